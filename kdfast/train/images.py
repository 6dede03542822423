"""PNG output without an imaging library: image grids of samples, and the encoder plots use.

The encoder writes 8-bit grayscale or RGB with filter type 0 on every row and one zlib
stream (the format's simplest valid form), which any viewer reads.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .._checks import check_count
from .run import atomic_files

PathLike = Union[str, Path]


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1, scale: int = 1) -> torch.Tensor:
    """Tile ``[N, 1, H, W]`` images in [-1, 1] into one uint8 ``[rows*(H+pad), ...]`` image
    (NaN pixels are drawn black, as -1; the float-to-uint8 cast of NaN is undefined)."""
    nrow, scale, pad = check_count("nrow", nrow, 1), check_count("scale", scale, 1), check_count("pad", pad, 0)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [N, 1, H, W] tensor of one or more grayscale images, got {got}")
    images = images.detach().float().nan_to_num(nan=-1.0)
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    if scale > 1:
        images = images.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    n, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 64, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    return grid


def write_png(image: Union[torch.Tensor, np.ndarray], path: PathLike) -> Path:
    """Write an 8-bit image as PNG: ``[H, W]`` grayscale or ``[H, W, 3]`` RGB (cast to uint8)."""
    pixels = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    pixels = np.ascontiguousarray(pixels.astype(np.uint8, copy=False))
    if pixels.ndim == 2:
        color_type = 0
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        color_type = 2
    else:
        raise ValueError(f"image must be [H, W] (grayscale) or [H, W, 3] (RGB), got shape {list(pixels.shape)}")
    h, w = pixels.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"image must not be empty, got shape {list(pixels.shape)}")
    rows = np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, -1)], axis=1)  # filter byte 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))
    path = Path(path)
    with atomic_files(path) as (tmp,):  # whole or not at all: an interrupted write keeps the old image
        tmp.write_bytes(png)
    return path


def save_grid(images: torch.Tensor, path: PathLike, nrow: int = 10, scale: int = 4) -> Path:
    """Save images ``[N, 1, H, W]`` in [-1, 1] as a PNG grid, ``nrow`` per row, upscaled ``scale``x."""
    return write_png(image_grid(images, nrow, pad=2, scale=scale), path)
