import importlib
import math

import numpy as np

import pytest
import torch

from kdfast import ops
from kdfast.backends import BackendUnavailableError
from kdfast.ops._tensors import number_tensor
from kdfast.ops.kd_divergence import KINDS, _kd_divergence
from kdfast.reference import kd_divergence as ref

from conftest import usable_backends
from helpers import assert_close_by_rule

BACKENDS = usable_backends("kd_divergence")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 7), (5, 1031), (3, 4099)]
ONE_ONE = number_tensor((1.0, 1.0))  # the op's numbers: 1 / temperature, loss_scale


def logits(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def fused(backend, s, t, kind, *, beta=0.5, temperature=1.0, labels=None, ignore_index=-100, vocab=None,
          loss_scale=1.0):
    """Row losses and the fused student gradient straight from one backend."""
    vocab = min(s.shape[1], t.shape[1]) if vocab is None else vocab
    return _kd_divergence(s, t, labels, KINDS.index(kind), beta, ignore_index, vocab, (1.0 / temperature, loss_scale),
                          True, backend=backend)


def reference(s, t, kind, dtype, **kw):
    """(row losses, student gradient) of the reference in ``dtype`` (float64 = ground truth)."""
    leaf = s.detach().to(dtype).requires_grad_(True)
    rows = ref.kd_divergence(leaf, t.to(dtype), kind, dtype=dtype, **kw)
    (grad,) = torch.autograd.grad(rows.sum(), leaf)
    return rows.detach(), grad


def assert_matches(backend, s, t, kind, name, **kw):
    ref_kw = dict(beta=kw.get("beta", 0.5), temperature=kw.get("temperature", 1.0), labels=kw.get("labels"),
                  ignore_index=kw.get("ignore_index", -100), vocab=kw.get("vocab"),
                  loss_scale=kw.get("loss_scale", 1.0))
    rows, grad = fused(backend, s, t, kind, **kw)
    rows64, grad64 = reference(s, t, kind, torch.float64, **ref_kw)
    rows32, grad32 = reference(s, t, kind, torch.float32, **ref_kw)
    assert rows.dtype == torch.float32 and rows.shape == (s.shape[0],)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all(), name
    assert_close_by_rule(rows, rows64, rows32, f"{name} loss", atol=2e-6)
    # A 16-bit gradient may also round the other way from torch's: allow one unit in the last place.
    ulp = 0.0 if s.dtype == torch.float32 else torch.finfo(s.dtype).eps * grad64.abs().max().item()
    assert_close_by_rule(grad, grad64, grad32.to(s.dtype), f"{name} grad", atol=2e-6 + ulp)
    return rows, grad


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, kind, dtype):
    for i, shape in enumerate(SHAPES):
        if backend == "triton" and shape[1] > 2000 and dtype != torch.float32:
            continue  # the interpreter is slow; the wide case runs once in fp32
        s, t = logits(shape, dtype, 2 * i), logits(shape, dtype, 2 * i + 1)
        assert_matches(backend, s, t, kind, f"{backend} {kind} {dtype} {shape}", beta=0.3, temperature=1.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_labels_padding_and_strides(backend, kind):
    wide_s = logits((6, 260), torch.float32, 10)
    s = wide_s[:, :257]  # rows strided, entries adjacent: used without a copy
    t = logits((6, 300), torch.float32, 11)  # a wider (padded) teacher vocabulary
    labels = torch.tensor([3, -100, 7, -100, 0, 250])
    rows, grad = assert_matches(backend, s, t, kind, f"{backend} {kind} padded", labels=labels, vocab=250,
                       loss_scale=4.0, temperature=2.0)
    assert (rows[labels == -100] == 0).all()
    assert (grad[labels == -100] == 0).all()
    assert (grad[:, 250:] == 0).all()  # student padding columns get no gradient


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_student_and_teacher_of_different_dtypes(backend, kind):
    # A half student against an fp32 teacher, an fp16 one against a bf16 one, ...: each is
    # widened from its own dtype (exactly), so rows and fp32 gradient are those of the same
    # logits both in float32.
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    for ds, dt in ((bf16, f32), (f32, f16), (f16, bf16), (bf16, f16)):
        s, t = logits((5, 1031), ds, 22), logits((5, 1031), dt, 23)
        args = dict(kind=kind, temperature=1.5, grad_dtype=f32, backend=backend)
        rows, grad = ops.kd_divergence_with_grad(s, t, **args)
        rows32, grad32 = ops.kd_divergence_with_grad(s.float(), t.float(), **args)
        torch.testing.assert_close(rows, rows32, rtol=0, atol=0, msg=f"{backend} {kind} {ds} {dt}")
        torch.testing.assert_close(grad, grad32, rtol=0, atol=0, msg=f"{backend} {kind} {ds} {dt} grad")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_gradient_stored_in_another_dtype(backend, grad_dtype):
    """fp32 logits, a 16-bit gradient: the kernel's fp32 gradient, rounded once when stored."""
    s, t = logits((5, 1031), torch.float32, 20), logits((5, 1031), torch.float32, 21)
    labels = torch.tensor([1, -100, 3, 4, 5])
    args = dict(kind="jsd", beta=0.3, temperature=1.5, labels=labels, backend=backend)
    rows32, grad32 = ops.kd_divergence_with_grad(s, t, **args)
    rows, grad = ops.kd_divergence_with_grad(s, t, grad_dtype=grad_dtype, **args)
    assert grad.dtype == grad_dtype and grad.shape == s.shape
    torch.testing.assert_close(rows, rows32, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad32.to(grad_dtype), rtol=0, atol=0)
    with pytest.raises(TypeError, match="grad_dtype"):
        ops.kd_divergence_with_grad(s, t, grad_dtype=torch.float64)


def test_a_16_bit_gradient_is_scaled_by_blocks_of_rows_alike(monkeypatch):
    # (a bf16 gradient times the float32 upstream gradient made two float32 copies of it on the
    # CPU: blocks of rows bound them; every element is the same product either way)
    mod = importlib.import_module("kdfast.ops.kd_divergence")  # (kdfast.ops.kd_divergence is the function)
    s = logits((37, 41), torch.float32, 24).bfloat16().requires_grad_()
    t = logits((37, 41), torch.float32, 25).bfloat16()
    upstream = torch.linspace(0.5, 2.0, 37)
    grads = []
    for block in (1 << 22, 41 * 5):  # one block; blocks of 5 rows (the last one short)
        monkeypatch.setattr(mod, "_SCALE_BLOCK", block)
        s.grad = None
        (ops.kd_divergence(s, t) * upstream).sum().backward()
        grads.append(s.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    s, t = logits((4, 33), torch.bfloat16, 1), logits((4, 33), torch.bfloat16, 2)
    rows, grad = fused(backend, s, t, "jsd", labels=torch.full((4,), 5), ignore_index=5)
    assert (rows == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits(backend, kind):
    # Huge magnitudes and -inf entries (masked vocabulary) shared by both models.
    s = logits((4, 300), torch.float32, 3, scale=1e4)
    t = logits((4, 300), torch.float32, 4, scale=1e4)
    masked = torch.zeros(4, 300, dtype=torch.bool)
    masked[:, ::7] = True
    masked[2, :299] = True  # one row with a single live entry
    s = s.masked_fill(masked, -math.inf)
    t = t.masked_fill(masked, -math.inf)
    rows, grad = fused(backend, s, t, kind)
    rows64, grad64 = reference(s, t, kind, torch.float64)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-6)
    assert rows[2].abs() < 1e-6 and (grad[2].abs() < 1e-6).all()  # identical one-point distributions


def near_float32_max_rows(seed):
    """Rows of float32 logits up to 3e38: a few tied at the top (the distribution at a
    temperature below 1), the rest spread down to -3e38, some -inf; where x / T overflows."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(4, 40, generator=g, dtype=torch.float64) * 6e38 - 3e38).float()
    x[:, 3::9] = -math.inf
    return x


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy: the overflowing branch
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1e-3])
def test_logits_that_overflow_when_divided_by_the_temperature(backend, kind, temperature):
    # Below T = 1, x / T overflows float32 for |x| > T * 3.4e38: each row is taken relative to
    # its max first (kd_common.h: tempered_shift). Such rows keep only their tied maxima: the
    # student's on 3 entries, the teacher's on 2 of them (the other way round for the reverse KL,
    # so that every divergence is finite; the float64 reference divides without overflow).
    top = 3.2e38
    s, t = near_float32_max_rows(30), near_float32_max_rows(31)
    s[:, [5, 6, 7]] = top
    t[:, [5, 6]] = top
    if kind == "reverse_kl":
        s, t = t, s
    t[1] = s[1]  # and one identical pair
    rows, grad = fused(backend, s, t, kind, temperature=temperature)
    rows64, grad64 = reference(s, t, kind, torch.float64, temperature=temperature)
    assert torch.isfinite(rows64).all() and torch.isfinite(grad64).all()
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-6, atol=1e-6 / temperature)
    assert rows[1].abs() < 1e-7 and rows[0] > 0.01


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_large_logits_keep_their_small_differences(backend, kind, offset):
    # Spread-out distributions far from 0: log-probabilities must come from x - max, not from
    # x - (max + log z), which rounds at the precision of the max (1e-3 at 1e4).
    s = logits((4, 37), torch.float32, 21) + offset
    t = logits((4, 37), torch.float32, 22) + offset
    rows, grad = fused(backend, s, t, kind)
    rows64, grad64 = reference(s, t, kind, torch.float64)
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=2e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy: log(0) in those rows
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_row_without_distribution_is_nan(backend, kind):
    # A row whose logits are all -inf, or hold inf or NaN, has no softmax: its loss and gradient
    # are NaN for every kind (not a finite number that hides it), other rows are unaffected,
    # and ignoring the row still gives 0.
    s, t = logits((6, 29), torch.float32, 23), logits((6, 29), torch.float32, 24)
    t[0] = -math.inf
    s[1] = -math.inf
    t[2, 5] = math.inf
    s[3, 7] = math.nan
    t[5] = -math.inf
    labels = torch.tensor([1, 2, 3, 4, 5, -100])
    rows, grad = fused(backend, s, t, kind, labels=labels)
    assert rows[:4].isnan().all() and grad[:4].isnan().all()
    assert rows[5] == 0 and (grad[5] == 0).all()
    clean, clean_grad = fused(backend, s[4:5], t[4:5], kind)
    torch.testing.assert_close(rows[4:5], clean)
    torch.testing.assert_close(grad[4:5], clean_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_zero_where_teacher_has_mass(backend):
    # KL(p || q) is +inf when q = 0 where p > 0: reported as inf, never NaN; JSD stays finite.
    s, t = logits((2, 50), torch.float32, 5), logits((2, 50), torch.float32, 6)
    s[0, 3] = -math.inf
    fkl, _ = fused(backend, s, t, "forward_kl")
    jsd, jsd_grad = fused(backend, s, t, "jsd")
    assert fkl[0] == math.inf and torch.isfinite(fkl[1])
    assert torch.isfinite(jsd).all() and torch.isfinite(jsd_grad).all()
    assert jsd_grad[0, 3] == 0


def test_autograd_student_and_teacher():
    s = logits((5, 97), torch.float32, 7).requires_grad_(True)
    t = logits((5, 97), torch.float32, 8).requires_grad_(True)
    weights = torch.linspace(0.5, 2.0, 5)
    (ops.kd_divergence(s, t, kind="jsd", beta=0.2, temperature=1.3) * weights).sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    (ref.kd_divergence(s64, t64, "jsd", 0.2, 1.3, dtype=torch.float64) * weights.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_forced_backend_stays_differentiable(backend):
    # backend= picks the kernel, not whether autograd sees it: a forced backend must not drop
    # the KD term's gradient from a sum of losses.
    s = logits((4, 53), torch.float32, 17).requires_grad_(True)
    t = logits((4, 53), torch.float32, 18)
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0])
    rows = ops.kd_divergence(s, t, kind="reverse_kl", backend=backend)
    assert rows.requires_grad
    ((rows * weights).sum() + s.sum() * 0).backward()
    _, grad64 = reference(s, t, "reverse_kl", torch.float64)
    torch.testing.assert_close(s.grad.double(), grad64 * weights.double()[:, None], rtol=1e-5, atol=1e-7)


def test_double_backward_is_refused_not_wrong():
    # The kernel's gradient has no graph of its own: create_graph must fail, not give zeros.
    s = logits((3, 40), torch.float32, 19).requires_grad_(True)
    t = logits((3, 40), torch.float32, 20)
    loss = ops.kd_divergence(s, t, kind="forward_kl").sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_second_backward_is_refused_not_wrong():
    # The forward's gradient buffer is handed to the first backward; a retained graph cannot reuse it.
    s = logits((3, 40), torch.float32, 15).requires_grad_(True)
    t = logits((3, 40), torch.float32, 16)
    loss = ops.kd_divergence(s, t, kind="jsd").sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        loss.backward()


def test_no_grad_path_skips_the_gradient():
    s, t = logits((3, 40), torch.float32, 9), logits((3, 40), torch.float32, 10)
    with torch.no_grad():
        rows = ops.kd_divergence(s.requires_grad_(True), t, kind="forward_kl")
    assert not rows.requires_grad
    expected, _ = reference(s, t, "forward_kl", torch.float64)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-6)


def test_opcheck():
    s = logits((4, 37), torch.float32, 11).requires_grad_(True)
    t = logits((4, 37), torch.float32, 12)
    labels = torch.tensor([1, -100, 2, 3])
    for want_grad in (True, False):
        torch.library.opcheck(torch.ops.kdfast.kd_divergence.default,
                              (s, t, labels, KINDS.index("jsd"), 0.5, -100, 37, ONE_ONE, want_grad, ""))


def test_direct_op_calls_check_what_the_kernels_take_on_trust():
    # torch.ops.kdfast.kd_divergence called directly (or by a compiler that changed layouts):
    # transposed logits were read as if contiguous (error 0.71); a vocab beyond the width
    # would read past the rows.
    s, t = logits((64, 8), torch.float32, 15).t(), logits((64, 8), torch.float32, 16).t()
    direct = torch.ops.kdfast.kd_divergence(s, t, None, KINDS.index("forward_kl"), 0.5, -100, 64, ONE_ONE, False,
                                            "")[0]
    torch.testing.assert_close(direct, ops.kd_divergence(s, t, kind="forward_kl"))
    c = s.contiguous()
    nan = torch.tensor([1.0, math.nan], dtype=torch.float64)
    for args, match in (((c, c, None, 0, 0.5, -100, 65, ONE_ONE), "vocab must be in"),
                        ((c, c[:3], None, 0, 0.5, -100, 64, ONE_ONE), "rows"),
                        ((c, c, None, 9, 0.5, -100, 64, ONE_ONE), "kind must be in"),
                        ((c, c, torch.zeros(3, dtype=torch.long), 0, 0.5, -100, 64, ONE_ONE), "labels must have shape"),
                        ((c, c, None, 0, 0.5, -100, 64, ONE_ONE.float()), "numbers must be a float64 CPU tensor"),
                        ((c, c, None, 0, 0.5, -100, 64, ONE_ONE[:1]), r"numbers must be .* shape \(2,\)"),
                        ((c, c, None, 0, 0.5, -100, 64, nan), r"loss_scale \(in numbers\) must be within float32"),
                        ((c, c, None, 0, 0.5, -100, 64, torch.tensor([1e39, 1.0], dtype=torch.float64)),
                         r"1 / temperature \(in numbers\) must be within float32"),
                        # (a beta outside [0, 1] or NaN, a negative temperature: rows of garbage or zeros)
                        ((c, c, None, 2, 2.0, -100, 64, ONE_ONE), r"beta must be in \[0, 1\], got 2.0"),
                        ((c, c, None, 2, math.nan, -100, 64, ONE_ONE), r"beta must be in \[0, 1\], got nan"),
                        ((c, c, None, 0, 0.5, -100, 64, torch.tensor([-1.0, 1.0], dtype=torch.float64)),
                         r"1 / temperature \(in numbers\) must be > 0, got -1.0")):
        with pytest.raises(ValueError, match=match):
            torch.ops.kdfast.kd_divergence(*args, False, "")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [1e-8, 3e-8, 1 - 1e-8])
def test_log_mixture_where_1_plus_r_rounds_to_1(backend, beta):
    # log m = log q + log1p(r) with r below float32's half-epsilon: 1 + r rounds to 1 and the
    # kernels fall back to r itself; with a dominant entry (log q near 0) dropping r instead
    # made the loss ~1e6 times too large. (The bound is loose: rows this hard are good to O(1)
    # relative error in float32 in every backend.)
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(8, 1000, generator=gen)
    t[:, 0] += 12
    s = t + 1e-2 * torch.randn(8, 1000, generator=gen)
    rows64 = ref.kd_divergence(s.double(), t.double(), "jsd", beta=beta, dtype=torch.float64)
    rows = ops.kd_divergence(s, t, kind="jsd", beta=beta, backend=backend)
    assert ((rows.double() - rows64).abs() / rows64.abs()).max() < 10


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("kind, beta", [("jsd", 1e-7), ("jsd", 1 - 1e-7)])
def test_a_mixture_weight_near_0_or_1_keeps_the_small_loss_of_nearly_equal_rows(backend, kind, beta):
    # log m = hi + log1p(small / big): the Triton kernel took log(1 + r), which rounds a small r
    # away (relative errors of 2e4 on rows whose loss is 3e-12; the others stay within a few %)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        t = torch.randn(8, 1000, generator=g) * 3
        s = t + 1e-2 * torch.randn(8, 1000, generator=g) + 300
        t = t - 200
        rows64 = ref.kd_divergence(s.double(), t.double(), kind, beta=beta, dtype=torch.float64)
        rows = ops.kd_divergence(s, t, kind=kind, beta=beta, backend=backend)
        assert ((rows.double() - rows64).abs() / rows64.abs()).max() < 0.2


def test_numbers_the_float32_kernels_cannot_hold_are_refused():
    # 1 / temperature and loss_scale are float32 in the kernels: past float32's range every row
    # was NaN or inf (the loss itself is finite); numpy complex numbers lost their imaginary part
    s, t = logits((3, 5), torch.float32, 1), logits((3, 5), torch.float32, 2)
    ids, lp = torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), -0.5)
    for call in (lambda **kw: ops.kd_divergence(s, t, **kw), lambda **kw: ops.kd_topk(s, ids, lp, **kw)):
        call(temperature=1e-38)  # (1 / temperature is a float32 number)
        with pytest.raises(ValueError, match="temperature must be at least 2.9387"):
            call(temperature=1e-39)
        with pytest.raises(ValueError, match="loss_scale must be within float32's range"):
            call(loss_scale=-1e39)
        with pytest.raises(ValueError, match="temperature must be a real number"):
            call(temperature=np.complex128(2 + 5j))
    # float64 logits (kd_loss takes them) compute in float64: no float32 bound
    from kdfast.losses import kd_loss
    assert torch.isfinite(kd_loss(s.double() * 1e-3, t.double() * 1e-3, temperature=1e-39))


@pytest.mark.parametrize("kind", ["jsd", "forward_kl", "reverse_kl", "tvd", "skew_kl"])
def test_compiles_with_a_teacher_that_needs_a_gradient(kind):
    # The teacher's gradient comes from the reference, which the traced backward runs: it must
    # not branch on data (it indexed the kept rows, a data-dependent shape).
    s, t = logits((3, 7), torch.float32, 15), logits((3, 7), torch.float32, 16)
    labels = torch.tensor([1, -100, 2])

    def loss(s, t):
        return ops.kd_divergence(s, t, kind=kind, labels=labels).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = [s.clone().requires_grad_(True), t.clone().requires_grad_(True)]
    compiled(*got).backward()
    expected = [s.clone().requires_grad_(True), t.clone().requires_grad_(True)]
    loss(*expected).backward()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.grad, e.grad)
    assert (got[1].grad[1] == 0).all()  # the ignored row


@pytest.mark.parametrize("backend", [None, "reference"])
def test_compiles(backend):
    # The reference backend too: it is what runs where no compiled kernel can, and compiled
    # code runs custom ops under dispatch modes (torch.func inside the op failed there).
    s = logits((4, 64), torch.float32, 13)
    t = logits((4, 64), torch.float32, 14)

    def loss(s, t):
        return ops.kd_divergence(s, t, kind="reverse_kl", labels=torch.tensor([1, -100, 2, 3]),
                                 backend=backend).mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaf = s.clone().requires_grad_(True)
    value = compiled(leaf, t)
    value.backward()
    expected_leaf = s.clone().requires_grad_(True)
    expected = loss(expected_leaf, t)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(leaf.grad, expected_leaf.grad)
    _, grad64 = reference(s, t, "reverse_kl", torch.float64, labels=torch.tensor([1, -100, 2, 3]))
    torch.testing.assert_close(leaf.grad.double(), grad64 / 4, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("call, error, match", [
    (lambda s, t: ops.kd_divergence(s[0], t), ValueError, "student_logits must be 2-D"),
    (lambda s, t: ops.kd_divergence(s.long(), t), TypeError, "student_logits must be float32"),
    (lambda s, t: ops.kd_divergence(s, t[:2]), ValueError, "same number of rows"),
    (lambda s, t: ops.kd_divergence(s, t[:, :5]), ValueError, "pass vocab_size"),
    (lambda s, t: ops.kd_divergence(s, t[:, :5], vocab_size=6), ValueError, "vocab_size must be in"),
    # fractional integers are refused, not truncated (0.5 would have ignored the rows labelled 0)
    (lambda s, t: ops.kd_divergence(s, t, vocab_size=2.5), ValueError, "vocab_size must be an integer"),
    (lambda s, t: ops.kd_divergence(s, t, labels=torch.zeros(s.shape[0], dtype=torch.long), ignore_index=0.5),
     ValueError, "ignore_index must be an integer"),
    (lambda s, t: ops.kd_divergence(s, t, kind="kl"), ValueError, "kind must be one of"),
    (lambda s, t: ops.kd_divergence(s, t, beta=1.5), ValueError, "beta must be in"),
    (lambda s, t: ops.kd_divergence(s, t, temperature=0.0), ValueError, "temperature must be"),
    (lambda s, t: ops.kd_divergence(s, t, temperature=math.nan), ValueError, "temperature must be"),
    (lambda s, t: ops.kd_divergence(s, t, labels=torch.zeros(2, dtype=torch.long)), ValueError, "labels must have"),
    (lambda s, t: ops.kd_divergence(s, t, labels=torch.zeros(3)), TypeError, "labels must hold integers"),
    (lambda s, t: ops.kd_divergence(s, t, loss_scale=math.inf), ValueError, "loss_scale"),
    (lambda s, t: ops.kd_divergence(s, t, backend="cuda"), BackendUnavailableError, "cannot run"),
    # (the range "[1, 0]" of vocab_size, which was not passed)
    (lambda s, t: ops.kd_divergence(s[:, :0], t[:, :0]), ValueError,
     r"student_logits must have a vocabulary of at least one entry, got shape \(3, 0\)"),
])
def test_bad_input(call, error, match, unemulated_backends):
    s, t = logits((3, 8), torch.float32, 0), logits((3, 8), torch.float32, 1)
    with pytest.raises(error, match=match):
        call(s, t)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_reference(backend, kind, dtype):
    for i, shape in enumerate(SHAPES + [(7, 128256)]):
        s = logits(shape, dtype, 2 * i).cuda()
        t = logits(shape, dtype, 2 * i + 1).cuda()
        labels = torch.arange(shape[0], device="cuda").masked_fill(torch.arange(shape[0], device="cuda") == 1, -100)
        assert_matches(backend, s, t, kind, f"{backend} {kind} {dtype} {shape}", labels=labels, temperature=1.5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("vocab, where", [(100, 0), (100, 99), (32000, 31744), (32000, 7)])
def test_gpu_nan_logit_anywhere_gives_nan(backend, vocab, where):
    # The CUDA block reduction merges per-thread (max, sum) pairs: a NaN read last by a thread
    # (index 0 for vocab 100; 31744 = 512 * 62 for 32000) must not be dropped by a merge.
    for kind in KINDS:
        for side in ("student", "teacher"):
            s, t = logits((3, vocab), torch.float32, 30).cuda(), logits((3, vocab), torch.float32, 31).cuda()
            (s if side == "student" else t)[1, where] = math.nan
            rows, grad = fused(backend, s, t, kind)
            assert rows[1].isnan() and grad[1].isnan().all(), (kind, side)
            assert torch.isfinite(rows[[0, 2]]).all(), (kind, side)


@pytest.mark.gpu
def test_gpu_no_sync_and_graph_capture():
    s = logits((64, 32000), torch.bfloat16, 1).cuda().requires_grad_(True)
    t = logits((64, 32000), torch.bfloat16, 2).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.kd_divergence(s, t, kind="jsd").sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        ops.kd_divergence(s, t, kind="jsd")  # warm-up outside capture
        with torch.cuda.graph(graph):
            rows = ops.kd_divergence(s, t, kind="jsd")
    graph.replay()
    torch.testing.assert_close(rows, ops.kd_divergence(s.detach(), t, kind="jsd"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_gpu_gradient_stored_in_another_dtype(backend, grad_dtype):
    s, t = logits((6, 32001), torch.float32, 22).cuda(), logits((6, 32001), torch.float32, 23).cuda()
    args = dict(kind="reverse_kl", temperature=2.0, backend=backend)
    rows32, grad32 = ops.kd_divergence_with_grad(s, t, **args)
    rows, grad = ops.kd_divergence_with_grad(s, t, grad_dtype=grad_dtype, **args)
    torch.testing.assert_close(rows, rows32, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad32.to(grad_dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------- threads, edge cases


@pytest.mark.parametrize("dtype, temperature", [(torch.bfloat16, 1.0), (torch.float32, 1.3), (torch.float16, 0.7)])
def test_rows_on_several_threads(dtype, temperature):
    # 64 x 4096 entries is enough work for the CPU launcher to use 2 threads; each thread widens
    # its rows (16-bit logits, or T != 1) into its own slice of the workspace. Two threads must
    # give the 1-thread result bit for bit, and the reference's.
    s, t = logits((64, 4096), dtype, 40), logits((64, 4096), dtype, 41)
    before = torch.get_num_threads()
    try:
        for kind in ("forward_kl", "jsd", "tvd"):
            runs = []
            for threads in (1, 2, 2):
                torch.set_num_threads(threads)
                runs.append(fused("cpu", s, t, kind, temperature=temperature, beta=0.3))
            torch.set_num_threads(before)
            for rows, grad in runs[1:]:
                assert torch.equal(rows, runs[0][0]), f"{kind} {dtype}: 2-thread loss differs from 1 thread"
                assert torch.equal(grad, runs[0][1]), f"{kind} {dtype}: 2-thread gradient differs from 1 thread"
            rows64, grad64 = reference(s, t, kind, torch.float64, temperature=temperature, beta=0.3)
            torch.testing.assert_close(runs[1][0].double(), rows64, rtol=1e-5, atol=2e-6)
            ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * grad64.abs().max().item()
            torch.testing.assert_close(runs[1][1].double(), grad64, rtol=1e-4, atol=2e-6 + ulp)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_at_the_ends(backend):
    # beta = 0 and 1 are allowed: skew KL(p || beta p + (1 - beta) q) is the forward KL at 0 and
    # 0 at 1; the JSD's mixture is one of the two distributions, so it is 0 at both ends.
    s, t = logits((3, 70), torch.float32, 42), logits((3, 70), torch.float32, 43)
    fkl, fkl_grad = fused(backend, s, t, "forward_kl")
    skew0, skew0_grad = fused(backend, s, t, "skew_kl", beta=0.0)
    torch.testing.assert_close(skew0, fkl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(skew0_grad, fkl_grad, rtol=1e-5, atol=1e-7)
    for kind, beta in (("skew_kl", 1.0), ("jsd", 0.0), ("jsd", 1.0)):
        rows, grad = fused(backend, s, t, kind, beta=beta)
        assert rows.abs().max() < 1e-6 and grad.abs().max() < 1e-6, (kind, beta)


def test_second_derivatives_at_the_ends_of_beta():
    # The mixture's log at beta = 0 or 1 is one side's log-probabilities exactly: through
    # logaddexp with a side of -inf everywhere its second derivative was NaN (inf / inf), in
    # float64 kd_loss (plain autograd) and in torch.func's Hessian of the op
    from kdfast.losses import kd_loss

    s = logits((3, 9), torch.float64, 48).requires_grad_()
    t = logits((3, 9), torch.float64, 49).requires_grad_()
    for beta in (0.0, 1.0):
        loss = lambda a, b: kd_loss(a, b, kind="skew_kl", beta=beta, reduction="sum")  # noqa: E731
        assert torch.autograd.gradgradcheck(loss, (s, t))
    v = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mixed = []
    for kind, beta in (("skew_kl", 0.0), ("forward_kl", 0.5)):  # skew KL at beta 0 is the forward KL
        grad_t, = torch.autograd.grad(kd_loss(s, t, kind=kind, beta=beta, reduction="sum"), t, create_graph=True)
        mixed.append(torch.autograd.grad((grad_t * v).sum(), s)[0])
    torch.testing.assert_close(mixed[0], mixed[1], rtol=1e-12, atol=1e-12)
    s32, t32 = s.detach().float(), t.detach().float()
    for kind in ("jsd", "skew_kl"):
        for beta in (0.0, 1.0):
            hessian = torch.func.hessian(lambda x: ops.kd_divergence(x, t32, kind=kind, beta=beta).sum())(s32)
            assert hessian.isfinite().all(), (kind, beta)


def check_jsd_beta_just_below_1(backend, device):
    # 1 - beta is formed in double: from a float32 beta, 1 - (1 - 1e-6) read 1.19e-6 and the JSD
    # gradient (proportional to it) was 13% off; at 1 - beta = 1e-9 it was exactly 0.
    s, t = logits((4, 40), torch.float32, 46), logits((4, 40), torch.float32, 47)
    for rest in (1e-5, 1e-6, 1e-9):
        _, grad = fused(backend, s.to(device), t.to(device), "jsd", beta=1.0 - rest)
        _, grad64 = reference(s, t, "jsd", torch.float64, beta=1.0 - rest)
        scale = grad64.abs().max().item()
        assert scale > 0
        assert (grad.cpu().double() - grad64).abs().max().item() < 1e-5 * scale, rest


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("scale", [3.0, 30.0])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9, 0.999, 1 - 1e-6, 1 - 1e-9])
def test_skew_kl_gradient_is_as_accurate_as_torchs(beta, scale, backend):
    # Near beta = 1 the gradient w - q sum(w) is O((1 - beta)^2) while w is O(1 - beta), and
    # float32 keeps ulp(w) / (1 - beta) of it: 2e-5 of it at 1 - beta = 1e-6, where torch's
    # autograd loses 4e-3. Shifting w by (1 - beta) q removes that cancellation but makes one
    # at a peaked student's mode (2e-4 at 1 - beta = 1e-3 with logits of scale 30, where torch
    # loses 3e-7): the plain form is kept, as accurate as torch's everywhere.
    s, t = logits((64, 500), torch.float32, 48, scale=scale), logits((64, 500), torch.float32, 49, scale=scale)
    _, grad = fused(backend, s, t, "skew_kl", beta=beta)
    _, grad64 = reference(s, t, "skew_kl", torch.float64, beta=beta)
    _, grad32 = reference(s, t, "skew_kl", torch.float32, beta=beta)  # (torch's autograd, in float32)
    err, torch_err = ((g.double() - grad64).abs().max().item() for g in (grad, grad32))
    factor = 5.0 if backend == "reference" else 2.5  # (the reference's float32 weights, in log space)
    assert err <= factor * torch_err + 1e-7 * grad64.abs().max().item(), (err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_jsd_beta_just_below_1(backend):
    # (The Triton interpreter computes with the scalar arguments in double; the gpu test below
    # checks the compiled kernel, which takes them in float32.)
    check_jsd_beta_just_below_1(backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_jsd_beta_just_below_1(backend):
    check_jsd_beta_just_below_1(backend, "cuda")
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_skew_kl_at_beta_0_where_student_probabilities_underflow(backend):
    # At beta = 0 the mixture m is q itself, so w = -p * (1 - beta) q / m is -p for every q; where
    # q underflowed to 0 in float32 it once read 0 / 0 as 0, and the gradient lost those entries.
    s = torch.tensor([[0.0, -8.0, 0.0], [1.0, -6.0, 0.5]])
    t = torch.zeros(2, 3)
    fkl, fkl_grad = fused(backend, s, t, "forward_kl", temperature=0.05)
    skew0, skew0_grad = fused(backend, s, t, "skew_kl", beta=0.0, temperature=0.05)
    torch.testing.assert_close(skew0, fkl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(skew0_grad, fkl_grad, rtol=1e-5, atol=1e-6)
    assert skew0_grad[0, 1] < -6  # -p / T: the entry whose student probability underflowed


def test_public_entry_takes_beta_at_the_ends():
    s, t = logits((3, 70), torch.float32, 42), logits((3, 70), torch.float32, 43)
    for kind, beta in (("skew_kl", 0.0), ("skew_kl", 1.0), ("jsd", 0.0), ("jsd", 1.0)):
        rows = ops.kd_divergence(s, t, kind=kind, beta=beta)
        expected = ref.kd_divergence(s.double(), t.double(), kind, beta, dtype=torch.float64)
        torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.kd_divergence(s, t, kind="skew_kl", beta=0.0),
                               ops.kd_divergence(s, t, kind="forward_kl"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_skew_kl_at_beta_0_with_a_student_zero(backend):
    # At beta = 0 the mixture is the student's q: where q = 0 (a -inf logit) and the teacher
    # has mass, log m is log(0 + 0) = -inf, not NaN, and the loss is +inf like the forward KL's.
    s, t = logits((2, 50), torch.float32, 44), logits((2, 50), torch.float32, 45)
    s[0, 3] = -math.inf
    rows, grad = fused(backend, s, t, "skew_kl", beta=0.0)
    assert rows[0] == math.inf and torch.isfinite(rows[1])
    assert not grad.isnan().any()
    fkl, _ = fused(backend, s, t, "forward_kl")
    torch.testing.assert_close(rows[1], fkl[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_jsd_at_beta_0_and_1_with_an_entry_one_side_lacks(backend):
    # The mixture at beta = 0 is q (at 1, p): an entry with p > 0 where q = 0 (or the reverse)
    # has log m = -inf, and its weight 0 must make the term 0, not 0 * inf = NaN.
    s, t = logits((2, 50), torch.float32, 46), logits((2, 50), torch.float32, 47)
    s[0, 3] = -math.inf
    t[1, 4] = -math.inf
    for beta in (0.0, 1.0):
        rows, grad = fused(backend, s, t, "jsd", beta=beta)
        assert rows.abs().max() < 1e-6 and grad.abs().max() < 1e-6, (beta, rows, grad.abs().max())


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_tvd_subgradient_where_p_equals_q(backend):
    # |p - q| at p == q exactly (entries 0 and 1: same logits, same normaliser) has subgradient 0.
    s = torch.tensor([[0.0, 0.0, 0.0, -30.0], [1.0, 1.0, 2.0, -math.inf]])
    t = torch.tensor([[0.0, 0.0, -30.0, 0.0], [1.0, 1.0, -math.inf, 2.0]])
    rows, grad = fused(backend, s, t, "tvd")
    rows64, grad64 = reference(s, t, "tvd", torch.float64)
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-7)
    # row 0 by hand: q = p = 1/3 on entries 0 and 1, w = (0, 0, q/2, ~0), sum(w) = 1/6
    torch.testing.assert_close(grad[0, :3].double(), torch.tensor([-1 / 18, -1 / 18, 1 / 9], dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_maximum_in_a_later_block(backend, kind, temperature):
    # A vocabulary wider than one Triton block (4096) whose maximum lies in the second block:
    # the sum of exponentials of the first block must be rescaled to the new maximum (by
    # exp((m_old - m_new) / T): at T = 1 a rescale without the temperature passed)
    vocab = 4096 + 200
    s, t = logits((2, vocab), torch.float32, 46), logits((2, vocab), torch.float32, 47)
    s[0, 4100], t[0, 4200] = 25.0, 20.0  # a dominant entry after the first block
    s[1, 4150], t[1, 4150] = 12.0, 11.0
    s[1, 10], t[1, 20] = 8.0, 9.0  # and a large one before it
    assert_matches(backend, s, t, kind, f"{backend} {kind} later max T={temperature}", temperature=temperature)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy: log(0) in the NaN rows
@pytest.mark.parametrize("backend", BACKENDS)
def test_maximum_and_nan_at_every_position(backend):
    # The CPU row maximum runs in SIMD lanes (two vectors of 8 lanes, then a scalar tail): a
    # dominant entry, or a NaN, must count wherever it sits, in a lane of the vector body or in
    # the tail. Row j holds it at position j of 37 (two 16-wide vector steps, then 5 left). The
    # entry is large enough that exp(entry - a missed maximum) overflows.
    vocab = 37
    for kind in KINDS:
        s, t = logits((vocab, vocab), torch.float32, 60), logits((vocab, vocab), torch.float32, 61)
        idx = torch.arange(vocab)
        s[idx, idx] = 500.0
        t[idx, (idx + 11) % vocab] = 400.0
        assert_matches(backend, s, t, kind, f"{backend} {kind} maximum at every position")
        s[idx, idx] = math.nan
        rows, grad = fused(backend, s, t, kind)
        assert rows.isnan().all() and grad.isnan().all(), kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_block_of_minus_inf(backend):
    # The Triton kernel reduces blocks of up to 4096 entries, and its maximum passes NaN over:
    # a NaN whose block is otherwise -inf left that block's maximum at -inf, the block was
    # skipped, and the row got a finite loss. Any NaN entry, in either row, makes the row's
    # loss and gradient NaN on every backend (the CPU and CUDA normalisers carry it).
    vocab = 8192
    for kind in KINDS:
        for side in ("student", "teacher"):
            s, t = logits((2, vocab), torch.float32, 62), logits((2, vocab), torch.float32, 63)
            x = s if side == "student" else t
            x[0, :4096] = -math.inf
            x[0, 5] = math.nan
            rows, grad = fused(backend, s, t, kind)
            assert rows[0].isnan() and grad[0].isnan().all(), f"{backend} {kind}: NaN in the {side} row lost"
            assert rows[1].isfinite() and grad[1].isfinite().all(), f"{backend} {kind}: finite row spoiled"


def test_fast_exp_is_unbiased():
    # The CPU kernel's exp is a polynomial: a dropped term is ~1 ulp, too little for one value,
    # but it errs the same way at every point, which the mean error shows. With a one-hot
    # teacher and a student row whose normaliser is exactly 1 (entry 0 is 0, the others below
    # e^-40), the forward-KL gradient is q_k = exp(s_k) itself.
    n = 4096
    k = torch.arange(1, n, dtype=torch.float64)
    for frac in (0.25, 0.45, 0.55, 0.75):  # exponent fractions: Cody-Waite remainders of both signs
        x = (-60.0 - (k % 60) + frac) * math.log(2)  # remainders near +-0.17 and +-0.35
        x = x + (k / n) * 0.03  # spread within each class
        s = torch.cat([torch.zeros(1, dtype=torch.float64), x]).float()[None]
        t = torch.full_like(s, -math.inf)
        t[0, 0] = 0.0
        _, grad = fused("cpu", s, t, "forward_kl")
        q = grad[0, 1:].double()
        exact = s[0, 1:].double().exp()
        rel = q / exact - 1
        assert rel.abs().max() < 3e-7, f"frac {frac}: max relative error {rel.abs().max():.2e}"
        assert abs(rel.mean()) < 1.5e-8, f"frac {frac}: mean relative error {rel.mean():.2e}"


def test_fast_exp_keeps_subnormal_results():
    # exp(x) for x in [-103.97, -87.3] is a subnormal float, not 0: within one subnormal step of
    # the correctly rounded value (the one-hot forward-KL gradient is q_k = exp(s_k) itself)
    x = torch.linspace(-103.9, -87.4, 4001, dtype=torch.float64)
    s = torch.cat([torch.zeros(1, dtype=torch.float64), x]).float()[None]
    t = torch.full_like(s, -math.inf)
    t[0, 0] = 0.0
    _, grad = fused("cpu", s, t, "forward_kl")
    exact = s[0, 1:].double().exp().float().double()
    assert (grad[0, 1:].double() - exact).abs().max() <= 2.0 ** -149
    assert (grad[0, 1:] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_is_infinite_where_a_subnormal_student_probability_meets_an_impossible_teacher_entry(backend):
    # q = exp(-90) > 0 where p = 0: KL(q || p) is infinite, as the float64 reference says
    s, t = torch.tensor([[0.0, -90.0, 1.0]]), torch.tensor([[0.0, -math.inf, -1.0]])
    rows, _ = fused(backend, s, t, "reverse_kl")
    assert rows[0] == math.inf
    assert ref.kd_divergence(s.double(), t.double(), "reverse_kl")[0] == math.inf


# --------------------------------------------------------------------------- autograd paths


class _PassThroughMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _weighted_grads(make_rows, s, t, weights):
    leaf = s.detach().clone().requires_grad_(True)
    rows = make_rows(leaf, t)
    (rows * weights).sum().backward()
    return rows.detach(), leaf.grad


@pytest.mark.parametrize("path", ["eager", "recompute", "dispatch_mode", "scaled_loss"])
def test_backward_scales_by_the_upstream_gradient(path):
    # Each way the backward gets the student's gradient (handed over from the forward, recomputed
    # when the forward did not make it, saved functionally under a dispatch mode) multiplies it
    # by the incoming gradient of each row.
    s, t = logits((5, 97), torch.float32, 49), logits((5, 97), torch.float32, 50)
    labels = torch.tensor([1, 2, -100, 4, 5])
    weights = torch.tensor([0.5, -1.25, 3.0, 2.0, 3.7])
    kw = dict(kind="jsd", beta=0.3, temperature=1.4, labels=labels, loss_scale=1.7)
    kernel_args = (labels, KINDS.index("jsd"), 0.3, -100, 97, number_tensor((1 / 1.4, 1.7)))

    if path == "eager":
        def make_rows(leaf, t):
            return ops.kd_divergence(leaf, t, **kw)
    elif path == "recompute":
        def make_rows(leaf, t):
            return torch.ops.kdfast.kd_divergence(leaf, t, *kernel_args, False, "")[0]
    elif path == "dispatch_mode":
        def make_rows(leaf, t):
            with _PassThroughMode():
                return ops.kd_divergence(leaf, t, **kw)
    else:
        def make_rows(leaf, t):
            return ops.kd_divergence(leaf, t, **kw) * 1.0

        weights = torch.full((5,), 3.7)
    rows, grad = _weighted_grads(make_rows, s, t, weights)
    s64 = s.double().requires_grad_(True)
    rows64 = ref.kd_divergence(s64, t.double(), "jsd", 0.3, 1.4, labels, loss_scale=1.7, dtype=torch.float64)
    (rows64 * weights.double()).sum().backward()
    torch.testing.assert_close(rows.double(), rows64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=1e-5, atol=1e-7)


def test_reduction_none_weighted_sum_through_the_teacher_and_student():
    # Both logits need gradients (keeps the inputs), the rows are weighted: loss * 3.7 backward.
    s = logits((4, 61), torch.float32, 51).requires_grad_(True)
    t = logits((4, 61), torch.float32, 52).requires_grad_(True)
    (ops.kd_divergence(s, t, kind="reverse_kl", temperature=0.8).sum() * 3.7).backward()
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    (ref.kd_divergence(s64, t64, "reverse_kl", 0.5, 0.8, dtype=torch.float64).sum() * 3.7).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_logits_with_a_non_unit_vocab_stride(backend):
    # A transposed view ([vocab, rows] memory read as [rows, vocab]): the public entry brings
    # the entries of each row together before the kernel reads them as adjacent.
    s = logits((53, 6), torch.float32, 53).t()
    t = logits((53, 6), torch.bfloat16, 54).t().float()  # also non-contiguous
    assert s.stride(1) != 1 and t.stride(1) != 1
    for kind in ("forward_kl", "tvd") if backend == "cpu" else ("forward_kl",):
        rows = ops.kd_divergence(s, t, kind=kind, backend=backend)
        rows_c, grad_c = ops.kd_divergence_with_grad(s.contiguous(), t.contiguous(), kind=kind, backend=backend)
        torch.testing.assert_close(rows, rows_c, rtol=0, atol=0)
        _, grad = ops.kd_divergence_with_grad(s, t, kind=kind, backend=backend)
        torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)
        rows64, _ = reference(s.contiguous(), t.contiguous(), kind, torch.float64)
        torch.testing.assert_close(rows.double(), rows64, rtol=1e-5, atol=1e-6)
        leaf = s.detach().clone().requires_grad_(True)  # same strides as s
        (ops.kd_divergence(leaf, t, kind=kind, backend=backend) * 2.0).sum().backward()
        torch.testing.assert_close(leaf.grad, grad_c * 2.0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_float16_gradient_survives_a_loss_scale(backend):
    # fp16 training scales the loss (GradScaler: 2^16) so that small gradients survive: the
    # student's gradient, computed in the forward, must not be rounded to float16 before the
    # backward's scale reaches it (entries below ~6e-8 would become 0).
    shape = (8, 1000) if backend == "triton" else (32, 4000)  # the interpreter is slow
    s, t = logits(shape, torch.float16, 50, scale=4.0), logits(shape, torch.float16, 51, scale=4.0)
    scale = 65536.0 / 32
    for kind in ("forward_kl", "jsd"):
        leaf = s.clone().requires_grad_(True)
        (ops.kd_divergence(leaf, t, kind=kind, backend=backend).sum() * scale).backward()
        _, grad64 = reference(s, t, kind, torch.float64)
        want = grad64 * scale
        assert leaf.grad.dtype == torch.float16
        # everything float16 represents at full precision after scaling agrees to its rounding
        normal = want.abs() >= torch.finfo(torch.float16).tiny
        assert normal.sum() > 0.3 * want.numel()
        # (float16 rounding, and float32 math's absolute error on entries that cancel)
        torch.testing.assert_close(leaf.grad.double()[normal], want[normal], rtol=1e-3, atol=scale * 5e-9)
        lost = (leaf.grad == 0) & normal
        assert lost.sum() == 0, f"{kind}: {int(lost.sum())} gradient entries flushed to 0"


def test_vmap_runs_through_the_dispatcher():
    # Batched (functorch) tensors have no memory of their own: under vmap the op is called
    # through the dispatcher, which runs it per batch entry, not by address.
    import warnings
    s, t = logits((3, 4, 10), torch.float32, 60), logits((3, 4, 10), torch.float32, 61)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that the op has no batching rule
        got = torch.vmap(lambda a, b: ops.kd_divergence(a, b, kind="forward_kl"))(s, t)
    torch.testing.assert_close(got, torch.stack([ops.kd_divergence(a, b, kind="forward_kl") for a, b in zip(s, t)]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_closed_form_gradient_equals_autograd_at_minus_inf_entries(kind, beta):
    # The reference backend's closed-form gradient against autograd through the reference loss,
    # with -inf student and teacher entries: skew KL at beta 0 (forward KL) gave 0 where the
    # student's entry is -inf, autograd and the kernels -p.
    s = torch.tensor([[-math.inf, 0.0, 1.0, -0.5], [0.3, -math.inf, -math.inf, 2.0], [1.0, 0.5, -1.0, 0.0]],
                     dtype=torch.float64)
    t = torch.tensor([[0.5, 0.0, -1.0, 0.2], [-math.inf, 1.0, -math.inf, 0.0], [0.0, -math.inf, 2.0, 1.0]],
                     dtype=torch.float64)
    leaf = s.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(ref.kd_divergence(leaf, t, kind, beta=beta, dtype=torch.float64).sum(), leaf)
    got = ref.kd_divergence_grad(s, t, kind, beta=beta, dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("kind", ["forward_kl", "tvd", "skew_kl"])
def test_long_row_sums_are_accumulated_in_float64_across_blocks(kind):
    # The CPU kernel sums each block of 256 entries in float32 lanes and the blocks' sums in
    # float64 (kd_cpu.h: kSumBlock), for the normaliser, the loss and sum(w). Over a row of 2^20
    # entries (4096 blocks) a float32 running total drifts by ~1e-6 relative, which shifts every
    # log-probability (and q) alike: the gradient (relative to its largest entry) goes from
    # ~1e-7 off to ~1e-6 off.
    vocab = 1 << 20
    s, t = logits((2, vocab), torch.float32, 80, scale=1.0), logits((2, vocab), torch.float32, 81, scale=1.0)
    rows, grad = fused("cpu", s, t, kind, beta=0.3)
    rows64, grad64 = reference(s, t, kind, torch.float64, beta=0.3)
    loss_err = ((rows.double() - rows64).abs() / rows64.abs()).max().item()
    grad_err = ((grad.double() - grad64).abs() / grad64.abs().amax(dim=1, keepdim=True)).max().item()
    assert loss_err < 8e-7, f"{kind}: loss relative error {loss_err:.2e}"
    assert grad_err < 4e-7, f"{kind}: gradient error {grad_err:.2e} of its largest entry"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_overflowing_rows_are_shifted_by_a_maximum_in_the_last_entry(backend, kind):
    # Below T = 1 each row is shifted by its max before it is divided by T (kd_cpu.h:
    # tempered_row); the max must count every entry, the last one (the row_max scalar tail)
    # included: a max missed by 1e37 becomes inf at T = 1e-3 and the whole row NaN.
    top = 3.2e38
    for pos in (0, 21, 39):  # the vector body, and the last entry of the 40 (tail)
        s, t = near_float32_max_rows(32), near_float32_max_rows(33)
        s[:, pos] = top
        t[:, pos] = top
        s[:, (pos + 1) % 40] = top  # the student ties with another entry (KL(p || q) finite)
        if kind == "reverse_kl":
            s, t = t, s
        rows, grad = fused(backend, s, t, kind, temperature=1e-3)
        rows64, grad64 = reference(s, t, kind, torch.float64, temperature=1e-3)
        assert torch.isfinite(rows64).all() and torch.isfinite(grad64).all()
        torch.testing.assert_close(rows.double(), rows64, rtol=1e-6, atol=1e-6, msg=f"{kind} max at {pos}")
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-6, atol=1e-3, msg=f"{kind} max at {pos}")


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_16_bit_gradient_rounds_ties_to_even(backend, grad_dtype):
    # A uniform student over 16 entries (q = 1/16 exactly) and a one-hot teacher: the forward-KL
    # gradient (q - p) * loss_scale is exact in float32, and this loss_scale puts every entry
    # on a tie between two 16-bit values (one more bit than the 16-bit mantissa, an odd last
    # kept bit): the stored gradient must round it to even, as torch does, in the vector body
    # of the conversion (8 lanes: F16C / AVX2 where the CPU has them).
    n = 16
    mantissa = 7 if grad_dtype == torch.bfloat16 else 10
    loss_scale = 1.0 + 3.0 * 2.0 ** -(mantissa + 1)
    s = torch.zeros(3, n)
    t = torch.full((3, n), -math.inf)
    t[torch.arange(3), torch.tensor([0, 9, n - 1])] = 0.0
    kw = dict(kind="forward_kl", loss_scale=loss_scale, backend=backend)
    _, grad32 = ops.kd_divergence_with_grad(s, t, **kw)
    _, grad = ops.kd_divergence_with_grad(s, t, grad_dtype=grad_dtype, **kw)
    torch.testing.assert_close(grad32[0, 1], torch.tensor(loss_scale / n), rtol=0, atol=0)  # exact: a tie
    assert not torch.equal(grad32.to(grad_dtype).float(), (grad32 * (1 - 2.0 ** -20)).to(grad_dtype).float())
    assert torch.equal(grad.view(torch.int16), grad32.to(grad_dtype).view(torch.int16))
