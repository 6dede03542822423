"""The handwritten digits set shipped by scikit-learn (1,797 8x8 images, 10 classes).

It is kdfast's embedded default: real data that needs no download, small enough to train a
class-conditional diffusion teacher and an evaluation classifier on two CPU cores.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .._checks import check_int, real_number

NUM_CLASSES = 10
SPLITS = ("train", "heldout", "all")


def load_digits(split: str = "train", size: int = 16, heldout_fraction: float = 0.2,
                seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, size, size]`` float32 in [-1, 1] and labels ``[N]`` int64.

    The split is stratified by class and fixed by ``seed``, so "train" and "heldout" never
    overlap and are the same on every machine. ``size`` 8 keeps the native resolution; 16
    upsamples bilinearly (what the UNet teacher uses).
    """
    if not isinstance(split, str) or split not in SPLITS:  # (an array compared with a str has no truth value)
        raise ValueError(f"split={split!r} is not supported; expected one of {SPLITS}")
    if isinstance(size, bool) or size not in (8, 16, 32):
        raise ValueError(f"size must be 8, 16 or 32, got {size!r}")
    size = int(size)  # (16.0 is 16; F.interpolate takes ints only)
    # (None, "0.2", [0.2] or a tensor of several values failed in the comparison, not naming the argument)
    heldout_fraction = real_number("heldout_fraction", heldout_fraction)
    if not 0.0 < heldout_fraction < 1.0:  # (NaN fails it too)
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    seed = check_int("seed", seed, minimum=0)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError("the digits data comes with scikit-learn: pip install scikit-learn") from exc
    data = sk_load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0  # pixel 0..16
    labels = torch.tensor(data.target, dtype=torch.int64)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    if split == "all":
        return images, labels
    gen = torch.Generator().manual_seed(seed)
    heldout = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        count = int(round(len(idx) * heldout_fraction))
        if not 0 < count < len(idx):
            side = "held-out" if count == 0 else "training"
            raise ValueError(f"heldout_fraction={heldout_fraction} leaves the {side} split without digits of class "
                             f"{c} ({len(idx)} in all); expected a fraction that keeps some of every class on both "
                             "sides")
        heldout[idx[:count]] = True
    keep = heldout if split == "heldout" else ~heldout
    return images[keep], labels[keep]
