import math

import pytest
import torch

from kdfast.losses import kd_loss, teacher_topk, topk_kd_loss


def logits(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).float() * scale


def coarse_kl(s, t, k, temperature=1.0):
    """KL between teacher and student coarse-grained to (top-k ids, everything else), float64."""
    log_q = torch.log_softmax(s.double() / temperature, -1)
    log_p = torch.log_softmax(t.double() / temperature, -1)
    ids = log_p.topk(k, -1).indices
    p_k, q_k = log_p.gather(-1, ids).exp(), log_q.gather(-1, ids).exp()
    p_r, q_r = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    return (p_k * (p_k.log() - q_k.log())).sum(-1) + p_r * (p_r.log() - q_r.log())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_is_the_coarse_grained_kl(temperature):
    s, t = logits((6, 50), 0), logits((6, 50), 1)
    ids, logp = teacher_topk(t, 8, temperature)
    ours = topk_kd_loss(s, ids, logp, temperature=temperature, reduction="none")
    torch.testing.assert_close(ours.double(), coarse_kl(s, t, 8, temperature), rtol=1e-5, atol=1e-6)
    full = kd_loss(s, t, kind="forward_kl", temperature=temperature, reduction="none")
    assert (ours <= full + 1e-6).all()  # coarse-graining never increases a KL


def test_renormalize_is_kl_of_the_truncated_teacher():
    s, t = logits((5, 40), 2), logits((5, 40), 3)
    ids, logp = teacher_topk(t, 5)
    ours = topk_kd_loss(s, ids, logp, remainder="renormalize", reduction="none")
    p_hat = logp.double().exp() / logp.double().exp().sum(-1, keepdim=True)
    log_q = torch.log_softmax(s.double(), -1).gather(-1, ids)
    torch.testing.assert_close(ours.double(), (p_hat * (p_hat.log() - log_q)).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remainder", ["bucket", "renormalize"])
def test_full_topk_equals_forward_kl(remainder):
    s, t = logits((2, 3, 30), 4), logits((2, 3, 30), 5)
    ids, logp = teacher_topk(t, 30)
    ours = topk_kd_loss(s, ids, logp, remainder=remainder)
    torch.testing.assert_close(ours, kd_loss(s, t, kind="forward_kl"), rtol=1e-5, atol=1e-6)


def test_gradients_labels_and_reductions():
    s = logits((4, 5, 64), 6).requires_grad_(True)
    t = logits((4, 5, 64), 7)
    ids, logp = teacher_topk(t, 10, 1.5)
    labels = torch.zeros(4, 5, dtype=torch.long)
    labels[1] = -100
    loss = topk_kd_loss(s, ids, logp, labels, temperature=1.5, scale_by_t2=True)
    loss.backward()
    s64 = s.detach().double().requires_grad_(True)
    expected = coarse_kl(s64.reshape(20, 64), t.reshape(20, 64), 10, 1.5)
    keep = labels.reshape(-1) != -100
    (expected[keep].sum() * 1.5 ** 2 / keep.sum()).backward()
    torch.testing.assert_close(loss.double(), expected[keep].sum() * 2.25 / 15, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    assert (s.grad[1] == 0).all()
    empty = topk_kd_loss(s, ids, logp, torch.full((4, 5), -100))
    assert empty.item() == 0.0


def test_teacher_topk_chunks_match_one_pass():
    t = logits((3, 7, 100), 8)
    ids, logp = teacher_topk(t, 4, temperature=2.0, chunk_size=5)
    direct = torch.log_softmax(t / 2.0, -1).topk(4, -1)
    assert ids.shape == (3, 7, 4) and torch.equal(ids, direct.indices)
    torch.testing.assert_close(logp, direct.values)


def test_teacher_topk_of_logits_that_overflow_when_divided_by_the_temperature():
    # float32 logits of 3e38 at T = 0.5: x / T overflows; the rows are shifted by their max first
    t = torch.tensor([[3.2e38, 3.2e38, -1e38, 1e30], [-3e38, 2e38, 2e38, 2e38]])
    ids, logp = teacher_topk(t, 2, temperature=0.5)
    direct = torch.log_softmax(t.double() / 0.5, -1).topk(2, -1)
    torch.testing.assert_close(logp.double(), direct.values)
    assert set(ids[0].tolist()) == {0, 1} and set(ids[1].tolist()) <= {1, 2, 3}


def test_confident_teacher_is_finite():
    s = logits((3, 20), 9)
    t = logits((3, 20), 10)
    t[:, 0] = 60.0  # the top-1 entry holds all but ~1e-26 of the mass
    ids, logp = teacher_topk(t, 3)
    value = topk_kd_loss(s, ids, logp)
    assert math.isfinite(value.item())


def test_student_without_mass_outside_the_topk():
    # Teacher and student both live on the k ids only: the bucket loss is the KL over them,
    # finite with a finite gradient, even when the stored mass rounds to just below 1.
    for seed in range(20):
        s = torch.full((2, 20), -math.inf)
        t = torch.full((2, 20), -math.inf)
        s[:, :5], t[:, :5] = logits((2, 5), seed), logits((2, 5), 100 + seed, scale=3.0)
        ids, logp = teacher_topk(t, 5)
        x = s.clone().requires_grad_(True)
        value = topk_kd_loss(x, ids, logp)
        value.backward()
        expected = kd_loss(s[:, :5], t[:, :5], kind="forward_kl")
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(x.grad[:, :5]).all() and (x.grad[:, 5:] == 0).all()


def test_teacher_mass_outside_a_massless_student_is_infinite():
    # A real remainder the student cannot cover is an infinite KL, not rounding.
    s = torch.full((1, 20), -math.inf)
    s[:, :5] = logits((1, 5), 1)
    t = logits((1, 20), 2)
    ids, logp = teacher_topk(t, 5)
    assert topk_kd_loss(s, ids, logp).item() == math.inf


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4, 3e4])
def test_shifting_the_student_logits_changes_nothing(offset):
    # The student's remainder is summed from its log-probabilities: as a difference of two
    # log-sum-exps of logits near 1e4 it lost their small differences (1e-2 off at 3e4).
    s, t = logits((2, 50), 21), logits((2, 50), 22)
    ids, logp = teacher_topk(t, 25)
    logp = logp - 6.0  # a large remainder (mass ~1 - e^-6 outside the k ids)
    x = (s + offset).requires_grad_(True)
    value = topk_kd_loss(x, ids, logp, reduction="sum")
    value.backward()
    s64 = (s + offset).double().requires_grad_(True)
    log_q = torch.log_softmax(s64, -1)
    p = logp.double().exp()
    r = 1 - p.sum(-1)
    outside = log_q.scatter(1, ids, -math.inf)
    expected = ((p * (logp.double() - log_q.gather(1, ids))).sum(-1) + r * (r.log() - outside.logsumexp(-1))).sum()
    expected.backward()
    torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=0, atol=2e-5 * s64.grad.abs().max().item())


@pytest.mark.parametrize("fill", [-math.inf, torch.finfo(torch.float32).min, -1e4, -100.0])
def test_a_remainder_within_rounding_is_zero_whatever_the_student_holds_outside(fill):
    # The teacher has no mass outside its 4 ids; its stored probabilities sum to 1 - 1e-7 by
    # rounding. A student masking the rest with finfo.min (or any large negative logit) must
    # not turn that rounding into a KL of 3e31.
    t = torch.full((1, 32), -math.inf)
    t[0, :4] = torch.tensor([2.0, 1.0, 0.5, -1.0])
    ids, logp = teacher_topk(t, 4)
    s = torch.full((1, 32), fill)
    s[0, :4] = torch.tensor([1.0, 0.0, 0.3, 0.2])
    expected = kd_loss(s[:, :4], t[:, :4], kind="forward_kl")
    torch.testing.assert_close(topk_kd_loss(s, ids, logp), expected, rtol=1e-5, atol=1e-6)


def test_nan_or_massless_teachers_are_refused_on_the_cpu_and_nan_elsewhere():
    from kdfast.reference.kd_topk import xlogy_ratio as _xlogy_ratio

    s = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0]])
    ids = torch.tensor([[0, 1, 2]])
    for remainder in ("bucket", "renormalize"):
        with pytest.raises(ValueError, match="holds NaN at a position that is not ignored"):
            topk_kd_loss(s, ids, torch.tensor([[-0.5, -1.5, math.nan]]), remainder=remainder)
    with pytest.raises(ValueError, match="nothing to renormalise"):
        topk_kd_loss(s, ids, torch.full((1, 3), -math.inf), remainder="renormalize")
    x = s.clone().requires_grad_(True)
    topk_kd_loss(x, ids, torch.full((1, 3), -math.inf)).backward()  # bucket: a teacher all in the remainder
    assert torch.isfinite(x.grad).all()
    # (on a GPU nothing is checked, which would sync: a NaN entry makes the loss NaN, not 0)
    p = torch.tensor([0.5, 0.0, math.nan])
    assert _xlogy_ratio(p, p.log(), torch.zeros(3)).isnan().tolist() == [False, False, True]


def test_k_equal_to_the_vocabulary_needs_the_whole_mass():
    s, t = logits((2, 4), 31), logits((2, 4), 32)
    ids, logp = teacher_topk(t, 4)
    with pytest.raises(ValueError, match="with k equal to the vocabulary there is no remainder"):
        topk_kd_loss(s, ids, logp - math.log(2.0))  # half the mass: a negative "KL" otherwise
    topk_kd_loss(s, ids, logp - math.log(2.0), remainder="renormalize")  # renormalised: fine


def test_teacher_topk_takes_floating_point_logits():
    # (complex logits lost their imaginary part, bools read as 0 and 1)
    for bad in (torch.randn(2, 5, dtype=torch.complex64), torch.tensor([[True, False, True]])):
        with pytest.raises(TypeError, match="teacher_logits must be floating point"):
            teacher_topk(bad, 2)


def test_k_outside_1_to_the_vocabulary_is_refused_by_name():
    with pytest.raises(ValueError, match=r"teacher_topk_ids must hold between 1 and 10 .* got k = 0"):
        topk_kd_loss(torch.randn(3, 10), torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0))
    # more ids than the vocabulary, even where every position is ignored (or there is none)
    for rows in (3, 0):
        with pytest.raises(ValueError, match=r"teacher_topk_ids must hold between 1 and 10 .* got k = 12"):
            topk_kd_loss(torch.randn(rows, 10), torch.zeros(rows, 12, dtype=torch.long), torch.zeros(rows, 12),
                         torch.full((rows,), -100))


def test_ids_outside_the_vocabulary_are_asserted_under_compile():
    # There the values are not read on the host: an assert in the graph, not a silent NaN.
    s = torch.randn(4, 11)
    ids = torch.tensor([[0, 1], [2, 11], [3, 4], [5, 6]])
    lp = torch.log(torch.full((4, 2), 0.3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, labels: topk_kd_loss(s, ids, lp, labels), backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"teacher_topk_ids must be in \[0, 11\)"):
        compiled(s, torch.tensor([0, 1, 2, 3]))
    # an ignored position may hold anything
    expected = topk_kd_loss(s, ids.clamp(max=10), lp, torch.tensor([0, -100, 2, 3]))
    torch.testing.assert_close(compiled(s, torch.tensor([0, -100, 2, 3])), expected)


def test_repeated_ids_are_asserted_under_compile():
    # As the range: asserted in the graph (the GPU path), an ignored position exempt.
    s = torch.randn(3, 11)
    ids = torch.tensor([[0, 1, 2], [5, 3, 5], [7, 8, 9]])
    lp = torch.log(torch.full((3, 3), 0.2))
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, labels: topk_kd_loss(s, ids, lp, labels), backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="teacher_topk_ids must not repeat an id within a position"):
        compiled(s, torch.tensor([0, 1, 2]))
    expected = topk_kd_loss(s, torch.tensor([[0, 1, 2], [5, 3, 4], [7, 8, 9]]), lp, torch.tensor([0, -100, 2]))
    torch.testing.assert_close(compiled(s, torch.tensor([0, -100, 2])), expected)
    # a position with every id padded to one value, ignored, passes too
    padded = torch.tensor([[0, 1, 2], [0, 0, 0], [7, 8, 9]])
    compiled_padded = torch.compile(lambda s, labels: topk_kd_loss(s, padded, lp, labels), backend="aot_eager",
                                    fullgraph=True)
    torch.testing.assert_close(compiled_padded(s, torch.tensor([0, -100, 2])), expected)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ids=lambda i: torch.cat([i[..., :1], i[..., :-1]], dim=-1)), ValueError, "must not repeat an id"),
    (dict(remainder="drop"), ValueError, "remainder must be"),
    (dict(reduction="avg"), ValueError, "reduction must be"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(ids=lambda i: i.float()), TypeError, "teacher_topk_ids must be int64"),
    (dict(ids=lambda i: i[:2]), ValueError, "teacher_topk_ids must have shape"),
    (dict(ids=lambda i: i + 100), ValueError, "must be in"),
    (dict(logp=lambda l: l[..., :2]), ValueError, "teacher_topk_logprobs must have the shape"),
    (dict(labels=torch.zeros(2, dtype=torch.long)), ValueError, "labels must be a tensor of shape"),
    # ids outside the vocabulary (padding with -1) counted as tokens; another device failed deep
    (dict(labels=torch.tensor([0, -1, 2])), ValueError, r"labels must be in \[0, 20\)"),
    (dict(labels=torch.zeros(3, dtype=torch.long, device="meta")), ValueError, "labels must be on cpu"),
    # a stored mass above 1 (here 1.4) or a positive log-probability is not a distribution
    (dict(logp=lambda l: l - torch.logsumexp(l, -1, keepdim=True) + math.log(1.4)), ValueError,
     "summing to at most 1"),
    (dict(logp=lambda l: l.index_fill(-1, torch.tensor([0]), 0.5)), ValueError, "each <= 0"),
])
def test_bad_input(kwargs, error, match):
    s, t = logits((3, 20), 11), logits((3, 20), 12)
    ids, logp = teacher_topk(t, 4)
    ids = kwargs.pop("ids", lambda i: i)(ids)
    logp = kwargs.pop("logp", lambda l: l)(logp)
    labels = kwargs.pop("labels", None)
    with pytest.raises(error, match=match):
        topk_kd_loss(s, ids, logp, labels, **kwargs)


def test_teacher_topk_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        teacher_topk(logits((2, 5), 0), 6)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_teacher_topk_bad_chunk_size(chunk_size):
    # -1 used to return uninitialised ids and log-probabilities
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        teacher_topk(logits((3, 5), 0), 2, chunk_size=chunk_size)


@pytest.mark.parametrize("remainder", ["bucket", "renormalize"])
def test_ignored_positions_give_no_nan_gradient_whatever_they_hold(remainder):
    # Padding positions: NaN teacher log-probabilities, out-of-range ids and NaN student
    # logits there must not reach the gradient (masking only the loss would send NaN back).
    s, t = logits((4, 20), 30), logits((4, 20), 31)
    ids, logp = teacher_topk(t, 5)
    labels = torch.tensor([3, -100, 7, -100])
    expected = topk_kd_loss(s[[0, 2]], ids[[0, 2]], logp[[0, 2]], remainder=remainder, reduction="sum")
    ids[1], logp[1] = -1, math.nan
    s[3] = math.nan
    x = s.clone().requires_grad_(True)
    loss = topk_kd_loss(x, ids, logp, labels, remainder=remainder, reduction="sum")
    loss.backward()
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(x.grad).all() and (x.grad[[1, 3]] == 0).all()


def test_uint8_labels_are_compared_in_int64():
    # As kd_loss: uint8 156 is a label, not ignore_index -100 wrapped to 156.
    s, t = logits((3, 200), 40), logits((3, 200), 41)  # (a vocabulary that holds id 156)
    ids, logp = teacher_topk(t, 4)
    labels = torch.tensor([156, 1, 2])
    for reduction in ("batchmean", "none"):
        torch.testing.assert_close(topk_kd_loss(s, ids, logp, labels.to(torch.uint8), reduction=reduction),
                                   topk_kd_loss(s, ids, logp, labels, reduction=reduction))


def test_float_labels_are_refused():
    s, t = logits((3, 20), 42), logits((3, 20), 43)
    ids, logp = teacher_topk(t, 4)
    with pytest.raises(TypeError, match="labels must hold integers"):
        topk_kd_loss(s, ids, logp, torch.tensor([1.0, -100.0, 2.0]))


@pytest.mark.parametrize("k", [1.5, True, "2"])
def test_teacher_topk_refuses_non_integer_k(k):
    # k=1.5 used to become 1
    with pytest.raises(ValueError, match="k must be an integer"):
        teacher_topk(logits((3, 5), 0), k)


def test_topk_kd_refuses_non_integer_ignore_index():
    s, t = logits((3, 20), 44), logits((3, 20), 45)
    ids, logp = teacher_topk(t, 4)
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        topk_kd_loss(s, ids, logp, torch.tensor([1, 2, 3]), ignore_index=2.5)


def test_numpy_integer_settings_are_accepted():
    # chunk_size=np.int64(4) used to be refused
    np = pytest.importorskip("numpy")
    t = logits((7, 10), 46)
    expected = teacher_topk(t, 3, chunk_size=4)
    for got, want in zip(teacher_topk(t, np.int64(3), chunk_size=np.int64(4)), expected):
        torch.testing.assert_close(got, want)


def test_input_checks_do_not_break_a_full_graph():
    # The CPU checks branch on data: under torch.compile they are skipped, not a graph break.
    ids, logp = teacher_topk(logits((3, 9), 41), 3)
    s = logits((3, 9), 42)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s: topk_kd_loss(s, ids, logp), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(s), topk_kd_loss(s, ids, logp))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_storage_keeps_real_remainders(dtype):
    # A remainder is 0 only within the stored values' own rounding: with bfloat16 storage a bound
    # of k units in its last place (0.5 at k = 64) dropped real remainders of 8-13%.
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4, 1000, generator=gen, dtype=torch.float64) * 3
    s = torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    values, ids = t.log_softmax(-1).topk(64, -1)
    logp = values.to(dtype)
    log_q = s.log_softmax(-1)
    p = logp.double().exp()
    r = 1 - p.sum(-1)
    q_rest = 1 - log_q.gather(1, ids).exp().sum(-1)
    assert (r > 0.05).all()
    expected = ((p * (logp.double() - log_q.gather(1, ids))).sum(-1) + r * (r.log() - q_rest.log())).mean()
    torch.testing.assert_close(topk_kd_loss(s.float(), ids, logp).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, mass", [(64, 0.62), (64, 0.95), (16, 1.5), (16, 1.05)], ids=str)
def test_half_precision_storage_is_checked_to_its_own_rounding(dtype, k, mass):
    # a slack of k units in the stored dtype's last place let a bfloat16 mass of 0.62 (k = vocab:
    # a "KL" of -0.30 for a student equal to its teacher) or of 1.5 through
    t = logits((1, 64), 40, scale=3.0)
    values, ids = t.log_softmax(-1).topk(k, -1)
    values = values - values.logsumexp(-1, keepdim=True) if k < 64 else values
    bad = (values + math.log(mass)).to(dtype)
    match = "no remainder" if mass < 1 else "summing to at most 1"
    with pytest.raises(ValueError, match=match):
        topk_kd_loss(t, ids, bad)
    topk_kd_loss(t, ids, values.to(dtype) if k == 64 else (values + math.log(0.9)).to(dtype))  # honest: accepted


def test_bfloat16_log_probabilities_stored_as_float16_are_accepted():
    # float16 holds bfloat16 values exactly, with bfloat16's rounding: checked to it
    lp = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.bfloat16).log_softmax(-1).half()
    assert torch.isfinite(topk_kd_loss(torch.zeros(1, 3), torch.arange(3)[None], lp))
    gen = torch.Generator().manual_seed(2)
    for _ in range(40):
        vocab = int(torch.randint(2, 3000, (1,), generator=gen))
        t = (torch.randn(2, vocab, generator=gen) * 4).bfloat16()
        values, ids = t.log_softmax(-1).topk(vocab if vocab < 50 else 32, -1)
        # accepted (a refusal raises ValueError), and a finite loss
        assert torch.isfinite(topk_kd_loss(torch.randn(2, vocab, generator=gen), ids, values.half()))


def test_half_precision_storage_of_real_teachers_is_accepted():
    # the bound is tight, not too tight: top-k of random teachers stored in 16 bits all pass
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        vocab = int(torch.randint(2, 2000, (1,), generator=gen))
        k = vocab if trial % 3 == 0 else int(torch.randint(1, vocab + 1, (1,), generator=gen))
        t = torch.randn(3, vocab, generator=gen) * float(torch.rand(1, generator=gen)) * 12
        ids, logp = teacher_topk(t, k)
        for dtype in (torch.bfloat16, torch.float16):
            # accepted (a refusal raises ValueError), and a finite loss
            assert torch.isfinite(topk_kd_loss(torch.randn(3, vocab, generator=gen), ids, logp.to(dtype)))


def test_a_stored_id_of_probability_zero_keeps_the_remainder():
    # ids need not be the top-k: one the teacher rules out (log-probability -inf) made the
    # rounding bound NaN, and the real remainder (here 0.55) was dropped
    s, t = logits((1, 10), 41), logits((1, 10), 42)
    t[0, 3] = -math.inf
    ids = torch.tensor([[0, 3, 5]])
    lp = t.log_softmax(-1).gather(1, ids)
    p, log_q = lp.double().exp(), s.double().log_softmax(-1)
    r, q_rest = 1 - p.sum(), 1 - log_q.gather(1, ids).exp().sum()
    inside = torch.where(p > 0, p * (lp.double() - log_q.gather(1, ids)), torch.zeros_like(p)).sum()
    torch.testing.assert_close(topk_kd_loss(s, ids, lp).double(), inside + r * (r.log() - q_rest.log()),
                               rtol=1e-5, atol=1e-6)


def test_vmap_over_the_labels_alone():
    s, t = logits((3, 10), 43), logits((3, 10), 44)
    ids, lp = teacher_topk(t, 4)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 3]])
    loop = torch.stack([topk_kd_loss(s, ids, lp, row) for row in labels])
    torch.testing.assert_close(torch.func.vmap(lambda row: topk_kd_loss(s, ids, lp, row))(labels), loop)


@pytest.mark.parametrize("ids_kind", ["whole mass", "with a -inf entry"])
def test_teacher_gradients_are_finite_where_the_remainder_is_zero(ids_kind):
    # log(1 - mass) at mass 1, or a stored -inf, dropped by where() still made NaN gradients
    t = torch.full((1, 10), -math.inf)
    t[0, :4] = torch.tensor([2.0, 1.0, 0.5, -1.0])
    ids, lp = teacher_topk(t, 4 if ids_kind == "whole mass" else 5)
    lp = lp.clone().requires_grad_()
    s = logits((1, 10), 45)
    topk_kd_loss(s, ids, lp).backward()
    assert torch.isfinite(lp.grad).all()
    # the kept entries' gradient is d/dlp_i of sum p_i (lp_i - log q_i): p_i (lp_i - log q_i + 1)
    p, log_q = lp.detach().exp(), s.log_softmax(-1).gather(1, ids)
    kept = p > 0
    torch.testing.assert_close(lp.grad[kept], (p * (lp.detach() - log_q + 1))[kept], rtol=1e-5, atol=1e-6)


def test_an_empty_vocabulary_is_named_as_such():
    # (it read "k must be in [1, 0]" and "teacher_topk_ids must hold between 1 and 0 ids")
    with pytest.raises(ValueError, match="teacher_logits must have a vocabulary of at least one entry"):
        teacher_topk(torch.randn(2, 0), 1)
    with pytest.raises(ValueError, match="student_logits must have a vocabulary of at least one entry"):
        topk_kd_loss(torch.randn(2, 0), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))


@pytest.mark.parametrize("case", ["nan", "mass_above_1", "renormalize_all_zero", "full_vocab_mass_below_1"])
def test_stored_logprobs_are_asserted_under_compile(case):
    # The eager CPU checks of the stored log-probabilities, as one assert in the graph (the GPU
    # path too): they went unchecked there, a NaN or a mass of 1.5 gave a silently wrong loss.
    k, vocab, remainder = 2, 11, "bucket"
    lp = torch.log(torch.full((3, k), 0.3))
    if case == "nan":
        lp[1, 0] = math.nan
    elif case == "mass_above_1":
        lp[1] = math.log(0.75)
    elif case == "renormalize_all_zero":
        lp[1] = -math.inf
        remainder = "renormalize"
    else:
        k = vocab = 4
        lp = torch.log(torch.full((3, k), 0.25))
        lp[1] = math.log(0.2)
    s = torch.randn(3, vocab)
    ids = torch.arange(k).repeat(3, 1)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, labels: topk_kd_loss(s, ids, lp, labels, remainder=remainder),
                             backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="teacher_topk_logprobs must be log-probabilities at every position"):
        compiled(s, torch.tensor([0, 1, 2]))
    # the position ignored, the same graph runs and equals eager mode (which takes it too)
    labels = torch.tensor([0, -100, 2])
    torch.testing.assert_close(compiled(s, labels), topk_kd_loss(s, ids, lp, labels, remainder=remainder))
