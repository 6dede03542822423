"""Teacher inference: a UNet's forward with its group norms fused and its activations channels-last.

:func:`prepare_for_inference` returns a frozen copy of a model for sampling and for the
teacher forwards of distillation:

- weights (and so activations) in channels-last, the layout oneDNN's and cuDNN's fastest
  convolutions read;
- every GroupNorm followed by SiLU run by :func:`kdfast.ops.group_norm_act` in one pass,
  with the time embedding a ResNet block adds before its second norm folded in:

  - kdfast's own :class:`~kdfast.models.UNet` (its blocks call the fused op themselves);
  - diffusers' ``ResnetBlock2D`` (the blocks of ``UNet2DModel`` and ``UNet2DConditionModel``,
    Stable Diffusion's UNet among them) with the default time-embedding norm and SiLU, and
    without an up/down-sampler of their own (such blocks are left as they are);
  - a ``GroupNorm`` directly followed by a ``SiLU`` in an ``nn.Sequential`` (not a subclass,
    whose forward may read the norm's output elsewhere), and diffusers UNets' and VAEs'
    ``conv_norm_out`` / ``conv_act``. The norm then applies the SiLU and the SiLU passes its
    input on: a slice of such a prepared ``Sequential`` that ends at the norm applies the SiLU.

  Subclasses of ``GroupNorm`` or ``SiLU`` (which may compute something else) and modules with
  hooks (which a fused pass would skip, or a replacement drop; accelerate's, which wrap the
  instance's ``forward``, included) are left as they are; a hook added to a prepared model's
  norm (or to a fused pair's SiLU) turns its fused pass off, and a hook registered for every
  module (``register_module_forward_hook``: ModuleTracker, FlopCounterMode) all of them, for as
  long as it is registered. The prepared model's ``state_dict`` has the original's keys and
  values.

The outputs are those of the original model up to float rounding. Wherever a gradient is
needed, or for float64 inputs, the fused blocks run torch's own modules instead, so the copy
stays differentiable (but is not meant for training).
"""
from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
import torch.nn as nn

from ._checks import check_flag
from .ops.group_norm import group_norm_act

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def can_fuse(x: torch.Tensor, *modules: Optional[nn.Module]) -> bool:
    """Whether the fused kernel may replace torch's modules for input ``x``: nothing needs a
    gradient (x or the modules' parameters), x is float32/16-bit on a CPU or CUDA device, and
    no hook is registered for every module (it would see no norm)."""
    if x.dtype not in _FUSED_DTYPES or x.device.type not in ("cpu", "cuda") or not _no_global_hooks():
        return False
    if not torch.is_grad_enabled():
        return True
    return not (x.requires_grad or any(p.requires_grad for m in modules if m is not None for p in m.parameters()))


class GroupNormSiLU(nn.GroupNorm):
    """A ``GroupNorm`` followed by SiLU, fused where :func:`can_fuse` allows. It is the original
    norm's settings and parameters (the same tensors, under the same names): a prepared model's
    ``state_dict`` has the original's keys, so weights load into it and out of it unchanged.

    Standing in for a norm-SiLU pair of modules, it comes with a :class:`PairedSiLU` in the
    SiLU's place (see :func:`fuse_group_norms`): once either of the two holds a hook, the pair
    runs as two steps again (the norm here, the SiLU there), so that a hook sees and changes
    what it would have in the original model."""

    def __init__(self, norm: nn.GroupNorm):
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"norm must be a torch.nn.GroupNorm, got {type(norm).__name__}")
        nn.Module.__init__(self)
        self.training = norm.training
        self.num_groups, self.num_channels, self.eps, self.affine = (norm.num_groups, norm.num_channels, norm.eps,
                                                                     norm.affine)
        self.register_parameter("weight", norm.weight)
        self.register_parameter("bias", norm.bias)
        self.partner: Optional[PairedSiLU] = None  # (a plain attribute: set by PairedSiLU)

    def __setattr__(self, name: str, value) -> None:
        if name == "partner":  # not a submodule: the pair would otherwise be in the state_dict twice
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def paired_in_two_steps(self) -> bool:
        """Whether this norm and its SiLU run as two steps: either holds a hook, or one is
        registered for every module."""
        return self.partner is not None and not (_no_global_hooks() and _no_hooks(self) and _no_hooks(self.partner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(group_norm(x))`` in one fused pass where the input allows it, else torch's
        (the norm alone where the pair runs in two steps)."""
        if self.paired_in_two_steps():
            return super().forward(x)
        if can_fuse(x, self):
            return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps)
        return torch.nn.functional.silu(super().forward(x))


class PairedSiLU(nn.Module):
    """The SiLU of a norm-SiLU pair whose :class:`GroupNormSiLU` applies it: the identity, or
    the SiLU where the pair runs in two steps (a hook on either module)."""

    def __init__(self, norm: GroupNormSiLU):
        super().__init__()
        object.__setattr__(self, "norm", norm)  # (not a submodule, as GroupNormSiLU.partner)
        norm.partner = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x) if self.norm.paired_in_two_steps() else x


# Every kind of hook a module can hold: a fused pass would skip its forward and backward hooks,
# and a replacement module would hold none of them.
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


# and the hooks registered for every module at once (torch.nn.modules.module.register_module_forward_hook, ...)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _no_hooks(module: nn.Module) -> bool:
    return not any(getattr(module, name, None) for name in _HOOKS) and not _wrapped_forward(module)


def _no_global_hooks() -> bool:
    """No hook is registered for every module now: checked at each call (see :func:`can_fuse`),
    not when preparing, so that one held a while (ModuleTracker, FlopCounterMode) is not kept
    as a decision."""
    return not any(getattr(torch.nn.modules.module, name, None) for name in _GLOBAL_HOOKS)


def _wrapped_forward(module: nn.Module) -> bool:
    """Whether the instance's forward is not its class's: accelerate's hooks (diffusers' CPU
    offload, device maps) register nothing, they wrap the instance's forward (and set _hf_hook),
    which a fused pass would skip as well. (Removing them leaves the class's forward bound on
    the instance: no hook.)"""
    if hasattr(module, "_hf_hook"):
        return True
    forward = vars(module).get("forward")
    return forward is not None and not (getattr(forward, "__func__", None) is type(module).forward
                                        and getattr(forward, "__self__", None) is module)


def _plain(module: Optional[nn.Module], cls: type) -> bool:
    """``module`` is exactly ``cls`` (a subclass may compute something else: diffusers' per-frame
    video group norm) and has no hooks. Checked again at each fused call of kdfast's UNet and of
    diffusers' ResNet blocks, so that a hook added after preparing turns the fused pass off."""
    return type(module) is cls and _no_hooks(module)


def plain_group_norm(module: Optional[nn.Module]) -> bool:
    """Whether the fused op may stand in for ``module``'s forward: an ``nn.GroupNorm`` itself,
    not a subclass, with no hooks (see ``_plain``)."""
    return _plain(module, nn.GroupNorm)


def _fusable_resnet(module: nn.Module) -> bool:
    """A diffusers ResnetBlock2D whose norm-SiLU pairs the fused forward below reproduces."""
    return (type(module).__name__ == "ResnetBlock2D" and type(module).__module__.startswith("diffusers")
            and _plain(getattr(module, "norm1", None), nn.GroupNorm)
            and _plain(getattr(module, "norm2", None), nn.GroupNorm)
            and _plain(getattr(module, "nonlinearity", None), nn.SiLU)
            and getattr(module, "time_embedding_norm", None) == "default"
            and getattr(module, "upsample", 1) is None and getattr(module, "downsample", 1) is None)


def _channel_shift(emb: torch.Tensor, batch: int, channels: int, dims: int) -> Optional[torch.Tensor]:
    """``emb`` as the ``[batch, channels]`` shift it adds to a ``dims``-d feature map, if it
    holds one value per sample and channel (either may broadcast); None if it varies over
    positions or does not broadcast so."""
    if (emb.dim() != dims or emb.shape[0] not in (1, batch) or emb.shape[1] not in (1, channels)
            or any(size != 1 for size in emb.shape[2:])):
        return None
    return emb.reshape(emb.shape[:2]).expand(batch, channels)


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args, **kwargs):
    """diffusers' ResnetBlock2D.forward (default time-embedding norm, SiLU, no resampler) with
    norm1 + SiLU and (+ temb) norm2 + SiLU as two fused passes."""
    if (not can_fuse(input_tensor, self) or (temb is None and self.time_emb_proj is not None)
            or not _fusable_resnet(self)):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    shift = None
    if temb is not None:
        # diffusers adds the projected embedding as [N, C, 1, 1], or an unprojected one as given
        emb = temb
        if self.time_emb_proj is not None:
            emb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))[:, :, None, None]
        shift = _channel_shift(emb, input_tensor.shape[0], self.norm2.num_channels, input_tensor.dim())
        if shift is None:  # varies over positions too: not a per-channel shift the fused norm can add
            return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    hidden = group_norm_act(input_tensor, self.norm1.num_groups, self.norm1.weight, self.norm1.bias, self.norm1.eps)
    hidden = self.conv1(hidden)
    hidden = group_norm_act(hidden, self.norm2.num_groups, self.norm2.weight, self.norm2.bias, self.norm2.eps,
                            shift=shift)
    hidden = self.conv2(self.dropout(hidden))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden) / self.output_scale_factor


def fuse_group_norms(model: nn.Module) -> int:
    """Fuse ``model``'s GroupNorm-SiLU pairs in place (see the module docstring); returns how
    many norms now run fused."""
    from .models.unet import UNet

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fused = 0
    for module in list(model.modules()):
        if isinstance(module, UNet):  # its blocks call the fused op themselves when told to
            for block in module.modules():
                if hasattr(block, "fused"):
                    block.fused = True
            fused += sum(plain_group_norm(m) for m in module.modules())
        elif _fusable_resnet(module) and not _wrapped_forward(module):  # (not hooked, nor fused already)
            # a partial, not a bound method: pickle restores a bound method by looking its name
            # up on the instance's class, which has no _fused_resnet_forward (torch.load failed)
            module.forward = functools.partial(_fused_resnet_forward, module)
            fused += 2
    # A GroupNorm attribute directly followed by a SiLU attribute (diffusers: conv_norm_out,
    # conv_act): the pair becomes GroupNormSiLU + PairedSiLU.
    for module in list(model.modules()):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            norm, act = module._modules[first], module._modules[second]
            if _plain(norm, nn.GroupNorm) and _plain(act, nn.SiLU) and _used_in_order(module, first, second):
                fused_norm = GroupNormSiLU(norm)
                module._modules[first] = fused_norm
                module._modules[second] = PairedSiLU(fused_norm).train(act.training)
                fused += 1
    return fused


# diffusers' modules that apply these attribute pairs one after the other in their forward.
_SEQUENTIAL_PAIRS = {("conv_norm_out", "conv_act")}


def _used_in_order(module: nn.Module, first: str, second: str) -> bool:
    """Whether ``module``'s forward feeds its child ``first``'s output to ``second`` and nothing
    else reads it: an ``nn.Sequential`` itself (a subclass may return every layer's output, or
    sum its children), or a diffusers module's known pair."""
    return type(module) is nn.Sequential or ((first, second) in _SEQUENTIAL_PAIRS
                                             and type(module).__module__.startswith("diffusers"))


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


def prepare_for_inference(model: nn.Module, *, channels_last: bool = True, fuse_norms: bool = True,
                          inplace: bool = False) -> nn.Module:
    """A frozen copy of ``model`` (eval mode, no gradients) for sampling and teacher forwards:
    channels-last weights and, with ``fuse_norms``, fused GroupNorm-SiLU pairs (see the
    module docstring). The original is left as it is, unless ``inplace`` (no copy: for a
    model too large to hold twice), when ``model`` itself is prepared and returned."""
    from .models.unet import UNet

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    channels_last, fuse_norms = check_flag("channels_last", channels_last), check_flag("fuse_norms", fuse_norms)
    fast = (model if check_flag("inplace", inplace) else copy.deepcopy(model)).eval().requires_grad_(False)
    if channels_last:
        # 4-d weights channels-last, 5-d ones (Conv3d: video UNets) channels-last-3d; Module.to
        # refuses a 5-d tensor for torch.channels_last
        fast = fast._apply(_channels_last)
        for module in fast.modules():
            if isinstance(module, UNet):
                module.channels_last = True
    if fuse_norms:
        fuse_group_norms(fast)
    return fast
