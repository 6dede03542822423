"""On/off settings take True or False only: ``bool("False")`` is True, so a string (or a number,
a numpy or tensor bool) given for a switch used to turn it on, silently; prepare_for_inference
with inplace="False" prepared (and changed) the caller's model itself."""
import copy

import numpy as np
import pytest
import torch

from kdfast import inference, ops
from kdfast.losses import FusedLinearKDLoss, KDLoss, fused_linear_kd, kd_loss, teacher_topk, topk_kd_loss
from kdfast.losses import diffusion as dl
from kdfast.models.unet import UNet, UNetConfig

NOT_SWITCHES = ["False", 1, 2.0, torch.tensor(True), None]  # (numpy bools are bools)


def _logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)


def _fused_args():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g), torch.randn(6, 7, generator=g),
            torch.randn(11, 7, generator=g))


def _solver_args():
    x = torch.randn(2, 3, 4, 4)
    return x, torch.randn_like(x), torch.tensor(ops.coefficients(1.0, -0.5, {"x": 0.5, "x0": 0.5}))


CALLS = {
    "kd_loss(scale_by_t2)": lambda v: kd_loss(*_logits(), temperature=2.0, scale_by_t2=v),
    "KDLoss(scale_by_t2)": lambda v: KDLoss(scale_by_t2=v),
    "fused_linear_kd(scale_by_t2)": lambda v: fused_linear_kd(*_fused_args(), scale_by_t2=v),
    "FusedLinearKDLoss(scale_by_t2)": lambda v: FusedLinearKDLoss(scale_by_t2=v),
    "topk_kd_loss(scale_by_t2)": lambda v: topk_kd_loss(_logits()[0], *teacher_topk(_logits()[1], 3), scale_by_t2=v),
    "ops.pseudo_huber(elementwise)": lambda v: ops.pseudo_huber(*_logits(), c=0.1, elementwise=v),
    "pseudo_huber_loss(elementwise)": lambda v: dl.pseudo_huber_loss(*_logits(), c=0.1, elementwise=v),
    "solver_step(write_history)": lambda v: ops.solver_step(*_solver_args(), write_history=v),
    "solver_step(write_aux)": lambda v: ops.solver_step(*_solver_args(), write_aux=v),
    "UNetConfig(attention)": lambda v: UNetConfig(attention=v),
    "prepare_for_inference(inplace)": lambda v: inference.prepare_for_inference(torch.nn.Linear(2, 2), inplace=v),
    "prepare_for_inference(fuse_norms)": lambda v: inference.prepare_for_inference(torch.nn.Linear(2, 2),
                                                                                   fuse_norms=v),
    "prepare_for_inference(channels_last)": lambda v: inference.prepare_for_inference(torch.nn.Linear(2, 2),
                                                                                      channels_last=v),
}


@pytest.mark.parametrize("value", NOT_SWITCHES, ids=repr)
@pytest.mark.parametrize("call", list(CALLS))
def test_a_switch_takes_true_or_false_only(call, value):
    name = call.split("(")[1].rstrip(")")
    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        CALLS[call](value)
    for ok in (True, False, np.False_):
        CALLS[call](ok)


def test_prepare_for_inference_leaves_the_callers_model_alone_on_a_bad_switch():
    model = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU()).train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="inplace"):
        inference.prepare_for_inference(model, inplace="False")
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[0], torch.nn.GroupNorm) and type(model[0]) is torch.nn.GroupNorm


@pytest.mark.parametrize("kwargs, match", [
    (dict(channel_mults=(1.5, 2)), r"channel_mults\[0\] must be a positive integer"),
    (dict(channel_mults="12"), "channel_mults must be a sequence"),
    (dict(channel_mults=None), "channel_mults must be a sequence"),
    (dict(num_classes=True), "num_classes must be a positive integer"),
    (dict(in_channels=0), "in_channels must be a positive integer"),
    (dict(base_channels="1"), "base_channels must be a positive integer"),
    (dict(num_res_blocks=1.5), "num_res_blocks must be a positive integer"),
    (dict(dropout="0.1"), "dropout must be a finite number"),
    (dict(dropout=True), "dropout must be a finite number"),
])
def test_unet_settings_are_checked_by_name(kwargs, match):
    # (int() took 1.5 as 1, "12" as (1, 2) and True as 1; others failed deep inside torch)
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)
    with pytest.raises(TypeError, match="config must be a UNetConfig"):
        UNet("bogus")
    assert UNetConfig(channel_mults=[1, 2], num_classes=np.int64(3)).channel_mults == (1, 2)


def test_module_arguments_are_checked():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        inference.prepare_for_inference(None)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        inference.fuse_group_norms(None)
    with pytest.raises(TypeError, match="norm must be a torch.nn.GroupNorm"):
        inference.GroupNormSiLU(torch.nn.Linear(2, 2))


def test_numbers_given_as_tensors_that_need_a_gradient_are_refused():
    # A learned guidance scale or temperature was turned into a float, silently dropping its
    # gradient (torch only warned)
    from kdfast.schedulers import DDIMScheduler

    learned = torch.tensor(2.0, requires_grad=True)
    s = DDIMScheduler()
    s.set_timesteps(4)
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="guidance_scale is taken as a number"):
        s.step_cfg(x, x, learned, s.timesteps[0], x)
    with pytest.raises(ValueError, match="temperature is taken as a number"):
        kd_loss(*_logits(), temperature=learned)
    kd_loss(*_logits(), temperature=learned.detach())  # (a detached tensor is a number)
