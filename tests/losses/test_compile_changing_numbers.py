"""A loss's number (temperature, weights) that changes between calls of a function compiled with
inductor, its graph caches on: each value's result, from one graph for every value after the
first.

From its second value on torch.compile traces such a number as a symbol. The KD kernels' custom
ops take it in a float64 tensor and the diffusion losses' as a per-sample tensor, which let the
symbol through (a float argument would specialise it: one graph per value, up to torch's
recompile limit). Once, a symbol made a tensor and specialised
by a float argument only while the op was lowered met inductor's graph cache, which did not see
the specialisation: from the third value on, the graph compiled for the second one was served."""
import pytest
import torch

from kdfast import ops
from kdfast.losses import fused_linear_kd, hinton_kd_loss, kd_loss, teacher_topk, topk_kd_loss


def _inputs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 31, generator=g), torch.randn(4, 31, generator=g)
    h, w, ht, wt = (torch.randn(shape, generator=g) for shape in ((4, 8), (31, 8), (4, 8), (31, 8)))
    labels = torch.randint(0, 31, (4,), generator=g)
    return s, t, h, w, ht, wt, labels


S, T, H, W, HT, WT, LABELS = _inputs()
IDS, LOGPROBS = teacher_topk(T, 5)
X0, X1, X2 = S.view(4, 1, 31), T.view(4, 1, 31), (S - T).view(4, 1, 31)  # latents for the diffusion losses

CASES = {
    "kd_loss temperature": (lambda v: kd_loss(S, T, kind="forward_kl", temperature=v),
                            (1.0, 2.0, 3.0, 4.0, 0.5, 1.5, 2.5, 3.5, 4.5, 5.0)),
    "topk_kd_loss temperature": (lambda v: topk_kd_loss(S, IDS, LOGPROBS, temperature=v), (1.0, 2.0, 3.0, 4.0)),
    "fused_linear_kd weights": (lambda v: fused_linear_kd(H, W, HT, WT, LABELS, weight_soft=v, weight_hard=1 - v),
                                (0.2, 0.4, 0.6, 0.8)),
    "fused_linear_kd temperature": (lambda v: fused_linear_kd(H, W, HT, WT, LABELS, temperature=v, weight_hard=0.5),
                                    (1.0, 2.0, 3.0, 4.0)),
    # the caller's own use of the number makes it a tensor first
    "kd_loss temperature, used by the caller too": (lambda v: kd_loss(S * v, T, kind="jsd", temperature=v),
                                                    (1.0, 2.0, 3.0, 4.0)),
    "hinton_kd_loss temperature": (lambda v: hinton_kd_loss(S, T, LABELS, temperature=v, alpha=0.5),
                                   (1.0, 2.0, 3.0)),
    # the diffusion losses take their numbers as per-sample tensors under torch.compile
    "pseudo_huber c": (lambda v: ops.pseudo_huber(X0, X1, c=v), (0.1, 0.2, 0.3, 0.4)),
    "progressive_mse schedule": (lambda v: ops.progressive_mse(X0, X1, X2, 0.9, v, 0.95, v / 2, weights=v),
                                 (0.3, 0.4, 0.5, 0.6)),
    "pd_target schedule": (lambda v: ops.pd_target(X1, X2, v, 0.5, 0.95, 0.2), (0.6, 0.7, 0.8, 0.9)),
}


@pytest.mark.parametrize("case", CASES)
def test_each_value_gets_its_own_result_from_one_graph_under_inductor(case, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # (a fresh cache: nothing from other runs)
    loss, values = CASES[case]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda v: loss(v), backend="inductor", fullgraph=True)
    for value in values:
        torch.testing.assert_close(compiled(value), loss(value), rtol=1e-5, atol=1e-6, msg=f"{case} = {value}")
    # the first value, then a symbolic one (fullgraph=True would fail at torch's recompile limit)
    assert counters["stats"]["unique_graphs"] <= 2


def test_float64_logits_keep_one_graph_for_every_temperature(tmp_path, monkeypatch):
    # float64 logits never reach a kernel (the float64 reference computes them): their numbers
    # stay symbolic, so an annealed temperature does not recompile per value (nor, under
    # fullgraph=True, fail at torch's recompile limit)
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    s, t = S.double(), T.double()
    # (temperatures on both sides of 1: the reference's tempered logits branched on the value,
    # a third graph; teacher_topk's too)
    for loss in (lambda v: kd_loss(s, t, kind="jsd", beta=0.3, temperature=v, scale_by_t2=True),
                 lambda v: teacher_topk(T, 5, temperature=v)[1]):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(loss, backend="inductor", fullgraph=True)
        for value in (1.5, 2.0, 0.5, 0.25, 2.5, 3.0, 0.75, 4.0, 4.5, 5.0, 1.0):
            torch.testing.assert_close(compiled(value), loss(value), msg=f"temperature = {value}")
        assert counters["stats"]["unique_graphs"] <= 2  # the first value, then a symbolic one


def _assert_gradients_from_one_graph(loss, inputs, values, name):
    """``loss(a, b, value)`` compiled with inductor: its value and the gradients of both inputs
    equal eager's for every value, from at most two graphs (the first value, then a symbol)."""
    from torch._dynamo.utils import counters

    def grads(fn, value):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves, value)
        out.backward()
        return (out.detach(), *(leaf.grad for leaf in leaves))

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    for value in values:
        torch.testing.assert_close(grads(compiled, value), grads(loss, value), rtol=1e-5, atol=1e-6,
                                   msg=f"{name} = {value}")
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("topk", [False, True])
def test_gradients_follow_a_changing_temperature_under_inductor(topk, tmp_path, monkeypatch):
    # the backward reads the numbers too: the student's gradient (forward kernel, scaled) and
    # the teacher's (log-probabilities') gradient, which the traced backward forms by torch's ops
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def loss(s, t, v):
        if topk:
            return topk_kd_loss(s, IDS, t, temperature=v, scale_by_t2=True)
        return kd_loss(s, t, kind="jsd", beta=0.3, temperature=v, scale_by_t2=True)

    _assert_gradients_from_one_graph(loss, (S, LOGPROBS if topk else T), (1.0, 2.0, 3.0, 0.7), "temperature")


@pytest.mark.parametrize("topk", [False, True])
def test_a_changing_hard_label_weight_keeps_one_graph_while_training(topk, tmp_path, monkeypatch):
    # with a student that takes gradients the hard-label gradient was added with alpha=weight_hard,
    # which made the weight a constant: one graph per value, then fullgraph's recompile failure
    from kdfast.losses import fused_linear_topk_kd

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def loss(h, w, v):
        if topk:
            return fused_linear_topk_kd(h, w, IDS, LOGPROBS, LABELS, weight_hard=v)
        return fused_linear_kd(h, w, HT, WT, LABELS, weight_hard=v)

    _assert_gradients_from_one_graph(loss, (H, W), (0.1, 0.2, 0.3, 0.4), "weight_hard")


def test_numbers_outside_float32_are_refused_when_the_compiled_op_runs(tmp_path, monkeypatch):
    # the entry's range check cannot see a symbolic value: the op checks the numbers it is given
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: kd_loss(S, T, kind="forward_kl", temperature=v), backend="aot_eager")
    compiled(1.0)
    compiled(2.0)  # (a symbolic temperature from here on)
    with pytest.raises(Exception, match=r"1 / temperature \(in numbers\) must be within float32"):
        compiled(1e-39)


def test_the_numbers_stay_on_the_cpu_whatever_the_default_device():
    from kdfast.ops._tensors import number_tensor

    with torch.device("meta"):
        assert number_tensor((0.5, 2.0)).device.type == "cpu"
