import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kdfast
from kdfast import ops
from kdfast.backends import BackendUnavailableError
from kdfast.reference import solver_step as ref

from conftest import usable_backends
from helpers import assert_close_by_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 4, 8, 8), (3, 7, 13), (2, 3, 5, 1031)]
BACKENDS = usable_backends("solver_step")


def random_coefs(gen):
    c = torch.randn(ops.solver_step.__globals__["NUM_COEFS"], generator=gen, dtype=torch.float64)
    return c.float()


def make_case(shape, dtype, n_hist, with_cond, with_aux, with_noise, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t():
        return torch.randn(shape, generator=g).to(dtype)

    return dict(
        sample=t(), model_output=t(), cond=t() if with_cond else None,
        history=[t() for _ in range(n_hist)], aux=t() if with_aux else None,
        noise=t() if with_noise else None, coefs=random_coefs(g),
    )


def reference_outputs(case, compute_dtype, guidance_scale=1.0, threshold=0, clip_value=1.0, dyn=None):
    hist = list(case["history"]) + [None] * (3 - len(case["history"]))
    inputs = [case["sample"], case["model_output"], case["cond"], *hist, case["aux"], case["noise"]]
    outs = ref.solver_step(inputs, case["coefs"], guidance_scale, threshold, clip_value, dyn, compute_dtype)
    return outs


def check_against_reference(backend, case, dtype, history_dtype=None, **kw):
    history_dtype = history_dtype or dtype
    res = ops.solver_step(case["sample"], case["model_output"], case["coefs"], cond=case["cond"],
                          history=case["history"], aux=case["aux"], noise=case["noise"],
                          write_history=True, write_aux=True, history_dtype=history_dtype,
                          backend=backend, **kw)
    threshold = 1 if kw.get("clip_value") is not None else (2 if kw.get("dynamic_scale") is not None else 0)
    args = dict(guidance_scale=kw.get("guidance_scale", 1.0), threshold=threshold,
                clip_value=kw.get("clip_value") or 1.0, dyn=kw.get("dynamic_scale"))
    r64 = reference_outputs(case, torch.float64, **args)
    rlow = reference_outputs(case, dtype, **args)
    for name, out, exp64, explow, odt in zip(("sample", "history", "aux"), res, r64, rlow,
                                             (dtype, history_dtype, dtype)):
        assert out.dtype == odt and out.shape == case["sample"].shape
        assert_close_by_rule(out, exp64, explow.to(odt), f"{backend} {name} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_all_inputs(backend, dtype, shape):
    case = make_case(shape, dtype, n_hist=3, with_cond=True, with_aux=True, with_noise=True)
    check_against_reference(backend, case, dtype, guidance_scale=4.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_hist,with_cond,with_aux,with_noise",
                         [c for c in itertools.product(range(4), (False, True), (False, True), (False, True))])
def test_matches_reference_input_subsets(backend, n_hist, with_cond, with_aux, with_noise):
    case = make_case((2, 3, 17), torch.float32, n_hist, with_cond, with_aux, with_noise, seed=n_hist)
    check_against_reference(backend, case, torch.float32, guidance_scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_input_is_read_in_its_own_dtype(backend):
    # Every input in another dtype than its neighbours (a half model's output and cond, a bf16
    # history entry next to an fp16 one, ...): widening is exact, so the step must give the bits
    # of the same values all in float32, rounded once into each output's dtype.
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    # (sample, model_output, cond, history 0, 1, 2, aux, noise)
    for dtypes in ((f32, bf16, f16, f16, bf16, f32, f16, bf16), (bf16, f16, f32, bf16, f32, f16, bf16, f16),
                   (f16, f32, bf16, f32, f16, bf16, f32, f32)):
        case = make_case((2, 3, 5, 13), torch.float32, n_hist=3, with_cond=True, with_aux=True, with_noise=True,
                         seed=31)
        ins = [case["sample"], case["model_output"], case["cond"], *case["history"], case["aux"], case["noise"]]
        ins = [t.to(d) for t, d in zip(ins, dtypes)]

        def step(ts):
            return ops.solver_step(ts[0], ts[1], case["coefs"], cond=ts[2], history=ts[3:6], aux=ts[6], noise=ts[7],
                                   guidance_scale=4.5, write_history=True, write_aux=True, history_dtype=bf16,
                                   backend=backend)

        got, want = step(ins), step([t.float() for t in ins])
        for name, g, w in zip(("sample", "history", "aux"), got, want):
            assert torch.equal(g, w.to(g.dtype)), f"{backend} {name} {dtypes}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_thresholding(backend, dtype):
    case = make_case((3, 4, 9, 9), dtype, 1, True, False, False, seed=3)
    case["model_output"] = case["model_output"] * 3
    check_against_reference(backend, case, dtype, guidance_scale=3.0, clip_value=0.7)
    scale = torch.tensor([1.0, 1.7, 2.5])
    check_against_reference(backend, case, dtype, guidance_scale=3.0, dynamic_scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_history_in_float32_for_half_latents(backend):
    case = make_case((2, 4, 8, 8), torch.float16, 2, False, False, False, seed=5)
    case["history"] = [h.float() for h in case["history"]]
    check_against_reference(backend, case, torch.float16, history_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_of_doubled_batch_and_non_contiguous(backend):
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, 6, 5, generator=g)
    doubled = torch.randn(4, 4, 6, 5, generator=g)  # [uncond; cond] from one batched forward
    transposed = torch.randn(2, 4, 5, 6, generator=g).transpose(2, 3)  # not in the sample's layout
    coefs = random_coefs(g)
    got = ops.solver_step(sample, doubled[:2], coefs, cond=doubled[2:], guidance_scale=7.0,
                          history=[transposed], backend=backend).sample
    exp = ops.solver_step(sample, doubled[:2].clone(), coefs, cond=doubled[2:].clone(), guidance_scale=7.0,
                          history=[transposed.contiguous()], backend="reference").sample
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_large_multithreaded_cpu():
    # Above the per-thread threshold of the CPU launcher, so its parallel path runs.
    with_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = make_case((2, 4, 128, 129), torch.float32, 2, True, True, True, seed=11)
        check_against_reference("cpu", case, torch.float32, guidance_scale=1.5)
    finally:
        torch.set_num_threads(with_threads)


def test_automatic_choice_is_cpu_kernel(unemulated_backends):
    assert kdfast.backends.op("solver_step").select("cpu").backend == "cpu"


def test_empty_batch():
    x = torch.empty(0, 4, 8, 8)
    out = ops.solver_step(x, x.clone(), torch.zeros(29)).sample
    assert out.shape == x.shape


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def good():
    x = torch.randn(2, 4, 8, 8)
    return x, torch.randn_like(x), torch.zeros(29)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cond=torch.randn(2, 4, 8, 7)), ValueError, "cond must have the shape"),
    (dict(history=[torch.randn(1, 4, 8, 8)]), ValueError, r"history\[0\] must have the shape"),
    (dict(history=[torch.randn(2, 4, 8, 8)] * 4), ValueError, "at most 3"),
    (dict(noise=torch.randn(2, 4, 8, 8, dtype=torch.float64)), TypeError, "noise must be float32"),
    (dict(aux=torch.randn(2, 4, 8, 8, device="meta")), ValueError, "aux must be on cpu"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite"),
    (dict(clip_value=float("inf")), ValueError, "clip_value must be a finite"),
    (dict(clip_value=-1.0), ValueError, "clip_value must be >= 0"),
    (dict(history=[None]), TypeError, r"history\[0\] is None"),
    (dict(clip_value=1.0, dynamic_scale=torch.ones(2)), ValueError, "not both"),
    (dict(dynamic_scale=torch.ones(3)), ValueError, r"dynamic_scale must be a float32 tensor of shape \(2,\)"),
    (dict(history_dtype=torch.int32), TypeError, "history_dtype"),
])
def test_bad_input_names_the_argument(good, kwargs, exc, match):
    x, m, c = good
    with pytest.raises(exc, match=match):
        ops.solver_step(x, m, c, **kwargs)


def test_bad_core_arguments(good):
    x, m, c = good
    with pytest.raises(ValueError, match="model_output must have the shape"):
        ops.solver_step(x, m[:1], c)
    with pytest.raises(TypeError, match="sample must be float32"):
        ops.solver_step(x.long(), m, c)
    with pytest.raises(ValueError, match=r"coefs must be a CPU float32 \(or float64\) tensor of 29"):
        ops.solver_step(x, m, torch.zeros(28))
    with pytest.raises(ValueError, match=r"coefs must be float32 \(or float64\)"):
        ops.solver_step(x, m, torch.zeros(29, dtype=torch.float16))
    with pytest.raises(ValueError, match="unknown source"):
        ops.coefficients(1.0, 0.0, sample={"eps": 1.0})
    # float() would take numeric strings and bools
    with pytest.raises(ValueError, match="x0_from_model must be a real number"):
        ops.coefficients(1.0, "0.5")
    with pytest.raises(ValueError, match=r"history\['h0'\] must be a real number"):
        ops.coefficients(1.0, 0.0, history={"h0": True})
    with pytest.raises(TypeError, match="sample must be a mapping"):  # (a list raised AttributeError)
        ops.coefficients(1.0, 0.0, sample=[("x", 1.0)])


def test_history_none_means_no_history(good):
    x, m, c = good
    torch.testing.assert_close(ops.solver_step(x, m, c, history=None).sample, ops.solver_step(x, m, c).sample)


def _raw_op(x, m, coefs, *, threshold=0, clip=1.0, mask=1, history_dtype=torch.float32, **tensors):
    return torch.ops.kdfast.solver_step(x, m, coefs, tensors.get("cond"), 1.0, tensors.get("h0"), None, None,
                                        tensors.get("aux"), tensors.get("noise"), threshold, clip, None, mask,
                                        history_dtype, "")


def test_registered_op_checks_what_the_kernels_trust(good):
    # torch.ops.kdfast.solver_step is callable directly: a mismatch must be an error, not an
    # out-of-bounds read (it segfaulted at (256, 65536) vs (1, 65536)).
    x, m, c = good
    for call, exc, match in [
        (lambda: _raw_op(x, m[:1], c), ValueError, "model_output must have the shape"),
        (lambda: _raw_op(x, m, c, cond=m[..., :7]), ValueError, "cond must have the shape"),
        (lambda: _raw_op(x, m, torch.zeros(5)), ValueError, r"coefs must be a CPU float32 \(or float64\) tensor"),
        (lambda: _raw_op(x.long(), m, c), TypeError, "sample must be a float32"),
        (lambda: _raw_op(x, m.double(), c), TypeError, "model_output must be float32"),
        (lambda: _raw_op(x, m, c, history_dtype=torch.float64, mask=3), TypeError, "history_dtype"),
        (lambda: _raw_op(x, m, c, threshold=1, clip=-1.0), ValueError, "clip_value must be >= 0"),
        (lambda: _raw_op(x, m, c, threshold=2), ValueError, "dynamic_scale must be"),
        (lambda: _raw_op(x, m, c, mask=2), ValueError, "out_mask"),
    ]:
        with pytest.raises(exc, match=match):
            call()


def test_registered_op_takes_any_layout():
    # channels_last inputs of a contiguous sample are brought to its layout, not read as if they were.
    case = make_case((2, 3, 4, 5), torch.float32, 1, True, False, True, seed=4)
    expected = ops.solver_step(case["sample"], case["model_output"], case["coefs"], cond=case["cond"],
                               history=case["history"], noise=case["noise"]).sample
    cl = {k: v.to(memory_format=torch.channels_last) for k, v in case.items()
          if isinstance(v, torch.Tensor) and v.dim() == 4}
    got = _raw_op(cl["sample"], cl["model_output"], case["coefs"], cond=cl["cond"],
                  h0=case["history"][0].to(memory_format=torch.channels_last), noise=cl["noise"])[0]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_forced_backend_stays_differentiable(backend):
    case = make_case((2, 3, 4), torch.float32, 0, False, False, False, seed=6)
    grads = []
    for chosen in (None, backend):
        x = case["sample"].clone().requires_grad_(True)
        out = ops.solver_step(x, case["model_output"], case["coefs"], clip_value=0.7, backend=chosen).sample
        assert out.requires_grad
        out.square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_an_unknown_backend_is_named_for_empty_or_float64_inputs_too():
    # an empty input skipped the backend choice (a misspelt name passed); float64 inputs were
    # told the compiled kernels cannot take float64, not that the name is unknown
    co = torch.tensor(ops.coefficients(1.0, 0.0, sample={"x0": 1.0}))
    empty, empty_map = torch.randn(0, 4), torch.randn(0, 4, 3)
    calls = {
        "solver_step": lambda b: ops.solver_step(empty, empty, co, backend=b),
        "solver_step float64": lambda b: ops.solver_step(torch.randn(2, 4).double(), torch.randn(2, 4).double(), co,
                                                         backend=b),
        "threshold_scale": lambda b: ops.threshold_scale(empty, empty, 1.0, -0.5, backend=b),
        "kd_divergence": lambda b: ops.kd_divergence(torch.randn(0, 5), torch.randn(0, 5), backend=b),
        "kd_topk": lambda b: ops.kd_topk(torch.randn(0, 5), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1),
                                         backend=b),
        "group_norm_act": lambda b: ops.group_norm_act(empty_map, 2, backend=b),
        "pseudo_huber": lambda b: ops.pseudo_huber(empty_map, empty_map, c=0.1, backend=b),
        "grid_combination": lambda b: ops.grid_combination(torch.randn(0, 3), torch.randn(0, 6),
                                                           torch.tensor([0.5, 1.0, 2.0]), backend=b),
        "grid_combination float64": lambda b: ops.grid_combination(torch.randn(2, 3).double(),
                                                                   torch.randn(2, 6).double(),
                                                                   torch.tensor([0.5, 1.0, 2.0]), backend=b),
    }
    for name, call in calls.items():
        call(None)
        with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
            call("nope")


def test_forced_backend_that_cannot_serve_explains(good, monkeypatch, unemulated_backends):
    x, m, c = good
    with pytest.raises(BackendUnavailableError, match="cuda backend runs on CUDA tensors"):
        ops.solver_step(x, m, c, backend="cuda")
    monkeypatch.setenv("KDFAST_BACKEND", "nonsense")
    kdfast.backends.refresh()
    try:
        with pytest.raises(BackendUnavailableError, match="unknown backend 'nonsense'"):
            ops.solver_step(x, m, c)
    finally:
        monkeypatch.undo()
        kdfast.backends.refresh()


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (under its interpreter here)")
def test_triton_interpret_set_after_import_takes_effect_on_refresh(good, monkeypatch):
    # Triton picks compiled or interpreted kernels when they are defined: kernels loaded before
    # TRITON_INTERPRET=1 cannot run CPU tensors; refresh() loads them again under it.
    x, m, c = good
    op = kdfast.backends.op("solver_step")
    try:
        monkeypatch.delenv("TRITON_INTERPRET")
        kdfast.backends.refresh()
        assert "only under its interpreter" in op.reason("triton", "cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert "call kdfast.backends.refresh()" in op.reason("triton", "cpu")
        kdfast.backends.refresh()
        assert op.reason("triton", "cpu") is None
        torch.testing.assert_close(ops.solver_step(x, m, c, backend="triton").sample,
                                   ops.solver_step(x, m, c, backend="cpu").sample)
    finally:
        monkeypatch.undo()
        kdfast.backends.refresh()


_INTERPRETER_MODES = """
import os, sys, torch
from kdfast import backends, ops
x = torch.randn(2, 8)
reason = lambda: backends.op("kd_divergence").reason("triton", "cpu")
if sys.argv[1] == "spelled":  # TRITON_INTERPRET=true: Triton interprets, so kdfast's backend serves
    rows = [ops.kd_divergence(x, 2 * x, backend=backend) for backend in ("triton", "cpu")]
    print(reason(), torch.allclose(*rows))
else:  # unset: triton is imported compiled; set afterwards, a refresh cannot change Triton's own functions
    print(reason())
    os.environ["TRITON_INTERPRET"] = "1"
    backends.refresh()
    print(reason())
"""


def test_triton_interpreter_mode_is_read_as_triton_reads_it(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # (from another folder: the source tree would shadow the installed package and its kernels)
    spelled = subprocess.run([sys.executable, "-c", _INTERPRETER_MODES, "spelled"], capture_output=True, text=True,
                             env={**env, "TRITON_INTERPRET": "true"}, timeout=300, cwd=tmp_path)
    assert spelled.stdout.split() == ["None", "True"], spelled.stderr[-2000:]
    late = subprocess.run([sys.executable, "-c", _INTERPRETER_MODES, "late"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    first, after_refresh = late.stdout.strip().splitlines()
    assert "set TRITON_INTERPRET=1 before the process imports triton" in first, late.stderr[-2000:]
    # (it said the backend served, and every kernel then failed inside Triton's interpreter)
    assert "start the process with TRITON_INTERPRET=1" in after_refresh


def test_kdfast_backend_env_forces_reference(good, monkeypatch, unemulated_backends):
    x, m, c = good
    monkeypatch.setenv("KDFAST_BACKEND", "reference")
    kdfast.backends.refresh()
    try:
        assert kdfast.backends.op("solver_step").select("cpu").backend == "reference"
        assert torch.equal(ops.solver_step(x, m, c).sample, ops.solver_step(x, m, c, backend="cpu").sample)
    finally:
        monkeypatch.undo()
        kdfast.backends.refresh()
    assert kdfast.backends.op("solver_step").select("cpu").backend == "cpu"


# --------------------------------------------------------------------------- fused_step (the schedulers' entry)

fused_step = ops.solver_step.__globals__["fused_step"]


def _custom_op(case, guidance_scale=1.0, clip_value=None, dynamic_scale=None, history_dtype=None):
    """The same step through the registered custom op: the general path that packs its own
    addresses (``_solver_step`` -> backend -> ``_step_args``), not the eager fast path."""
    hist = [ops.solver_step.__globals__["in_layout"](h, case["sample"]) for h in case["history"]]
    hist += [None] * (3 - len(hist))
    threshold = 1 if clip_value is not None else (2 if dynamic_scale is not None else 0)
    return torch.ops.kdfast.solver_step(case["sample"], case["model_output"], case["coefs"], case["cond"],
                                        guidance_scale, *hist, case["aux"], case["noise"], threshold,
                                        1.0 if clip_value is None else clip_value, dynamic_scale, 7,
                                        history_dtype or case["sample"].dtype, "")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_hist,with_cond,with_aux,with_noise",
                         [(0, False, False, False), (1, False, True, False), (2, True, True, True),
                          (3, True, False, True)])
@pytest.mark.parametrize("layout", ["contiguous", "views"])
def test_fused_step_is_the_public_step(dtype, n_hist, with_cond, with_aux, with_noise, layout):
    """The schedulers' positional entry and the public one give bit-identical outputs, equal to
    the custom op's (whose packing is separate), for every input subset and layout."""
    case = make_case((2, 3, 5, 7), dtype, n_hist, with_cond, with_aux, with_noise, seed=n_hist + 10)
    if layout == "views":  # CFG halves, batch-strided views (kept) and a transposed one (copied)
        doubled = torch.cat([case["model_output"], case["model_output"] * 2])
        case["model_output"] = torch.stack([doubled[2:], doubled[:2]], 1)[:, 0]
        case["sample"] = torch.stack([case["sample"], case["sample"]], 1)[:, 0]
        if with_cond:
            case["cond"] = torch.cat([case["cond"], case["cond"] * 3])[2:]
        if n_hist:
            case["history"][0] = case["history"][0].transpose(2, 3).contiguous().transpose(2, 3)
    hist_dtype = torch.float32 if dtype != torch.float32 else None
    kwargs = dict(cond=case["cond"], guidance_scale=2.5, history=case["history"], aux=case["aux"],
                  noise=case["noise"], write_history=True, write_aux=True, history_dtype=hist_dtype)
    public = ops.solver_step(case["sample"], case["model_output"], case["coefs"], **kwargs)
    fused = fused_step(case["sample"], case["model_output"], case["coefs"], case["cond"], 2.5, case["history"],
                       case["aux"], case["noise"], None, None, True, True, hist_dtype)
    general = _custom_op(case, guidance_scale=2.5, history_dtype=hist_dtype)
    for a, b, c in zip(public, fused, general):
        assert a.dtype == b.dtype == c.dtype and a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, b) and torch.equal(a, c)
    forced = ops.solver_step(case["sample"], case["model_output"], case["coefs"], backend="reference", **kwargs)
    for a, b in zip(public, forced):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_fused_step_thresholds_like_the_public_step(good):
    x, m, c = good
    c = torch.tensor(ops.coefficients(1.0, -0.5, sample={"x": 0.5, "x0": 0.5}), dtype=torch.float32)
    dyn = ops.threshold_scale(x, m * 3, 1.0, -0.5, ratio=0.9, max_value=2.0)
    for clip, scale in ((0.3, None), (None, dyn)):
        public = ops.solver_step(x, m * 3, c, clip_value=clip, dynamic_scale=scale)
        fused = fused_step(x, m * 3, c, None, 1.0, (), None, None, clip, scale, False, False, None)
        assert torch.equal(public.sample, fused.sample)
        assert fused.history is None and fused.aux is None


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cond=torch.randn(2, 4, 8, 7)), ValueError, "cond must have the shape"),
    (dict(history=[torch.randn(1, 4, 8, 8)]), ValueError, r"history\[0\] must have the shape"),
    (dict(history=[torch.randn(2, 4, 8, 8), "h"]), TypeError, r"history\[1\] must be a torch.Tensor"),
    (dict(noise=torch.randn(2, 4, 8, 8, dtype=torch.float64)), TypeError, "noise must be float32"),
    (dict(aux=torch.randn(2, 4, 8, 8, device="meta")), ValueError, "aux must be on cpu"),
    (dict(model_output=None), TypeError, "model_output must be a torch.Tensor"),
    (dict(model_output=torch.randn(2, 4, 8, 8).long()), TypeError, "model_output must be float32"),
    (dict(sample=torch.zeros(())), ValueError, "batch dimension"),
    (dict(sample=torch.zeros(2, 4, 8, 8, dtype=torch.int32)), TypeError, "sample must be float32"),
    (dict(history_dtype=torch.float64), TypeError, r"history_dtype .*float64 with a float64 sample"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite"),
    (dict(clip_value=float("inf")), ValueError, "clip_value must be a finite"),
    (dict(clip_value=-1.0), ValueError, "clip_value must be >= 0"),
    (dict(dynamic_scale=torch.ones(3)), ValueError, r"dynamic_scale must be a float32 tensor of shape \(2,\)"),
    (dict(history_dtype=torch.int32), TypeError, "history_dtype"),
])
def test_fused_step_checks_every_tensor_like_the_public_step(good, kwargs, exc, match):
    x, m, c = good
    args = dict(sample=x, model_output=m, coefs=c, cond=None, guidance_scale=1.0, history=(), aux=None, noise=None,
                clip_value=None, dynamic_scale=None, write_history=True, write_aux=False, history_dtype=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fused_step(*args.values())
    public = {k: v for k, v in args.items() if k not in ("sample", "model_output", "coefs")}
    with pytest.raises(exc, match=match):
        ops.solver_step(args["sample"], args["model_output"], c, **public)


def test_fused_step_takes_the_dispatcher_when_it_must():
    """Autograd and tensor subclasses still reach the custom op through the schedulers' entry."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, generator=g).requires_grad_(True)
    m = torch.randn(2, 3, 4, generator=g)
    c = torch.tensor(ops.coefficients(1.0, -0.5, sample={"x": 0.5, "x0": 0.5}), dtype=torch.float32)
    out = fused_step(x, m, c, None, 1.0, (), None, None, None, None, False, False, None).sample
    assert out.grad_fn is not None
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5 + 0.5 * 1.0))
    p = torch.nn.Parameter(m.clone())
    with torch.no_grad():
        via_subclass = fused_step(x.detach(), p, c, None, 1.0, (), None, None, None, None, False, False, None)
    plain = ops.solver_step(x.detach(), m, c)
    assert torch.equal(via_subclass.sample, plain.sample)


# --------------------------------------------------------------------------- a row of coefficients per sample


def _rows_case(shape, dtype, seed=7):
    """A step case whose samples each get their own coefficient row (``coefs`` [batch, 29])."""
    case = make_case(shape, dtype, 2, True, True, True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.stack([random_coefs(g) for _ in range(shape[0])])
    rows[0, 2:] = 0.0
    rows[0, 2 + 3] = 1.0  # sample 0: the output is x0 alone (other sources dropped, as a zero does)
    case["coefs"] = rows
    return case


def _sample_slice(case, b):
    """The case of sample ``b`` alone, with its own row."""
    one = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else [h[b:b + 1] for h in v] if isinstance(v, list) else v)
           for k, v in case.items() if k != "coefs"}
    one["coefs"] = case["coefs"][b]
    return one


def _run_case(case, backend, **kw):
    return ops.solver_step(case["sample"], case["model_output"], case["coefs"], cond=case["cond"],
                           history=case["history"], aux=case["aux"], noise=case["noise"], write_history=True,
                           write_aux=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 13), (4, 3, 5, 1031)])
@pytest.mark.parametrize("threshold", ["none", "clip", "dynamic"])
def test_rows_per_sample_step_each_sample_with_its_own_row(backend, dtype, shape, threshold):
    case = _rows_case(shape, dtype)
    kw = dict(guidance_scale=2.5)
    if threshold == "clip":
        kw["clip_value"] = 0.7
    elif threshold == "dynamic":
        kw["dynamic_scale"] = torch.linspace(1.0, 2.0, shape[0])
    res = _run_case(case, backend, **kw)
    # Bit for bit what the same backend gives each sample alone with that sample's row
    for b in range(shape[0]):
        one_kw = dict(kw)
        if threshold == "dynamic":
            one_kw["dynamic_scale"] = kw["dynamic_scale"][b:b + 1]
        alone = _run_case(_sample_slice(case, b), backend, **one_kw)
        for name, out, exp in zip(("sample", "history", "aux"), res, alone):
            assert torch.equal(out[b:b + 1], exp), f"{backend} {name} of sample {b}"
    # ... and the reference within the dtype's rule
    threshold_code = {"none": 0, "clip": 1, "dynamic": 2}[threshold]
    args = dict(guidance_scale=2.5, threshold=threshold_code, clip_value=kw.get("clip_value", 1.0),
                dyn=kw.get("dynamic_scale"))
    for out, e64, elow in zip(res, reference_outputs(case, torch.float64, **args),
                              reference_outputs(case, dtype, **args)):
        assert_close_by_rule(out, e64, elow.to(dtype), f"{backend} rows {dtype}")


def test_rows_per_sample_differ_from_one_row_for_all():
    # The rows are used as rows: a step with every sample on row 0 gives another result
    case = _rows_case((3, 4, 9), torch.float32)
    res = _run_case(case, None)
    shared = _run_case(dict(case, coefs=case["coefs"][0]), None)
    assert torch.equal(res.sample[0], shared.sample[0])
    assert not torch.equal(res.sample[1:], shared.sample[1:])


def test_rows_per_sample_float64():
    case = _rows_case((3, 2, 17), torch.float64)
    case["coefs"] = case["coefs"].double() * (1 + 1e-9)  # float64 values a float32 row would round
    res = _run_case(case, None, guidance_scale=1.5)
    for b in range(3):
        alone = _run_case(_sample_slice(case, b), None, guidance_scale=1.5)
        for out, exp in zip(res, alone):
            assert out.dtype == torch.float64 and torch.equal(out[b:b + 1], exp)
    exp = reference_outputs(case, torch.float64, guidance_scale=1.5)
    torch.testing.assert_close(res.sample, exp[0], rtol=0, atol=0)


@pytest.mark.parametrize("rows,match", [
    (torch.zeros(3, 29), r"\(2, 29\) table"),
    (torch.zeros(2, 28), r"\(2, 29\) table"),
    (torch.zeros(2, 29, device="meta"), "on the CPU or on cpu"),
    (torch.zeros(2, 29, dtype=torch.int32), "coefs must be float32"),
    (torch.zeros(2, 2, 29), r"a \(2, 29\) table of a row per sample"),
])
def test_rows_per_sample_bad_input(good, rows, match):
    x, m, _ = good
    with pytest.raises(ValueError, match=match):
        ops.solver_step(x, m, rows)
    if rows.device.type != "meta":  # (the dispatcher sends a call with a meta tensor to the fake)
        with pytest.raises(ValueError, match=match):
            _raw_op(x, m, rows)


def test_rows_binding_takes_exactly_one_of_row_and_rows():
    from kdfast import _ext
    x = torch.zeros(1, 4)
    out = torch.empty_like(x)
    row = torch.zeros(29)
    common = (1, 4, [x.data_ptr(), x.data_ptr()] + [0] * 6, [4] * 8, [0] * 8, [out.data_ptr(), 0, 0], [4, 0, 0],
              [0, 0, 0])
    for coef, rows in ((0, 0), (row.data_ptr(), row.data_ptr())):
        with pytest.raises(ValueError, match="exactly one of coef"):
            _ext.cpu()[0].solver_step(*common, coef, rows, 1.0, 0, 1.0, 0, 1)


def test_rows_per_sample_opcheck_autograd_and_compile():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 2, 5, generator=g)
    rows = torch.stack([random_coefs(g) for _ in range(3)])
    args = (x, torch.randn_like(x), rows, torch.randn_like(x), 3.0, torch.randn_like(x), None, None,
            torch.randn_like(x), torch.randn_like(x), 1, 0.8, None, 7, torch.float32, "")
    torch.library.opcheck(torch.ops.kdfast.solver_step.default, args)
    # gradients: the reference's, row by row
    xs, ms = x.clone().requires_grad_(True), torch.randn(3, 2, 5, generator=g).requires_grad_(True)
    w = torch.randn(3, 2, 5, generator=g)
    (ops.solver_step(xs, ms, rows, clip_value=0.9).sample * w).sum().backward()
    xe, me = xs.detach().clone().requires_grad_(True), ms.detach().clone().requires_grad_(True)
    (ref.solver_step([xe, me] + [None] * 6, rows, 1.0, 1, 0.9)[0] * w).sum().backward()
    torch.testing.assert_close(xs.grad, xe.grad)
    torch.testing.assert_close(ms.grad, me.grad)
    compiled = torch.compile(lambda a, b: ops.solver_step(a, b, rows).sample * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, ms.detach()), ops.solver_step(x, ms.detach(), rows).sample * 2)


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("threshold", ["none", "clip", "dynamic"])
def test_coefficients_are_differentiable(rows, threshold):
    # Learned solver coefficients: the gradient reaches one row or a row per sample (gradcheck in
    # float64), and, in float32, equals autograd through the reference
    g = torch.Generator().manual_seed(5)
    shape = (3, 2, 7)
    x, m, cond, h = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    coefs = torch.randn((3, 29) if rows else (29,), generator=g, dtype=torch.float64)
    # coefficients at exactly 0 (the sample's and the model output's weights in two outputs):
    # their sources are not read, but they keep their gradient, sum(grad * source)
    coefs[..., [2, 2 + 9 + 1]] = 0.0
    kw = dict(cond=cond, guidance_scale=1.5, history=[h], write_history=True, write_aux=True)
    if threshold == "clip":
        kw["clip_value"] = 0.9
    elif threshold == "dynamic":
        kw["dynamic_scale"] = torch.tensor([1.0, 1.3, 2.0], dtype=torch.float64)

    def step(c):
        return tuple(ops.solver_step(x, m, c, **kw))

    assert torch.autograd.gradcheck(step, (coefs.clone().requires_grad_(True),))
    c32 = coefs.float().requires_grad_(True)
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) else [t.float() for t in v] if isinstance(v, list) else v)
            for k, v in kw.items()}
    out = ops.solver_step(x.float(), m.float(), c32, **kw32)
    w = [torch.randn(shape, generator=g) for _ in range(3)]
    sum((o * wk).sum() for o, wk in zip(out, w)).backward()
    c_ref = coefs.float().requires_grad_(True)
    inputs = [x.float(), m.float(), cond.float(), h.float(), None, None, None, None]
    threshold_code = {"none": 0, "clip": 1, "dynamic": 2}[threshold]
    dyn = kw32.get("dynamic_scale")
    outs = ref.solver_step(inputs, c_ref, 1.5, threshold_code, kw.get("clip_value", 1.0), dyn)
    sum((o * wk).sum() for o, wk in zip(outs, w)).backward()
    assert c32.grad.shape == coefs.shape
    torch.testing.assert_close(c32.grad, c_ref.grad)


def test_opcheck_with_coefficients_that_need_a_gradient():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 5, generator=g)
    for coefs in (random_coefs(g), torch.stack([random_coefs(g), random_coefs(g)])):
        args = (x, torch.randn_like(x), coefs.requires_grad_(True), torch.randn_like(x), 2.0, torch.randn_like(x),
                None, None, None, None, 1, 0.8, None, 3, torch.float32, "")
        torch.library.opcheck(torch.ops.kdfast.solver_step.default, args)


def test_rows_per_sample_step_path_has_no_tensor_to_python_conversions(monkeypatch):
    x = torch.randn(3, 4, 8, 8)
    m = torch.randn_like(x)
    rows = torch.randn(3, 29)

    def forbidden(*a, **k):
        raise AssertionError("host conversion on the step path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    ran = []
    for backend in [None, *[b for b in BACKENDS if b != "triton"], "reference"]:
        ran.append(ops.solver_step(x, m, rows, cond=m, guidance_scale=2.0, history=[x], backend=backend).sample)
    monkeypatch.undo()
    assert len(ran) >= 3 and all(torch.equal(r, ran[0]) for r in ran[1:2])


# --------------------------------------------------------------------------- torch integration


def test_opcheck_solver_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g)
    args = (x, torch.randn_like(x), random_coefs(g), torch.randn_like(x), 3.0, torch.randn_like(x), None, None,
            torch.randn_like(x), torch.randn_like(x), 1, 0.8, None, 7, torch.float32, "")
    torch.library.opcheck(torch.ops.kdfast.solver_step.default, args)


def test_opcheck_threshold_scale():
    x = torch.randn(3, 50)
    torch.library.opcheck(torch.ops.kdfast.threshold_scale.default,
                          (x, torch.randn_like(x), None, 1.0, 1.0, -0.5, 0.9, 2.0, ""))
    # with inputs that need a gradient: the autograd formula is registered and checked too
    g = torch.Generator().manual_seed(2)
    x, m, c = (torch.randn(3, 50, generator=g) * 3).requires_grad_(True), torch.randn(3, 50, generator=g), \
        torch.randn(3, 50, generator=g).requires_grad_(True)
    torch.library.opcheck(torch.ops.kdfast.threshold_scale.default, (x, m, c, 2.0, 1.0, -0.5, 0.9, 100.0, ""))
    # a forced backend goes through the op too (its autograd formula: it called the kernel directly)
    torch.library.opcheck(torch.ops.kdfast.threshold_scale.default, (x, m, c, 2.0, 1.0, -0.5, 0.9, 100.0, "cpu"))


def test_direct_threshold_scale_op_calls_are_checked():
    # torch.ops.kdfast.threshold_scale called directly: the kernels read its tensors by address,
    # so it checks what the public entry checks (a column-major sample was read as row-major,
    # a smaller model output past its end)
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(2, 1000, generator=g) * 3, torch.randn(2, 1000, generator=g) * 3
    op = torch.ops.kdfast.threshold_scale
    column_major = x.t().contiguous().t()
    torch.testing.assert_close(op(column_major, m, None, 1.0, 1.0, -0.5, 0.995, 100.0, ""),
                               ops.threshold_scale(x, m, 1.0, -0.5, max_value=100.0))
    for args, error, match in (((x, m[:, :2], None, 1.0, 1.0, -0.5, 0.995, 100.0), ValueError, "model_output"),
                               ((x, m, None, 1.0, 1.0, -0.5, 2.0, 100.0), ValueError, r"ratio must be in \[0, 1\]"),
                               ((x, m, None, 1.0, 1.0, -0.5, 0.995, 0.0), ValueError, "max_value must be positive"),
                               ((x[:, :0], m[:, :0], None, 1.0, 1.0, -0.5, 0.995, 100.0), ValueError,
                                "at least one element per sample")):
        with pytest.raises(error, match=match):
            op(*args, "")


def test_opcheck_solver_step_with_dynamic_scale_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g).requires_grad_(True)
    scale = torch.tensor([1.2, 2.5]).requires_grad_(True)
    args = (x, torch.randn_like(x), random_coefs(g), None, 1.0, torch.randn_like(x).requires_grad_(True), None, None,
            None, None, 2, 1.0, scale, 3, torch.float32, "")
    torch.library.opcheck(torch.ops.kdfast.solver_step.default, args)


def test_autograd_matches_reference():
    g = torch.Generator().manual_seed(1)
    case = make_case((2, 3, 4), torch.float32, 2, True, True, True, seed=2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in case.items() if isinstance(v, torch.Tensor) and k != "coefs"}
    hist = [h.clone().requires_grad_(True) for h in case["history"]]
    res = ops.solver_step(leaves["sample"], leaves["model_output"], case["coefs"], cond=leaves["cond"],
                          guidance_scale=2.0, history=hist, aux=leaves["aux"], noise=leaves["noise"],
                          clip_value=0.5, write_history=True)
    w0, w1 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    ((res.sample * w0).sum() + (res.history * w1).sum()).backward()
    exp_leaves = [t.detach().clone().requires_grad_(True) for t in
                  (case["sample"], case["model_output"], case["cond"], *case["history"], case["aux"], case["noise"])]
    s, mo, co, h0, h1, a, n = exp_leaves
    outs = ref.solver_step([s, mo, co, h0, h1, None, a, n], case["coefs"], 2.0, 1, 0.5)
    ((outs[0] * w0).sum() + (outs[1] * w1).sum()).backward()
    got = [leaves["sample"], leaves["model_output"], leaves["cond"], *hist, leaves["aux"], leaves["noise"]]
    for gt, ex in zip(got, exp_leaves):
        torch.testing.assert_close(gt.grad, ex.grad)


def test_double_backward_keeps_the_second_order_terms():
    # A gradient penalty on learned coefficients: the backward's own gradient must have a graph
    # (it was built on detached copies and silently had none).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).mul(3).requires_grad_(True)
    m = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).mul(3).requires_grad_(True)
    coefs = torch.tensor(ops.coefficients(0.5, 0.7, sample={"x": 2.0, "x0": 0.3, "model": 0.4},
                                          history={"x0": 1.0}), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, m, c: ops.solver_step(x, m, c).sample, (x, m, coefs))
    assert torch.autograd.gradgradcheck(lambda x, m, c: ops.solver_step(x, m, c, clip_value=0.5).sample,
                                        (x, m, coefs))

    def thresholded(x, m, c):
        scale = ops.threshold_scale(x, m, 0.5, 0.7, ratio=0.9, max_value=1.5)
        return ops.solver_step(x, m, c, dynamic_scale=scale).sample

    assert torch.autograd.gradgradcheck(thresholded, (x, m, coefs))
    # one tensor in two input slots: each slot's gradient once (a shared node summed them twice)
    row = torch.tensor(ops.coefficients(1.0, -0.5, sample={"x": 0.7, "x0": 0.3, "model": 0.2}))
    y = torch.randn(2, 3, generator=gen).requires_grad_(True)
    once, twice = (torch.autograd.grad(ops.solver_step(y, y, row).sample.sum(), y, create_graph=cg)[0]
                   for cg in (False, True))
    torch.testing.assert_close(once, twice)
    # the float32 kernel path: the same second-order gradient as float64
    x32, m32, c32 = (t.detach().float().requires_grad_(True) for t in (x, m, coefs))
    for a, b, c in ((x32, m32, c32), (x, m, coefs)):
        (g,) = torch.autograd.grad(ops.solver_step(a, b, c).sample.square().sum(), a, create_graph=True)
        g.sum().backward()
    torch.testing.assert_close(c32.grad.double(), coefs.grad, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    x = torch.randn(2, 4, 4)
    m = torch.randn_like(x)
    c = torch.tensor(ops.coefficients(1.0, -0.5, sample={"x": 0.5, "x0": 0.5}), dtype=torch.float32)

    def f(x, m):
        return ops.solver_step(x, m, c, guidance_scale=1.0).sample * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, m), f(x, m))
    # a non-dense layout at a new shape (a dynamic-shape recompile): its symbolic strides must
    # not be sorted in the graph
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    for batch, width in ((2, 5), (3, 6)):
        x, m = torch.randn(batch, 3, 4, width).transpose(1, 3), torch.randn(batch, width, 4, 3)
        torch.testing.assert_close(compiled(x, m), f(x, m))


def test_step_path_has_no_tensor_to_python_conversions(monkeypatch, good):
    x, m, c = good
    dyn = ops.threshold_scale(x, m, 1.0, -0.5, ratio=0.9, max_value=2.0)

    def forbidden(*a, **k):
        raise AssertionError("host conversion on the step path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    ran = []
    for backend in [None, *BACKENDS, "reference"]:
        if backend == "triton":
            continue  # the interpreter itself converts; on a GPU the sync-debug test covers it
        res = ops.solver_step(x, m, c, cond=m, guidance_scale=2.0, history=[x], dynamic_scale=dyn,
                              write_history=True, backend=backend)
        scale = ops.threshold_scale(x, m, 1.0, -0.5, ratio=0.9, max_value=2.0, backend=backend)
        ran.append((res.sample.shape, res.history.shape, scale.shape))
    monkeypatch.undo()
    assert ran and all(r == (x.shape, x.shape, (x.shape[0],)) for r in ran)  # every path completed


# --------------------------------------------------------------------------- threshold scale


@pytest.mark.parametrize("backend", usable_backends("threshold_scale"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ratio", [((1, 1), 0.995), ((3, 4, 8, 8), 0.995), ((2, 1031), 0.5), ((2, 7), 1.0), ((2, 7), 0.0)])
def test_threshold_scale_matches_quantile(backend, dtype, shape, ratio):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    m = torch.randn(shape, generator=g).to(dtype)
    cond = torch.randn(shape, generator=g).to(dtype)
    # max_value 100 leaves the quantiles (1.7 to 7.6 here) unclamped, so the selection itself is
    # checked; 4.0 clamps some of them
    for max_value in (100.0, 4.0):
        got = ops.threshold_scale(x, m, 0.8, -0.3, cond=cond, guidance_scale=2.0, ratio=ratio, max_value=max_value,
                                  backend=backend)
        exp = ref.threshold_scale(x, m, cond, 2.0, 0.8, -0.3, ratio, max_value, compute_dtype=torch.float64)
        assert got.dtype == torch.float32 and got.shape == (shape[0],)
        torch.testing.assert_close(got, exp.float(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", usable_backends("threshold_scale"))
def test_threshold_scale_reads_each_input_in_its_own_dtype(backend):
    # sample, model output and cond of three different dtypes (an fp32 sample with a half
    # model's outputs, and the other ways round): each must be widened from its own dtype, not
    # from the sample's or the model output's
    g = torch.Generator().manual_seed(6)
    shape = (3, 4, 9, 7)
    x, m, cond = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    for dtypes in ((f32, bf16, f16), (f16, f32, bf16), (bf16, f16, f32), (f32, f16, bf16)):
        xs, ms, cs = (t.to(d) for t, d in zip((x, m, cond), dtypes))
        got = ops.threshold_scale(xs, ms, 0.8, -0.3, cond=cs, guidance_scale=2.0, ratio=0.9, max_value=100.0,
                                  backend=backend)
        exp = ref.threshold_scale(xs, ms, cs, 2.0, 0.8, -0.3, 0.9, 100.0, compute_dtype=torch.float64)
        torch.testing.assert_close(got, exp.float(), rtol=2e-6, atol=2e-6, msg=f"{backend} {dtypes}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_threshold_scale_beyond_two_to_the_24_values_per_sample(device, ratio):
    # torch.quantile stops at 2^24 values; above, n - 1 is not exact in float32, and a float32
    # position put ratio 1.0 past the end (a crash on the CPU) or on the wrong element.
    inner = (1 << 24) + 4
    x = torch.rand(1, inner, generator=torch.Generator().manual_seed(0)) * 3.0
    x[0, 123] = 7.5
    got = ops.threshold_scale(x.to(device), torch.zeros(1, inner, device=device), 1.0, 0.0, ratio=ratio,
                              max_value=100.0, backend=device)
    expected = np.quantile(x.abs().double().numpy()[0], ratio)
    assert abs(got.item() - expected) <= 1e-6 * expected
    del x


@pytest.mark.parametrize("backend", usable_backends("threshold_scale") + ["reference"])
def test_threshold_scale_of_a_sample_with_nan_is_nan(backend):
    # torch.quantile (diffusers' thresholding) gives NaN; a selection that skips NaN would
    # threshold with a made-up scale instead.
    x = torch.randn(3, 257, generator=torch.Generator().manual_seed(5)) * 3
    x[1, 100] = float("nan")
    got = ops.threshold_scale(x, torch.zeros_like(x), 1.0, 0.0, ratio=0.995, max_value=2.0, backend=backend)
    assert got[1].isnan() and torch.isfinite(got[[0, 2]]).all()


@pytest.mark.parametrize("backend", usable_backends("threshold_scale"))
def test_threshold_scale_next_to_inf_and_bits_like_torch_quantile(backend):
    # torch.quantile interpolates with torch.lerp from ceil(pos), which is the position itself
    # when it is exact: an inf beside an exact position is not read (lo + 0 * inf was NaN), and
    # an inf above a fraction >= 0.5 gives torch's NaN. Random values: the same bits as torch.
    inf = math.inf
    for values, ratio in (([1.5, inf, 0.5], 0.5), ([3.0, inf], 0.0), ([0.5, inf], 0.995), ([0.5, inf], 0.25)):
        x = torch.tensor([values]) * 2.0
        got = ops.threshold_scale(x, torch.zeros_like(x), 0.5, 0.0, ratio=ratio, max_value=10.0, backend=backend)
        exp = ref.threshold_scale(x, torch.zeros_like(x), None, 1.0, 0.5, 0.0, ratio, 10.0)
        assert torch.equal(got, exp) or (got.isnan() & exp.isnan()).all(), (values, ratio, got, exp)
    x = torch.rand(4, 999, generator=torch.Generator().manual_seed(8)) * 20
    for ratio in (0.1, 0.5, 0.77, 0.9, 0.995):
        got = ops.threshold_scale(x, torch.zeros_like(x), 1.0, 0.0, ratio=ratio, max_value=100.0, backend=backend)
        assert torch.equal(got, torch.quantile(x, ratio, dim=1).clamp(1.0, 100.0)), ratio
    # many short rows: torch.lerp is a fused multiply-add; two roundings were 1 ulp off in ~2%
    x = torch.rand(2000, 5, generator=torch.Generator().manual_seed(9)) * 3
    for ratio in (0.1, 0.3, 0.7, 0.995):
        got = ops.threshold_scale(x, torch.zeros_like(x), 1.0, 0.0, ratio=ratio, max_value=100.0, backend=backend)
        assert torch.equal(got, torch.quantile(x, ratio, dim=1).clamp(1.0, 100.0)), ratio


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")
def test_threshold_scale_out_of_host_memory_raises(tmp_path):
    # Each CPU thread copies a whole sample as float for the selection: where that cannot be
    # allocated, std::bad_alloc left the OpenMP region and aborted the process.
    script = """
import resource, torch
from kdfast import ops
x = torch.randn(2, 2 ** 24)
ops.threshold_scale(x[:, :100], x[:, :100], 1.0, 0.0, backend="cpu")  # (threads started)
pages = int(open("/proc/self/statm").read().split()[0])
resource.setrlimit(resource.RLIMIT_AS, (pages * resource.getpagesize() + (16 << 20), resource.RLIM_INFINITY))
try:
    ops.threshold_scale(x, x, 1.0, 0.0, backend="cpu")
except RuntimeError as e:
    print("raised:", e)
"""
    # (run from tmp_path: from the repository's root, -c would import the unbuilt source tree)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "out of memory" in done.stdout, (done.returncode, done.stdout, done.stderr[-2000:])


def test_threshold_scale_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="ratio must be in"):
        ops.threshold_scale(x, x, 1.0, 0.0, ratio=1.5)
    with pytest.raises(ValueError, match="model_output must have the shape"):
        ops.threshold_scale(x, x[:, :4], 1.0, 0.0)
    for backend in (None, "reference"):  # (the kernels said "invalid argument", the reference AttributeError)
        with pytest.raises(TypeError, match="model_output must be a torch.Tensor"):
            ops.threshold_scale(x, None, 1.0, -0.5, backend=backend)
    with pytest.raises(ValueError, match="at least one element"):
        ops.threshold_scale(torch.empty(2, 0), torch.empty(2, 0), 1.0, 0.0)
    # a scale of 0 divides x0 by 0, a negative one flips its sign
    for max_value in (0.0, -1.0, 1e-50):  # (1e-50 is 0 in the float32 kernels: the step was all NaN)
        with pytest.raises(ValueError, match="max_value must be positive"):
            ops.threshold_scale(x, x, 1.0, 0.0, max_value=max_value)
    # not numbers, or past float32 (which the kernels' scalars are): errors naming the argument
    for kwargs, name in ((dict(ratio=None), "ratio"), (dict(max_value=None), "max_value"),
                         (dict(max_value=1e39), "max_value"), (dict(guidance_scale="a"), "guidance_scale")):
        with pytest.raises(ValueError, match=f"{name} must be"):
            ops.threshold_scale(x, x, 1.0, 0.0, **kwargs)
    with pytest.raises(ValueError, match="x0_from_x must be a real number"):
        ops.threshold_scale(x, x, None, 0.0)
    c = torch.tensor(ops.coefficients(1.0, 0.0, sample={"x0": 1.0}))
    for kwargs, name in ((dict(clip_value=1e39), "clip_value"), (dict(guidance_scale=None, cond=x), "guidance_scale")):
        with pytest.raises(ValueError, match=f"{name} must be"):
            ops.solver_step(x, x, c, **kwargs)


@pytest.mark.parametrize("backend", usable_backends("threshold_scale"))
def test_threshold_scale_with_a_forced_backend_keeps_its_gradient(backend):
    # a named backend called the kernel directly: no autograd (gradients through a thresholded
    # step silently wrong) and a graph break under torch.compile
    g = torch.Generator().manual_seed(21)
    x, m = (torch.randn(3, 40, generator=g) * 3).requires_grad_(True), torch.randn(3, 40, generator=g)
    scale = ops.threshold_scale(x, m, 1.0, -0.5, ratio=0.9, max_value=100.0, backend=backend)
    assert scale.requires_grad
    (got,) = torch.autograd.grad(scale.sum(), x)
    (expected,) = torch.autograd.grad(ops.threshold_scale(x, m, 1.0, -0.5, ratio=0.9, max_value=100.0).sum(), x)
    torch.testing.assert_close(got, expected)
    compiled = torch.compile(lambda x: ops.threshold_scale(x, m, 1.0, -0.5, ratio=0.9, max_value=100.0,
                                                           backend=backend), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x.detach()), scale.detach())


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_zero_coefficient_drops_an_inf_source(backend):
    x = torch.randn(2, 8)
    noise = torch.full_like(x, float("inf"))
    c = torch.tensor(ops.coefficients(1.0, 0.0, sample={"x": 2.0}), dtype=torch.float32)
    out = ops.solver_step(x, torch.randn_like(x), c, noise=noise, backend=backend).sample
    torch.testing.assert_close(out, 2 * x)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("terms", [1, 2, 4, 5])
def test_a_negative_zero_first_term_sums_to_positive_zero(backend, terms):
    # Every backend sums from +0 (the CPU tile loop started from its first product: -0 there,
    # +0 from the reference, CUDA and Triton), so equal inputs give equal bits.
    x = torch.tensor([[-0.0, -1.0, 0.0]])
    zero = torch.zeros_like(x)
    extra = dict(list(dict(h0=1.0, h1=1.0, h2=1.0, aux=1.0).items())[:terms - 1])
    c = torch.tensor(ops.coefficients(0.0, 1.0, sample={"x": 1.0, **extra}), dtype=torch.float32)
    out = ops.solver_step(x, zero, c, history=[zero] * min(terms - 1, 3),
                          aux=zero if terms > 4 else None, backend=backend).sample
    assert out.tolist() == [[0.0, -1.0, 0.0]]
    assert not torch.signbit(out[0, 0])


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_an_input_not_passed_adds_nothing_whatever_its_coefficient(backend):
    # Triton and CUDA read a missing input as 0 and still added inf * 0 = NaN; the reference and
    # the CPU drop its term
    x = torch.tensor([[0.5, -2.0, 3.0]])
    for source in ("h0", "h1", "h2", "aux", "noise"):
        for value in (math.inf, math.nan):
            c = torch.tensor(ops.coefficients(1.0, 0.0, sample={"x": 1.0, source: value}))
            rows = c.expand(1, -1).contiguous()  # per-sample rows too
            for coefs in (c, rows):
                out = ops.solver_step(x, torch.ones_like(x), coefs, backend=backend).sample
                assert torch.equal(out, x), (source, value, coefs.dim(), out)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_a_negative_dynamic_scale_clamps_as_torch_clamp(backend):
    # torch.clamp(x0, -s, s) with -s > s gives s (applied last); the kernels gave -s below -s
    x = torch.tensor([[1.0, 1.0, -1.0, 0.25]])
    c = torch.tensor(ops.coefficients(0.0, 1.0, sample={"x0": 1.0}))
    for s in (-1.0, -0.5):
        out = ops.solver_step(x, x, c, dynamic_scale=torch.tensor([s]), backend=backend).sample
        assert torch.equal(out, torch.clamp(x, -s, s) / s), (s, out)
        clipped = ops.solver_step(x, x, c, clip_value=0.5, backend=backend).sample
        assert torch.equal(clipped, torch.clamp(x, -0.5, 0.5))


# --------------------------------------------------------------------------- float64 (the reference, in float64)


def _float64_case(seed=20, shape=(2, 3, 5, 7)):
    case = make_case(shape, torch.float64, 3, True, True, True, seed=seed)
    case["coefs"] = torch.randn(29, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return case


def _float64_expected(case, coefs=None, **kw):
    threshold = 1 if kw.get("clip_value") is not None else (2 if kw.get("dynamic_scale") is not None else 0)
    hist = case["history"] + [None] * (3 - len(case["history"]))
    inputs = [case["sample"], case["model_output"], case["cond"], *hist, case["aux"], case["noise"]]
    return ref.solver_step(inputs, case["coefs"] if coefs is None else coefs, kw.get("guidance_scale", 1.0),
                           threshold, kw.get("clip_value") or 1.0, kw.get("dynamic_scale"), torch.float64)


@pytest.mark.parametrize("threshold", ["none", "clip", "dynamic"])
def test_float64_step_is_the_reference_in_float64(threshold):
    case = _float64_case()
    kw = dict(guidance_scale=2.5)
    if threshold == "clip":
        kw["clip_value"] = 0.8
    elif threshold == "dynamic":
        kw["dynamic_scale"] = torch.tensor([1.0, 1.9], dtype=torch.float64)
    expected = _float64_expected(case, **kw)
    public = ops.solver_step(case["sample"], case["model_output"], case["coefs"], cond=case["cond"],
                             history=case["history"], aux=case["aux"], noise=case["noise"], write_history=True,
                             write_aux=True, **kw)
    fused = fused_step(case["sample"], case["model_output"], case["coefs"], case["cond"], 2.5, case["history"],
                       case["aux"], case["noise"], kw.get("clip_value"), kw.get("dynamic_scale"), True, True, None)
    general = _custom_op(case, guidance_scale=2.5, clip_value=kw.get("clip_value"),
                         dynamic_scale=kw.get("dynamic_scale"))
    for outs in (public, fused, general):
        for got, exp in zip(outs, expected):
            assert got.dtype == torch.float64
            assert torch.equal(got, exp)


def test_float64_step_keeps_float64_coefficients():
    """A float64 row is used in full by a float64 step (the same math by hand, to rounding);
    a float32 row is the float64 row rounded, ~1e-8 off; a kernel-dtype step reads a float64
    row rounded to float32, exactly as if given the float32 row."""
    g = torch.Generator().manual_seed(21)
    x64 = torch.randn(2, 3, 17, generator=g, dtype=torch.float64)
    m64 = torch.randn(2, 3, 17, generator=g, dtype=torch.float64)
    a, b, c, d = 0.1234567890123, -1.0000000123, 0.3333333333333, 0.7071067811865
    row = ops.coefficients(a, b, sample={"x": c, "x0": d})
    c64, c32 = torch.tensor(row, dtype=torch.float64), torch.tensor(row, dtype=torch.float32)
    by_hand = c * x64 + d * (a * x64 + b * m64)
    full = ops.solver_step(x64, m64, c64).sample
    rounded = ops.solver_step(x64, m64, c32).sample
    assert full.dtype == rounded.dtype == torch.float64
    assert (full - by_hand).abs().max() <= 1e-15
    assert 1e-9 < (rounded - by_hand).abs().max() < 1e-6
    x32, m32 = x64.float(), m64.float()
    for backend in [None, *BACKENDS, "reference"]:
        assert torch.equal(ops.solver_step(x32, m32, c64, backend=backend).sample,
                           ops.solver_step(x32, m32, c32, backend=backend).sample), backend
    assert torch.equal(fused_step(x32, m32, c64, None, 1.0, (), None, None, None, None, False, False, None).sample,
                       ops.solver_step(x32, m32, c32).sample)


def test_float64_history_dtypes_and_mixed_inputs():
    case = _float64_case(seed=22)
    expected = _float64_expected(case)
    # float32 model output / history read into a float64 step; a float32 history entry written
    mixed = dict(case, model_output=case["model_output"].float(), history=[h.float() for h in case["history"]])
    res = ops.solver_step(mixed["sample"], mixed["model_output"], case["coefs"], cond=case["cond"],
                          history=mixed["history"], aux=case["aux"], noise=case["noise"], write_history=True,
                          history_dtype=torch.float32)
    exp = _float64_expected(mixed)
    assert res.sample.dtype == torch.float64 and res.history.dtype == torch.float32
    assert torch.equal(res.sample, exp[0]) and torch.equal(res.history, exp[1].float())
    res = ops.solver_step(case["sample"], case["model_output"], case["coefs"], cond=case["cond"],
                          history=case["history"], aux=case["aux"], noise=case["noise"], write_history=True)
    assert res.history.dtype == torch.float64 and torch.equal(res.history, expected[1])
    # a float64 tensor in a float32 step stays an error: the kernels read float32/16/bf16 only
    x = case["sample"].float()
    for kwargs, match in ((dict(noise=case["noise"]), "noise must be float32"),
                          (dict(cond=case["cond"]), "cond must be float32"),
                          (dict(history_dtype=torch.float64, write_history=True), "history_dtype"),
                          (dict(dynamic_scale=torch.ones(2, dtype=torch.float64)), "dynamic_scale")):
        with pytest.raises((TypeError, ValueError), match=match):
            ops.solver_step(x, x, case["coefs"], **kwargs)


def test_float64_is_served_by_the_reference_only(monkeypatch, unemulated_backends):
    """No compiled backend claims float64: a forced one (argument or KDFAST_BACKEND) says why."""
    case = _float64_case(seed=23)
    x, m, c = case["sample"], case["model_output"], case["coefs"]
    op = kdfast.backends.op("solver_step")
    assert op.select("cpu").backend == "cpu"  # float32 and friends still get the kernel
    for backend in [*BACKENDS, "cuda"]:
        with pytest.raises(BackendUnavailableError, match=f"backend '{backend}' cannot run kdfast.solver_step on "
                                                          "float64 tensors"):
            ops.solver_step(x, m, c, backend=backend)
        with pytest.raises(BackendUnavailableError, match="kdfast.threshold_scale on float64"):
            ops.threshold_scale(x, m, 1.0, -0.5, backend=backend)
    assert torch.equal(ops.solver_step(x, m, c, backend="reference").sample, ops.solver_step(x, m, c).sample)
    monkeypatch.setenv("KDFAST_BACKEND", "cpu")
    kdfast.backends.refresh()
    try:
        with pytest.raises(BackendUnavailableError, match="float64 is computed by the reference backend"):
            ops.solver_step(x, m, c)
        assert ops.solver_step(x.float(), m.float(), c).sample.dtype == torch.float32
    finally:
        monkeypatch.undo()
        kdfast.backends.refresh()


def test_float64_autograd_and_compile():
    case = _float64_case(seed=24, shape=(2, 3, 4))
    scale = torch.tensor([1.3, 2.0], dtype=torch.float64)
    leaves = [case["sample"].clone().requires_grad_(True), case["model_output"].clone().requires_grad_(True),
              case["history"][0].clone().requires_grad_(True), scale.clone().requires_grad_(True)]
    res = ops.solver_step(leaves[0], leaves[1], case["coefs"], history=[leaves[2]], dynamic_scale=leaves[3],
                          write_history=True)
    assert res.sample.dtype == res.history.dtype == torch.float64
    (res.sample.sin().sum() + res.history.square().sum()).backward()
    exp_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    outs = ref.solver_step([exp_leaves[0], exp_leaves[1], None, exp_leaves[2], None, None, None, None],
                           case["coefs"], 1.0, 2, 1.0, exp_leaves[3], torch.float64)
    (outs[0].sin().sum() + outs[1].square().sum()).backward()
    for got, exp in zip(leaves, exp_leaves):
        assert got.grad.dtype == torch.float64
        torch.testing.assert_close(got.grad, exp.grad, rtol=1e-14, atol=1e-14)
    c = case["coefs"]
    compiled = torch.compile(lambda x, m: ops.solver_step(x, m, c).sample * 2, backend="aot_eager", fullgraph=True)
    x, m = case["sample"], case["model_output"]
    out = compiled(x, m)
    assert out.dtype == torch.float64 and torch.equal(out, ops.solver_step(x, m, c).sample * 2)


def test_opcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    c = torch.randn(29, generator=g, dtype=torch.float64)
    args = (x, torch.randn_like(x), c, torch.randn_like(x), 3.0, torch.randn_like(x), None, None,
            torch.randn_like(x), torch.randn_like(x), 2, 1.0, torch.tensor([1.5, 2.5], dtype=torch.float64), 7,
            torch.float64, "")
    torch.library.opcheck(torch.ops.kdfast.solver_step.default, args)
    torch.library.opcheck(torch.ops.kdfast.threshold_scale.default,
                          (x * 3, torch.randn_like(x), None, 1.0, 1.0, -0.5, 0.9, 2.0, ""))


@pytest.mark.parametrize("shape,ratio", [((1, 1), 0.995), ((3, 4, 8, 8), 0.995), ((2, 1031), 0.5), ((2, 7), 1.0)])
def test_threshold_scale_float64(shape, ratio):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    cond = torch.randn(shape, generator=g, dtype=torch.float64)
    got = ops.threshold_scale(x, m, 0.8, -0.3, cond=cond, guidance_scale=2.0, ratio=ratio, max_value=100.0)
    x0 = 0.8 * x - 0.3 * (m + 2.0 * (cond - m))
    expected = np.quantile(x0.reshape(shape[0], -1).abs().numpy(), ratio, axis=1).clip(1.0, 100.0)
    assert got.dtype == torch.float64 and got.shape == (shape[0],)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-15, atol=0)


# --------------------------------------------------------------------------- gradient of dynamic thresholding


def _threshold_grads(x, m, cond, guidance_scale, cx, cm, ratio, max_value, weight, via_reference):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, m, cond)]
    if via_reference:  # autograd through torch.quantile (what diffusers differentiates)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = ref.threshold_scale(*leaves[:3], guidance_scale, cx, cm, ratio, max_value, compute)
    else:
        out = ops.threshold_scale(leaves[0], leaves[1], cx, cm, cond=leaves[2], guidance_scale=guidance_scale,
                                  ratio=ratio, max_value=max_value)
        assert out.grad_fn is not None
    (out * weight).sum().backward()
    return out, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_cond", [False, True])
@pytest.mark.parametrize("shape,ratio", [((3, 4, 8, 8), 0.995), ((2, 1031), 0.5), ((2, 7), 1.0), ((2, 7), 0.0),
                                         ((4, 1), 0.9), ((2, 256), 0.2)])
def test_threshold_scale_gradient_is_the_references(dtype, with_cond, shape, ratio):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    m = torch.randn(shape, generator=g).to(dtype)
    cond = torch.randn(shape, generator=g).to(dtype) if with_cond else None
    weight = torch.linspace(0.5, 2.0, shape[0], dtype=dtype)
    # max_value 4 clamps some rows from above, ratio 0 clamps all of them from below
    for max_value in (100.0, 4.0):
        args = (x, m, cond, 2.0, 0.8, -0.3, ratio, max_value, weight)
        got_out, got = _threshold_grads(*args, via_reference=False)
        exp_out, exp = _threshold_grads(*args, via_reference=True)
        assert got_out.dtype == exp_out.dtype
        torch.testing.assert_close(got_out, exp_out, rtol=2e-6, atol=2e-6)
        for a, b in zip(got, exp):
            if b is None:
                assert a is None
            else:
                assert a.dtype == dtype
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        # rows whose quantile is clamped (to 1 from below, e.g. all rows at ratio 0, or to
        # max_value) get no gradient; the others do
        live = (exp_out > 1) & (exp_out < max_value)
        per_row = got[0].reshape(shape[0], -1).abs().sum(1)
        assert torch.equal(per_row > 0, live), (per_row, exp_out)
        if ratio == 0.0:
            assert not live.any()


def test_threshold_scale_gradient_ties_nan_and_half():
    # ties: torch.quantile's sort decides which equal element gets the gradient, and so does ours
    x = torch.tensor([[3.0, -3.0, 3.0, 1.0, -2.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0, -2.0, 2.0, 2.0]])
    for ratio in (0.5, 0.9, 1.0):
        _, got = _threshold_grads(x, torch.zeros_like(x), None, 1.0, 1.0, 0.0, ratio, 10.0, torch.ones(2), False)
        _, exp = _threshold_grads(x, torch.zeros_like(x), None, 1.0, 1.0, 0.0, ratio, 10.0, torch.ones(2), True)
        torch.testing.assert_close(got[0], exp[0])
        torch.testing.assert_close(got[1], exp[1])
    # a row with NaN has a NaN scale and no gradient, as through torch.quantile + clamp
    x = torch.randn(2, 33, generator=torch.Generator().manual_seed(1)) * 3
    x[1, 4] = float("nan")
    out, got = _threshold_grads(x, torch.zeros_like(x), None, 1.0, 1.0, 0.0, 0.9, 10.0, torch.ones(2), False)
    assert out[1].isnan() and got[0][1].eq(0).all() and got[0][0].abs().sum() > 0
    # half inputs: gradients in their dtype, from float32 math
    xh = (torch.randn(2, 64, generator=torch.Generator().manual_seed(2)) * 3).half()
    _, got = _threshold_grads(xh, torch.zeros_like(xh), None, 1.0, 1.0, 0.0, 0.9, 10.0, torch.ones(2), False)
    _, exp = _threshold_grads(xh.float(), torch.zeros(2, 64), None, 1.0, 1.0, 0.0, 0.9, 10.0, torch.ones(2), True)
    assert got[0].dtype == torch.float16
    torch.testing.assert_close(got[0].float(), exp[0], rtol=1e-3, atol=1e-3)


def test_threshold_scale_gradcheck_float64():
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    m = torch.randn(2, 3, 11, generator=g, dtype=torch.float64).requires_grad_(True)
    cond = torch.randn(2, 3, 11, generator=g, dtype=torch.float64).requires_grad_(True)
    fn = lambda x, m, cond: ops.threshold_scale(x, m, 0.8, -0.3, cond=cond, guidance_scale=2.0,  # noqa: E731
                                                ratio=0.9, max_value=100.0)
    assert torch.autograd.gradcheck(fn, (x, m, cond), eps=1e-7, atol=1e-7)


def test_thresholded_step_gradient_is_the_references():
    """A whole dynamically thresholded step (threshold_scale, then the step with that scale)
    differentiates like the reference under autograd, the scale's path included."""
    case = make_case((2, 3, 6, 5), torch.float32, 1, True, False, False, seed=12)
    c = torch.tensor(ops.coefficients(1.1, -0.7, sample={"x": 0.6, "x0": 0.3, "h0": 0.1}, history={"x0": 1.0}),
                     dtype=torch.float32)
    results = []
    for via_reference in (False, True):
        x, m, cond, h = [t.clone().mul(3 if k == 0 else 1).requires_grad_(True)
                         for k, t in enumerate((case["sample"], case["model_output"], case["cond"],
                                                case["history"][0]))]
        if via_reference:
            scale = ref.threshold_scale(x, m, cond, 1.5, 1.1, -0.7, 0.9, 10.0)
            outs = ref.solver_step([x, m, cond, h, None, None, None, None], c, 1.5, 2, 1.0, scale)[:2]
        else:
            scale = ops.threshold_scale(x, m, 1.1, -0.7, cond=cond, guidance_scale=1.5, ratio=0.9, max_value=10.0)
            res = ops.solver_step(x, m, c, cond=cond, guidance_scale=1.5, history=[h], dynamic_scale=scale,
                                  write_history=True)
            outs = [res.sample, res.history]
        assert ((scale > 1) & (scale < 10)).all()  # the quantile path is live
        (outs[0].sin().sum() + outs[1].square().sum()).backward()
        results.append([x.grad, m.grad, cond.grad, h.grad])
    for got, exp in zip(*results):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_no_grad_calls_skip_the_dispatcher(monkeypatch, good, unemulated_backends):
    """Without inputs that need a gradient, threshold_scale and the step never box through the
    custom ops (the autograd formulas cost nothing then)."""
    x, m, c = good
    calls = []

    def spy(name):
        def call(*args):
            calls.append(name)
            raise AssertionError(f"torch.ops.kdfast.{name} on a no-grad call")
        return call

    monkeypatch.setattr(torch.ops.kdfast, "threshold_scale", spy("threshold_scale"))
    monkeypatch.setattr(torch.ops.kdfast, "solver_step", spy("solver_step"))
    launches = []
    real = ops.solver_step.__globals__["_LAUNCHERS"]["cpu"]
    monkeypatch.setitem(ops.solver_step.__globals__["_LAUNCHERS"], "cpu",
                        lambda x, args: (launches.append(1), real(x, args)))
    for x_ in (x, x.clone().requires_grad_(True)):
        with torch.no_grad() if x_.requires_grad else torch.enable_grad():
            dyn = ops.threshold_scale(x_, m, 1.0, -0.5, ratio=0.9, max_value=2.0)
            ops.solver_step(x_, m, c, dynamic_scale=dyn)
            fused_step(x_, m, c, None, 1.0, (), None, None, None, dyn, False, False, None)
    assert calls == [] and len(launches) == 4
    monkeypatch.undo()
    xg = x.clone().requires_grad_(True)
    assert ops.threshold_scale(xg, m, 1.0, -0.5, ratio=0.9, max_value=2.0).grad_fn is not None


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(2, 4, 128, 128)])
def test_gpu_backends_match_reference(backend, dtype, shape):
    if kdfast.backends.op("solver_step").reason(backend, "cuda"):
        pytest.skip(kdfast.backends.op("solver_step").reason(backend, "cuda"))
    case = make_case(shape, dtype, 2, True, True, True)
    cuda_case = {k: (v.cuda() if isinstance(v, torch.Tensor) and k != "coefs" else
                     [h.cuda() for h in v] if isinstance(v, list) else v) for k, v in case.items()}
    res = ops.solver_step(cuda_case["sample"], cuda_case["model_output"], case["coefs"], cond=cuda_case["cond"],
                          guidance_scale=3.0, history=cuda_case["history"], aux=cuda_case["aux"],
                          noise=cuda_case["noise"], write_history=True, write_aux=True, clip_value=1.5,
                          backend=backend)
    r64 = reference_outputs(case, torch.float64, 3.0, 1, 1.5)
    rlow = reference_outputs(case, dtype, 3.0, 1, 1.5)
    for out, e64, elow in zip(res, r64, rlow):
        assert_close_by_rule(out.cpu(), e64, elow.to(dtype), f"{backend} {dtype}")


@pytest.mark.gpu
def test_gpu_threshold_scale_matches_quantile():
    x = torch.randn(3, 4, 64, 64, device="cuda") * 3
    m = torch.randn_like(x)
    # max_value 100: the quantiles (~6.8) stay unclamped, so the radix select itself is checked
    got = ops.threshold_scale(x, m, 0.8, -0.3, ratio=0.995, max_value=100.0, backend="cuda")
    exp = ref.threshold_scale(x.double(), m.double(), None, 1.0, 0.8, -0.3, 0.995, 100.0, torch.float64)
    assert (exp > 4).all()
    torch.testing.assert_close(got.cpu(), exp.float().cpu(), rtol=2e-6, atol=2e-6)
    x[1, 0, 5, 7] = float("nan")  # the radix select would order NaN above inf and skip it
    got = ops.threshold_scale(x, m, 0.8, -0.3, ratio=0.995, max_value=4.0, backend="cuda")
    assert got[1].isnan() and torch.isfinite(got[[0, 2]]).all()
    # A sample that ends in a partial block pass, and values with many ties (each warp adds
    # its lanes' counts per bin at once): the same quantile as torch's.
    x = torch.randint(0, 7, (2, 3, 37, 41), device="cuda").float() * 1.25 + 2
    m = torch.zeros_like(x)
    for ratio in (0.5, 0.9, 0.995):
        got = ops.threshold_scale(x, m, 1.0, 0.0, ratio=ratio, max_value=100.0, backend="cuda")
        exp = ref.threshold_scale(x.double(), m.double(), None, 1.0, 1.0, 0.0, ratio, 100.0, torch.float64)
        torch.testing.assert_close(got.cpu(), exp.float().cpu(), rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
def test_gpu_threshold_scale_backward_has_no_syncs():
    # The backward's interpolation weight is a Python number: as a tensor made on the GPU it was
    # a host-to-device copy, which syncs (an error here, a failure inside a captured backward).
    x = (torch.randn(2, 4, 16, 16, device="cuda") * 3).requires_grad_(True)
    m = torch.randn_like(x)
    weight = torch.linspace(0.5, 2.0, 2, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.threshold_scale(x, m, 0.8, -0.3, ratio=0.9, max_value=100.0)
        (grad,) = torch.autograd.grad((out * weight).sum(), x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _, (expected, *_) = _threshold_grads(x.detach().cpu(), m.cpu(), None, 1.0, 0.8, -0.3, 0.9, 100.0,
                                         weight.cpu(), True)
    torch.testing.assert_close(grad.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "triton"])
def test_gpu_step_has_no_syncs_and_captures_in_a_cuda_graph(backend):
    x = torch.randn(2, 4, 64, 64, device="cuda")
    m, h = torch.randn_like(x), torch.randn_like(x)
    c = torch.tensor(ops.coefficients(1.0, -0.5, sample={"x": 0.9, "x0": 0.1, "h0": 0.2}, history={"x0": 1.0}),
                     dtype=torch.float32)
    dyn = ops.threshold_scale(x, m, 1.0, -0.5, max_value=2.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = ops.solver_step(x, m, c, cond=h, guidance_scale=2.0, history=[h], dynamic_scale=dyn,
                                write_history=True, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.solver_step(x, m, c, cond=h, guidance_scale=2.0, history=[h], dynamic_scale=dyn, write_history=True,
                         backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = ops.solver_step(x, m, c, cond=h, guidance_scale=2.0, history=[h], dynamic_scale=dyn,
                                   write_history=True, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured.sample, eager.sample)
    torch.testing.assert_close(captured.history, eager.history)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_rows_per_sample(backend, dtype):
    if kdfast.backends.op("solver_step").reason(backend, "cuda"):
        pytest.skip(kdfast.backends.op("solver_step").reason(backend, "cuda"))
    case = _rows_case((5, 4, 64, 64), dtype)
    cuda_case = {k: (v.cuda() if isinstance(v, torch.Tensor) and k != "coefs" else
                     [h.cuda() for h in v] if isinstance(v, list) else v) for k, v in case.items()}
    dyn = torch.linspace(1.0, 2.0, 5)
    dyn_cuda = dyn.cuda()
    for rows in (case["coefs"], case["coefs"].cuda()):  # host rows are copied over without a sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            res = _run_case(dict(cuda_case, coefs=rows), backend, guidance_scale=2.5, dynamic_scale=dyn_cuda)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        args = dict(guidance_scale=2.5, threshold=2, dyn=dyn)
        for out, e64, elow in zip(res, reference_outputs(case, torch.float64, **args),
                                  reference_outputs(case, dtype, **args)):
            assert_close_by_rule(out.cpu(), e64, elow.to(dtype), f"{backend} rows {dtype}")
        for b in (0, 3):
            alone = _run_case(_sample_slice(cuda_case, b), backend, guidance_scale=2.5,
                              dynamic_scale=dyn_cuda[b:b + 1])
            if backend == "cuda":  # the same arithmetic on the same values: the same bits
                assert torch.equal(res.sample[b:b + 1], alone.sample)
            else:  # (Triton compiles the two variants apart; its FMA contraction may differ)
                torch.testing.assert_close(res.sample[b:b + 1], alone.sample)


@pytest.mark.gpu
def test_gpu_rows_per_sample_in_a_cuda_graph():
    x = torch.randn(3, 4, 32, 32, device="cuda")
    m = torch.randn_like(x)
    rows = torch.randn(3, 29)
    eager = ops.solver_step(x, m, rows).sample
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.solver_step(x, m, rows.cuda())
    torch.cuda.current_stream().wait_stream(stream)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        with torch.cuda.graph(graph):
            ops.solver_step(x, m, rows)  # host rows: refused, they would be read again at each replay
    graph = torch.cuda.CUDAGraph()
    device_rows = rows.cuda()
    with torch.cuda.graph(graph):
        captured = ops.solver_step(x, m, device_rows).sample
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)


# --------------------------------------------------------------------------- gradients of every input


# One distinct coefficient per (output, source): a gradient sent to the wrong input shows.
_DISTINCT_COEFS = torch.tensor([0.7, -0.45] + [0.1 * (k + 1) + 0.013 * (j + 1) * (-1) ** j
                                               for k in range(3) for j in range(9)], dtype=torch.float32)


@pytest.mark.parametrize("n_hist,with_aux,with_noise",
                         [(0, True, False), (1, False, True), (1, True, True), (2, True, False), (2, False, True),
                          (3, True, True), (3, False, False)])
@pytest.mark.parametrize("threshold", ["none", "clip"])
def test_backward_of_every_input_matches_autograd_through_the_reference(n_hist, with_aux, with_noise, threshold):
    """cond, each history entry, aux and noise all need a gradient; each gets autograd's through
    the pure-torch reference, for every subset of the optional inputs (an entry saved for the
    backward in the wrong slot would give another input's gradient, or none)."""
    case = make_case((2, 3, 5), torch.float32, n_hist, True, with_aux, with_noise, seed=40 + n_hist)
    names = ["sample", "model_output", "cond"] + [f"h{k}" for k in range(n_hist)] + \
        (["aux"] if with_aux else []) + (["noise"] if with_noise else [])
    values = [case["sample"] * 2, case["model_output"], case["cond"], *case["history"]] + \
        ([case["aux"]] if with_aux else []) + ([case["noise"]] if with_noise else [])
    clip = 0.6 if threshold == "clip" else None
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(2, 3, 5, generator=g) for _ in range(3)]

    def run(via_reference):
        leaves = [v.detach().clone().requires_grad_(True) for v in values]
        by = dict(zip(names, leaves))
        hist = [by[f"h{k}"] for k in range(n_hist)]
        if via_reference:
            inputs = [by["sample"], by["model_output"], by["cond"], *(hist + [None] * (3 - n_hist)),
                      by.get("aux"), by.get("noise")]
            outs = ref.solver_step(inputs, _DISTINCT_COEFS, 1.7, 1 if clip is not None else 0,
                                   clip if clip is not None else 1.0)
        else:
            outs = ops.solver_step(by["sample"], by["model_output"], _DISTINCT_COEFS, cond=by["cond"],
                                   guidance_scale=1.7, history=hist, aux=by.get("aux"), noise=by.get("noise"),
                                   clip_value=clip, write_history=True, write_aux=True)
            assert all(o.grad_fn is not None for o in outs)
        sum(((o * w).sum() for o, w in zip(outs, weights))).backward()
        return [t.grad for t in leaves]

    got, exp = run(False), run(True)
    for name, a, b in zip(names, got, exp):
        assert a is not None, f"no gradient for {name}"
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"gradient of {name}")


def test_backward_history_entries_in_mixed_dtypes():
    """A float16 and a float32 history entry each get their gradient, in their own dtype."""
    case = make_case((2, 9), torch.float32, 2, False, False, False, seed=44)
    h0 = case["history"][0].half().requires_grad_(True)
    h1 = case["history"][1].clone().requires_grad_(True)
    out = ops.solver_step(case["sample"], case["model_output"], _DISTINCT_COEFS, history=[h0, h1],
                          write_history=True)
    (out.sample.sum() + 2 * out.history.sum()).backward()
    assert h0.grad.dtype == torch.float16 and h1.grad.dtype == torch.float32
    c = _DISTINCT_COEFS
    torch.testing.assert_close(h0.grad.float(), torch.full((2, 9), float(c[2 + 4] + 2 * c[11 + 4])),
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h1.grad, torch.full((2, 9), float(c[2 + 5] + 2 * c[11 + 5])))


# --------------------------------------------------------------------------- clip_value = 0


@pytest.mark.parametrize("backend", [None, *BACKENDS, "reference"])
@pytest.mark.parametrize("path", ["public", "fused", "autograd", "float64"])
def test_clip_value_zero_clamps_x0_to_zero(backend, path):
    """clip_value=0.0 is a clamp to [0, 0] (x0 = 0), not "no clipping"."""
    if path == "float64" and backend not in (None, "reference"):
        pytest.skip("float64 is served by the reference only")
    dtype = torch.float64 if path == "float64" else torch.float32
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 7, generator=g, dtype=dtype) * 3
    m = torch.randn(2, 3, 7, generator=g, dtype=dtype) * 3
    c = torch.tensor(ops.coefficients(1.0, -0.5, sample={"x": 0.5, "x0": 2.0}, history={"x0": 1.0}),
                     dtype=torch.float32)
    if path == "autograd":
        x = x.clone().requires_grad_(True)
    if path == "fused":
        res = fused_step(x, m, c, None, 1.0, (), None, None, 0.0, None, True, False, None, backend)
    else:
        res = ops.solver_step(x, m, c, clip_value=0.0, write_history=True, backend=backend)
    torch.testing.assert_close(res.sample.detach(), (0.5 * x).detach())
    assert (res.history == 0).all()
    if path == "autograd":
        res.sample.sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))  # no gradient through a clamped x0


# --------------------------------------------------------------------------- one source at a time


def _one_source_case(batch, device="cpu"):
    g = torch.Generator().manual_seed(31)
    tensors = [torch.randn(batch, 3, 37, generator=g) for _ in range(8)]
    return [t.to(device) for t in tensors]


def _check_each_source(backend, device="cpu"):
    # the Triton interpreter runs one program per sample: one sample keeps it fast
    x, model, cond, h0, h1, h2, aux, noise = _one_source_case(1 if backend == "triton" else 2, device)
    for j, source in enumerate(ops.solver_step.__globals__["SOURCES"]):
        c = torch.tensor(ops.coefficients(0.8, -0.3, sample={source: 1.5 + j}, history={source: -0.75},
                                          aux={source: 0.25 * j - 3.0}), dtype=torch.float32)
        res = ops.solver_step(x, model, c, cond=cond, guidance_scale=2.5, history=[h0, h1, h2], aux=aux,
                              noise=noise, write_history=True, write_aux=True, backend=backend)
        exp = ref.solver_step([t.cpu() for t in (x, model, cond, h0, h1, h2, aux, noise)], c, 2.5)
        for k, (got, want) in enumerate(zip(res, exp)):
            assert want.abs().sum() > 0
            torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5,
                                       msg=f"{backend}: output {k} from {source} alone")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_every_source_alone_with_a_nonzero_coefficient(backend):
    """Each of the 9 sources (noise last) feeds each of the 3 outputs on its own."""
    _check_each_source(backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_every_source_alone_with_a_nonzero_coefficient(backend):
    if kdfast.backends.op("solver_step").reason(backend, "cuda"):
        pytest.skip(kdfast.backends.op("solver_step").reason(backend, "cuda"))
    _check_each_source(backend, "cuda")


# --------------------------------------------------------------------------- batch-strided layouts


def _batch_strided_layouts(shape, seed):
    """(name, tensor) pairs of one value in layouts whose samples are each one contiguous block."""
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(shape, generator=g)
    batch = shape[0]
    inner = value[0].numel()
    wide = torch.randn((batch, 2 * shape[1]) + tuple(shape[2:]), generator=g)
    wide[:, :shape[1]] = value
    padded = torch.randn(batch * (inner + 5), generator=g)
    padded_view = padded.as_strided(shape, (inner + 5,) + value[0].stride(), 3)
    padded_view.copy_(value)
    doubled = torch.cat([value, torch.full_like(value, 9.0)])  # [uncond; cond] halves (contiguous)
    cfg_first, _ = doubled.chunk(2)
    interleaved = torch.stack([value, -value], 1)[:, 0]
    return value, [("slice_of_wider", wide[:, :shape[1]]), ("padded_batch_stride", padded_view),
                   ("cfg_half", cfg_first), ("interleaved", interleaved)]


def test_sample_layout_keeps_views_and_copies_the_rest():
    from kdfast.ops._tensors import in_layout, sample_layout
    value, layouts = _batch_strided_layouts((3, 4, 5), 0)
    for name, t in layouts:
        kept = sample_layout(t)
        assert kept.data_ptr() == t.data_ptr() and kept.stride() == t.stride(), name
    # samples that are dense blocks in another order (channels_last-like) are kept as well
    for t in (value.transpose(1, 2), torch.randn(1, 5, 4).transpose(1, 2), value.transpose(1, 2)[:2]):
        assert sample_layout(t) is t
    for t in (value[:, :, ::2], value.transpose(1, 2)[:, ::2], torch.randn(3, 4, 2)[..., :1].expand(3, 4, 5)):
        copied = sample_layout(t)
        assert copied.is_contiguous() and torch.equal(copied, t)
    big = torch.randn(3, 8)
    assert sample_layout(big[:1, :4]).data_ptr() == big.data_ptr()  # batch of 1, contiguous sample
    # in_layout: a tensor whose samples are ordered as the sample's stays; another order is copied into it
    like = value.transpose(1, 2)
    assert in_layout(torch.randn(5, 4, 3).permute(2, 0, 1), like).stride() == (20, 1, 5)
    moved = in_layout(value.transpose(1, 2).contiguous(), like)
    assert moved.stride() == like.stride() and torch.equal(moved, like)
    assert in_layout(value.transpose(1, 2).contiguous(), value.transpose(1, 2).contiguous()).is_contiguous()


_SLOTS = ["sample", "model_output", "cond", "h0", "h1", "h2", "aux", "noise", "all"]


@pytest.mark.parametrize("backend,slot", [(b, s) for b in [None, "cpu", "reference"] for s in _SLOTS] +
                         [(b, "all") for b in BACKENDS if b not in ("cpu", "reference")])
def test_batch_strided_inputs_match_contiguous_ones(backend, slot):
    """Inputs whose samples are contiguous blocks at a batch stride other than numel / batch (a
    slice of a wider tensor, a padded batch stride, a CFG half, an interleaved batch) are read
    in place at their stride, by every backend, and give the contiguous inputs' step."""
    shape = (3, 4, 5)
    names = ["sample", "model_output", "cond", "h0", "h1", "h2", "aux", "noise"]
    values, variants = {}, {}
    for k, name in enumerate(names):
        values[name], variants[name] = _batch_strided_layouts(shape, 50 + k)
    c = random_coefs(torch.Generator().manual_seed(8))

    def step(inputs, dyn=None, clip=None):
        return ops.solver_step(inputs["sample"], inputs["model_output"], c, cond=inputs["cond"], guidance_scale=2.0,
                               history=[inputs["h0"], inputs["h1"], inputs["h2"]], aux=inputs["aux"],
                               noise=inputs["noise"], write_history=True, write_aux=True, clip_value=clip,
                               dynamic_scale=dyn, backend=backend)

    expected = ref.solver_step([values[n] for n in names], c, 2.0)
    for layout in range(4):
        inputs = dict(values)
        for name in (names if slot == "all" else [slot]):
            inputs[name] = variants[name][layout][1]
        what = f"{backend} {slot} {variants[names[0]][layout][0]}"
        for got, want in zip(step(inputs), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)
        if backend == "triton":
            continue  # the interpreter is slow; the layouts are what this checks
        clipped = ref.solver_step([values[n] for n in names], c, 2.0, 1, 0.4)
        for got, want in zip(step(inputs, clip=0.4), clipped):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what + " clipped")


def _batch_strided(value, kind):
    """``value`` (a leaf or not) as a batch-strided view that autograd follows back to it."""
    batch, first = value.shape[0], value.shape[1]
    if kind == "slice_of_wider":
        return torch.cat([value, torch.zeros_like(value)], 1)[:, :first]
    if kind == "interleaved":
        return torch.stack([value, -value], 1)[:, 0]
    padded = torch.cat([value.reshape(batch, -1), torch.zeros(batch, 5)], 1)
    return padded[:, :value[0].numel()].unflatten(1, value.shape[1:])


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_batch_strided_inputs_under_autograd_and_threshold_scale(backend):
    """The same layouts through the custom op (inputs that need a gradient) and threshold_scale."""
    shape = (3, 4, 5)
    g = torch.Generator().manual_seed(60)
    x, m, h = (torch.randn(shape, generator=g) for _ in range(3))
    c = random_coefs(torch.Generator().manual_seed(9))
    want = ref.solver_step([x, m, None, h, None, None, None, None], c)[0]
    want_scale = ref.threshold_scale(x * 3, m, None, 1.0, 1.0, -0.5, 0.9, 100.0, torch.float64).float()
    for kind in ("slice_of_wider", "interleaved", "padded"):
        leaves = [t.clone().requires_grad_(True) for t in (x, m, h)]
        views = [_batch_strided(t, kind) for t in leaves]
        assert not views[0].is_contiguous() and views[0][0].is_contiguous()
        got = ops.solver_step(*views[:2], c, history=[views[2]], backend=backend).sample
        assert got.grad_fn is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=kind)
        got.sum().backward()
        for leaf, value in zip(leaves, (float(c[2] + c[0] * c[5]), float(c[3] + c[4] + c[1] * c[5]), float(c[6]))):
            torch.testing.assert_close(leaf.grad, torch.full(shape, value), rtol=1e-5, atol=1e-5, msg=kind)
        with torch.no_grad():
            xs, ms = _batch_strided(x * 3, kind), _batch_strided(m, kind)
        scale = ops.threshold_scale(xs, ms, 1.0, -0.5, ratio=0.9, max_value=100.0,
                                    backend=backend if backend in usable_backends("threshold_scale") else None)
        torch.testing.assert_close(scale, want_scale, rtol=2e-6, atol=2e-6, msg=kind)


# --------------------------------------------------------------------------- quantile positions


@pytest.mark.parametrize("backend", usable_backends("threshold_scale") + ["reference"])
def test_threshold_scale_at_a_fractional_quantile_position_across_a_gap(backend):
    # ratio 0.995 over 1000 values: position 994.005, between a value 2 and a value 102, so the
    # quantile is 2.5 (the next position up would give about 102)
    x = torch.cat([torch.linspace(0.5, 2.0, 995), torch.linspace(102.0, 110.0, 5)]).reshape(1, 1000)
    x = x[:, torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    x = torch.cat([x, -x])  # |x0|
    got = ops.threshold_scale(x, torch.zeros_like(x), 1.0, 0.0, ratio=0.995, max_value=1000.0, backend=backend)
    exp = torch.quantile(x.abs(), 0.995, dim=1)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert abs(got[0].item() - 2.5) < 1e-3
    # and a thresholded step uses it
    c = torch.tensor(ops.coefficients(1.0, 0.0, sample={"x0": 1.0}), dtype=torch.float32)
    out = ops.solver_step(x, torch.zeros_like(x), c, dynamic_scale=got, backend=None if backend == "triton" else
                          backend).sample
    torch.testing.assert_close(out, x.clamp(-2.5, 2.5) / 2.5, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device, backend", [("cpu", "cpu"), ("cpu", "reference"),
                                             pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
def test_threshold_scale_beyond_two_to_the_24_at_a_fractional_position(device, backend):
    # n = 2^24 + 4 values (the float64 position path): the median sits at 8388609.5, between the
    # 8388610 ones and the 5s, so the scale is 3 (the next position up would give 5). The
    # reference (float64 samples, GPUs without the CUDA extension) cannot use torch.quantile,
    # which refuses rows of more than 2^24 values.
    n = (1 << 24) + 4
    lo = 8388610
    x = torch.full((1, n), 5.0)
    x[0, :lo] = 1.0
    got = ops.threshold_scale(x.to(device), torch.zeros(1, n, device=device), 1.0, 0.0, ratio=0.5,
                              max_value=100.0, backend=backend)
    assert abs(got.item() - 3.0) <= 1e-6
    if backend == "reference":
        x[0, 7] = float("nan")  # a NaN makes the quantile NaN, as torch.quantile's
        assert ops.threshold_scale(x, torch.zeros(1, n), 1.0, 0.0, ratio=0.5, max_value=100.0,
                                   backend=backend).isnan().all()
    del x


def test_vmap_goes_through_the_dispatcher():
    # Batched (functorch) tensors have no memory of their own: the step is not launched on
    # their addresses; the dispatcher batches it or names the op it cannot batch.
    g = torch.Generator().manual_seed(61)
    x, m = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 4, 5, generator=g)
    c = random_coefs(g)
    try:
        got = torch.vmap(lambda a, b: ops.solver_step(a, b, c).sample)(x, m)
    except RuntimeError as e:
        assert "kdfast::solver_step" in str(e)
    else:
        torch.testing.assert_close(got, torch.stack([ops.solver_step(a, b, c).sample for a, b in zip(x, m)]))


def fp16_round_trips(backend="cpu"):
    """Every fp16 bit pattern widened by the kernel (an fp32 history output of the fp16 input)
    and fp32 values across fp16's whole range (subnormals, ties, overflow) narrowed (an fp16
    sample output of an fp32 model output), with what torch gives for each (-0 as +0: a step's
    sums start from +0 on every backend)."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(4, -1)
    widen = torch.tensor(ops.coefficients(0.0, 0.0, {"x": 1.0}, {"x": 1.0}), dtype=torch.float32)
    _, widened, _ = ops.solver_step(every, torch.zeros_like(every), widen, history=[], write_history=True,
                                    history_dtype=torch.float32, backend=backend)
    g = torch.Generator().manual_seed(0)
    wide = torch.cat([every.float().reshape(-1),  # exact fp16 values, and the ties halfway between them
                      (every.float().reshape(-1)[:-1] + every.float().reshape(-1)[1:]) / 2,
                      torch.randn(20000, generator=g) * torch.logspace(-10, 5.5, 20000).float(),
                      torch.tensor([65504.0, 65519.0, 65520.0, 1e9, -1e9, 2.0**-25, 2.0**-26, 3 * 2.0**-26])])
    wide = wide[torch.isfinite(wide)].reshape(1, -1)
    narrow = torch.tensor(ops.coefficients(0.0, 0.0, {"model": 1.0}), dtype=torch.float32)
    narrowed, _, _ = ops.solver_step(torch.zeros_like(wide, dtype=torch.float16), wide, narrow, backend=backend)
    return (widened, every.float() + 0.0), (narrowed, (wide + 0.0).half())


def test_cpu_fp16_conversions_are_exact_and_round_like_torch():
    # The CPU kernel converts fp16 blocks with F16C where the CPU has it, in software otherwise
    # (test_extensions runs both): every value widens exactly and narrows to nearest-even.
    for got, expected in fp16_round_trips():
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16 if got.dtype == torch.float16 else torch.int32),
                           expected[~nan].view(torch.int16 if got.dtype == torch.float16 else torch.int32))


@pytest.mark.parametrize("name", ["guidance_scale", "clip_value", "max_value", "x0_from_model"])
def test_a_float_that_changes_between_compiled_calls_keeps_a_full_graph(name):
    # math.isfinite on a float that torch.compile made symbolic broke the graph; a non-finite
    # value is still refused, when the compiled code runs. (The op takes the number as a graph
    # constant: each new value compiles once, as the README says, up to torch's limit of 8.)
    coefs = torch.tensor(ops.coefficients(1.0, -0.5, sample={"x0": 0.7, "x": 0.3}))
    g = torch.Generator().manual_seed(50)
    x, m, c = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    fn = {"guidance_scale": lambda v: ops.solver_step(x, m, coefs, cond=c, guidance_scale=v).sample,
          "clip_value": lambda v: ops.solver_step(x, m, coefs, clip_value=v).sample,
          "max_value": lambda v: ops.threshold_scale(x, m, 1.0, -0.5, max_value=v),
          "x0_from_model": lambda v: ops.threshold_scale(x, m, 1.0, v)}[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    for v in (2.0, 3.0, 4.5):
        torch.testing.assert_close(compiled(v), fn(v))
    with pytest.raises(RuntimeError, match=f"{name} must be finite"):
        compiled(math.nan)


def test_coefficients_changed_in_place_before_the_backward_are_refused():
    # kept as a plain attribute, the changed table gave other gradients (73 for 1) without a word
    x = torch.randn(2, 3, 4, requires_grad=True)
    coefs = torch.tensor(ops.coefficients(1.0, -0.5, sample={"x0": 0.7, "x": 0.3}))
    out = ops.solver_step(x, torch.randn(2, 3, 4), coefs).sample
    with torch.no_grad():
        coefs.mul_(10.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_an_empty_batch_under_vmap_and_through_the_registered_op():
    # reshape(batch, -1) cannot infer -1 for no elements; the direct op divided by the batch
    coefs = torch.tensor(ops.coefficients(1.0, -0.5, sample={"x0": 0.7, "x": 0.3}))
    x, m = torch.randn(0, 2, 3, 4), torch.randn(0, 2, 3, 4)
    assert torch.func.vmap(lambda x, m: ops.threshold_scale(x, m, 1.0, -0.5))(x, m).shape == (0, 2)
    step = torch.func.vmap(lambda x, m: ops.solver_step(x, m, coefs,
                                                        dynamic_scale=ops.threshold_scale(x, m, 1.0, -0.5)).sample)
    assert step(x, m).shape == (0, 2, 3, 4)
    assert torch.ops.kdfast.threshold_scale(x, m, None, 1.0, 1.0, -0.5, 0.9, 1.5, "").shape == (0,)
    assert ops.threshold_scale(x.flatten(0, 1), m.flatten(0, 1), 1.0, -0.5).shape == (0,)  # (it was refused)
