import pytest
import torch
import torch.nn.functional as F

from kdfast.losses import FusedLinearTopKKDLoss, fused_linear_topk_kd, teacher_topk
from kdfast.reference import kd_topk as ref


def heads(tokens=37, hidden=16, vocab=101, k=8, dtype=torch.float32, seed=0, temperature=1.5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype).requires_grad_(True)
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_(True)
    ids, lp = teacher_topk(torch.randn(tokens, vocab, generator=g) * 2, k, temperature=temperature)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::5] = -100
    return h, w, b, ids, lp, labels


def materialised(h, w, b, ids, lp, labels, *, temperature=1.0, remainder="bucket", weight_hard=0.0, weight_soft=1.0,
                 scale_by_t2=False, reduction="batchmean"):
    """The same loss from float64 logits: the top-k reference's rows (as topk_kd_loss takes
    them) plus cross-entropy, reduced."""
    logits = h.double() @ w.double().t() + (0 if b is None else b.double())
    rows = weight_soft * ref.kd_topk(logits, ids, lp.double(), labels, temperature=temperature, remainder=remainder,
                                     stored_eps=torch.finfo(lp.dtype).eps,
                                     loss_scale=temperature ** 2 if scale_by_t2 else 1.0, dtype=torch.float64)
    if weight_hard:
        rows = rows + weight_hard * F.cross_entropy(logits, labels, reduction="none")
    total = rows.sum()
    valid = torch.tensor(h.shape[0]) if labels is None else (labels != -100).sum().clamp(min=1)
    return {"sum": total, "batchmean": total / valid, "mean": total / (valid * w.shape[0])}[reduction]


def grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("remainder", ["bucket", "renormalize"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("chunk_size", [1, 10, None])
def test_matches_materialised_logits(remainder, reduction, chunk_size):
    h, w, b, ids, lp, labels = heads()
    for weight_hard, bias in ((0.0, None), (0.7, b)):
        kw = dict(temperature=1.5, remainder=remainder, weight_hard=weight_hard, weight_soft=0.6, scale_by_t2=True,
                  reduction=reduction)
        loss = fused_linear_topk_kd(h, w, ids, lp, labels, bias, chunk_size=chunk_size, **kw)
        expected = materialised(h, w, bias, ids, lp, labels, **kw)
        torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=1e-7)
        for got, want in zip(grads(loss, h, w, bias), grads(expected, h, w, bias)):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-7)


def test_without_labels_and_under_no_grad():
    h, w, b, ids, lp, _ = heads(seed=1)
    loss = fused_linear_topk_kd(h, w, ids, lp)
    expected = materialised(h, w, None, ids, lp, None)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=1e-7)
    with torch.no_grad():
        evaluated = fused_linear_topk_kd(h, w, ids, lp)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, loss.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_heads(dtype):
    h, w, b, ids, lp, labels = heads(dtype=dtype, seed=2)
    loss = fused_linear_topk_kd(h, w, ids, lp, labels, b, weight_hard=0.5)
    got = grads(loss, h, w, b)
    assert all(g.dtype == dtype for g in got)
    expected = materialised(h, w, b, ids, lp, labels, weight_hard=0.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)  # the products are fp32
    for g, e in zip(got, grads(expected, h, w, b)):
        torch.testing.assert_close(g.double(), e.double(), rtol=2e-2, atol=2e-3)


def test_transforms_take_the_unfused_path():
    # torch.func cannot run the chunked function (its gradients are made in its forward): the
    # same loss comes from the materialised logits there.
    h, w, b, ids, lp, labels = heads(seed=3)
    expected = grads(fused_linear_topk_kd(h, w, ids, lp, labels, b, weight_hard=0.3), h)[0]
    got = torch.func.grad(lambda x: fused_linear_topk_kd(x, w.detach(), ids, lp, labels, b.detach(),
                                                         weight_hard=0.3))(h.detach())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_module():
    h, w, b, ids, lp, labels = heads(seed=4)
    criterion = FusedLinearTopKKDLoss(temperature=2.0, remainder="renormalize", weight_hard=0.5, weight_soft=0.5,
                                      chunk_size=16)
    assert "remainder='renormalize'" in repr(criterion) and "chunk_size=16" in repr(criterion)
    torch.testing.assert_close(criterion(h, w, ids, lp, labels, b),
                               fused_linear_topk_kd(h, w, ids, lp, labels, b, temperature=2.0, remainder="renormalize",
                                                    weight_hard=0.5, weight_soft=0.5))
    with pytest.raises(ValueError, match="remainder must be one of"):
        FusedLinearTopKKDLoss(remainder="drop")
    with pytest.raises(ValueError, match="reduction must be"):
        FusedLinearTopKKDLoss(reduction="none")
    with pytest.raises(ValueError, match=r"weight_soft \* temperature\*\*2 must be at most float32's largest"):
        FusedLinearTopKKDLoss(temperature=1e20, scale_by_t2=True)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(ids=a["ids"][:5]), ValueError, r"teacher_topk_ids must have shape \(37,\) \+ \(k,\)"),
    (lambda a: a.update(lp=a["lp"][:, :3]), ValueError, "must have the shape of teacher_topk_ids"),
    (lambda a: a["ids"].__setitem__((1, 0), 101), ValueError, r"teacher_topk_ids must be in \[0, 101\)"),
    (lambda a: a["ids"].__setitem__((1, 1), a["ids"][1, 0].item()), ValueError, "must not repeat an id"),
    (lambda a: a["lp"].__setitem__((2, 0), 1.0), ValueError, "must be log-probabilities"),
    (lambda a: a.update(ids=a["ids"].float()), TypeError, "teacher_topk_ids must be int64 or int32"),
    (lambda a: a.update(kw=dict(remainder="drop")), ValueError, "remainder must be one of"),
    (lambda a: a.update(kw=dict(weight_hard=0.5), labels=None), ValueError, "weight_hard > 0 needs labels"),
    (lambda a: a.update(kw=dict(temperature=0.0)), ValueError, "temperature must be"),
    (lambda a: a.update(w=a["w"][:, :3]), ValueError, r"student_weight must be \[vocab, 16\]"),
    (lambda a: a.update(w=a["w"][:0]), ValueError, "student_weight must have at least one row"),
    (lambda a: a.update(kw=dict(weight_hard=1e39)), ValueError, "weight_hard and weight_soft must be at most"),
])
def test_bad_input(mutate, error, match):
    h, w, b, ids, lp, labels = heads(seed=5)
    a = dict(h=h, w=w, ids=ids.clone(), lp=lp.clone(), labels=labels, kw={})
    mutate(a)
    with pytest.raises(error, match=match):
        fused_linear_topk_kd(a["h"], a["w"], a["ids"], a["lp"], a["labels"], **a["kw"])


def test_ignored_positions_may_hold_anything():
    # Padding positions (label ignore_index) are not checked and give no NaN.
    h, w, b, ids, lp, labels = heads(seed=6)
    ids[0], lp[0] = -1, float("nan")  # labels[0] is ignored
    loss = fused_linear_topk_kd(h, w, ids, lp, labels)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads(loss, h, w))
