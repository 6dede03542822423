import pytest
import torch
import torch.nn.functional as F

from kdfast.losses import dkd_loss, hinton_kd_loss, sinkhorn_kd_loss


def logits(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).float() * scale


def test_hinton_matches_the_textbook_formula():
    s, t = logits((16, 10), 0).requires_grad_(True), logits((16, 10), 1)
    labels = torch.arange(16) % 10
    ours = hinton_kd_loss(s, t, labels, temperature=4.0, alpha=0.7)
    T = 4.0
    textbook = 0.7 * F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T \
        + 0.3 * F.cross_entropy(s, labels)
    torch.testing.assert_close(ours, textbook, rtol=1e-5, atol=1e-6)
    g_ours, = torch.autograd.grad(ours, s)
    g_text, = torch.autograd.grad(textbook, s)
    torch.testing.assert_close(g_ours, g_text, rtol=1e-5, atol=1e-6)


def dkd_transcribed(s, t, labels, alpha, beta, T):
    """DKD as written in the authors' mdistiller code (mask by subtracting 1000)."""
    gt = torch.zeros_like(s).scatter_(1, labels.unsqueeze(1), 1).bool()
    other = ~gt
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)

    def cat_mask(p):
        return torch.cat([(p * gt).sum(1, keepdims=True), (p * other).sum(1, keepdims=True)], 1)

    tckd = F.kl_div(torch.log(cat_mask(ps)), cat_mask(pt), reduction="sum") * T ** 2 / s.shape[0]
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), F.softmax(t / T - 1000.0 * gt, 1),
                    reduction="sum") * T ** 2 / s.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_matches_the_reference_code():
    s, t = logits((12, 7), 2).double().requires_grad_(True), logits((12, 7), 3).double()
    labels = torch.arange(12) % 7
    ours = dkd_loss(s, t, labels, alpha=1.0, beta=8.0, temperature=4.0)
    theirs = dkd_transcribed(s, t, labels, 1.0, 8.0, 4.0)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    g_ours, = torch.autograd.grad(ours, s)
    g_theirs, = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(g_ours.double(), g_theirs, rtol=1e-4, atol=1e-6)


def test_dkd_with_classes_the_teacher_rules_out():
    # A teacher logit of -inf (a class it gives probability 0), at a non-target class and at
    # a target class: 0 log 0 = 0, as in the authors' code, not NaN.
    s = logits((4, 6), 4).double().requires_grad_(True)
    t = logits((4, 6), 5).double()
    labels = torch.tensor([0, 1, 2, 3])
    t[:, 5] = float("-inf")
    t[0, 0] = float("-inf")
    ours = dkd_loss(s, t, labels, alpha=1.0, beta=8.0, temperature=2.0)
    theirs = dkd_transcribed(s, t, labels, 1.0, 8.0, 2.0)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    g_ours, = torch.autograd.grad(ours, s)
    assert torch.isfinite(g_ours).all()


def sinkhorn_plain(p, q, cost, eps, iterations):
    """Textbook (non-log) Sinkhorn scaling in float64, one sample."""
    K = torch.exp(-cost / eps)
    u = torch.ones_like(p)
    for _ in range(iterations):
        v = q / (K.t() @ u)
        u = p / (K @ v)
    v = q / (K.t() @ u)
    plan = u[:, None] * K * v[None, :]
    return (plan * cost).sum()


def test_sinkhorn_matches_plain_scaling():
    s, t = logits((4, 6), 4), logits((4, 6), 5)
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(6, 6, generator=g, dtype=torch.float64)
    cost = (cost + cost.t()) / 2
    cost.fill_diagonal_(0)
    ours = sinkhorn_kd_loss(s, t, cost.float(), epsilon=0.3, iterations=200)
    p, q = F.softmax(t.double(), 1), F.softmax(s.double(), 1)
    expected = torch.stack([sinkhorn_plain(p[b], q[b], cost, 0.3, 200) for b in range(4)]).mean()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-6)


def test_sinkhorn_with_zero_one_cost_approaches_total_variation():
    s, t = logits((5, 8), 6), logits((5, 8), 7)
    tv = 0.5 * (F.softmax(s, 1) - F.softmax(t, 1)).abs().sum(1).mean()
    ours = sinkhorn_kd_loss(s, t, epsilon=0.01, iterations=500)
    torch.testing.assert_close(ours, tv, rtol=2e-2, atol=2e-3)
    s = s.requires_grad_(True)
    sinkhorn_kd_loss(s, t, iterations=10).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("epsilon", [0.05, 0.01, 1e-3, 1e-4])
def test_sinkhorn_with_too_few_iterations_is_never_below_the_exact_distance(epsilon):
    # 50 iterations are far too few for epsilon 1e-3: the plan's rows missed the teacher's
    # distribution by an L1 of ~1.9, and its cost fell to 0 (a loss with no gradient). The
    # rounded plan is a real transport plan: its cost is at least the exact distance (here the
    # total variation) and, for this cost, reaches it.
    s, t = logits((4, 10), 20, scale=3.0), logits((4, 10), 21, scale=3.0)
    tv = 0.5 * (F.softmax(s.double(), 1) - F.softmax(t.double(), 1)).abs().sum(1).mean()
    s = s.requires_grad_(True)
    ours = sinkhorn_kd_loss(s, t, epsilon=epsilon, iterations=50)
    assert tv - 1e-5 <= ours.double() <= tv + 2e-3
    ours.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_sinkhorn_gradients_stay_bounded_with_a_one_hot_teacher():
    # Rounding the plan divided by a sum that can be exactly 0 while the other marginal's error
    # is rounding noise: the value stayed right but 40 of these 300 gradients reached ~1e23.
    worst = 0.0
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        s = (torch.randn(2, 10, generator=g) * float(1 + seed % 4)).requires_grad_(True)
        t = torch.full((2, 10), -1e4)
        t[:, seed % 10] = 0
        sinkhorn_kd_loss(s, t, epsilon=0.05, iterations=50).backward()
        assert torch.isfinite(s.grad).all()
        worst = max(worst, s.grad.abs().max().item())
    assert worst < 1.0


def test_sinkhorn_gradients_are_finite_for_confident_rows_and_few_iterations():
    # After one or two iterations a row of the plan can sum to ~0 where its target does not: the
    # rounding's (target / sum).clamp(max=1) then had a division backward of inf, times the
    # clamp's 0, NaN, under a finite loss (30 of these 60 batches at one iteration).
    for iterations in (1, 2, 5):
        for seed in range(60):
            g = torch.Generator().manual_seed(seed)
            s = (torch.randn(4, 3, generator=g) * 8).requires_grad_(True)
            t = torch.randn(4, 3, generator=g) * 8
            loss = sinkhorn_kd_loss(s, t, temperature=0.3, epsilon=0.01, iterations=iterations)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), (iterations, seed)


@pytest.mark.parametrize("call, error, match", [
    (lambda s, t, y: hinton_kd_loss(s, t[:2], y), ValueError, "same shape"),
    (lambda s, t, y: hinton_kd_loss(s, t, None, alpha=0.5), ValueError, "labels are needed"),
    (lambda s, t, y: hinton_kd_loss(s, t, y, alpha=1.5), ValueError, "alpha must be"),
    (lambda s, t, y: hinton_kd_loss(s[0], t[0], y), ValueError, r"\[batch, classes\]"),
    (lambda s, t, y: dkd_loss(s, t, y + 10), ValueError, "class ids in"),
    (lambda s, t, y: dkd_loss(s, t, y.float()), TypeError, "labels must be an int64"),
    (lambda s, t, y: dkd_loss(s, t, y, temperature=0), ValueError, "temperature"),
    (lambda s, t, y: sinkhorn_kd_loss(s, t, torch.ones(3, 3)), ValueError, "cost must be"),
    (lambda s, t, y: sinkhorn_kd_loss(s, t, epsilon=0), ValueError, "epsilon must be"),
    # (float32 cannot hold it: cost / epsilon was 0 / 0, a NaN loss; float64 logits take it)
    (lambda s, t, y: sinkhorn_kd_loss(s, t, epsilon=1e-300), ValueError,
     r"epsilon must be at least 1.1755e-38 \(the smallest normal torch.float32\) with torch.float32 logits"),
    (lambda s, t, y: sinkhorn_kd_loss(s, t, 1 - torch.eye(5, dtype=torch.int64)), TypeError, "cost must be a floating"),
    (lambda s, t, y: sinkhorn_kd_loss(s, t, torch.full((5, 5), float("inf"))), ValueError, "cost must be finite"),
    (lambda s, t, y: dkd_loss(s, t, y, alpha=float("nan")), ValueError, "alpha must be"),
    (lambda s, t, y: dkd_loss(s, t, y, beta=-8.0), ValueError, "beta must be"),
    (lambda s, t, y: sinkhorn_kd_loss(s, t, iterations=0), ValueError, "iterations must be"),
    (lambda s, t, y: hinton_kd_loss(s, t, y, alpha=None), ValueError, "alpha must be a real number"),
    (lambda s, t, y: dkd_loss(s, t, y, alpha="1"), ValueError, "alpha must be a real number"),
    (lambda s, t, y: sinkhorn_kd_loss(s, t, epsilon=None), ValueError, "epsilon must be a real number"),
    # another device failed deep inside torch ("meta" stands for a second device)
    (lambda s, t, y: hinton_kd_loss(s, t, y.to("meta"), alpha=0.5), ValueError, "labels must be on cpu"),
    (lambda s, t, y: dkd_loss(s, t, y.to("meta")), ValueError, "labels must be on cpu"),
    (lambda s, t, y: dkd_loss(s, t.to("meta"), y), ValueError, "teacher_logits must be on cpu"),
    (lambda s, t, y: sinkhorn_kd_loss(s, t.to("meta")), ValueError, "teacher_logits must be on cpu"),
])
def test_bad_input(call, error, match):
    s, t = logits((4, 5), 8), logits((4, 5), 9)
    with pytest.raises(error, match=match):
        call(s, t, torch.tensor([0, 1, 2, 3]))


def dkd_float64(s, t, labels, alpha, beta, T):
    """DKD row by row in float64, keeping only the terms with teacher probability > 0: a row
    whose teacher rules out every non-target class has no NCKD term (an empty distribution)."""
    total = 0.0
    for b in range(s.shape[0]):
        rest = torch.arange(s.shape[1]) != labels[b]
        lp, lq = torch.log_softmax(t[b] / T, 0), torch.log_softmax(s[b] / T, 0)
        bin_p = torch.stack([lp[labels[b]], torch.logsumexp(lp[rest], 0)])
        bin_q = torch.stack([lq[labels[b]], torch.logsumexp(lq[rest], 0)])
        keep = bin_p > float("-inf")
        total = total + alpha * (bin_p[keep].exp() * (bin_p[keep] - bin_q[keep])).sum()
        if (t[b][rest] > float("-inf")).any():
            nt_p, nt_q = torch.log_softmax(t[b][rest] / T, 0), torch.log_softmax(s[b][rest] / T, 0)
            keep = nt_p > float("-inf")
            total = total + beta * (nt_p[keep].exp() * (nt_p[keep] - nt_q[keep])).sum()
    return total / s.shape[0] * T ** 2


def test_dkd_teacher_certain_of_the_label_gives_a_finite_gradient():
    # A teacher that rules out every non-target class (log of a one-hot) has no non-target
    # distribution: its NCKD is 0 and the loss is TCKD alone. -inf - -inf used to be NaN there,
    # which reached the student's gradient through the masked-out branch of a where().
    s = logits((5, 6), 6).double().requires_grad_(True)
    t = logits((5, 6), 7).double()
    labels = torch.tensor([0, 3, 5, 2, 1])
    t[0] = torch.log(F.one_hot(labels[0], 6).double())  # certain of the label
    t[3] = torch.log(F.one_hot(labels[3], 6).double())
    t[1, [0, 4]] = float("-inf")  # rules out some non-target classes only
    for temperature in (1.0, 4.0):
        ours = dkd_loss(s, t, labels, alpha=1.0, beta=8.0, temperature=temperature)
        expected = dkd_float64(s, t, labels, 1.0, 8.0, temperature)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
        g_ours, = torch.autograd.grad(ours, s)
        g_expected, = torch.autograd.grad(expected, s)
        assert torch.isfinite(g_ours).all()
        torch.testing.assert_close(g_ours.double(), g_expected, rtol=1e-4, atol=1e-6)
    # the rows without -inf still match the authors' code
    normal = [2, 4]
    torch.testing.assert_close(dkd_loss(s[normal], t[normal], labels[normal]).double(),
                               dkd_transcribed(s[normal], t[normal], labels[normal], 1.0, 8.0, 4.0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("iterations", [2.5, True, "3", 0])
def test_sinkhorn_refuses_non_integer_iterations(iterations):
    # 2.5 used to run 2 iterations silently
    s, t = logits((2, 4), 10), logits((2, 4), 11)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        sinkhorn_kd_loss(s, t, iterations=iterations)


def test_sinkhorn_takes_numpy_integer_iterations():
    np = pytest.importorskip("numpy")
    s, t = logits((2, 4), 10), logits((2, 4), 11)
    torch.testing.assert_close(sinkhorn_kd_loss(s, t, iterations=np.int64(7)), sinkhorn_kd_loss(s, t, iterations=7))


@pytest.mark.parametrize("loss", [hinton_kd_loss, dkd_loss])
def test_label_checks_do_not_break_a_full_graph(loss):
    # The CPU label check branches on data: under torch.compile it is skipped, not a graph break.
    labels = torch.tensor([1, 2, 3])
    s, t = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), torch.randn(3, 5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: loss(s, t, labels), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(s, t), loss(s, t, labels))


@pytest.mark.parametrize("loss, values", [
    # (Hinton's soft term is the fused kernel, which takes the temperature as a number: one graph
    # per value, as documented)
    (lambda s, t, labels, temperature: hinton_kd_loss(s, t, labels, temperature=temperature, alpha=0.5), 3),
    (lambda s, t, labels, temperature: dkd_loss(s, t, labels, temperature=temperature), 10),
    (lambda s, t, labels, temperature: sinkhorn_kd_loss(s, t, temperature=temperature, iterations=3), 10),
], ids=["hinton", "dkd", "sinkhorn"])
def test_a_changing_temperature_does_not_break_a_full_graph(loss, values):
    # An annealed temperature becomes symbolic on its second value: the finiteness check must
    # trace (math.isfinite of a SymFloat broke the graph).
    # Nor may it specialise the value (torch.scalar_tensor of it did): one graph per value hit
    # torch's recompile limit after 8 values, a hard failure with fullgraph=True.
    from torch._dynamo.utils import counters

    labels = torch.tensor([1, 2, 3])
    s, t = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), torch.randn(3, 5)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for temperature in (2.0, 3.0, 4.5, 1.5, 2.5, 3.5, 5.0, 6.0, 7.0, 8.0)[:values]:
        torch.testing.assert_close(compiled(s, t, labels, temperature), loss(s, t, labels, temperature))
    if values > 8:
        assert counters["stats"]["unique_graphs"] <= 2  # the first value, then a symbolic one
    # still checked once symbolic (torch folds comparisons of symbolic floats as if finite): at run time
    with pytest.raises(RuntimeError, match="temperature must be finite"):
        compiled(s, t, labels, float("inf"))


def test_float64_logits_are_computed_in_float64():
    # as kd_loss computes them: gradcheck needs it, and float32 left DKD 1e-6 off its float64 value
    s, t = logits((4, 10), 20).double().requires_grad_(True), logits((4, 10), 21).double()
    labels = torch.tensor([0, 3, 9, 5])
    for loss in (lambda z: hinton_kd_loss(z, t, labels, temperature=4.0, alpha=0.5),
                 lambda z: dkd_loss(z, t, labels, temperature=4.0),
                 lambda z: sinkhorn_kd_loss(z, t, iterations=5)):
        assert loss(s).dtype == torch.float64
        assert torch.autograd.gradcheck(loss, (s,))
    ours = dkd_loss(s, t, labels, temperature=4.0)
    torch.testing.assert_close(ours, dkd_float64(s.detach(), t, labels, 1.0, 8.0, 4.0), rtol=1e-12, atol=0)
    # float32 and 16-bit logits are still computed (and returned) in float32
    assert dkd_loss(s.detach().half(), t.half(), labels).dtype == torch.float32


@pytest.mark.parametrize("loss", [
    lambda s, t, labels: hinton_kd_loss(s, t, labels, alpha=0.9),
    lambda s, t, labels: dkd_loss(s, t, labels),
    lambda s, t, labels: sinkhorn_kd_loss(s, t),
], ids=["hinton", "dkd", "sinkhorn"])
def test_an_empty_batch_gives_zero_as_kd_loss_does(loss):
    # a batch mean over no samples is 0 (kd_loss's batchmean), not 0 / 0 = NaN
    head = torch.nn.Linear(8, 5)
    value = loss(head(torch.randn(0, 8)), torch.randn(0, 5), torch.zeros(0, dtype=torch.long))
    assert value.item() == 0.0
    value.backward()
    assert head.weight.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("labels, error", [(torch.tensor([9.5, 1.0, 2.0]), TypeError),
                                           (torch.tensor([0, 1, 7]), ValueError),
                                           (torch.tensor([[0, 1, 2]]), ValueError)])
def test_hinton_checks_labels_given_at_alpha_1(labels, error):
    # alpha=1 leaves the labels unused; bad ones were taken silently there, refused at 0.9
    s, t = logits((3, 5), 30), logits((3, 5), 31)
    with pytest.raises(error, match="labels"):
        hinton_kd_loss(s, t, labels, alpha=1.0)
    torch.testing.assert_close(hinton_kd_loss(s, t, torch.tensor([0, 1, 4]), alpha=1.0), hinton_kd_loss(s, t, alpha=1.0))


def test_hinton_never_drops_a_label_of_minus_100():
    # F.cross_entropy's default ignore_index would drop it from the cross-entropy alone under
    # torch.compile (where the CPU label check does not run): refused there as in eager mode
    s, t = logits((3, 5), 30), logits((3, 5), 31)
    labels = torch.tensor([0, 1, -100])
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 5\)"):
        hinton_kd_loss(s, t, labels, alpha=0.5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t, y: hinton_kd_loss(s, t, y, alpha=0.5), backend="aot_eager", fullgraph=True)
    with pytest.raises(IndexError, match="-100 is out of bounds"):
        compiled(s, t, labels)


@pytest.mark.parametrize("offset", [1e3, 1e5, 1e6])
def test_dkd_float32_keeps_its_precision_for_logits_far_from_zero(offset):
    # Softmaxes ignore a common offset; float32 log-probabilities formed as logit - logsumexp
    # carried the offset's rounding (1e-2 relative error at 1e6).
    s0, t0 = logits((8, 10), 8), logits((8, 10), 9)
    labels = torch.arange(8) % 10
    s = (s0 + offset).requires_grad_(True)
    t = t0 + offset
    ours = dkd_loss(s, t, labels)
    s64 = s.detach().double().requires_grad_(True)
    expected = dkd_float64(s64, t.double(), labels, 1.0, 8.0, 4.0)
    torch.testing.assert_close(ours.double(), expected, rtol=2e-6, atol=0)
    g_ours, = torch.autograd.grad(ours, s)
    g_expected, = torch.autograd.grad(expected, s64)
    torch.testing.assert_close(g_ours.double(), g_expected, rtol=0, atol=2e-6 * float(g_expected.abs().max()))


def test_dkd_logits_near_the_float32_maximum_stay_finite_below_temperature_1():
    # (logits / T alone would overflow to inf; their differences do not)
    s = torch.tensor([[3e38, 2.9e38, 2.95e38, 3e38]], requires_grad=True)
    t = torch.tensor([[0.5, -0.2, 0.1, 0.3]])
    labels = torch.tensor([2])
    ours = dkd_loss(s, t, labels, temperature=0.5)
    s64 = s.detach().double().requires_grad_(True)
    expected = dkd_float64(s64, t.double(), labels, 1.0, 8.0, 0.5)
    assert torch.isfinite(expected)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0)
    g, = torch.autograd.grad(ours, s)
    g_expected, = torch.autograd.grad(expected, s64)
    torch.testing.assert_close(g.double(), g_expected, rtol=1e-5, atol=1e-6)


def test_hinton_alpha_0_is_the_cross_entropy_even_where_the_kd_term_is_infinite():
    # The student rules out (-inf) a class the teacher does not: KL = inf, and 0 * inf was NaN.
    s = torch.tensor([[2.0, 1.0, float("-inf")], [0.5, -1.0, 0.3]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.1, -0.3]])
    labels = torch.tensor([0, 2])
    ours = hinton_kd_loss(s, t, labels, temperature=4.0, alpha=0.0)
    s2 = s.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(s2, labels)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(expected, s2)[0])


def test_sinkhorn_temperature_softens_both_distributions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g) * 3, torch.randn(4, 10, generator=g) * 3
    for temperature in (0.5, 2.0, 4.0):
        torch.testing.assert_close(sinkhorn_kd_loss(s, t, temperature=temperature, epsilon=0.1, iterations=100),
                                   sinkhorn_kd_loss(s / temperature, t / temperature, epsilon=0.1, iterations=100))
