import math
import struct
import zlib

import numpy as np
import pytest
import torch

from kdfast.train import plot
from kdfast.train.images import image_grid, write_png
from kdfast.train.plot import COLORS, moving_average, plot_curves, render_curves


def read_png(path) -> np.ndarray:
    """Decode the PNGs kdfast writes (8-bit gray or RGB, filter 0), checking every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    assert pos == len(data) and list(chunks)[-1] == b"IEND"
    w, h, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and color_type in (0, 2)
    channels = 3 if color_type == 2 else 1
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * channels)
    assert (raw[:, 0] == 0).all()  # filter type 0
    return raw[:, 1:].reshape(h, w, channels).squeeze(-1) if channels == 1 else raw[:, 1:].reshape(h, w, 3)


def test_write_png_gray_and_rgb(tmp_path):
    gray = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    assert np.array_equal(read_png(write_png(gray, tmp_path / "g.png")), gray.numpy())
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(read_png(write_png(rgb, tmp_path / "c.png")), rgb)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        write_png(np.zeros((2, 2, 4), np.uint8), tmp_path / "x.png")


def _mask(img: np.ndarray, color) -> np.ndarray:
    return (img == np.array(color, np.uint8)).all(-1)


def _axes_box(img: np.ndarray):
    """Rows and columns of the black axes frame: (top, bottom, left, right)."""
    black = _mask(img, (0, 0, 0))
    rows = np.nonzero(black.sum(1) > img.shape[1] // 2)[0]
    cols = np.nonzero(black.sum(0) > img.shape[0] // 3)[0]
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_curves_are_drawn_where_the_data_is(tmp_path):
    xs = range(0, 101)
    series = {"low": [(x, 0.0) for x in xs], "high": [(x, 1.0) for x in xs], "rising": [(x, x / 100) for x in xs]}
    path = plot_curves(series, tmp_path / "p.png", title="Loss 1.5e-3", size=(400, 300))
    img = read_png(path)
    assert img.shape == (300, 400, 3)
    top, bottom, left, right = _axes_box(img)
    inside = np.zeros(img.shape[:2], bool)
    inside[top + 1:bottom, left + 1:right] = True
    height = bottom - top

    low, high, rising = (_mask(img, COLORS[i]) & inside for i in range(3))
    # Horizontal lines across the whole box, at the bottom (y=0) and the top (y=1) of the padded range.
    for line, near in ((low, bottom), (high, top)):
        rows, cols = np.nonzero(line)
        assert cols.max() - cols.min() >= 0.95 * (right - left)
        assert np.abs(rows - near).max() < 0.1 * height
    # The rising line goes up (smaller row numbers) from left to right, every column of the box.
    rows, cols = np.nonzero(rising)
    mean_row = np.array([rows[cols == c].mean() for c in np.unique(cols)])
    assert len(mean_row) >= 0.95 * (right - left) and (np.diff(mean_row) <= 1).all()
    assert mean_row[0] - mean_row[-1] > 0.8 * height
    # The colour key below the axes: a swatch of every curve's colour, and text.
    for color in COLORS[:3]:
        assert _mask(img[bottom + 1:], color).sum() >= 100
    assert _mask(img[:top], plot._TEXT).any()  # the title


def test_gaps_log_scale_and_errors(tmp_path):
    nan = float("nan")
    points = [(x, 1.0 if x < 40 or x > 60 else nan) for x in range(101)]
    img = render_curves({"gappy": points, "empty": []}, size=(400, 300))
    top, bottom, left, right = _axes_box(img)
    cols = np.nonzero(_mask(img[top + 1:bottom, left + 1:right], COLORS[0]))[1] + left + 1
    middle = left + (right - left) // 2
    assert not ((cols > middle - 10) & (cols < middle + 10)).any()  # NaN breaks the line
    assert (cols < middle - 30).any() and (cols > middle + 30).any()

    # log scale: y = 10**x is a straight line; non-positive values are left out
    img = render_curves({"exp": [(x, 10.0 ** x) for x in range(-3, 4)] + [(4, 0.0), (5, -1.0)]}, log_y=True)
    assert _mask(img, COLORS[0]).sum() > 100
    with pytest.raises(ValueError, match="at least one curve"):
        render_curves({})
    with pytest.raises(ValueError, match="too small"):
        render_curves({"a": [(0, 1), (1, 2)]}, size=(40, 30))
    # (x, y, z) triples were reshaped into other points and drawn
    with pytest.raises(ValueError, match=r"series 'a' must be a sequence of \(x, y\) points, got shape \(2, 3\)"):
        render_curves({"a": [(1, 2, 3), (4, 5, 6)]})


def test_image_grid_takes_grayscale_batches_only():
    # RGB was cut to its first channel, [N, H, W] failed to unpack, an empty batch drew a blank
    assert tuple(image_grid(torch.zeros(3, 1, 4, 5), nrow=2, pad=1).shape) == (11, 13)
    for images in (torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4), torch.zeros(0, 1, 4, 4), [[0.0]]):
        with pytest.raises(ValueError, match=r"images must be a \[N, 1, H, W\] tensor"):
            image_grid(images, nrow=2)


def test_font_and_text():
    assert all(len(rows) == 5 and set(rows) <= set("01234567") for rows in plot._FONT.values())
    assert len(plot._FONT) == len(set(plot._FONT)) == 49
    canvas = np.full((20, 60, 3), 255, np.uint8)
    plot.draw_text(canvas, 1, 1, "a1~")  # lower case drawn as upper case, unknown as "?"
    assert plot.text_width("a1~") == 3 * 8 - 2
    assert not (canvas[:, 1 + plot.text_width("a1~"):] != 255).any()
    inked = (canvas != 255).any(-1)
    assert inked[:, :6].any() and inked[:, 8:14].any() and inked[:, 16:22].any()


def test_moving_average():
    assert moving_average([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([], 5) == []
    assert math.isclose(moving_average([2.0] * 100, 50)[-1], 2.0)
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)


def test_moving_average_keeps_non_finite_values_in_their_own_windows():
    nan, inf = float("nan"), float("inf")
    # A NaN or an inf is left out of the windows that hold it; later windows are plain means.
    assert moving_average([1.0, nan, 2.0, 3.0, 4.0], 2) == [1.0, 1.0, 2.0, 2.5, 3.5]
    out = moving_average([inf, 1.0, 2.0, 3.0], 2)
    assert math.isnan(out[0]) and out[1:] == [1.0, 1.5, 2.5]  # NaN: the first window holds no finite value
    out = moving_average([nan, nan, 1.0, -inf, 5.0, 7.0], 2)
    assert math.isnan(out[0]) and math.isnan(out[1]) and out[2:] == [1.0, 1.0, 5.0, 6.0]
    # no running sum: huge values do not wipe out the small ones after them
    assert moving_average([1e300, -1e300, 1.0, 2.0], 2)[-1] == 1.5
    assert moving_average([1.0, 2.0, 3.0], 10) == [1.0, 1.5, 2.0]


def test_values_near_the_float64_limit_plot_and_average():
    # spans, paddings and window sums of values near 1.8e308 overflowed to inf (then NaN pixels)
    for series in ({"a": [(0, 0.0), (1, 1.7e308)]}, {"a": [(0, 1.7e308), (1, 1.7e308)]},
                   {"a": [(-1e308, 0.0), (1e308, 1.0)]}):
        assert _mask(render_curves(series), COLORS[0]).sum() > 0
    assert moving_average([1e308, 1e308, 1e308], 2) == [1e308, 1e308, 1e308]
    # ... and small values beside a huge one are not scaled into underflow
    assert moving_average([1e300, 1e-30, 2e-30], 1) == [1e300, 1e-30, 2e-30]
    for window in (math.inf, 2.5, 0, True):
        with pytest.raises(ValueError, match="window"):
            moving_average([1.0], window)


def test_an_interrupted_write_png_keeps_the_previous_image(tmp_path, monkeypatch):
    # the loss plot and grids were written in place: a kill mid-write left a truncated file
    from pathlib import Path
    gray = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    path = write_png(gray, tmp_path / "loss.png")
    before = path.read_bytes()
    real = Path.write_bytes

    def interrupted(self, data):
        real(self, data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_png(gray * 2, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_image_grid_pixels_and_placement():
    # values -1 / 0 / +1 as 0 / 128 / 255, NaN black, cells filled row by row, padding 64
    imgs = torch.stack([torch.full((1, 2, 3), v) for v in (-1.0, 1.0, 0.0)])
    imgs[2, 0, 0, 0] = float("nan")
    g = image_grid(imgs, nrow=2, pad=1)
    assert g.shape == (7, 9)
    assert (g[1:3, 1:4] == 0).all() and (g[1:3, 5:8] == 255).all()
    third = g[4:6, 1:4]
    assert third[0, 0] == 0 and (third.flatten()[1:] == 128).all()
    assert g[0, 0] == 64 and g[4:6, 5:8].eq(64).all()  # padding and the empty cell
