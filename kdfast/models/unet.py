"""A small class-conditional UNet for 16x16 single-channel images (the digits teacher).

Written in plain PyTorch, no diffusers: a DDPM-style UNet with residual blocks (GroupNorm,
SiLU, time + class embedding added between the two convolutions), one stride-2 downsampling
per level and self-attention at the lowest resolution. The class embedding has one extra
row, index ``num_classes`` ("null"), which is what classifier-free guidance feeds for the
unconditional half of the batch.

``forward(x, t, class_labels)`` takes the *training* timestep ``t`` (0 .. num_train_timesteps-1,
integer or fractional, scalar or one per sample) as diffusers' UNets do, so kdfast schedulers'
``timesteps`` can be passed straight in, and returns epsilon or v depending on
``config.prediction_type`` (the model itself does not care; the config records what it was
trained for).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_flag, check_float, check_int, is_finite_number, real_number
from ..inference import can_fuse, plain_group_norm
from ..ops._tensors import check_label_ids, vmapped
from ..ops.group_norm import group_norm_act

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class UNetConfig:
    """Everything needed to rebuild a :class:`UNet`; saved next to the weights as JSON."""

    sample_size: int = 16
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32
    channel_mults: Tuple[int, ...] = (1, 2, 2)   # one entry per resolution: 16, 8, 4
    num_res_blocks: int = 1                      # per level on the way down (one more on the way up)
    attention: bool = True                       # self-attention at the lowest resolution
    attention_heads: int = 4
    num_classes: int = 10                        # class index num_classes is the null class
    time_embed_dim: int = 128
    norm_groups: int = 8
    dropout: float = 0.0
    prediction_type: str = "epsilon"

    def __post_init__(self):
        # (int() would take 1.5 as 1, "12" as (1, 2) and True as 1: the settings are checked by name)
        mults = self.channel_mults
        if isinstance(mults, (str, bytes)) or not isinstance(mults, (tuple, list)):
            raise ValueError(f"channel_mults must be a sequence of positive integers, got {mults!r}")
        self.channel_mults = tuple(check_int(f"channel_mults[{k}]", m, minimum=1) for k, m in enumerate(mults))
        for name in ("sample_size", "in_channels", "out_channels", "base_channels", "num_res_blocks", "num_classes",
                     "time_embed_dim", "norm_groups", "attention_heads"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        self.attention = check_flag("attention", self.attention)
        self.dropout = check_float("dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r} is not supported; "
                             f"expected one of {PREDICTION_TYPES}")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be positive integers, got {self.channel_mults}")
        if self.sample_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"sample_size {self.sample_size} is not divisible by "
                             f"2**{len(self.channel_mults) - 1} (one halving per extra level)")
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(f"base_channels * channel_mults ({self.base_channels * m}) must be divisible "
                                 f"by norm_groups ({self.norm_groups})")
        if self.attention and (self.base_channels * self.channel_mults[-1]) % self.attention_heads:
            raise ValueError("the lowest-resolution channel count must be divisible by attention_heads")

    @property
    def null_class(self) -> int:
        """The class index that means "no class" (classifier-free guidance's unconditional input)."""
        return self.num_classes

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["channel_mults"] = list(self.channel_mults)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        """Build from :meth:`to_dict` output; unknown keys are an error (a different architecture)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNet config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of (possibly fractional) timesteps ``[N]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, *, fused: bool, shift: Optional[torch.Tensor] = None,
             silu: bool = True) -> torch.Tensor:
    """``silu(norm(x + shift[:, :, None, None]))`` (or without the SiLU): kdfast's fused kernel
    when ``fused`` and :func:`kdfast.inference.can_fuse` allows (one pass over the feature map
    instead of three), torch's modules otherwise: in training (their backward is faster than
    the fused op's recomputing one), in float64, on devices other than CPUs and CUDA GPUs, and for
    a norm that is a subclass of GroupNorm or holds hooks (which the fused op would skip)."""
    if fused and can_fuse(x, norm) and plain_group_norm(norm):
        return group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, shift=shift,
                              activation="silu" if silu else "identity")
    if shift is not None:
        x = x + shift[:, :, None, None]
    y = norm(x)
    return F.silu(y) if silu else y


def _zero(module: nn.Module) -> nn.Module:
    # Zero-initialised output layers make every residual block start as the identity, which
    # lets a small UNet train stably at a high learning rate from the first step.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding added in between, plus a skip path."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.fused = False  # set by kdfast.inference.fuse_group_norms

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_act(self.norm1, x, fused=self.fused))
        h = norm_act(self.norm2, h, fused=self.fused, shift=self.emb(emb))
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a (small) feature map, residual."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))
        self.fused = False  # set by kdfast.inference.fuse_group_norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(norm_act(self.norm, x, fused=self.fused, silu=False))
        q, k, v = qkv.reshape(n, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    """Class-conditional UNet: ``forward(x [N,C,S,S], t, class_labels [N]) -> [N,C,S,S]``.

    ``class_labels`` holds 0..num_classes-1, or ``num_classes`` (see ``config.null_class``) for
    the unconditional prediction; ``None`` means unconditional for the whole batch.
    """

    def __init__(self, config: Union[UNetConfig, Mapping[str, Any], None] = None, **overrides):
        super().__init__()
        if config is None:
            config = UNetConfig(**overrides)
        elif isinstance(config, Mapping):
            config = UNetConfig.from_dict({**config, **overrides})
        elif not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, a mapping of its fields or None, got {type(config).__name__}")
        elif overrides:
            config = UNetConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.channels_last = False  # inputs made channels-last (set by kdfast.inference.prepare_for_inference)
        self.fused = False  # norm_out fused (set by kdfast.inference.fuse_group_norms)
        cfg = config
        emb_dim, groups = cfg.time_embed_dim, cfg.norm_groups
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        levels = len(chans)

        self.time_mlp = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)

        def attn(ch: int, level: int) -> nn.Module:
            return SelfAttention(ch, cfg.attention_heads, groups) if cfg.attention and level == levels - 1 \
                else nn.Identity()

        # Down path: every block's output is kept as a skip connection for the up path.
        self.down = nn.ModuleList()
        skip_chans = [chans[0]]
        ch = chans[0]
        for level, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(ch, out_ch, emb_dim, groups, cfg.dropout),
                                                attn(out_ch, level)]))
                ch = out_ch
                skip_chans.append(ch)
            if level < levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_chans.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, groups, cfg.dropout),
                                  SelfAttention(ch, cfg.attention_heads, groups) if cfg.attention else nn.Identity(),
                                  ResBlock(ch, ch, emb_dim, groups, cfg.dropout)])

        # Up path: one more block per level than on the way down, to consume the downsampler's skip.
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            out_ch = chans[level]
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(ch + skip_chans.pop(), out_ch, emb_dim, groups, cfg.dropout),
                                              attn(out_ch, level)]))
                ch = out_ch
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))

        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def for_inference(self, fused_norms: bool = True) -> "UNet":
        """A frozen copy for sampling and teacher forwards (:func:`kdfast.inference.prepare_for_inference`):
        weights and activations channels-last (oneDNN's and cuDNN's faster convolution layout)
        and, with ``fused_norms``, every GroupNorm-SiLU pair, with the embedding add before it,
        run by kdfast's fused :func:`~kdfast.ops.group_norm_act`. Same outputs up to float
        rounding; ~1.6x faster per forward on 2 CPU cores (benchmarks/bench_inference.py).
        Under autograd the norms fall back to torch's modules, so it stays differentiable, but
        it is not meant for training."""
        from ..inference import prepare_for_inference

        return prepare_for_inference(self, fuse_norms=fused_norms)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embedding(self, x: torch.Tensor, t, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(n)
        elif t.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape ({n},), got {tuple(t.shape)}")
        if class_labels is None:
            class_labels = torch.full((n,), self.config.null_class, dtype=torch.long, device=x.device)
        else:
            class_labels = torch.as_tensor(class_labels, device=x.device)
            if class_labels.shape != (n,):
                raise ValueError(f"class_labels must have shape ({n},), got {tuple(class_labels.shape)}")
            if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
                raise TypeError(f"class_labels must be integer class indices, got {class_labels.dtype}")
            # Checked on the CPU only (in a compiled graph or an export: an async assert). On a GPU
            # the embedding's own device-side assert catches them: a check would cost kernels per step.
            if class_labels.device.type == "cpu":
                null = self.config.null_class
                check_label_ids(class_labels, null + 1, None, name="class_labels",
                                hint=f" ({null} is the unconditional label)")
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        return emb + self.class_embed(class_labels.long())

    def forward(self, x: torch.Tensor, t, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.config
        # Tensors are checked by type, dtype and shape only: reading their values would cost a
        # host sync on a GPU (and cannot be done under torch.func.vmap or torch.compile).
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        weight_dtype = self.conv_in.weight.dtype
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor (the model's dtype, {weight_dtype}), "
                            f"got dtype {x.dtype}")
        # (autocast casts the others, not float64)
        if x.dtype != weight_dtype and (x.dtype == torch.float64 or not torch.is_autocast_enabled(x.device.type)):
            hint = "" if x.dtype == torch.float64 else ", or run under torch.autocast"
            raise TypeError(f"x must have the model's dtype {weight_dtype}, got dtype {x.dtype} (convert x, or the "
                            f"model with .to({x.dtype}){hint})")
        if isinstance(t, torch.Tensor):
            if t.dtype == torch.bool or t.dtype.is_complex:
                raise TypeError(f"t must hold real timesteps (an integer or floating-point tensor), "
                                f"got dtype {t.dtype}")
        elif not isinstance(t, (list, tuple, np.ndarray)):
            # a number: float() would take True as 1, and NaN or inf give a NaN output
            if not is_finite_number(real_number("t", t), "t", symbolic=True):  # (the embedding: torch's ops)
                raise ValueError(f"t must be a finite number, got {t!r}")
        else:  # a list or numpy array of timesteps, on the host: its values are checked here
            try:
                t = torch.as_tensor(t)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"t must be a real number or a tensor of them, got {t!r}") from None
            if t.dtype == torch.bool or t.dtype.is_complex:
                raise TypeError(f"t must hold real timesteps (integers or floating-point numbers), got dtype {t.dtype}")
            if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                raise ValueError(f"t must be finite, got {t.tolist()}")
        if class_labels is not None:
            if not isinstance(class_labels, torch.Tensor):
                try:
                    class_labels = torch.as_tensor(class_labels)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"class_labels must be a tensor of integer class indices, got "
                                    f"{type(class_labels).__name__}") from None
            dtype = class_labels.dtype
            if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
                raise TypeError(f"class_labels must be integer class indices, got {class_labels.dtype}")
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [N, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2 ** (len(cfg.channel_mults) - 1)  # each level but the last halves H and W
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x must have H and W divisible by {factor} (this UNet has {len(cfg.channel_mults)} "
                             f"levels), got {tuple(x.shape)}")
        emb = self._embedding(x, t, class_labels)
        if self.channels_last and not vmapped(x):  # (torch.func.vmap cannot lay a slice out)
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        skips: List[torch.Tensor] = [h]
        for block in self.down:
            if isinstance(block, nn.ModuleList):
                h = block[1](block[0](h, emb))
            else:
                h = block(h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block in self.up:
            if isinstance(block, nn.ModuleList):
                h = block[1](block[0](torch.cat([h, skips.pop()], dim=1), emb))
            else:
                h = block(h)
        return self.conv_out(norm_act(self.norm_out, h, fused=self.fused))
