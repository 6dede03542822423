import math

import pytest
import torch

from kdfast import ops
from kdfast.backends import BackendUnavailableError
from kdfast.ops._tensors import number_tensor
from kdfast.ops.kd_topk import _kd_topk
from kdfast.reference import kd_topk as ref

from conftest import usable_backends
from helpers import assert_close_by_rule

BACKENDS = usable_backends("kd_topk")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REMAINDERS = ("bucket", "renormalize")
# (rows, vocab, k): one entry; k of 1, several and the whole vocabulary; vocabularies not a
# multiple of any block
SHAPES = [(1, 1, 1), (2, 7, 3), (5, 1031, 1), (5, 1031, 64), (3, 517, 517)]


def logits(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def stored(rows, vocab, k, seed, temperature=1.0):
    """A teacher's top-k (ids, float32 log-probabilities) from random logits."""
    teacher = logits((rows, vocab), torch.float32, seed)
    top = torch.log_softmax(teacher / temperature, dim=-1).topk(k, dim=-1)
    return top.indices, top.values


def fused(backend, s, ids, lp, *, labels=None, ignore_index=-100, temperature=1.0, remainder="bucket",
          loss_scale=1.0, stored_eps=torch.finfo(torch.float32).eps):
    """Row losses and the fused student gradient straight from one backend."""
    return _kd_topk(s, ids, lp.float(), None if labels is None else labels.long(), remainder == "renormalize",
                    ignore_index, stored_eps, (1.0 / temperature, loss_scale), True, backend=backend)


def reference(s, ids, lp, dtype, **kw):
    """(row losses, student gradient by autograd) of the reference in ``dtype``."""
    leaf = s.detach().to(dtype).requires_grad_(True)
    rows = ref.kd_topk(leaf, ids, lp.to(dtype), dtype=dtype, **kw)
    grad = torch.autograd.grad(rows.sum(), leaf)[0] if rows.requires_grad else torch.zeros_like(leaf)
    return rows.detach(), grad


def assert_matches(backend, s, ids, lp, name, finite=True, **kw):
    rows, grad = fused(backend, s, ids, lp, **kw)
    ref_kw = {k: v for k, v in kw.items()}
    rows64, grad64 = reference(s, ids, lp, torch.float64, **ref_kw)
    rows32, grad32 = reference(s, ids, lp, torch.float32, **ref_kw)
    assert rows.dtype == torch.float32 and rows.shape == (s.shape[0],)
    assert grad.shape == s.shape
    if finite:
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all(), name
    # infinite and NaN results where the reference has them, the finite ones by the rule
    for out, want, name_of in ((rows, rows64, "loss"), (grad, grad64, "grad")):
        odd = ~torch.isfinite(want)
        assert torch.equal(odd, ~torch.isfinite(out)), f"{name} {name_of}: non-finite entries differ"
        torch.testing.assert_close(out.double()[odd], want[odd], equal_nan=True, msg=f"{name} {name_of}")
    fin, fin_g = torch.isfinite(rows64), torch.isfinite(grad64)
    assert_close_by_rule(rows[fin], rows64[fin], rows32[fin], f"{name} loss", atol=2e-6)
    ulp = 0.0 if s.dtype == torch.float32 or not fin_g.any() else (
        torch.finfo(s.dtype).eps * grad64[fin_g].abs().max().item())
    assert_close_by_rule(grad.float()[fin_g], grad64[fin_g], grad32[fin_g], f"{name} grad", atol=2e-6 + ulp)
    return rows, grad


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("remainder", REMAINDERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, remainder, dtype):
    for i, (rows, vocab, k) in enumerate(SHAPES):
        for temperature, loss_scale in ((1.0, 1.0), (2.5, 6.25)):
            s = logits((rows, vocab), dtype, 2 * i)
            ids, lp = stored(rows, vocab, k, 2 * i + 1, temperature)
            assert_matches(backend, s, ids, lp, f"{backend} {remainder} {dtype} {(rows, vocab, k)} T={temperature}",
                           temperature=temperature, remainder=remainder, loss_scale=loss_scale)


def test_closed_form_gradient_is_the_autograd_gradient():
    # kd_topk_grad is the reference backend's gradient (inside the custom op nothing records a
    # graph): it must be the autograd gradient of the reference's loss, edge cases included.
    s = logits((8, 40), torch.float64, 1)
    s[1, :5] += 100.0  # the mass outside the ids far below the row's maximum
    s[2, 5:] = -math.inf  # no mass outside the ids
    s[3, 7] = math.nan  # no softmax
    ids, lp = stored(8, 40, 5, 2)
    ids[1], ids[2] = torch.arange(5), torch.arange(5)
    lp = lp.double()
    lp[4, 2] = -math.inf  # an entry of probability 0
    lp[5] = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)  # the whole mass (no remainder)
    lp[6, 0] = math.nan
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, -100])
    for remainder in REMAINDERS:
        for kw in (dict(), dict(labels=labels, temperature=1.7, loss_scale=2.89)):
            kw = dict(kw, remainder=remainder, stored_eps=torch.finfo(torch.float32).eps)
            _, autograd = reference(s, ids, lp, torch.float64, **kw)
            closed = ref.kd_topk_grad(s, ids, lp, dtype=torch.float64, **kw)
            torch.testing.assert_close(closed, autograd, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("missing", [2e-6, 1e-5])
def test_a_remainder_within_k_float32_eps_of_zero_is_rounding(backend, missing):
    # A stored mass of 1 - 2e-6 is above the rounding of the stored values (~4e-7) but within
    # k = 32 float32 epsilons (3.8e-6): its remainder is rounding, dead; 1 - 1e-5 is a live one.
    # (A kernel that left the k * FLT_EPS term out of the bound was off by 4.5e-6 relative.)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 64, generator=gen)
    student[:, 32:] -= 12
    ids = torch.arange(32).expand(2, 32).contiguous()
    lp = (torch.softmax(torch.randn(2, 32, generator=gen, dtype=torch.float64), 1) * (1 - missing)).log().float()
    expected = ops.kd_topk(student, ids, lp, backend="reference")
    torch.testing.assert_close(ops.kd_topk(student, ids, lp, backend=backend), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("remainder", REMAINDERS)
def test_edge_rows(backend, remainder):
    s = logits((9, 300), torch.float32, 3)
    ids, lp = stored(9, 300, 6, 4)
    s[0, ids[0]] += 100.0  # a confident student: its outside mass is summed again below 1e-30
    s[1] = -math.inf  # only the ids possible: no outside mass
    s[1, ids[1]] = torch.arange(6.0)
    lp[2, 3:] = -math.inf  # entries of probability 0
    lp[3] = torch.log_softmax(logits((6,), torch.float32, 5), -1)  # stored mass 1: no remainder
    s[4] *= 1e3  # large logits keep their small differences
    s[4] += 1e4
    s[5, ids[5, 0]] = -math.inf  # the student gives an id probability 0: an infinite KL
    s[6, 17] = -math.inf
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, -100, 8])
    s[7] = math.nan  # an ignored row may hold anything
    lp[7] = math.nan
    rows, grad = assert_matches(backend, s, ids, lp, f"{backend} {remainder}", finite=False, labels=labels,
                                remainder=remainder)
    assert rows[7] == 0 and (grad[7] == 0).all()
    assert rows[5] == math.inf and torch.isfinite(grad).all()
    # a teacher remainder (here 0.4) against a student with no mass outside the ids: infinite
    assert (rows[1] == math.inf) == (remainder == "bucket")
    assert torch.isfinite(rows[[0, 2, 3, 4, 6, 8]]).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_row_without_softmax_or_with_a_nan_teacher_is_nan(backend):
    s = logits((4, 50), torch.float32, 6)
    ids, lp = stored(4, 50, 4, 7)
    s[0, 3] = math.nan
    s[1, 9] = math.inf
    s[2] = -math.inf
    lp[3, 1] = math.nan  # (refused by topk_kd_loss on the CPU; on a GPU nothing is read back)
    for remainder in REMAINDERS:
        rows, grad = fused(backend, s, ids, lp, remainder=remainder)
        assert rows.isnan().all(), remainder
        assert grad[:3].isnan().all()
        _, grad64 = reference(s, ids, lp, torch.float64, remainder=remainder)
        torch.testing.assert_close(grad[3].double(), grad64[3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_remainder_within_the_stored_rounding_counts_as_zero(backend):
    # bfloat16 log-probabilities of a teacher whose top-k holds all its mass: their stored sum is
    # off 1 by rounding, which must not become a remainder (an infinite KL against a student
    # without mass outside the ids).
    s = torch.full((2, 20), -math.inf)
    s[:, :8] = logits((2, 8), torch.float32, 8)
    lp = torch.log_softmax(logits((2, 8), torch.float32, 9), -1).bfloat16().float()
    ids = torch.arange(8).repeat(2, 1)
    eps = torch.finfo(torch.bfloat16).eps
    rows, grad = fused(backend, s, ids, lp, stored_eps=eps)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert_matches(backend, s, ids, lp, backend, stored_eps=eps)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p_top", [0.995, 0.9995])
def test_a_confident_tokens_small_remainder_is_kept_in_16_bit_storage(backend, dtype, p_top):
    # The remainder test's bound took p (1 + |lp|) units of the stored dtype: a top token of
    # 0.995 stored in bf16 (its remainder pinned to 0.4992 % +- 0.002 %) had its remainder
    # dropped, and the loss came out negative, lowest for a one-hot student.
    vocab = 100
    s = torch.zeros(1, vocab)
    s[0, 0] = math.log((1 - 1e-6) / 1e-6 * (vocab - 1))  # the student: 1 - 1e-6 on id 0
    ids = torch.tensor([[0]])
    lp = torch.tensor([[math.log(p_top)]]).to(dtype)
    eps = torch.finfo(dtype).eps
    log_q = s.double().log_softmax(-1)
    p = lp.double().exp()
    r, q_rest = 1 - p[0, 0], 1 - log_q[0, 0].exp()
    exact = p[0, 0] * (lp.double()[0, 0] - log_q[0, 0]) + r * (r.log() - q_rest.log())
    rows, grad = fused(backend, s, ids, lp.float(), stored_eps=eps) if backend != "reference" else reference(
        s, ids, lp.float(), torch.float64, stored_eps=eps)
    assert exact > 0
    torch.testing.assert_close(rows.double()[0], exact, rtol=2e-3, atol=1e-7)
    # the gradient pushes the student's top logit down (towards the teacher's p_top), not up:
    # d/ds_0 of the bucket KL is r q_0 - p_0 Q
    q0 = log_q[0, 0].exp()
    want = r * q0 - p[0, 0] * q_rest
    assert want > 0
    torch.testing.assert_close(grad.double()[0, 0], want, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("level", [-10.0, -1e4, -1e6, -1e8])
def test_renormalized_weights_of_very_negative_log_probabilities(backend, level):
    # lp - (max + log z) rounded log z away at the scale of lp: weights of 1 each at -1e8 (a loss
    # k times too large), 0.938 for 0.916 at -1e6
    s = torch.zeros(1, 10)
    ids = torch.tensor([[0, 1, 2, 3]])
    lp = torch.full((1, 4), level)
    rows, _ = (fused(backend, s, ids, lp, remainder="renormalize") if backend != "reference"
               else reference(s, ids, lp, torch.float32, remainder="renormalize"))
    torch.testing.assert_close(rows[0].double(), torch.tensor(math.log(10 / 4), dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_and_16_bit_gradients(backend):
    wide = logits((6, 90), torch.bfloat16, 10)
    s = wide[:, 5:75]  # rows strided, entries adjacent
    ids, lp = stored(6, 70, 9, 11)
    rows, grad = fused(backend, s, ids, lp)
    rows_c, grad_c = fused(backend, s.contiguous(), ids, lp)
    torch.testing.assert_close(rows, rows_c, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)
    half = logits((6, 70), torch.float16, 12)
    _, grad16 = fused(backend, half, ids, lp)
    assert grad16.dtype == torch.float32  # scaled by the upstream gradient before it is narrowed


def test_autograd_student_and_logprobs():
    s = logits((5, 97), torch.float32, 13).requires_grad_(True)
    ids, lp = stored(5, 97, 7, 14, 1.3)
    lp.requires_grad_(True)
    weights = torch.linspace(0.5, 2.0, 5)
    (ops.kd_topk(s, ids, lp, temperature=1.3) * weights).sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    lp64 = lp.detach().double().requires_grad_(True)
    eps = torch.finfo(torch.float32).eps
    (ref.kd_topk(s64, ids, lp64, temperature=1.3, stored_eps=eps, dtype=torch.float64)
     * weights.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_forced_backend_stays_differentiable(backend):
    s = logits((4, 53), torch.float32, 17).requires_grad_(True)
    ids, lp = stored(4, 53, 5, 18)
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0])
    rows = ops.kd_topk(s, ids, lp, backend=backend)
    assert rows.requires_grad
    ((rows * weights).sum() + s.sum() * 0).backward()
    _, grad64 = reference(s, ids, lp, torch.float64, stored_eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(s.grad.double(), grad64 * weights.double()[:, None], rtol=1e-5, atol=1e-7)


def test_double_and_second_backward_are_refused_not_wrong():
    s = logits((3, 40), torch.float32, 19).requires_grad_(True)
    ids, lp = stored(3, 40, 4, 20)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ops.kd_topk(s, ids, lp).sum(), s, create_graph=True)
    loss = ops.kd_topk(s, ids, lp).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        loss.backward()


def test_no_grad_path_matches():
    s = logits((3, 40), torch.float32, 9)
    ids, lp = stored(3, 40, 4, 10)
    with torch.no_grad():
        rows = ops.kd_topk(s.requires_grad_(True), ids, lp)
    assert not rows.requires_grad
    expected, _ = reference(s, ids, lp, torch.float64, stored_eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-6)


def test_opcheck():
    s = logits((4, 37), torch.float32, 11).requires_grad_(True)
    ids, lp = stored(4, 37, 5, 12)
    labels = torch.tensor([1, -100, 2, 3])
    for want_grad in (True, False):
        for renormalize in (False, True):
            torch.library.opcheck(torch.ops.kdfast.kd_topk.default,
                                  (s, ids, lp, labels, renormalize, -100, 1e-7, number_tensor((1.0, 1.0)), want_grad,
                                   ""))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_compiles(backend):
    s = logits((4, 64), torch.float32, 13)
    ids, lp = stored(4, 64, 6, 14)
    labels = torch.tensor([1, -100, 2, 3])

    def loss(s):
        return ops.kd_topk(s, ids, lp, labels=labels, temperature=2.0, backend=backend).mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaf = s.clone().requires_grad_(True)
    value = compiled(leaf)
    value.backward()
    expected_leaf = s.clone().requires_grad_(True)
    expected = loss(expected_leaf)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(leaf.grad, expected_leaf.grad)


def test_vmap_and_per_sample_gradients_use_the_reference():
    s = logits((3, 4, 30), torch.float32, 15)
    ids, lp = stored(12, 30, 3, 16)
    ids, lp = ids.reshape(3, 4, 3), lp.reshape(3, 4, 3)
    per_sample = torch.func.vmap(torch.func.grad(lambda x, i, p: ops.kd_topk(x, i, p).sum()))(s, ids, lp)
    for b in range(3):
        leaf = s[b].clone().requires_grad_(True)
        ops.kd_topk(leaf, ids[b], lp[b]).sum().backward()
        torch.testing.assert_close(per_sample[b], leaf.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("call, error, match", [
    (lambda s, i, p: ops.kd_topk(s[0], i, p), ValueError, "student_logits must be 2-D"),
    (lambda s, i, p: ops.kd_topk(s.long(), i, p), TypeError, "student_logits must be float32"),
    (lambda s, i, p: ops.kd_topk(s, i[:2], p[:2]), ValueError, r"ids must have shape \(3, k\)"),
    (lambda s, i, p: ops.kd_topk(s, i, p[:, :2]), ValueError, "logprobs must have the shape of ids"),
    (lambda s, i, p: ops.kd_topk(s, i.float(), p), TypeError, "ids must be int64 or int32"),
    (lambda s, i, p: ops.kd_topk(s, i, p.long()), TypeError, "logprobs must be floating point"),
    (lambda s, i, p: ops.kd_topk(s, i[:, :0], p[:, :0]), ValueError, "between 1 and 8"),
    (lambda s, i, p: ops.kd_topk(s, i, p, remainder="drop"), ValueError, "remainder must be one of"),
    (lambda s, i, p: ops.kd_topk(s, i, p, temperature=0.0), ValueError, "temperature must be"),
    (lambda s, i, p: ops.kd_topk(s, i, p, loss_scale=math.nan), ValueError, "loss_scale"),
    (lambda s, i, p: ops.kd_topk(s, i, p, labels=torch.tensor([0, 9, 1])), ValueError, r"labels must be in \[0, 8\)"),
    (lambda s, i, p: ops.kd_topk(s, i, p, stored_dtype=torch.int8), TypeError, "stored_dtype"),
    (lambda s, i, p: ops.kd_topk(s, i, p, backend="cuda"), BackendUnavailableError, "cannot run"),
])
def test_bad_input(call, error, match, unemulated_backends):
    s = logits((3, 8), torch.float32, 0)
    ids, lp = stored(3, 8, 4, 1)
    with pytest.raises(error, match=match):
        call(s, ids, lp)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("remainder", REMAINDERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_reference(backend, remainder, dtype):
    for i, (rows, vocab, k) in enumerate(SHAPES + [(7, 128256, 64), (3, 300000, 20)]):
        s = logits((rows, vocab), dtype, 2 * i).cuda()
        ids, lp = stored(rows, vocab, k, 2 * i + 1, 1.5)
        labels = (torch.arange(rows) % vocab).masked_fill(torch.arange(rows) == 1, -100)
        assert_matches(backend, s, ids.cuda(), lp.cuda(), f"{backend} {remainder} {dtype} {(rows, vocab, k)}",
                       labels=labels.cuda(), temperature=1.5, remainder=remainder)


@pytest.mark.gpu
def test_gpu_no_sync_and_graph_capture():
    s = logits((64, 32000), torch.bfloat16, 1).cuda().requires_grad_(True)
    ids, lp = stored(64, 32000, 32, 2)
    ids, lp = ids.cuda(), lp.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.kd_topk(s, ids, lp).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        ops.kd_topk(s, ids, lp)  # warm-up outside capture
        with torch.cuda.graph(graph):
            rows = ops.kd_topk(s, ids, lp)
    graph.replay()
    torch.testing.assert_close(rows, ops.kd_topk(s.detach(), ids, lp))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_id_outside_the_vocabulary_makes_its_row_nan_without_touching_memory(backend):
    # Ids are checked by topk_kd_loss on the CPU only (on a GPU that would be a sync): a kernel
    # must neither read nor write outside the row for them (the op can also be called directly).
    s = logits((4, 30), torch.float32, 21)
    ids, lp = stored(4, 30, 3, 22)
    ids[1, 2], ids[2, 0] = 30, -1
    rows, grad = fused(backend, s, ids, lp)
    assert rows[1:3].isnan().all() and grad[1:3].isnan().all()
    ok = torch.tensor([0, 3])
    expected, grad64 = reference(s[ok], ids[ok], lp[ok], torch.float64, stored_eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(rows[ok].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[ok].double(), grad64, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_with_grad_stores_the_gradient_in_the_dtype_asked(backend, grad_dtype):
    # (what the chunked fused-linear top-k loss takes: no graph, the gradient rounded once)
    s = logits((5, 211), torch.float32, 23).requires_grad_(True)
    ids, lp = stored(5, 211, 9, 24)
    labels = torch.tensor([3, -100, 0, 7, 1])
    rows, grad = ops.kd_topk_with_grad(s, ids, lp, labels=labels, temperature=1.7, grad_dtype=grad_dtype,
                                       backend=backend)
    assert not rows.requires_grad and not grad.requires_grad and grad.dtype == grad_dtype
    rows32, grad32 = fused(backend, s.detach(), ids, lp, labels=labels, temperature=1.7)
    torch.testing.assert_close(rows, rows32, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad32.to(grad_dtype), rtol=0, atol=0)
    with pytest.raises(TypeError, match="grad_dtype"):
        ops.kd_topk_with_grad(s, ids, lp, grad_dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_with_grad_stores_nan_and_ignored_rows_in_the_dtype_asked(backend, grad_dtype):
    # The rows whose gradient is not computed, a row without a softmax (NaN) and ignored rows
    # (0), are stored in grad_dtype too, each in its own row.
    s = logits((6, 211), torch.float32, 26)
    ids, lp = stored(6, 211, 9, 27)
    s[1, 5] = math.nan
    labels = torch.tensor([3, 0, -100, 7, 1, -100])
    rows, grad = ops.kd_topk_with_grad(s, ids, lp, labels=labels, grad_dtype=grad_dtype, backend=backend)
    rows32, grad32 = ops.kd_topk_with_grad(s, ids, lp, labels=labels, backend=backend)
    assert grad.dtype == grad_dtype and grad32.dtype == torch.float32
    torch.testing.assert_close(rows, rows32, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, grad32.to(grad_dtype), rtol=0, atol=0, equal_nan=True)
    assert grad[1].isnan().all() and (grad[[2, 5]] == 0).all() and torch.isfinite(grad[[0, 3, 4]]).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_outside_logits_of_minus_1e30(backend):
    # Logits of -1e30 outside the ids (a vocabulary masked by a finite minimum): the mass there
    # must be shared among them, not each given all of it (torch.logsumexp's gradient at that
    # size rounds the result onto every entry: the gradient summed to -9, not 0).
    s = torch.full((3, 50), -1e30)
    s[:, :4] = logits((3, 4), torch.float32, 25)
    ids = torch.arange(4).repeat(3, 1)
    lp = torch.log(torch.full((3, 4), 0.2))
    rows, grad = fused(backend, s, ids, lp)
    rows64, grad64 = reference(s, ids, lp, torch.float64, stored_eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-6)
    assert grad.sum(1).abs().max() < 1e-6  # shifting every logit changes nothing
    closed = ref.kd_topk_grad(s.double(), ids, lp.double(), stored_eps=torch.finfo(torch.float32).eps,
                              dtype=torch.float64)
    torch.testing.assert_close(closed, grad64, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_a_broad_teachers_mass_is_summed_without_drift(backend):
    # 256 bfloat16-stored entries summed one by one in float32 drifted by 1e-6 relative, all one
    # way; renormalised weights (and remainders) inherit it, times T^2: 6x torch's float32 error.
    g = torch.Generator().manual_seed(0)
    temperature, k, vocab, rows = 4.0, 256, 2000, 16
    top = torch.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2.0 / temperature, -1).topk(k)
    ids, lp = top.indices, top.values.bfloat16()
    s = (torch.randn(rows, vocab, generator=g) * 2.0)
    eps = torch.finfo(torch.bfloat16).eps
    for remainder in REMAINDERS:
        assert_matches(backend, s, ids, lp.float(), f"{backend} {remainder}", temperature=temperature,
                       loss_scale=temperature ** 2, remainder=remainder, stored_eps=eps)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_an_all_minus_inf_student_is_nan_whatever_the_teacher(backend):
    # (a teacher with no stored mass gave the reference inf, or 0 with k equal to the vocabulary)
    for s, ids, lp in ((torch.full((1, 3), -math.inf), torch.tensor([[1]]), torch.full((1, 1), -math.inf)),
                       (torch.full((1, 1), -math.inf), torch.tensor([[0]]), torch.full((1, 1), -math.inf))):
        for remainder in REMAINDERS:
            rows, grad = fused(backend, s, ids, lp, remainder=remainder)
            assert rows.isnan().all() and grad.isnan().all(), (backend, remainder)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy: the overflowing branch
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("remainder", REMAINDERS)
@pytest.mark.parametrize("temperature", [0.5, 1e-3])
def test_logits_that_overflow_when_divided_by_the_temperature(backend, remainder, temperature):
    # Below T = 1, s / T overflows float32 for |s| > T * 3.4e38: the row is taken relative to its
    # max first (kd_common.h: tempered_shift). Such a row keeps only its tied maxima: row 0's
    # student on 4 entries, the teacher's 0.9 on 3 of them (a live remainder against the fourth),
    # row 1's student on the 3 entries the teacher stores. The float64 reference divides without
    # overflow.
    g = torch.Generator().manual_seed(40)
    s = (torch.rand(2, 30, generator=g, dtype=torch.float64) * 6e38 - 3e38).float()
    s[:, 2::7] = -math.inf
    s[0, [5, 6, 7, 8]] = 3.2e38
    s[1, [5, 6, 7]] = 3.2e38
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    lp = torch.tensor([[0.3, 0.3, 0.3], [0.5, 0.25, 0.25]]).log()
    rows, grad = fused(backend, s, ids, lp, temperature=temperature, remainder=remainder)
    rows64, grad64 = reference(s, ids, lp, torch.float64, temperature=temperature, remainder=remainder,
                               stored_eps=torch.finfo(torch.float32).eps)
    assert torch.isfinite(rows64).all() and torch.isfinite(grad64).all()
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-6, atol=1e-6 / temperature)
    assert rows[1] > 0.01


def test_a_direct_call_refuses_a_temperature_that_is_not_positive():
    # (read_numbers checked finiteness and float32's range only: T = -1 gave rows of garbage)
    s = logits((4, 30), torch.float32, 25)
    ids, lp = stored(4, 30, 3, 26)
    for inv_t in (-1.0, 0.0):
        with pytest.raises(ValueError, match=rf"1 / temperature \(in numbers\) must be > 0, got {inv_t}"):
            torch.ops.kdfast.kd_topk(s, ids, lp, None, False, -100, 0.0,
                                     torch.tensor([inv_t, 1.0], dtype=torch.float64), False, "")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_bucket_remainder_with_one_id_left_out(backend):
    # k = vocab - 1: the remainder bucket is the one token outside the ids; the loss is the
    # forward KL between the two (k + 1)-outcome distributions, written out by hand
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 3, 6
    student = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[: vocab - 1] for _ in range(rows)])
    p = torch.softmax(torch.randn(rows, vocab - 1, generator=gen, dtype=torch.float64), -1) * 0.7  # mass 0.7
    q_ids = torch.softmax(student, -1).gather(1, ids)
    r, q_rest = 1 - p.sum(-1), 1 - q_ids.sum(-1)
    expected = (p * (p.log() - q_ids.log())).sum(-1) + r * (r.log() - q_rest.log())
    torch.testing.assert_close(ref.kd_topk(student, ids, p.log(), remainder="bucket", dtype=torch.float64), expected,
                               rtol=1e-10, atol=1e-12)
    got = ops.kd_topk(student.float(), ids, p.log().float(), remainder="bucket", backend=backend)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
