import json
import os
import shutil

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")

import kdfast.train.teacher as teacher_module  # noqa: E402
from kdfast.cli import main  # noqa: E402
from kdfast.demo import DemoError, run_demo  # noqa: E402


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "dpmpp_2m" in table and "ddim" in table
    data = json.loads((out / "metrics.json").read_text())
    rows = data["rows"]
    assert len(rows) == 4  # 2 solvers x 2 step counts
    for row in rows:
        for key in ("solver", "steps", "frechet", "accuracy", "ms_per_image", "anchor_ms_per_image",
                    "solver_ms_per_image", "anchor_solver_ms_per_image"):
            assert row[key] is not None, key
        # the solver's share is measured inside the loop, so it is part of the whole
        assert 0 < row["solver_ms_per_image"] < row["ms_per_image"]
        assert 0 < row["anchor_solver_ms_per_image"] < row["anchor_ms_per_image"]
        # the fused kdfast loop and the diffusers loop give the same samples
        assert row["max_abs_diff"] < 1e-4
        assert abs(row["frechet"] - row["anchor_frechet"]) < 1e-3 * max(1.0, row["frechet"])
        assert row["accuracy"] >= 0.8
        assert (out / "grids" / f"{row['solver']}_{row['steps']}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "kdfast demo" in report
    floor = data["settings"]["frechet_floor"]  # 2 per class: random real sets of 20, not one fixed set
    assert floor["draws"] == 20 and floor["min"] < floor["mean"] < floor["max"]
    assert f"{floor['mean']:.2f} for 20 real training images (mean of 20 random" in report


def test_floor_at_sizes_real_data_cannot_fill():
    from kdfast.demo import _floor_sentence, _real_floor
    from kdfast.eval import DigitsEvaluator

    assert _real_floor(DigitsEvaluator(), 200) is None  # the smallest training class holds 139 digits
    assert "no real-vs-real value at this sample size" in _floor_sentence(None, 2000)


def test_cuda_graph_needs_a_gpu(tmp_path):
    with pytest.raises(DemoError, match="cuda_graph needs a CUDA device"):
        run_demo(out=str(tmp_path), device="cpu", cuda_graph=True, progress=False)


@pytest.mark.gpu
def test_gpu_quick_demo_with_cuda_graph(tmp_path):
    rows = run_demo(out=str(tmp_path / "demo"), solvers=["dpmpp_2m", "ddim"], steps=[5], n_per_class=2,
                    device="cuda", cuda_graph=True, progress=False)
    for row in rows:
        assert row["solver_ms_per_image"] is None
        assert abs(row["frechet"] - row["anchor_frechet"]) < 1e-2 * max(1.0, row["frechet"])


def test_bad_solver_and_steps_are_named(tmp_path):
    with pytest.raises(DemoError, match="unknown solver"):
        run_demo(out=str(tmp_path), solvers=["dpm_fast"], progress=False)
    with pytest.raises(DemoError, match="steps must be integers >= 1"):
        run_demo(out=str(tmp_path), steps=[0], progress=False)
    assert main(["demo", "--solvers", "nope", "--out", str(tmp_path)]) == 2


def test_too_many_steps_are_refused_before_earlier_outputs_are_removed(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "grids").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    assert main(["demo", "--solvers", "dpmpp_2m,ddim", "--steps", "5,1001", "--n-per-class", "2", "--no-anchor",
                 "--no-progress", "--out", str(out)]) == 2
    assert "steps must be <= 1000" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "{}" and not any((out / "grids").iterdir())


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=[2.7]), "steps must be integers >= 1, got [2.7]"),
    (dict(steps=[True]), "steps must be integers >= 1, got [True]"),
    (dict(n_per_class=2.5), "n_per_class must be an integer in [2, 10000]"),
    (dict(n_per_class=10**9), "n_per_class must be an integer in [2, 10000]"),  # (it failed allocating 80 GB)
    (dict(guidance_scale="x"), "guidance_scale must be a finite number, got 'x'"),
    (dict(guidance_scale="3"), "guidance_scale must be a finite number, got '3'"),
    (dict(guidance_scale=True), "guidance_scale must be a finite number, got True"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
    # (a string was split into letters, an int failed in list(), a string switch was true)
    (dict(solvers="ddim"), "solvers must be a list, got 'ddim'"),
    (dict(steps=5), "steps must be a list, got 5"),
    (dict(solvers=[["ddim"]]), "solvers must be names of solvers, got [['ddim']]"),
    (dict(cuda_graph="False"), "cuda_graph must be True or False, got 'False'"),
    (dict(anchor="False"), "anchor must be True or False, got 'False'"),
    (dict(progress=1), "progress must be True or False, got 1"),
])
def test_python_api_refuses_what_the_cli_cannot_pass(tmp_path, kwargs, message):
    # (the CLI's argument types keep these out; run_demo must not truncate or fail late)
    out = tmp_path / "out"
    with pytest.raises(DemoError) as exc:
        run_demo(out=str(out), **{"solvers": ["ddim"], "steps": [2], "n_per_class": 2, "anchor": False,
                                  "progress": False, **kwargs})
    assert message in str(exc.value)
    assert not out.exists()


def test_integral_floats_are_accepted_as_counts(tmp_path):
    rows = run_demo(out=str(tmp_path / "out"), solvers=["ddim"], steps=[2.0], n_per_class=2.0, anchor=False,
                    device="cpu", progress=False)
    assert [(r["steps"], type(r["steps"])) for r in rows] == [(2, int)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the file-as-folder case below covers it")
def test_unwritable_output_folder_permissions(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(DemoError, match="not writable"):
        run_demo(out=str(locked / "out"), progress=False)


def test_output_path_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DemoError, match="not writable"):
        run_demo(out=str(blocker / "out"), progress=False)


def test_an_output_file_taken_by_a_folder_is_refused_before_sampling(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(teacher_module.Teacher, "sample",
                        lambda *a, **k: pytest.fail("sampled before checking outputs"))
    for name in ("grids/ddim_2.png", "report.md"):
        out = tmp_path / name.replace("/", "_")
        (out / name).mkdir(parents=True)
        assert main(["demo", "--solvers", "ddim", "--steps", "2", "--n-per-class", "2", "--no-anchor",
                     "--no-progress", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"kdfast demo: error: output file {str(out / name)!r} is not writable: it is an existing folder"


def test_corrupt_teacher_asset_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "digits_teacher.safetensors"
    shutil.copy(teacher_module.SHIPPED_PATH, bad)
    shutil.copy(teacher_module.metadata_path(teacher_module.SHIPPED_PATH), teacher_module.metadata_path(bad))
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(teacher_module, "SHIPPED_PATH", bad)
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "kdfast demo: error" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--n-per-class", "0"], "n_per_class must be an integer in [2, 10000]"),
    # DDIM refuses more steps than the teacher's 1000 training timesteps; the others would repeat timesteps
    (["--steps", "5,1001"], "steps must be <= 1000 (the teacher's training timesteps), got [1001]"),
    (["--steps", ","], "steps must be integers >= 1, got []"),
    (["--solvers", ""], "solvers must name at least one solver"),
    (["--solvers", ","], "solvers must name at least one solver"),
    (["--seed", str(2**64 - 1)], "seed must be an integer in [0, 2**63 - 1]"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**63 - 1]"),
    (["--device", "foo"], "device must be cpu or cuda"),
    (["--device", "gpu"], "device must be cpu or cuda"),
    (["--device", "mps"], "device must be cpu or cuda"),
    # a repeated value would run the same configuration twice and write duplicate rows
    (["--solvers", "ddim,euler,ddim"], "solvers must not repeat a value, got ddim more than once"),
    (["--steps", "2,3,2,3"], "steps must not repeat a value, got 2, 3 more than once"),
])
def test_cli_refuses_explicit_bad_values_before_creating_the_folder(tmp_path, capsys, args, message):
    # --quick must not replace an explicit empty or zero value with its own default
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdfast demo: error: ") and message in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(out)]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(DemoError, match="no CUDA GPU"):
        run_demo(out=str(out), device="cuda:0", progress=False)
    assert not out.exists()


def test_heun_is_flagged_and_stale_outputs_are_removed(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "grids").mkdir(parents=True)
    for name in ("ddim_7.png", "euler_a_50.png", "mine.png", "notes.txt"):
        (out / "grids" / name).write_bytes(b"old")
    (out / "metrics.json").write_text("{}")
    # heun at 1 step is an Euler step: cheap, and the note is attached all the same
    assert main(["demo", "--solvers", "heun", "--steps", "1", "--n-per-class", "2", "--no-anchor",
                 "--device", "cpu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    # progress is on, but stderr is not a terminal: no bar, no carriage-return noise in logs
    assert "\r" not in captured.err and "kdfast demo:" not in captured.err.replace("kdfast demo: warning", "")
    warning = [line for line in captured.err.splitlines() if line.startswith("kdfast demo: warning: heun")]
    assert len(warning) == 1 and "noise" in warning[0] and "diffusers" in warning[0]
    assert "note: heun gives noise" in captured.out
    data = json.loads((out / "metrics.json").read_text())
    assert data["rows"][0]["note"] and "heun" in data["settings"]["notes"]
    assert "Note on heun" in (out / "report.md").read_text()
    # the demo's own grids of an earlier run go; files it does not write stay
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["heun_1.png", "mine.png", "notes.txt"]

    with pytest.warns(UserWarning, match="heun gives noise"):
        run_demo(out=str(out), solvers=["heun"], steps=[1], n_per_class=2, anchor=False, device="cpu",
                 progress=False)
    assert [r["note"] for r in json.loads((out / "metrics.json").read_text())["rows"]] == \
        [data["rows"][0]["note"]]


def test_solvers_help_warns_about_heun(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "heun gives noise" in " ".join(capsys.readouterr().out.split())


def test_a_loop_that_diverges_is_reported_not_fatal(tmp_path, monkeypatch, capsys):
    # diffusers' Euler-ancestral gives NaN at 3 steps on this teacher (a float32 sqrt of a negative
    # round-off); any NaN sample set is stood in for here by one poisoned image, whatever diffusers does
    import kdfast.demo as demo

    real = demo._anchor_sample

    def poisoned(*args, **kwargs):
        images, labels = real(*args, **kwargs)
        return images.index_fill(0, torch.tensor([0]), float("nan")), labels

    monkeypatch.setattr(demo, "_anchor_sample", poisoned)
    out = tmp_path / "demo"
    assert main(["demo", "--solvers", "ddim", "--steps", "2", "--n-per-class", "2", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "note: ddim at 2 steps: 1 diffusers images hold NaN or inf (not scored)" in table
    (row,) = json.loads((out / "metrics.json").read_text())["rows"]
    assert row["anchor_frechet"] is None and row["anchor_accuracy"] is None and row["max_abs_diff"] is None
    assert row["anchor_non_finite_images"] == 1 and row["non_finite_images"] == 0
    assert row["frechet"] is not None and row["accuracy"] >= 0.5
    assert "**Not finite:** ddim at 2 steps" in (out / "report.md").read_text()
    # its timings are not compared: there is no row left to give an overall speed-up
    assert "less time per image" not in table


def test_a_run_that_fails_leaves_the_earlier_outputs(tmp_path, monkeypatch):
    import kdfast.demo as demo

    out = tmp_path / "demo"
    (out / "grids").mkdir(parents=True)
    (out / "grids" / "ddim_7.png").write_bytes(b"old")
    (out / "metrics.json").write_text("{}")

    def broken(*args, **kwargs):
        raise RuntimeError("the evaluator broke")

    monkeypatch.setattr(demo, "_scores", broken)
    with pytest.raises(RuntimeError, match="the evaluator broke"):
        run_demo(out=str(out), solvers=["ddim"], steps=[1], n_per_class=2, anchor=False, device="cpu",
                 progress=False)
    assert (out / "grids" / "ddim_7.png").read_bytes() == b"old" and (out / "metrics.json").read_text() == "{}"
    monkeypatch.undo()

    # ... nor while the new files are being written (they are renamed into place together)
    calls = []

    def interrupted_second_grid(images, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save_grid(images, path, **kwargs)

    real_save_grid = teacher_module.save_grid
    monkeypatch.setattr(teacher_module, "save_grid", interrupted_second_grid)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out=str(out), solvers=["ddim"], steps=[1, 2], n_per_class=2, anchor=False, device="cpu",
                 progress=False)
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["ddim_7.png"]
    assert (out / "metrics.json").read_text() == "{}" and not (out / "report.md").exists()


def test_the_overall_speed_sentence_says_when_kdfast_was_slower():
    from kdfast.demo import format_table

    row = dict(solver="ddim", steps=2, model_evals=4, frechet=1.0, accuracy=1.0, solver_ms_per_image=0.1,
               anchor_frechet=1.0, anchor_solver_ms_per_image=0.1, max_abs_diff=0.0)
    faster = format_table([dict(row, ms_per_image=1.0, anchor_ms_per_image=1.25)])
    slower = format_table([dict(row, ms_per_image=1.25, anchor_ms_per_image=1.0)])
    assert "all rows: 1.25x less time per image" in faster
    assert "all rows: 1.25x more time per image" in slower and "less time" not in slower


def test_the_diffusers_anchor_draws_a_stochastic_schedulers_noise_in_the_teachers_batches(monkeypatch):
    # Teacher.sample draws the per-step noise batch by batch; the anchor drew it for all images at
    # once, so past one batch (500 images) the two differed by the noise alone (0.85 at 510 images)
    from kdfast.demo import _anchor_sample

    monkeypatch.setattr(teacher_module, "SAMPLE_BATCH", 4)
    teacher = teacher_module.load_teacher()
    images, labels = teacher.sample(1, 2, 1.2, scheduler="euler_ancestral", seed=0, batch_size=4)
    anchor, anchor_labels = _anchor_sample(teacher, "euler_ancestral", 1, 2, 1.2, 0)
    assert torch.equal(labels, anchor_labels)
    assert (images - anchor).abs().max() < 5e-3  # (float error only: 6e-4 here; the other noise gave 0.5)


def test_model_evaluations_count_heuns_second_order_steps():
    from kdfast.demo import _evals
    teacher = teacher_module.load_teacher()
    assert _evals(teacher, "heun", 5) == 9 and _evals(teacher, "ddim", 5) == 5
