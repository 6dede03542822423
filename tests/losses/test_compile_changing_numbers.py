"""A loss's number (temperature, weights) that changes between calls of a function compiled with
inductor, its graph caches on: each value's result, never a graph compiled for an earlier one.

From its second value on torch.compile traces such a number as a symbol. The kernels' custom ops
take it as a constant: one graph per value. A number made a tensor first (the finiteness check
did that) was made a constant only while the op was lowered, which inductor's graph cache does
not see: from the third value on, the graph compiled for the second one was served."""
import pytest
import torch

from kdfast.losses import fused_linear_kd, hinton_kd_loss, kd_loss, teacher_topk, topk_kd_loss


def _inputs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 31, generator=g), torch.randn(4, 31, generator=g)
    h, w, ht, wt = (torch.randn(shape, generator=g) for shape in ((4, 8), (31, 8), (4, 8), (31, 8)))
    labels = torch.randint(0, 31, (4,), generator=g)
    return s, t, h, w, ht, wt, labels


S, T, H, W, HT, WT, LABELS = _inputs()
IDS, LOGPROBS = teacher_topk(T, 5)

CASES = {
    "kd_loss temperature": (lambda v: kd_loss(S, T, kind="forward_kl", temperature=v), (1.0, 2.0, 3.0, 4.0)),
    "topk_kd_loss temperature": (lambda v: topk_kd_loss(S, IDS, LOGPROBS, temperature=v), (1.0, 2.0, 3.0)),
    "fused_linear_kd weights": (lambda v: fused_linear_kd(H, W, HT, WT, LABELS, weight_soft=v, weight_hard=1 - v),
                                (0.2, 0.4, 0.6, 0.8)),
    # the caller's own use of the number makes it a tensor first
    "kd_loss temperature, used by the caller too": (lambda v: kd_loss(S * v, T, kind="jsd", temperature=v),
                                                    (1.0, 2.0, 3.0, 4.0)),
    "hinton_kd_loss temperature": (lambda v: hinton_kd_loss(S, T, LABELS, temperature=v, alpha=0.5),
                                   (1.0, 2.0, 3.0)),
}


@pytest.mark.parametrize("case", CASES)
def test_each_value_gets_its_own_result_under_inductor(case, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # (a fresh cache: nothing from other runs)
    loss, values = CASES[case]
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: loss(v), backend="inductor", fullgraph=True)
    for value in values:
        torch.testing.assert_close(compiled(value), loss(value), rtol=1e-5, atol=1e-6, msg=f"{case} = {value}")


def test_float64_logits_keep_one_graph_for_every_temperature(tmp_path, monkeypatch):
    # float64 logits never reach a kernel (the float64 reference computes them): their numbers
    # stay symbolic, so an annealed temperature does not recompile per value (nor, under
    # fullgraph=True, fail at torch's recompile limit)
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    s, t = S.double(), T.double()
    loss = lambda v: kd_loss(s, t, kind="jsd", beta=0.3, temperature=v, scale_by_t2=True)  # noqa: E731
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    for value in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5):
        torch.testing.assert_close(compiled(value), loss(value), msg=f"temperature = {value}")
    assert counters["stats"]["unique_graphs"] <= 2  # the first value, then a symbolic one
