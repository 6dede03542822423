import json
import os
import shutil

import pytest

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
    assert "kdfast demo" in (out / "report.md").read_text()


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
