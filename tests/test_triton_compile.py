"""Every Triton kernel compiles for the GPUs kdfast targets (sm_90, sm_80), here on the CPU.

The interpreter that runs the Triton kernels in the other tests is more permissive than
Triton's compiler; this runs the compiler's whole pipeline, ptxas included, for each kernel
specialisation the ops produce (see tests/triton_compile_check.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).with_name("triton_compile_check.py")


def _compiler_available() -> str:
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # no triton, or a build without the NVIDIA backend
        return f"triton's NVIDIA backend is unavailable: {exc}"
    return ""


@pytest.mark.parametrize("arch", [90, 80])
def test_triton_kernels_compile_for_gpu(arch):
    reason = _compiler_available()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(CHECK), str(arch)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if "skipped" in report:
        pytest.skip(report["skipped"])
    assert set(report["launches"]) == {"_kd_divergence_kernel", "_kd_topk_kernel", "_solver_step_kernel",
                                       "_reduce_kernel", "_finish_kernel", "_grad_kernel", "_combination_kernel",
                                       "_group_norm_kernel", "_chunk_moments_kernel", "_chunk_normalize_kernel",
                                       "_grid_combination_kernel"}
