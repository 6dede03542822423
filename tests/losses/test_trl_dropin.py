"""kdfast.losses.trl: TRL's GKD loss, fused, with TRL's signature and values."""
import pytest
import torch

from kdfast.losses import trl as kdtrl


def logits(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * 2


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])  # without labels TRL's batchmean divides by the batch
def test_same_values_and_gradients_as_trl(gkd_trainer, reduction, beta, with_labels):
    s, t = logits((2, 5, 97), 0), logits((2, 5, 97), 1)
    labels = torch.tensor([[3, -100, 4, 5, 6], [-100, -100, 1, 2, 0]]) if with_labels else None
    args = dict(labels=labels, beta=beta, temperature=1.7, reduction=reduction)
    ours_in, theirs_in = s.clone().requires_grad_(True), s.double().requires_grad_(True)
    ours = kdtrl.generalized_jsd_loss(ours_in, t, **args)
    theirs = gkd_trainer.generalized_jsd_loss(theirs_in, t.double(), **args)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=1e-7)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(ours_in.grad.double(), theirs_in.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("teacher_dtype", [torch.float64, torch.float32])
def test_float64_logits_like_trl(gkd_trainer, reduction, teacher_dtype):
    # TRL takes float64 logits (a GKDTrainer with .double() models): so does the drop-in, in
    # float64 (the fused kernels stop at float32; it refused them)
    s, t = logits((2, 5, 97), 4).double(), logits((2, 5, 97), 5).to(teacher_dtype)
    labels = torch.tensor([[3, -100, 4, 5, 6], [-100, -100, 1, 2, 0]])
    for lab in (labels, None):
        ours_in, theirs_in = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        ours = kdtrl.generalized_jsd_loss(ours_in, t, lab, beta=0.3, temperature=1.7, reduction=reduction)
        theirs = gkd_trainer.generalized_jsd_loss(theirs_in, t, lab, beta=0.3, temperature=1.7, reduction=reduction)
        assert ours.dtype == theirs.dtype == torch.float64
        # (TRL takes a float32 teacher's log-softmax in float32; kdfast widens the logits first)
        tol = dict(rtol=1e-12, atol=1e-14) if teacher_dtype == torch.float64 else dict(rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(ours, theirs, **tol)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours_in.grad, theirs_in.grad, **tol)


def test_num_items_in_batch(gkd_trainer):
    s, t = logits((3, 4, 50), 2), logits((3, 4, 50), 3)
    labels = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1))
    labels[0] = -100
    for reduction in ("batchmean", "none"):  # num_items_in_batch wins over the reduction, as in TRL
        ours = kdtrl.generalized_jsd_loss(s, t, labels, num_items_in_batch=torch.tensor(7), reduction=reduction)
        theirs = gkd_trainer.generalized_jsd_loss(s.double(), t.double(), labels, num_items_in_batch=torch.tensor(7),
                                                  reduction=reduction)
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=1e-7)


def test_patch_gkd_trainer(gkd_trainer, monkeypatch):
    monkeypatch.setattr(gkd_trainer, "generalized_jsd_loss", gkd_trainer.generalized_jsd_loss)  # restored after
    assert kdtrl.patch_gkd_trainer() is gkd_trainer
    assert gkd_trainer.generalized_jsd_loss is kdtrl.generalized_jsd_loss
    s, t = logits((4, 30), 4), logits((4, 30), 5)
    torch.testing.assert_close(gkd_trainer.generalized_jsd_loss(s, t, beta=0.2),
                               kdtrl.generalized_jsd_loss(s, t, beta=0.2))


def test_trainers_whose_loss_takes_more_are_refused():
    # (TRL's GOLD trainer passes logits_are_probs, IWOPD top_k: the drop-in would fail mid-training)
    class GoldLike:
        @staticmethod
        def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                 reduction="batchmean", logits_are_probs=False):
            return None

    original = GoldLike.generalized_jsd_loss
    with pytest.raises(TypeError, match="GoldLike.generalized_jsd_loss takes logits_are_probs"):
        kdtrl.patch_gkd_trainer(GoldLike)
    assert GoldLike.generalized_jsd_loss is original


def test_bad_input():
    with pytest.raises(ValueError, match="reduction must be one of"):
        kdtrl.generalized_jsd_loss(logits((2, 8), 0), logits((2, 8), 1), reduction="avg")
    with pytest.raises(TypeError, match="no generalized_jsd_loss"):
        kdtrl.patch_gkd_trainer(object)


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_every_reduction_checks_its_arguments(reduction):
    # "none" is computed the unfused way, like TRL, but refuses what the fused reductions refuse
    s, t = logits((2, 3, 11), 0), logits((2, 3, 11), 1)
    with pytest.raises(ValueError, match="beta must be in"):
        kdtrl.generalized_jsd_loss(s, t, beta=2.0, reduction=reduction)
    with pytest.raises(ValueError, match="temperature must be"):
        kdtrl.generalized_jsd_loss(s, t, temperature=0.0, reduction=reduction)
    with pytest.raises(ValueError, match="teacher_logits"):
        kdtrl.generalized_jsd_loss(s, t[:1], reduction=reduction)
    with pytest.raises(ValueError, match="labels must"):
        kdtrl.generalized_jsd_loss(s, t, torch.zeros(2, 4, dtype=torch.long), reduction=reduction)
