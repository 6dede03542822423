import math

import numpy as np
import pytest
import torch

from kdfast.losses import KDLoss, hinton_kd_loss, kd_loss, teacher_topk, topk_kd_loss
from kdfast.losses.trl import generalized_jsd_loss
from kdfast.ops import kd_divergence
from kdfast.reference import kd_divergence as ref


@pytest.fixture(scope="module")
def trl_jsd(gkd_trainer):
    return gkd_trainer.generalized_jsd_loss


def logits(shape, seed, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def grads(fn, s, t):
    s = s.detach().clone().requires_grad_(True)
    value = fn(s, t)
    value.backward()
    return value.detach(), s.grad


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_generalized_jsd_matches_trl(trl_jsd, beta, temperature, reduction, with_labels):
    # 2-D logits: TRL's label-free batchmean divides by the first dimension, here the tokens.
    s, t = logits((12, 503), 0), logits((12, 503), 1)
    labels = torch.tensor([5, -100, 3, 2, -100, 9, 1, 1, 0, -100, 7, 4]) if with_labels else None
    ours, ours_grad = grads(lambda s, t: kd_loss(s, t, labels, kind="jsd", beta=beta, temperature=temperature,
                                                 reduction=reduction), s, t)
    s64, t64 = s.double(), t.double()
    theirs, theirs_grad = grads(lambda s, t: trl_jsd(s, t, labels=labels, beta=beta, temperature=temperature,
                                                     reduction=reduction), s64, t64)
    torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=1e-7)
    # fp32 math: elements far below the largest gradient carry its absolute rounding error
    atol = 1e-6 * theirs_grad.abs().max().item()
    torch.testing.assert_close(ours_grad.double(), theirs_grad, rtol=2e-5, atol=atol)


def test_matches_trl_on_3d_inputs_with_labels(trl_jsd):
    s, t = logits((2, 6, 301), 2), logits((2, 6, 301), 3)
    labels = torch.randint(0, 301, (2, 6), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = -100
    ours = kd_loss(s, t, labels, beta=0.3)
    theirs = trl_jsd(s.double(), t.double(), labels=labels, beta=0.3)
    torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=1e-7)


def test_num_items_in_batch_matches_trl(trl_jsd):
    s, t = logits((8, 97), 4), logits((8, 97), 5)
    labels = torch.tensor([1, 2, -100, 4, 5, -100, 7, 8])
    ours = kd_loss(s, t, labels, num_items_in_batch=torch.tensor(20))
    theirs = trl_jsd(s.double(), t.double(), labels=labels, num_items_in_batch=torch.tensor(20))
    torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd", "skew_kl"])
def test_other_kinds_against_reference(kind):
    s, t = logits((3, 5, 211), 6), logits((3, 5, 211), 7)
    labels = torch.ones(3, 5, dtype=torch.long)
    labels[1] = -100
    ours, ours_grad = grads(lambda s, t: kd_loss(s, t, labels, kind=kind, beta=0.1, temperature=2.0,
                                                 scale_by_t2=True), s, t)

    def expected(s, t):
        rows = ref.kd_divergence(s.reshape(-1, 211), t.reshape(-1, 211), kind, 0.1, 2.0, labels.reshape(-1),
                                 loss_scale=4.0, dtype=torch.float64)
        return rows.sum() / 10

    theirs, theirs_grad = grads(expected, s.double(), t.double())
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_grad.double(), theirs_grad, rtol=1e-5, atol=1e-8)


def test_hinton_forward_kl_matches_torch_kl_div():
    s, t = logits((16, 10), 8), logits((16, 10), 9)
    T = 4.0
    ours = kd_loss(s, t, kind="forward_kl", temperature=T, scale_by_t2=True)
    torch_kd = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                          reduction="batchmean", log_target=True) * T * T
    torch.testing.assert_close(ours, torch_kd, rtol=1e-5, atol=1e-7)


def test_reduction_none_and_gradient_weights():
    s, t = logits((2, 3, 40), 10), logits((2, 3, 40), 11)
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    s = s.requires_grad_(True)
    per_token = kd_loss(s, t, labels, kind="reverse_kl", reduction="none")
    assert per_token.shape == (2, 3) and per_token.dtype == torch.float32
    assert per_token[0, 1] == 0 and per_token[1, 2] == 0
    weights = torch.tensor([[1.0, 5.0, 2.0], [0.5, 3.0, 7.0]])
    (per_token * weights).sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    rows = ref.kd_divergence(s64.reshape(6, 40), t.double().reshape(6, 40), "reverse_kl", labels=labels.reshape(-1),
                             dtype=torch.float64)
    (rows * weights.double().reshape(-1)).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def test_all_tokens_ignored_gives_zero_not_nan():
    s = logits((4, 30), 12, torch.bfloat16).requires_grad_(True)
    t = logits((4, 30), 13, torch.bfloat16)
    loss = kd_loss(s, t, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert s.grad.dtype == torch.bfloat16 and (s.grad == 0).all()
    # a teacher that takes gradients too (its gradient comes from the reference's autograd)
    s.grad = None
    t.requires_grad_(True)
    kd_loss(s, t, torch.full((4,), -100)).backward()
    assert (s.grad == 0).all() and t.grad.dtype == torch.bfloat16 and (t.grad == 0).all()


def test_padded_vocabularies():
    # A student head padded to 64 columns, a teacher head padded to 70: the padding columns
    # get probability 0, unlike zero logits, which would give them mass.
    s, t = logits((5, 64), 14), logits((5, 70), 15)
    shared = kd_loss(s, t, vocab_size=50)
    exact = kd_loss(s[:, :50], t[:, :50])
    torch.testing.assert_close(shared, exact)
    padded_with_zeros = kd_loss(torch.cat([s[:, :50], torch.zeros(5, 20)], 1), t)
    assert not torch.allclose(shared, padded_with_zeros)


def test_module_form():
    criterion = KDLoss(kind="tvd", temperature=1.5)
    s, t = logits((4, 20), 16), logits((4, 20), 17)
    torch.testing.assert_close(criterion(s, t), kd_loss(s, t, kind="tvd", temperature=1.5))
    assert "tvd" in repr(criterion)


def test_low_precision_inputs_keep_fp32_math():
    s32, t32 = logits((8, 1000), 18), logits((8, 1000), 19)
    for dtype in (torch.float16, torch.bfloat16):
        s, t = s32.to(dtype), t32.to(dtype)
        loss = kd_loss(s, t)
        exact = kd_loss(s.float(), t.float())  # the same rounded inputs, fp32 all along
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, exact, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("call, error, match", [
    (lambda s, t: kd_loss(s, t, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda s, t: kd_loss(s, t[:1]), ValueError, "must agree in every dimension"),
    (lambda s, t: kd_loss(s, t[..., :3]), ValueError, "pass vocab_size"),
    (lambda s, t: kd_loss(s, t, torch.zeros(2, 2, dtype=torch.long)), ValueError, "labels must have shape"),
    (lambda s, t: kd_loss(s, t, [1, 2]), TypeError, "labels must be a torch.Tensor"),
    (lambda s, t: kd_loss(s.numpy(), t), TypeError, "student_logits must be a torch.Tensor"),
    (lambda s, t: kd_loss(s, t, kind="js"), ValueError, "kind must be one of"),
    (lambda s, t: kd_loss(s, t, temperature=-1.0), ValueError, "temperature must be"),
    (lambda s, t: KDLoss(kind="kl"), ValueError, "kind must be one of"),
    (lambda s, t: KDLoss(beta=2.0), ValueError, "beta must be in"),
    (lambda s, t: KDLoss(reduction="avg"), ValueError, "reduction must be one of"),
    (lambda s, t: KDLoss(temperature=float("inf")), ValueError, "temperature must be a positive finite"),
    # it used to be ignored silently
    (lambda s, t: kd_loss(s, t, reduction="none", num_items_in_batch=4), ValueError, "num_items_in_batch"),
    (lambda s, t: kd_loss(s[..., :0], t[..., :0]), ValueError, "at least one entry"),
    (lambda s, t: kd_loss(s, t, num_items_in_batch=0), ValueError, "num_items_in_batch must be a positive integer"),
    (lambda s, t: kd_loss(s, t, num_items_in_batch=-2), ValueError, "num_items_in_batch"),
    (lambda s, t: kd_loss(s, t, num_items_in_batch="3"), ValueError, "num_items_in_batch"),
    # a tensor's value is not read, but its size and dtype are (a [2] tensor gave a [2] "loss")
    (lambda s, t: kd_loss(s, t, num_items_in_batch=torch.tensor([2, 3])), ValueError, "num_items_in_batch"),
    (lambda s, t: kd_loss(s, t, num_items_in_batch=torch.tensor(True)), ValueError, "num_items_in_batch"),
    # not numbers: errors that name the argument (float() said only "must be a string or a number")
    (lambda s, t: kd_loss(s, t, beta=None), ValueError, "beta must be a real number"),
    (lambda s, t: kd_loss(s, t, temperature=None), ValueError, "temperature must be a real number"),
    (lambda s, t: kd_loss(s, t, temperature=True), ValueError, "temperature must be a real number"),
    (lambda s, t: kd_loss(s, t, temperature=np.True_), ValueError, "temperature must be a real number"),
    (lambda s, t: kd_loss(s, t, beta=torch.tensor(True)), ValueError, "beta must be a real number"),
    (lambda s, t: KDLoss(temperature="a"), ValueError, "temperature must be a real number"),
    (lambda s, t: KDLoss(beta="0.5"), ValueError, "beta must be a real number"),
    (lambda s, t: generalized_jsd_loss(s, t, beta=None, reduction="none"), ValueError, "beta must be a real"),
    (lambda s, t: kd_divergence(s.flatten(0, 1), t.flatten(0, 1), loss_scale=None), ValueError, "loss_scale must"),
    # temperature**2 past float32 named a loss_scale the caller never passed
    (lambda s, t: kd_loss(s, t, temperature=2e19, scale_by_t2=True), ValueError, r"temperature\*\*2 \(scale_by_t2"),
    (lambda s, t: hinton_kd_loss(s.flatten(0, 1), t.flatten(0, 1), torch.zeros(6, dtype=torch.long),
                                 temperature=2e19), ValueError, r"temperature\*\*2 \(scale_by_t2"),
    (lambda s, t: topk_kd_loss(s, *teacher_topk(t, 3), temperature=2e19, scale_by_t2=True), ValueError,
     r"temperature\*\*2 \(scale_by_t2"),
])
def test_bad_input(call, error, match):
    s, t = logits((2, 3, 8), 0), logits((2, 3, 8), 1)
    with pytest.raises(error, match=match):
        call(s, t)


def test_extreme_logits_are_finite():
    s = logits((4, 100), 20, scale=3e4)
    t = logits((4, 100), 21, scale=3e4)
    t[:, 10:20] = -math.inf
    s[:, 10:20] = -math.inf
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"):
        value, grad = grads(lambda s, t: kd_loss(s, t, kind=kind), s, t)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), kind


def test_labels_out_of_range_are_refused_on_every_path():
    # Padding with -1 where ignore_index is -100 counted the padding as tokens (0.129 where the
    # intended masking gives 0.152), silently; ids past the vocabulary likewise
    s, t = logits((4, 8), 0), logits((4, 8), 1)
    for labels in (torch.tensor([0, 1, -1, -1]), torch.tensor([0, 1, 8, -100])):
        found = int(labels[2])
        with pytest.raises(ValueError, match=rf"labels must be in \[0, 8\) or ignore_index=-100; found {found}"):
            kd_loss(s, t, labels)
        with pytest.raises(ValueError, match="labels must be in"):
            kd_loss(s.double(), t.double(), labels)  # (the float64 path)
        with pytest.raises(ValueError, match="labels must be in"):
            kd_divergence(s, t, labels=labels)
        for reduction in ("batchmean", "none"):
            with pytest.raises(ValueError, match="labels must be in"):
                generalized_jsd_loss(s, t, labels, reduction=reduction)
    # -1 is fine as the ignore_index itself
    kd_loss(s, t, torch.tensor([0, 1, -1, -1]), ignore_index=-1)
    # labels only mask here: a student's own tokens past the shared vocabulary (vocab_size) count,
    # the logits' width bounds them
    kd_loss(s, t[:, :6], torch.tensor([0, 1, 7, -100]), vocab_size=6)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 8\)"):
        kd_loss(s, t[:, :6], torch.tensor([0, 1, 8, -100]), vocab_size=6)


def test_label_checks_read_no_values_under_fake_tensors():
    # (the CPU check read values, which FakeTensorMode and make_fx's fake tracing cannot give)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    s, t, labels = logits((8, 12), 0), logits((8, 12), 1), torch.arange(8)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = kd_loss(mode.from_tensor(s), mode.from_tensor(t), mode.from_tensor(labels))
    assert out.shape == ()
    graph = make_fx(lambda a, b, y: kd_loss(a, b, y), tracing_mode="fake")(s, t, labels)
    torch.testing.assert_close(graph(s, t, labels), kd_loss(s, t, labels))


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_uint8_labels_count_like_int64(reduction):
    # The kernel compares labels with ignore_index in int64, so uint8 156 is kept; the token
    # count used torch's uint8 comparison, where -100 wraps to 156, and left that row out.
    s, t = logits((4, 200), 22), logits((4, 200), 23)
    labels = torch.tensor([156, 1, 2, 3])
    for dtype in (torch.uint8, torch.int16, torch.int32):
        torch.testing.assert_close(kd_loss(s, t, labels.to(dtype), reduction=reduction),
                                   kd_loss(s, t, labels, reduction=reduction))


@pytest.mark.parametrize("call, name", [
    (lambda: KDLoss(vocab_size=0), "vocab_size"),
    (lambda: KDLoss(vocab_size=-3), "vocab_size"),
    (lambda: KDLoss(vocab_size="abc"), "vocab_size"),
    (lambda: KDLoss(vocab_size=4.7), "vocab_size"),
    (lambda: KDLoss(vocab_size=True), "vocab_size"),
    (lambda: KDLoss(ignore_index=1.5), "ignore_index"),
    (lambda: KDLoss(ignore_index="-100"), "ignore_index"),
    (lambda: KDLoss(ignore_index=1 << 64), "ignore_index"),
    (lambda: kd_loss(logits((3, 8), 0), logits((3, 8), 1), vocab_size=4.7), "vocab_size"),
    (lambda: kd_loss(logits((3, 8), 0), logits((3, 8), 1), torch.zeros(3, dtype=torch.long), ignore_index=0.5),
     "ignore_index"),
])
def test_integer_settings_are_checked(call, name):
    # they used to pass construction (and 4.7 was truncated to 4 at the call)
    with pytest.raises(ValueError, match=f"{name} must"):
        call()


def test_integer_like_settings_and_full_repr():
    np = pytest.importorskip("numpy")
    s, t = logits((3, 8), 0), logits((3, 8), 1)
    labels = torch.tensor([0, 5, 2])
    criterion = KDLoss(vocab_size=np.int64(6), ignore_index=np.int32(5))
    torch.testing.assert_close(criterion(s, t, labels), kd_loss(s, t, labels, vocab_size=6, ignore_index=5))
    assert type(criterion.vocab_size) is int and type(criterion.ignore_index) is int
    text = repr(criterion)
    for setting in ("kind='jsd'", "beta=0.5", "temperature=1.0", "ignore_index=5", "reduction='batchmean'",
                    "scale_by_t2=False", "vocab_size=6"):
        assert setting in text, setting


def test_num_items_in_batch_tensors_of_one_element():
    # transformers' Trainer passes a float tensor (its count divided by the parallel sizes), of
    # shape [1, 1] under DataParallel
    s, t = logits((2, 3, 8), 0), logits((2, 3, 8), 1)
    expected = kd_loss(s, t, reduction="sum") / 4
    for n in (torch.tensor(4), torch.tensor(4.0), torch.tensor([[4]])):
        got = kd_loss(s, t, num_items_in_batch=n)
        assert got.shape == () and torch.allclose(got, expected)


def test_an_unknown_forced_backend_is_refused_for_float64_logits_too(monkeypatch):
    # float64 logits go to the float64 reference: a misspelt KDFAST_BACKEND went unnoticed there
    import kdfast
    from kdfast.backends import BackendUnavailableError

    s, t = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    monkeypatch.setenv("KDFAST_BACKEND", "cpuu")
    kdfast.backends.refresh()
    try:
        for dtype in (torch.float32, torch.float64):
            with pytest.raises(BackendUnavailableError, match="unknown backend 'cpuu'"):
                kd_loss(s.to(dtype), t.to(dtype))
    finally:
        monkeypatch.undo()
        kdfast.backends.refresh()


def test_padded_vocabularies_mean_divides_by_the_shared_vocabulary():
    s, t = logits((5, 64), 14), logits((5, 70), 15)
    labels = torch.tensor([1, -100, 3, 4, 0])
    torch.testing.assert_close(kd_loss(s, t, labels, vocab_size=50, reduction="mean"),
                               kd_loss(s[:, :50], t[:, :50], labels, reduction="mean"))


def test_module_form_applies_scale_by_t2():
    s, t = logits((6, 40), 1), logits((6, 40), 2)
    for kind in ("forward_kl", "jsd"):
        got = KDLoss(kind=kind, temperature=3.0, scale_by_t2=True)(s, t)
        torch.testing.assert_close(got, kd_loss(s, t, kind=kind, temperature=3.0, scale_by_t2=True))
        torch.testing.assert_close(got, 9.0 * kd_loss(s, t, kind=kind, temperature=3.0))


def test_num_items_in_batch_divides_every_reduction_as_trl(gkd_trainer):
    s, t = logits((3, 4, 30), 3), logits((3, 4, 30), 4)
    labels = torch.tensor([[1, 2, -100, 3], [4, -100, -100, 5], [6, 7, 8, 9]])
    for reduction in ("sum", "batchmean", "mean"):
        theirs = gkd_trainer.generalized_jsd_loss(s.double(), t.double(), labels=labels, reduction=reduction,
                                                  num_items_in_batch=torch.tensor(7))
        ours = generalized_jsd_loss(s, t, labels, reduction=reduction, num_items_in_batch=torch.tensor(7))
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_loss(s, t, labels, reduction="sum", num_items_in_batch=7),
                               kd_loss(s, t, labels, reduction="sum") / 7)


def test_float64_logits_apply_scale_by_t2():
    s, t = logits((6, 40), 5).double(), logits((6, 40), 6).double()
    for kind in ("forward_kl", "jsd", "tvd"):
        scaled = kd_loss(s, t, kind=kind, temperature=2.0, scale_by_t2=True)
        torch.testing.assert_close(scaled, 4.0 * kd_loss(s, t, kind=kind, temperature=2.0))
        torch.testing.assert_close(scaled, kd_loss(s.float(), t.float(), kind=kind, temperature=2.0,
                                                   scale_by_t2=True).double(), rtol=1e-5, atol=1e-6)
