"""The benchmark scripts run (smoke runs at tiny sizes) and leave the recorded figures alone."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, args", [
    ("bench_kdloss.py", ["--quick", "--repeats", "1", "--no-write"]),
    ("bench_diffusion_losses.py", ["--quick", "--repeats", "1", "--quiet-load", "1000"]),
    ("bench_solvers.py", ["--quick", "--repeats", "1", "--solvers", "ddim,dpmpp_2m", "--sections", "steps"]),
    ("bench_solvers.py", ["--quick", "--repeats", "1", "--sections", "unet"]),
])
def test_benchmark_smoke_run(script, args):
    if script == "bench_solvers.py":
        pytest.importorskip("diffusers")
    results = {p: p.read_bytes() for p in (BENCH / "results").glob("*.json")}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kdfast" in done.stdout or "ms" in done.stdout
    assert {p: p.read_bytes() for p in (BENCH / "results").glob("*.json")} == results


def test_ncu_report_parsing(monkeypatch):
    """ncu_solver_bytes reads Nsight Compute's raw CSV (a GPU-only script; its parsing is not)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import ncu_solver_bytes as N
    header = '"ID","Process ID","Kernel Name",' + ",".join(f'"{m}"' for m in N.METRICS)
    units = '"","","",' + ",".join('"sector"' if "sectors" in m else '"byte"' for m in N.METRICS)
    launches = [f'"{i}","7","void kdfast::solver_step_kernel(Params)","4,096","2,048","131,072","65,536"'
                for i in range(N.STEPS * len(N.SOLVERS))]
    text = "\n".join(["==PROF== Connected to process 7", header, units, *launches, "==PROF== Disconnected"])
    rows = N.parse_ncu_csv(text)
    assert len(rows) == N.STEPS * len(N.SOLVERS)
    assert rows[0]["lts__t_sectors_srcunit_tex_op_read.sum"] == 4096
    summary = N.summarise(rows, itemsize=4)
    assert [r["op"] for r in summary] == [f"scheduler_step:{name}" for name in N.SOLVERS]
    ddim = summary[0]
    assert ddim["l2_bytes"] == 32 * (4096 + 2048) and ddim["dram_bytes"] == 131072 + 65536
    assert ddim["lower_bound_bytes"] == 3 * 2 * 4 * 128 * 128 * 4  # x, model output read; sample written
    with pytest.raises(SystemExit, match="launches"):
        N.summarise(rows[:-1], itemsize=4)


def _bench_module(monkeypatch, name):
    monkeypatch.syspath_prepend(str(BENCH))
    import importlib

    return importlib.import_module(name)


@pytest.mark.parametrize("script, args, message", [
    ("bench_solvers", ["--quick", "--sections", "steps", "--solvers", "foo"],
     "--solvers: unknown solver(s) foo; expected some of dpmpp_2m,"),
    ("bench_solvers", ["--solvers", ","], "--solvers: no solver given"),
    ("bench_solvers", ["--repeats", "-1"], "argument --repeats: must be an integer >= 1, got -1"),
    ("bench_solvers", ["--device", "foo"], "--device: expected cpu or cuda (or cuda:N), got 'foo'"),
    ("bench_solvers", ["--sections", "x"], "--sections takes steps, unet and/or kdiff"),
    ("bench_kdloss", ["--quick", "--no-write", "--cases", "foo"], "--cases: unknown case(s) foo; expected some of"),
    ("bench_kdloss", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
])
def test_benchmark_argument_errors(monkeypatch, capsys, script, args, message):
    module = _bench_module(monkeypatch, script)
    with pytest.raises(SystemExit) as exc:
        module.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["bench_solvers", "bench_kdloss"])
def test_benchmark_cuda_without_a_gpu_is_an_argument_error(monkeypatch, capsys, script):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = _bench_module(monkeypatch, script)
    with pytest.raises(SystemExit) as exc:
        module.main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda: no CUDA GPU here" in capsys.readouterr().err
