import json

import pytest

pytest.importorskip("sklearn")

from kdfast.assets_build import compare_with_shipped  # noqa: E402
from kdfast.cli import main  # noqa: E402


def test_assets_build_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "assets"
    assert main(["assets", "build", "--quick", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "classifier: held-out accuracy" in text and "teacher: guidance 1.0, 5 steps" in text
    for name in ("digits_classifier", "digits_teacher"):
        assert (out / f"{name}.safetensors").stat().st_size > 1000
        meta = json.loads((out / f"{name}.json").read_text())
        assert "metrics" in meta
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


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["assets", "build", "--quick", "--out", str(blocker / "out"), "--no-progress"]) == 2
    assert "cannot be created" in capsys.readouterr().err


def test_build_restores_the_thread_count(tmp_path):
    import torch

    from kdfast.assets_build import build_assets

    before = torch.get_num_threads()
    build_assets(out=str(tmp_path / "a"), quick=True, threads=1, progress=False)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_bad_thread_count_is_an_error_before_anything_is_written(tmp_path, capsys, threads):
    out = tmp_path / "assets"
    assert main(["assets", "build", "--quick", "--threads", threads, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdfast assets build: error: threads must be an integer >= 1 (or None for torch's choice), " \
                  f"got {threads}"
    assert not out.exists()
