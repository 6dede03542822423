"""FusedLinearKDLoss against Liger-Kernel's LigerFusedLinearJSDLoss, the loss it replaces.

Liger's chunked losses are torch code (run here uncompiled, on the CPU). With the same settings
and heads of one width the two agree in fp32, loss and gradients; the documented differences
(defaults, 2-D inputs, wider teacher heads: see the README) are left out.
"""
import pytest
import torch

from kdfast.losses import FusedLinearKDLoss

liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is a test dependency")


def make(seed, tokens=23, student_hidden=8, teacher_hidden=12, vocab=40, biases=False, ignored=0):
    g = torch.Generator().manual_seed(seed)
    data = dict(sh=torch.randn(tokens, student_hidden, generator=g),
                sw=torch.randn(vocab, student_hidden, generator=g) * 0.5,
                th=torch.randn(tokens, teacher_hidden, generator=g),
                tw=torch.randn(vocab, teacher_hidden, generator=g) * 0.5,
                sb=torch.randn(vocab, generator=g) if biases else None,
                tb=torch.randn(vocab, generator=g) if biases else None)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[:ignored] = -100
    return data, labels


def run(criterion, data, labels):
    """Loss and the gradients of the student's hidden states, weight and bias."""
    leaves = {k: None if data[k] is None else data[k].clone().requires_grad_(True) for k in ("sh", "sw", "sb")}
    loss = criterion(leaves["sh"], leaves["sw"], data["th"], data["tw"], labels, leaves["sb"], data["tb"])
    loss.backward()
    return [loss.detach()] + [None if v is None else v.grad for v in leaves.values()]


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("weights", [(0.0, 1.0), (0.5, 0.5), (0.3, 0.7)])
def test_matches_liger_fused_linear_jsd(beta, temperature, weights):
    data, labels = make(seed=int(10 * beta + 100 * temperature), biases=beta == 0.5, ignored=5)
    weight_hard, weight_soft = weights
    theirs = run(liger.LigerFusedLinearJSDLoss(weight_hard_loss=weight_hard, weight_soft_loss=weight_soft, beta=beta,
                                               temperature=temperature, compiled=False, chunk_size=8),
                 data, labels)
    ours = run(FusedLinearKDLoss(kind="jsd", beta=beta, temperature=temperature, weight_hard=weight_hard,
                                 weight_soft=weight_soft, chunk_size=5), data, labels)
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), ours, theirs):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)


def test_all_tokens_ignored_gives_zero_as_liger():
    data, labels = make(seed=3, ignored=23)
    for criterion in (liger.LigerFusedLinearJSDLoss(compiled=False),
                      FusedLinearKDLoss(weight_hard=0.5, weight_soft=0.5)):
        loss, grad_hidden, grad_weight, _ = run(criterion, data, labels)
        assert loss.item() == 0 and not grad_hidden.any() and not grad_weight.any()
