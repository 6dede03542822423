import json
import os
import shutil

import pytest

pytest.importorskip("sklearn")

import kdfast.assets_build as assets_build  # noqa: E402
from kdfast.assets_build import compare_with_shipped  # noqa: E402
from kdfast.cli import main  # noqa: E402


def test_assets_build_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "assets"
    umask = os.umask(0o022)
    try:
        assert main(["assets", "build", "--quick", "--out", str(out), "--no-progress"]) == 0
    finally:
        os.umask(umask)
    text = capsys.readouterr().out
    assert "classifier: held-out accuracy" in text and "teacher: guidance 1.0, 5 steps" in text
    for name in ("digits_classifier", "digits_teacher"):
        assert (out / f"{name}.safetensors").stat().st_size > 1000
        meta = json.loads((out / f"{name}.json").read_text())
        assert "metrics" in meta
        for suffix in (".safetensors", ".json"):  # new files: 0666 & ~umask, not safetensors' 0600
            assert (out / f"{name}{suffix}").stat().st_mode & 0o777 == 0o644, name + suffix
    # the rebuilt models load and work with the rest of kdfast
    from kdfast.eval import DigitsEvaluator
    from kdfast.train.teacher import load_teacher

    images, labels = load_teacher(out / "digits_teacher.safetensors").sample(1, steps=2)
    assert DigitsEvaluator(path=out / "digits_classifier.safetensors").evaluate(images, labels)["frechet"] >= 0


def test_comparison_flags_differences_outside_tolerance():
    shipped_like = {"heldout_accuracy": 0.9972}
    teacher_like = {"results": [{"guidance_scale": 1.0, "steps": 50, "frechet": 3.07, "class_accuracy": 0.984}]}
    report = compare_with_shipped(shipped_like, teacher_like)
    assert all(row["ok"] for row in report.values()), report
    worse = compare_with_shipped({"heldout_accuracy": 0.90},
                                 {"results": [{"guidance_scale": 1.0, "steps": 50, "frechet": 9.0,
                                               "class_accuracy": 0.7}]})
    assert not any(row["ok"] for row in worse.values()), worse


def test_unwritable_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(assets_build, "_build", lambda *a, **k: pytest.fail("trained before checking the outputs"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["assets", "build", "--quick", "--out", str(blocker / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdfast assets build: error: classifier weights file ")
    assert "cannot be written" in err[0]


@pytest.mark.parametrize("name", ["digits_classifier.safetensors", "digits_classifier.json",
                                  "digits_teacher.safetensors", "digits_teacher.json"])
def test_each_output_file_is_checked_before_training(tmp_path, capsys, monkeypatch, name):
    # the JSON beside each weights file too: found now, not as a traceback after the training
    monkeypatch.setattr(assets_build, "_build", lambda *a, **k: pytest.fail("trained before checking the outputs"))
    out = tmp_path / "assets"
    (out / name).mkdir(parents=True)  # the file's path is taken by a folder
    assert main(["assets", "build", "--quick", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdfast assets build: error: ")
    assert f"{name}' is not writable: it is an existing folder" in err[0]


def test_a_rebuild_in_place_is_compared_with_the_files_it_replaces(tmp_path, monkeypatch):
    # ``--out`` = the package's own assets folder: here a copy of it, standing in for it
    package_assets = tmp_path / "package" / "assets"
    package_assets.mkdir(parents=True)
    for name in assets_build.ASSETS:
        for suffix in (".json", ".safetensors"):
            shutil.copy(assets_build.SHIPPED_DIR / f"{name}{suffix}", package_assets)
    shipped = {name: json.loads((package_assets / f"{name}.json").read_text()) for name in assets_build.ASSETS}
    monkeypatch.setattr(assets_build, "SHIPPED_DIR", package_assets)
    # the quick budget, but measuring the row the comparison reads, and not quick=True (no comparison)
    monkeypatch.setattr(assets_build, "FULL", dict(assets_build.QUICK, steps=(50,)))
    import kdfast.train.teacher as teacher_mod

    measured = []
    real_measure = teacher_mod.measure_samples

    def measure(*args, **kwargs):
        measured.append(kwargs["progress"])
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(teacher_mod, "measure_samples", measure)
    result = assets_build.build_assets(out=str(package_assets), progress=True)
    assert measured == [True]  # the measuring phase shows progress too (a bar, on a terminal)
    rebuilt = {name: json.loads((package_assets / f"{name}.json").read_text()) for name in assets_build.ASSETS}
    assert rebuilt != shipped  # the files were replaced ...
    row = result["comparison"]["classifier held-out accuracy"]  # ... and compared with the ones they replaced
    assert row["shipped"] == shipped["digits_classifier"]["metrics"]["heldout_accuracy"]
    assert row["rebuilt"] == rebuilt["digits_classifier"]["metrics"]["heldout_accuracy"] != row["shipped"]
    old = [r for r in shipped["digits_teacher"]["metrics"]["results"] if (r["guidance_scale"], r["steps"]) == (1.0, 50)]
    assert result["comparison"]["teacher 50-step Frechet (guidance 1)"]["shipped"] == old[0]["frechet"]


def test_a_build_that_stops_midway_leaves_the_previous_set_whole(tmp_path, monkeypatch):
    # (the new classifier was renamed into place before the teacher was trained: an interruption
    # left it beside the old teacher, whose metrics were measured with the old classifier)
    out = tmp_path / "assets"
    out.mkdir()
    for name in assets_build.ASSETS:
        for suffix in (".json", ".safetensors"):
            shutil.copy(assets_build.SHIPPED_DIR / f"{name}{suffix}", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import kdfast.train.teacher as teacher_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(teacher_mod, "train_teacher", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets_build.build_assets(out=str(out), quick=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nor is a staging folder left


def test_build_restores_the_thread_count(tmp_path):
    import torch

    from kdfast.assets_build import build_assets

    before = torch.get_num_threads()
    build_assets(out=str(tmp_path / "a"), quick=True, threads=1, progress=False)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999999", "x"])
def test_bad_seed_is_a_usage_error(tmp_path, capsys, monkeypatch, seed):
    monkeypatch.setattr(assets_build, "_build", lambda *a, **k: pytest.fail("built despite a bad seed"))
    out = tmp_path / "assets"
    assert main(["assets", "build", "--quick", "--seed", seed, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdfast assets build: error: argument --seed: ")
    assert "[0, 2**63 - 1]" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_bad_thread_count_is_an_error_before_anything_is_written(tmp_path, capsys, threads):
    out = tmp_path / "assets"
    assert main(["assets", "build", "--quick", "--threads", threads, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdfast assets build: error: threads must be an integer >= 1 (or None for torch's choice), " \
                  f"got {threads}"
    assert not out.exists()
