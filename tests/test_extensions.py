import pytest

import kdfast


def test_cpu_extension_is_built_and_describes_itself():
    module, reason = kdfast._ext.cpu()
    assert module is not None, reason
    assert module.NUM_COEFS == 29 and module.NUM_INPUTS == 8
    assert "compiler" in module.build_info()


def test_cuda_extension_imports_without_a_gpu():
    module, reason = kdfast._ext.cuda()
    if module is None:
        pytest.skip(f"CUDA extension not built here: {reason}")
    # Static CUDA runtime: importing and querying works with no driver; 0 devices then.
    assert module.device_count() >= 0
    assert module.runtime_version() >= 12000
    # With no device usable, the runtime's error is named (the cuda backend's reason quotes it).
    assert (module.device_error() == "") == (module.device_count() > 0)
    if module.device_count() == 0:
        assert module.device_error().startswith("cudaError")
    assert module.NUM_COEFS == 29


def test_build_records_what_it_built(unemulated_backends):
    # CMake writes _build_info.json; `kdfast info` says why the CUDA extension is absent from it.
    info = kdfast._ext.build_info()
    assert info.get("cuda_requested") in ("AUTO", "ON", "OFF")
    module, reason = kdfast._ext.cuda()
    if module is None:
        assert reason == f"kdfast._C_cuda {info['cuda']}" and info["cuda"].startswith("not built")
    else:
        assert info["cuda"].startswith("built for archs")


def test_source_tree_without_extensions_is_recognised(tmp_path, monkeypatch):
    (tmp_path / "CMakeLists.txt").write_text("")
    (tmp_path / "kdfast").mkdir()
    monkeypatch.setattr(kdfast._ext, "_package_dir", lambda: str(tmp_path / "kdfast"))
    monkeypatch.setattr(kdfast._ext.importlib.util, "find_spec", lambda name: None)
    assert kdfast._ext.is_unbuilt_source_tree()
    (tmp_path / "CMakeLists.txt").unlink()
    assert not kdfast._ext.is_unbuilt_source_tree()


def test_cuda_backend_refuses_gpus_below_the_built_archs():
    # CMake's "80;89;90" carries machine code and PTX for each: sm_86 runs the sm_80 code,
    # a T4 (sm_75) runs nothing and must fall back with a reason, not fail every launch.
    from kdfast.backends import cuda_arch_reason

    assert cuda_arch_reason("80,89,90", (9, 0)) is None
    assert cuda_arch_reason("80,89,90", (8, 6)) is None
    assert cuda_arch_reason("80,89,90", (12, 0)) is None
    reason = cuda_arch_reason("80,89,90", (7, 5))
    assert "sm_75" in reason and "KDFAST_CUDA_ARCHS=75" in reason
    assert cuda_arch_reason("90", (8, 0)) is not None
    # arch-specific, family, real-only and virtual-only entries, and names of no arch (an
    # int() of "90a" raised, failing every op on a CUDA tensor and `kdfast info`)
    assert cuda_arch_reason("90a", (9, 0)) is None and cuda_arch_reason("90a", (10, 0)) is not None
    assert cuda_arch_reason("100f", (10, 3)) is None and cuda_arch_reason("100f", (12, 0)) is not None
    assert cuda_arch_reason("80-real", (8, 6)) is None and cuda_arch_reason("80-real", (9, 0)) is not None
    assert cuda_arch_reason("80-virtual", (9, 0)) is None and cuda_arch_reason("90a;80", (8, 9)) is None
    assert cuda_arch_reason("native", (7, 5)) is None and cuda_arch_reason("all-major", (7, 5)) is None


def test_cuda_backend_steps_aside_when_its_runtime_cannot_use_the_gpus(monkeypatch):
    # torch (built for an older CUDA) sees the GPU, but the driver is older than the CUDA runtime
    # linked into kdfast._C_cuda: every launch would fail, so the cuda backend must give way,
    # with the runtime's error in its reason, and triton serve.
    import torch

    from kdfast import backends

    class Module:
        @staticmethod
        def device_error():
            return "cudaErrorInsufficientDriver (CUDA driver version is insufficient for CUDA runtime version)"

        @staticmethod
        def build_info():
            return {"archs": "80,89,90"}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kdfast._ext, "cuda", lambda: (Module, None))
    monkeypatch.setattr(kdfast._ext, "triton", lambda: (object(), None))
    monkeypatch.setattr(backends, "_FORCED", None)
    reason = backends.backend_reason("cuda", "cuda")
    assert "cudaErrorInsufficientDriver" in reason and "driver" in reason
    op = backends.Op("test_runtime_reason")
    op.register("cuda")(lambda: None)
    op.register("triton")(lambda: None)
    assert op.select("cuda").backend == "triton"
    assert backends.cuda_runtime_reason("") is None


def test_cuda_backend_checks_the_lowest_gpu(monkeypatch):
    import torch

    from kdfast import backends

    capabilities = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capabilities[0 if i is None else i])
    assert backends._lowest_capability() == (7, 5)


def test_triton_older_than_the_kernels_need_is_refused_with_a_reason(monkeypatch):
    # Triton 3.0-3.2 (torch 2.4-2.6) reject the solver step's tuple argument with an
    # AttributeError at launch: the backend must step aside with a reason instead.
    import importlib
    import importlib.util
    import sys
    import types

    from kdfast import _ext

    assert _ext.version_tuple("3.3.1") == (3, 3) and _ext.version_tuple("3.10.0+git1a2b") == (3, 10)
    assert _ext.version_tuple("4") == (4,) >= _ext.TRITON_MIN_VERSION
    for version, usable in (("3.0.0", False), ("3.2.0", False), ("3.3.0", True)):
        monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=version))
        monkeypatch.setattr(_ext, "_load", lambda name: (object(), None))  # the kernels themselves: not imported
        _ext.triton.cache_clear()
        try:
            module, reason = _ext.triton()
            if usable:
                assert module is not None and reason is None
            else:
                assert module is None and f"triton {version} is older than the 3.3" in reason
                assert "triton>=3.3" in reason
        finally:
            monkeypatch.undo()
            _ext.forget()  # the next call imports the real triton and kernels again
    real, reason = _ext.triton()  # the installed triton again: refused only if it is old itself
    installed = importlib.util.find_spec("triton") and importlib.import_module("triton").__version__
    old = bool(installed) and _ext.version_tuple(installed) < _ext.TRITON_MIN_VERSION
    assert (real is None) == (reason is not None)
    assert ("older than" in (reason or "")) == old


def test_op_modules_keep_their_annotations_as_types():
    # torch 2.4's custom_op reads an op's signature annotations as types and refuses strings:
    # with postponed annotations (`from __future__ import annotations`) in a module that
    # defines custom ops, kdfast no longer imports on torch 2.4 (pyproject: torch>=2.4).
    import __future__
    import importlib

    for name in ("kdfast.ops.solver_step", "kdfast.ops.kd_divergence", "kdfast.ops.diffusion_losses"):
        module = importlib.import_module(name)
        assert getattr(module, "annotations", None) is not __future__.annotations, name


def test_import_leaves_the_compiler_stack_unloaded():
    # torch._dynamo (and the triton and sympy it pulls in) takes about 2 s to import: kdfast
    # loads it only once something is compiled, not at `import kdfast` (nor for `kdfast info`)
    import subprocess
    import sys

    code = ("import sys, torch; before = set(sys.modules); import kdfast; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'triton', 'sympy') "
            "if m in sys.modules and m not in before))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_gpu_script_runs_every_gpu_test():
    """.ci/gpu names the test paths it runs on a lent GPU (one call, no time to run the whole
    suite): every file holding a gpu test must be under one of them, or it never runs."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (root / ".ci" / "gpu").read_text()
    paths = set(re.findall(r"\btests/[\w/.]+", script))
    assert paths
    gpu_files = [p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")
                 if re.search(r"^@pytest\.mark\.gpu", p.read_text(), re.M)]
    assert gpu_files
    missing = [f for f in gpu_files if not any(f == p or f.startswith(p.rstrip("/") + "/") for p in paths)]
    assert missing == [], f"gpu tests .ci/gpu does not run: {missing}"


def test_gpu_script_refuses_an_unknown_stage(tmp_path):
    """A misspelt stage matched nothing: the one device call ran the other stages and ended
    green. It is refused before the build (which would cost minutes of the call)."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / ".ci" / "gpu"
    done = subprocess.run(["bash", str(script), "kdloss, bytes,loss"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unknown stage 'loss'" in done.stderr
    assert not (tmp_path / "gpu.log").exists()  # nothing ran


_BASELINE_CHECK = r"""
import sys
import torch
import kdfast
from kdfast import losses, ops
from kdfast.schedulers import DPMSolverMultistepScheduler

torch.manual_seed(0)
out = {"cpu_target": kdfast._ext.cpu()[0].build_info()["cpu_target"]}
x = torch.randn(3, 64, 9, 7)
w, b, s = torch.randn(64), torch.randn(64), torch.randn(3, 64)
out["gn"] = ops.group_norm_act(x, 8, w, b, shift=s)
out["gn_small"] = ops.group_norm_act(torch.randn(5, 128, 2, 2), 32)
out["gn_cl"] = ops.group_norm_act(x.contiguous(memory_format=torch.channels_last), 8, w, b, shift=s)
out["gn_bf16"] = ops.group_norm_act(x.bfloat16(), 8, w, b, shift=s)
student, teacher = torch.randn(37, 1000, requires_grad=True), torch.randn(37, 1000)
loss = losses.kd_loss(student, teacher, kind="jsd")
loss.backward()
out["kd"], out["kd_grad"] = loss.detach(), student.grad
for dtype in (torch.float16, torch.bfloat16):  # 16-bit rows widened in blocks, 1031 = 128 * 8 + 7 wide
    s16, t16 = (torch.randn(5, 1031) * 3).to(dtype), (torch.randn(5, 1031) * 3).to(dtype)
    out[f"kd_{dtype}"] = ops.kd_divergence_with_grad(s16, t16, kind="jsd", beta=0.3, temperature=1.7,
                                                     grad_dtype=torch.float32)
out["huber"] = losses.pseudo_huber_loss(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000)
scheduler.set_timesteps(8)
sample = torch.randn(2, 4, 16, 16)
for t in scheduler.timesteps:
    sample = scheduler.step(torch.tanh(sample) * 0.5, t, sample).prev_sample
out["dpm"] = sample
wide = torch.randn(3, 50, 160).bfloat16()
out["grid_bf16"] = ops.grid_combination(torch.randn(3, 50, 16), (wide, wide.half()), torch.randn(21))
# fp16 blocks: F16C in the AVX2 build, software conversions in the baseline one
every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(4, -1)
widen = torch.tensor(ops.coefficients(0.0, 0.0, {"x": 1.0}, {"x": 1.0}), dtype=torch.float32)
out["f16_widen"] = ops.solver_step(every, torch.zeros_like(every), widen, history=[], write_history=True,
                                   history_dtype=torch.float32)[1]
wide = torch.randn(1, 50000) * torch.logspace(-10, 5.5, 50000)
narrow = torch.tensor(ops.coefficients(0.0, 0.0, {"model": 1.0}), dtype=torch.float32)
out["f16_narrow"] = ops.solver_step(torch.zeros(1, 50000, dtype=torch.float16), wide, narrow)[0]
# bf16 blocks: AVX2 in the AVX2 build, scalar loops in the baseline one (every pattern widened;
# random float32 patterns, NaNs and rounding ties among them, narrowed)
every = every.view(torch.int16).view(torch.bfloat16)
out["bf16_widen"] = ops.solver_step(every, torch.zeros_like(every), widen, history=[], write_history=True,
                                    history_dtype=torch.float32)[1]
bits = torch.randint(-2**31, 2**31, (1, 65536), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
bits[0, ::7] = (bits[0, ::7] & ~0xffff) | 0x8000  # ties
floats = bits.to(torch.int32).view(torch.float32)
out["bf16_narrow"] = ops.solver_step(torch.zeros(1, 65536, dtype=torch.bfloat16), floats, narrow)[0]
torch.save(out, sys.argv[1])
"""


def test_both_cpu_builds_compute_the_same(tmp_path):
    """The hot loops are compiled for AVX2 + FMA and for baseline x86-64 (kd_cpu.h) and picked
    at load time; KDFAST_CPU_BASELINE=1 forces the baseline. Both give the same results, to
    rounding (FMA contracts products and sums), and the same fp16 conversions exactly."""
    import os
    import subprocess
    import sys

    import torch

    results = {}
    for value in ("1", "0"):
        path = tmp_path / f"baseline{value}.pt"
        # (run outside the source tree, whose kdfast/ has no built extension, so the installed one is imported)
        done = subprocess.run([sys.executable, "-c", _BASELINE_CHECK, str(path)], capture_output=True, text=True,
                              env={**os.environ, "KDFAST_CPU_BASELINE": value}, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[value] = torch.load(path)
    forced, chosen = results["1"], results["0"]
    assert forced.pop("cpu_target") == "baseline"
    assert chosen.pop("cpu_target") == kdfast._ext.cpu()[0].build_info()["cpu_target"]
    assert forced.keys() == chosen.keys()
    for key in forced:
        if key.startswith(("f16", "bf16")):  # conversions: the same bits, NaN payloads included
            assert torch.equal(forced[key].view(torch.uint8), chosen[key].view(torch.uint8)), key
        else:
            torch.testing.assert_close(forced[key], chosen[key], rtol=2e-5, atol=2e-5, equal_nan=True, msg=key)
