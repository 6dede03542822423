"""Compile every Triton kernel of kdfast for an NVIDIA GPU target, on a machine without a GPU.

The CPU test suite runs the Triton kernels through Triton's interpreter, which accepts
things the real compiler rejects (Python globals that are not ``tl.constexpr``, for one).
This script runs the kdfast ops with ``backend="triton"`` on CPU tensors while Triton's
active driver is a stand-in for an sm_XX GPU and every launch only compiles (``warmup``):
each kernel specialisation the ops produce goes through Triton's whole pipeline (TTIR, TTGIR,
LLVM IR, PTX, and ``ptxas`` to a cubin). Nothing runs, so the outputs are garbage and
unused.

    python tests/triton_compile_check.py [ARCH]     # ARCH: compute capability, default 90

Prints one JSON line: the compile-only launches per kernel and the seconds spent. Exits non-zero on
the first kernel that does not compile. Run by tests/test_triton_compile.py in a fresh process
(the kernels must be defined as compiled, not interpreted, functions).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)  # before triton defines any kernel

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402


class _TargetOnlyDriver:
    """Enough of a driver for Triton to compile for ``target``; launching is never asked of it."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


# Kernels that round every product before adding it (bit-identical to the CPU and CUDA ones):
# compiled without FMA contraction, which their PTX must show.
UNFUSED = {"_grid_combination_kernel"}
# Kernels whose fp32 divisions round as IEEE (tl.div_rn), as torch's and the CUDA kernels' do:
# compiled `/` is div.full.f32, within 2 ulp (a clamped x0 / s could miss +-1).
IEEE_DIVISION = {"_solver_step_kernel"}
LAUNCHES: Counter = Counter()  # compile-only launches per kernel (repeats hit the cache)
SECONDS: Counter = Counter()


def _compile_only(self, grid):
    def launch(*args, **kwargs):
        start = time.perf_counter()
        kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
        name = getattr(self, "__name__", str(self))
        if kernel is None or "cubin" not in kernel.asm:
            raise RuntimeError(f"{name}: no cubin produced")
        if name in UNFUSED and "fma.rn.f32" in kernel.asm.get("ptx", ""):
            raise RuntimeError(f"{name}: products fused into sums (fma.rn.f32 in its PTX)")
        if name in IEEE_DIVISION and any(op in kernel.asm.get("ptx", "") for op in ("div.full.f32", "div.approx")):
            raise RuntimeError(f"{name}: an approximate division in its PTX")
        LAUNCHES[name] += 1
        SECONDS[name] += time.perf_counter() - start
        return kernel
    return launch


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def kd_divergence_cases(ops):
    from kdfast.ops.kd_divergence import KINDS

    labels = torch.tensor([1, -100, 3, 4])
    for kind in KINDS:  # every kind, with labels and a bf16 gradient from fp32 logits
        ops.kd_divergence_with_grad(_randn(4, 1000), _randn(4, 1000), kind=kind, labels=labels,
                                    grad_dtype=torch.bfloat16, backend="triton")
    # 16-bit logits, forward only / gradient in their own dtype
    ops.kd_divergence(_randn(4, 5000, dtype=torch.bfloat16), _randn(4, 5000, dtype=torch.bfloat16), kind="jsd",
                      backend="triton")
    ops.kd_divergence_with_grad(_randn(4, 300, dtype=torch.float16), _randn(4, 300, dtype=torch.float16),
                                kind="reverse_kl", backend="triton")
    # Triton compiles an int argument equal to 1 as a constant: one row, and a vocabulary of one
    ops.kd_divergence_with_grad(_randn(1, 7), _randn(1, 7), kind="jsd", backend="triton")
    ops.kd_divergence_with_grad(_randn(3, 1), _randn(3, 1), kind="forward_kl", backend="triton")


def kd_topk_cases(ops):
    def stored(rows, vocab, k):
        return (torch.stack([torch.randperm(vocab)[:k] for _ in range(rows)]),
                torch.log_softmax(_randn(rows, vocab), -1)[:, :k].contiguous())

    labels = torch.tensor([1, -100, 3, 4])
    ids, lp = stored(4, 1000, 20)
    for remainder in ("bucket", "renormalize"):  # with labels, a gradient from fp32 logits
        s = _randn(4, 1000).requires_grad_(True)
        ops.kd_topk(s, ids, lp, labels=labels, remainder=remainder, temperature=2.0, loss_scale=4.0,
                    backend="triton").sum().backward()
    for dtype in (torch.bfloat16, torch.float16):  # 16-bit logits, forward only and with their gradient
        s = _randn(4, 5000, dtype=dtype)
        ids, lp = stored(4, 5000, 64)
        ops.kd_topk(s, ids, lp, backend="triton")
        ops.kd_topk(s.requires_grad_(True), ids, lp, backend="triton").sum().backward()
    # k equal to the vocabulary (no remainder), and more stored entries than one chunk of them
    ids, lp = stored(2, 3000, 3000)
    ops.kd_topk(_randn(2, 3000).requires_grad_(True), ids, lp, backend="triton").sum().backward()
    # Triton compiles an int argument equal to 1 as a constant: one row, k of 1, a vocabulary of one
    ids, lp = stored(1, 7, 1)
    ops.kd_topk(_randn(1, 7).requires_grad_(True), ids, lp, backend="triton").sum().backward()
    ids, lp = stored(3, 1, 1)
    ops.kd_topk(_randn(3, 1).requires_grad_(True), ids, lp, remainder="renormalize",
                backend="triton").sum().backward()

def solver_step_cases(ops):
    coefs = torch.tensor(ops.coefficients(0.5, -0.3, sample={"x": 0.9, "x0": 0.1, "h0": 0.05, "h1": -0.02,
                                                               "h2": 0.01, "aux": 0.03, "noise": 0.2},
                                          history={"x0": 1.0}, aux={"x": 1.0}), dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, m = _randn(2, 4, 8, 8, dtype=dtype), _randn(2, 4, 8, 8, dtype=dtype)
        ops.solver_step(x, m, coefs, backend="triton")  # plain (DDIM, Euler)
        ops.solver_step(x, m, coefs, cond=_randn(2, 4, 8, 8, dtype=dtype), guidance_scale=5.0,
                        history=[_randn(2, 4, 8, 8, dtype=dtype)] * 2, write_history=True,
                        backend="triton")  # guided multistep (DPM-Solver++ 2M)
    x, m = _randn(2, 4, 8, 8, dtype=torch.bfloat16), _randn(2, 4, 8, 8, dtype=torch.bfloat16)
    hist = [_randn(2, 4, 8, 8)] * 3
    ops.solver_step(x, m, coefs, history=hist, aux=_randn(2, 4, 8, 8, dtype=torch.bfloat16),
                    noise=_randn(2, 4, 8, 8, dtype=torch.bfloat16), write_history=True, write_aux=True,
                    history_dtype=torch.float32, backend="triton")  # UniPC / SDE: every input and output
    ops.solver_step(x, m, coefs, clip_value=1.0, backend="triton")
    ops.solver_step(x, m, coefs, dynamic_scale=torch.ones(2), backend="triton")
    # a row of coefficients per sample (loaded by the kernel), with guidance and a dynamic threshold
    rows = torch.stack([coefs, coefs * 0.5])
    ops.solver_step(x, m, rows, cond=_randn(2, 4, 8, 8, dtype=torch.bfloat16), guidance_scale=3.0, history=hist[:1],
                    write_history=True, dynamic_scale=torch.ones(2), backend="triton")
    # size-1 arguments compile as constants: one sample of one element
    ops.solver_step(_randn(1, 1), _randn(1, 1), coefs, history=[_randn(1, 1)], write_history=True,
                    dynamic_scale=torch.ones(1), backend="triton")


def diffusion_loss_cases(ops):
    for dtype in (torch.float32, torch.bfloat16):
        def leaf(*shape):
            return _randn(*shape, dtype=dtype).requires_grad_(True)

        x, y = leaf(3, 4, 16, 16), leaf(3, 4, 16, 16)
        for elementwise in (False, True):
            ops.pseudo_huber(x, y, c=0.03, weights=torch.rand(3), elementwise=elementwise,
                             backend="triton").sum().backward()
        ops.dmd(x, _randn(3, 4, 16, 16, dtype=dtype), _randn(3, 4, 16, 16, dtype=dtype),
                backend="triton").sum().backward()
        ops.dmd(x, _randn(3, 4, 16, 16, dtype=dtype), _randn(3, 4, 16, 16, dtype=dtype),
                x_t=_randn(3, 4, 16, 16, dtype=dtype), weights=torch.rand(3), backend="triton").sum().backward()
        a_t, s_t, a_s, s_s = torch.rand(3) + 0.1, torch.rand(3) + 0.1, torch.rand(3) + 0.1, torch.rand(3) + 0.1
        for prediction in ("epsilon", "v_prediction", "sample"):
            ops.progressive_mse(x, _randn(3, 4, 16, 16, dtype=dtype), _randn(3, 4, 16, 16, dtype=dtype),
                                a_t, s_t, a_s, s_s, prediction_type=prediction, backend="triton").sum().backward()
            with torch.no_grad():
                ops.pd_target(x, y, a_t, s_t, a_s, s_s, prediction_type=prediction, backend="triton")
                ops.per_sample_ddim_step(x, y, a_t, s_t, a_s, s_s, prediction_type=prediction, backend="triton")
    # size-1 arguments compile as constants: one element per sample, and one sample
    for shape in ((3, 1), (1, 5)):
        x, y = _randn(*shape).requires_grad_(True), _randn(*shape)
        w = torch.rand(shape[0])
        for elementwise in (False, True):
            ops.pseudo_huber(x, y, c=0.03, weights=w, elementwise=elementwise, backend="triton").sum().backward()
        ops.dmd(x, _randn(*shape), _randn(*shape), weights=w, backend="triton").sum().backward()
        ones = torch.ones(shape[0])
        ops.progressive_mse(x, _randn(*shape), _randn(*shape), ones * 0.8, ones * 0.6, ones * 0.9, ones * 0.4,
                            backend="triton").sum().backward()


def group_norm_cases(ops):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = _randn(2, 8, 5, 7, dtype=dtype)
        w, b, s = _randn(8, dtype=dtype), _randn(8, dtype=dtype), _randn(2, 8, dtype=dtype)
        for layout in (torch.contiguous_format, torch.channels_last):
            ops.group_norm_act(x.contiguous(memory_format=layout), 4, w, b, shift=s, backend="triton")
        ops.group_norm_act(x, 2, activation="identity", backend="triton")
    # size-1 arguments compile as constants: one sample, one position, one group
    ops.group_norm_act(_randn(1, 4, 1, 1), 1, _randn(4), backend="triton")
    # groups split across programs (too few (sample, group) pairs for the GPU): 2 chunks each
    for dtype in (torch.float32, torch.bfloat16):
        x = _randn(1, 4, 64, 64, dtype=dtype)
        for layout in (torch.contiguous_format, torch.channels_last):
            ops.group_norm_act(x.contiguous(memory_format=layout), 2, _randn(4, dtype=dtype), _randn(4, dtype=dtype),
                               shift=_randn(1, 4, dtype=dtype), backend="triton")
        ops.group_norm_act(x, 2, activation="identity", backend="triton")


def grid_combination_cases(ops):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = _randn(2, 9, 16, dtype=dtype)
        y0, y1 = _randn(2, 9, 160, dtype=dtype), _randn(2, 9, 160, dtype=dtype)
        ops.grid_combination(x, y0, _randn(11), backend="triton")
        ops.grid_combination(x, (y0, y1), _randn(21), backend="triton")
    # mixed dtypes (a bf16 model's outputs for an fp32 sample), one channel, a grid of one
    ops.grid_combination(_randn(3, 16), _randn(3, 64, dtype=torch.bfloat16), _randn(5), backend="triton")
    ops.grid_combination(_randn(3, 1), _randn(3, 1), _randn(2), backend="triton")
    # the most weights the kernels take: 128 kernel arguments besides the sample's
    ops.grid_combination(_randn(3, 4), (_randn(3, 256), _randn(3, 256)), _randn(129), backend="triton")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arch = int(argv[0]) if argv else 90
    from kdfast import _ext, ops

    kernels, why = _ext.triton()  # defines the kernels now, as compiled functions
    if kernels is None:
        print(json.dumps({"skipped": f"kdfast.kernels unavailable: {why}"}))
        return 0
    # Only so kdfast's registry routes CPU tensors to Triton: it serves them with interpreted
    # kernels alone, and these are compiled ones on purpose.
    os.environ["TRITON_INTERPRET"] = "1"
    _ext._interpreted_kernels = True
    _ext.triton_library_interpreted = lambda: None  # (Triton's own functions are compiled ones too)
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    KernelInterface.__getitem__ = _compile_only
    for cases in (kd_divergence_cases, kd_topk_cases, solver_step_cases, diffusion_loss_cases, group_norm_cases,
                  grid_combination_cases):
        cases(ops)
    print(json.dumps({"arch": arch, "triton": triton.__version__, "launches": dict(LAUNCHES),
                      "seconds": {k: round(v, 1) for k, v in SECONDS.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
