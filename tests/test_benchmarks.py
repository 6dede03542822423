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
