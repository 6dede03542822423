"""The fused-linear losses under torch.compile: their chunk loop runs inside one custom op
(``kdfast::fused_linear_kd``, ``kdfast::fused_linear_topk_kd``), so a token count that changes
between calls keeps one graph (traced, the loop was unrolled per count: one graph per count,
then past torch's recompile limit of 8 the function ran eagerly)."""
import pytest
import torch

from kdfast.losses import fused_linear_kd, fused_linear_topk_kd, teacher_topk
from kdfast.ops._tensors import number_tensor

HIDDEN, VOCAB, TEACHER_HIDDEN, TEACHER_VOCAB, K = 8, 31, 12, 37, 5
TOKEN_COUNTS = (4, 5, 6, 7, 9, 13, 17, 40, 100, 130)  # more than torch's recompile limit


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5, torch.randn(VOCAB, generator=g),
            torch.randn(TEACHER_VOCAB, TEACHER_HIDDEN, generator=g) * 0.5)


def _batch(tokens, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (tokens,), generator=g)
    labels[::3] = -100
    return torch.randn(tokens, HIDDEN, generator=g), torch.randn(tokens, TEACHER_HIDDEN, generator=g), labels


def _loss(topk):
    if topk:
        def loss(h, w, b, ids, logprobs, labels):
            return fused_linear_topk_kd(h, w, ids, logprobs, labels, b, temperature=2.0, weight_hard=0.3,
                                        chunk_size=16)
    else:
        def loss(h, w, b, ht, wt, labels):
            return fused_linear_kd(h, w, ht, wt, labels, b, kind="jsd", beta=0.3, temperature=2.0, weight_hard=0.3,
                                   chunk_size=16)
    return loss


def _value_and_grads(fn, h, w, b, teacher_a, teacher_b, labels):
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    out = fn(*leaves, teacher_a, teacher_b, labels)
    out.backward()
    return (out.detach(), *(leaf.grad for leaf in leaves))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("topk", [False, True], ids=["teacher_head", "stored_topk"])
def test_a_changing_token_count_keeps_one_graph(topk, backend, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    loss = _loss(topk)
    w, b, wt = _weights()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    for seed, tokens in enumerate(TOKEN_COUNTS):
        h, ht, labels = _batch(tokens, seed)
        # (the stored top-k of the teacher's logits takes the teacher's place)
        teacher = teacher_topk(ht @ wt[:VOCAB].t(), K) if topk else (ht, wt)
        torch.testing.assert_close(_value_and_grads(compiled, h, w, b, *teacher, labels),
                                   _value_and_grads(loss, h, w, b, *teacher, labels), rtol=1e-5, atol=1e-6,
                                   msg=f"{tokens} tokens")
    assert counters["stats"]["unique_graphs"] <= 2  # the first count, then a symbolic one


def test_the_loss_alone_under_no_grad_and_a_frozen_head():
    # only the gradients asked for are computed (the others are empty outputs of the op)
    w, b, wt = _weights()
    h, ht, labels = _batch(20, 0)
    compiled = torch.compile(lambda *a: fused_linear_kd(*a, weight_hard=0.5, chunk_size=8), backend="aot_eager",
                             fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, w, ht, wt, labels), fused_linear_kd(h, w, ht, wt, labels,
                                                                                     weight_hard=0.5, chunk_size=8))
    leaf = h.clone().requires_grad_(True)
    compiled(leaf, w, ht, wt, labels).backward()
    eager = h.clone().requires_grad_(True)
    fused_linear_kd(eager, w, ht, wt, labels, weight_hard=0.5, chunk_size=8).backward()
    torch.testing.assert_close(leaf.grad, eager.grad)


def _kd_op_args(want=(True, True, True), requires_grad=True):
    w, b, wt = _weights()
    h, ht, labels = _batch(11, 0)
    h, w, b = (t.clone().requires_grad_(requires_grad) for t in (h, w, b))
    return (h, w, b, ht, wt, None, labels, 2, 0.3, -100, VOCAB, 4, "batchmean", number_tensor((2.0, 1.0, 0.3)),
            list(want))


def _topk_op_args():
    w, b, wt = _weights()
    h, ht, labels = _batch(11, 0)
    ids, logprobs = teacher_topk(ht @ wt[:VOCAB].t(), K)
    h, w, b = (t.clone().requires_grad_(True) for t in (h, w, b))
    return (h, w, b, ids, logprobs, labels, "bucket", -100, VOCAB, 0, "sum", number_tensor((1.5, 2.0, 0.0)),
            [True, True, True])


def test_opcheck():
    torch.library.opcheck(torch.ops.kdfast.fused_linear_kd.default, _kd_op_args())
    torch.library.opcheck(torch.ops.kdfast.fused_linear_topk_kd.default, _topk_op_args())


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_a_float64_default_dtype_changes_nothing(float64_default, tmp_path, monkeypatch):
    # (the ops' loss and denominator took the default dtype, their fake kernel said float32:
    # inductor's backward read the buffers as float32, NaN gradients; opcheck failed)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    w, b, wt = (t.float() for t in _weights())
    h, ht, _ = (t.float() if t.is_floating_point() else t for t in _batch(9, 1))

    def loss(h, w, b):  # no labels, "batchmean": the denominator a fill
        return fused_linear_kd(h, w, ht, wt, None, b, chunk_size=4)

    expected = _value_and_grads(lambda h, w, b, *rest: loss(h, w, b), h, w, b, None, None, None)
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    got = _value_and_grads(lambda h, w, b, *rest: compiled(h, w, b), h, w, b, None, None, None)
    assert expected[0].dtype == torch.float32
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    args = [t.detach().float().requires_grad_(t.requires_grad) if i < 5 else t for i, t in enumerate(_kd_op_args())]
    args[12] = "sum"  # (its denominator: a 1 the op makes)
    torch.library.opcheck(torch.ops.kdfast.fused_linear_kd.default, tuple(args))


def test_meta_tensors_give_the_losss_shape():
    # (torch.is_autocast_enabled raised "unknown device type for autocast" for meta tensors)
    h, w = torch.empty(6, HIDDEN, device="meta"), torch.empty(VOCAB, HIDDEN, device="meta")
    out = fused_linear_kd(h, w, h, w)
    assert out.device.type == "meta" and out.shape == () and out.dtype == torch.float32
    out = fused_linear_topk_kd(h, w, torch.zeros(6, K, dtype=torch.long, device="meta"),
                               torch.zeros(6, K, device="meta"))
    assert out.device.type == "meta" and out.shape == ()


def test_the_ops_gradients_are_the_functions():
    args = _kd_op_args()
    loss, *_ = torch.ops.kdfast.fused_linear_kd(*args)
    (3.0 * loss).backward()
    h, w, b, ht, wt, _, labels = args[:7]
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    expected = fused_linear_kd(leaves[0], leaves[1], ht, wt, labels, leaves[2], kind="jsd", beta=0.3, temperature=2.0,
                               weight_hard=0.3, vocab_size=VOCAB, chunk_size=4)
    (3.0 * expected).backward()
    torch.testing.assert_close(loss, expected.detach())
    for got, leaf in zip((h, w, b), leaves):
        torch.testing.assert_close(got.grad, leaf.grad)


@pytest.mark.parametrize("index, value, error, match", [
    (7, 5, ValueError, r"kind must be in \[0, 5\)"),
    (10, VOCAB + 1, ValueError, r"vocab must be in \[1, 31\]"),
    (11, -1, ValueError, "chunk_size must be >= 1, or 0 for the default"),
    (12, "none", ValueError, "reduction must be 'batchmean', 'sum' or 'mean'"),
    (13, number_tensor((2.0, 1.0, -0.5)), ValueError, "the loss weights must be >= 0"),
    (13, number_tensor((2.0, 1.0)), ValueError, r"numbers must be a float64 CPU tensor of shape \(3,\)"),
    (13, number_tensor((0.0, 1.0, 0.0)), ValueError, "temperature must be a positive finite number"),
    (14, [True, True], ValueError, "want_grads must hold 3 flags"),
    (4, torch.randn(VOCAB, TEACHER_HIDDEN + 1), ValueError, r"teacher_weight must be \[vocab, 12\]"),
    (6, torch.full((11,), VOCAB), ValueError, r"labels must be in \[0, 31\)"),
])
def test_a_direct_call_of_the_op_is_checked(index, value, error, match):
    args = list(_kd_op_args(requires_grad=False))
    args[index] = value
    with pytest.raises(error, match=match):
        torch.ops.kdfast.fused_linear_kd(*args)


def test_a_gradient_the_call_did_not_compute_is_refused():
    loss = torch.ops.kdfast.fused_linear_kd(*_kd_op_args(want=(True, False, True)))[0]
    with pytest.raises(RuntimeError, match=r"input 1 needs a gradient its call did not compute"):
        loss.backward()


def test_torch_export_takes_a_dynamic_token_count():
    # (traced, the chunk loop made the token count a constant of the exported program)
    w, b, wt = _weights()

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(w.clone())

        def forward(self, h, ht, labels):
            return fused_linear_kd(h, self.weight, ht, wt, labels, weight_hard=0.5, chunk_size=8)

    head = Head()
    tokens = torch.export.Dim("tokens")
    exported = torch.export.export(head, _batch(11, 0), dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}))
    for seed, count in enumerate((11, 5, 30)):
        batch = _batch(count, seed)
        torch.testing.assert_close(exported.module()(*batch), head(*batch))
