"""Line plots as PNG without matplotlib (not a kdfast dependency): loss curves and the like.

:func:`render_curves` rasterises into a uint8 RGB array with numpy: an axes box with light
grid lines, tick labels, one coloured polyline per series, a colour key naming each series
and an optional title. Text uses a built-in 3x5 pixel font (upper-case letters, digits and
a little punctuation), drawn at twice its size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._checks import check_int
from .images import write_png

PathLike = Union[str, Path]
Points = Sequence[Tuple[float, float]]

# matplotlib's "tab10" palette, so the colours look familiar.
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
_AXES, _GRID, _TEXT = (0, 0, 0), (225, 225, 225), (40, 40, 40)

# 3x5 glyphs: five rows of three pixels, each row an octal digit (4 = left, 2 = middle, 1 = right).
_FONT = dict(zip(
    "0123456789.-+:/_()=%, ?ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    ("75557 26227 71747 71317 55711 74717 74757 71122 75757 75717 00002 00700 02720 02020 11244 00007 "
     "24442 21112 07070 51245 00024 00000 71302 25755 65656 34443 65556 74647 74644 34553 55755 72227 "
     "11152 55655 44447 57755 65555 25552 65644 25563 65655 34216 72222 55557 55552 55775 55255 55222 "
     "71247").split()))
_SCALE = 2                     # font pixels per glyph pixel
_ADVANCE = 4 * _SCALE          # glyph width plus one column of spacing
_LINE = 7 * _SCALE             # text line height


def text_width(text: str) -> int:
    """Width in pixels of ``text`` drawn by :func:`draw_text`."""
    return max(0, len(text) * _ADVANCE - _SCALE)


def draw_text(canvas: np.ndarray, x: int, y: int, text: str, color=_TEXT) -> None:
    """Draw ``text`` with its top-left corner at pixel ``(x, y)``, clipped to the canvas."""
    h, w = canvas.shape[:2]
    for i, char in enumerate(text.upper()):
        rows = _FONT.get(char, _FONT["?"])
        for r, bits in enumerate(rows):
            for c in range(3):
                if int(bits) & (4 >> c):
                    y0, x0 = y + r * _SCALE, x + i * _ADVANCE + c * _SCALE
                    canvas[max(0, y0):min(h, y0 + _SCALE), max(0, x0):min(w, x0 + _SCALE)] = color


def _tick_label(value: float) -> str:
    return f"{value:.3g}".replace("e-0", "e-").replace("e+0", "e")


def _draw_polyline(canvas: np.ndarray, px: np.ndarray, py: np.ndarray, box: Tuple[int, int, int, int],
                   color) -> None:
    """A 2-pixel-wide line through the points ``(px, py)`` (pixel coordinates, NaN = gap)."""
    left, top, right, bottom = box
    ok = np.isfinite(px) & np.isfinite(py)
    keep = ok[:-1] & ok[1:]  # segments with both ends present; a NaN breaks the line
    x0, y0, dx, dy = px[:-1][keep], py[:-1][keep], np.diff(px)[keep], np.diff(py)[keep]
    # One sample per pixel of each segment's longer side, so the line has no holes.
    n = np.maximum(np.ceil(np.maximum(np.abs(dx), np.abs(dy))).astype(np.int64), 1)
    seg = np.repeat(np.arange(len(n)), n)
    t = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n, n)
    xs = np.concatenate([x0[seg] + t * dx[seg], px[ok]])  # the points themselves too (isolated ones)
    ys = np.concatenate([y0[seg] + t * dy[seg], py[ok]])
    xs, ys = np.rint(xs).astype(np.int64), np.rint(ys).astype(np.int64)
    for ox, oy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = xs + ox, ys + oy
        inside = (cx >= left) & (cx <= right) & (cy >= top) & (cy <= bottom)
        canvas[cy[inside], cx[inside]] = color


def _range(values: List[np.ndarray]) -> Tuple[float, float]:
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.empty(0)
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _unit(values: List[np.ndarray]) -> float:
    """A power of two within a factor 2 of the largest finite magnitude among ``values`` (1 when
    there is none, or it is 0): dividing by it and multiplying back is exact."""
    finite = [np.abs(v[np.isfinite(v)]).max() for v in values if np.isfinite(v).any()]
    largest = float(max(finite)) if finite else 0.0
    return math.ldexp(1.0, math.frexp(largest)[1] - 1) if largest > 0 else 1.0


def render_curves(series: Mapping[str, Points], title: Optional[str] = None, size: Tuple[int, int] = (640, 400),
                  log_y: bool = False) -> np.ndarray:
    """Rasterise line plots of ``{name: [(x, y), ...]}`` into a uint8 ``[H, W, 3]`` RGB array.

    ``size`` is ``(width, height)`` in pixels. Non-finite points (and, with ``log_y``,
    non-positive y) are left out and break the line. Series take the :data:`COLORS` in order.
    """
    if not series:
        raise ValueError("series must hold at least one curve, got none")
    width, height = int(size[0]), int(size[1])
    data: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for name, points in series.items():
        arr = np.asarray(points, dtype=np.float64) if len(points) else np.empty((0, 2))
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"series {name!r} must be a sequence of (x, y) points, got shape {arr.shape}")
        x, y = arr[:, 0].copy(), arr[:, 1].copy()
        if log_y:
            with np.errstate(divide="ignore", invalid="ignore"):
                y = np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
        data[str(name)] = (x, y)
    # Each axis is laid out in units of its largest finite magnitude, so that spans and paddings
    # of values near the float64 limit (1e308) do not overflow to inf; labels show real values.
    x_unit, y_unit = (_unit([v[k] for v in data.values()]) for k in (0, 1))
    data = {name: (x / x_unit, y / y_unit) for name, (x, y) in data.items()}
    (x_lo, x_hi), (y_lo, y_hi) = _range([x for x, _ in data.values()]), _range([y for _, y in data.values()])
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    y_ticks = np.linspace(y_lo, y_hi, 5)
    with np.errstate(over="ignore"):  # (a padded end past 1.8e308 is labelled inf)
        y_labels = [_tick_label(10 ** (v * y_unit) if log_y else v * y_unit) for v in y_ticks]
    x_ticks = np.linspace(x_lo, x_hi, 5)

    legend_rows = len(data)
    left = max(text_width(s) for s in y_labels) + 14
    top = 2 * _LINE if title else _LINE
    right, bottom = width - 1 - max(12, text_width(_tick_label(x_hi * x_unit)) // 2 + 2), \
        height - 1 - (2 * _LINE + legend_rows * _LINE)
    if right - left < 20 or bottom - top < 20:
        raise ValueError(f"size {size} is too small for a plot with {len(data)} curves")
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    for tick, label in zip(y_ticks, y_labels):
        row = int(round(to_px(x_lo, tick)[1]))
        canvas[row, left:right + 1] = _GRID
        draw_text(canvas, left - 6 - text_width(label), row - 5 * _SCALE // 2, label)
    for tick in x_ticks:
        col = int(round(to_px(tick, y_lo)[0]))
        canvas[top:bottom + 1, col] = _GRID
        label = _tick_label(tick * x_unit)
        draw_text(canvas, col - text_width(label) // 2, bottom + _SCALE * 2, label)
    canvas[top, left:right + 1] = canvas[bottom, left:right + 1] = _AXES
    canvas[top:bottom + 1, left] = canvas[top:bottom + 1, right] = _AXES

    for i, (name, (x, y)) in enumerate(data.items()):
        color = COLORS[i % len(COLORS)]
        if len(x):
            px, py = to_px(x, y)
            _draw_polyline(canvas, px, py, (left + 1, top + 1, right - 1, bottom - 1), color)
        # The colour key: a swatch and the name, one row per curve below the x tick labels.
        ky = bottom + 2 * _LINE + i * _LINE
        canvas[ky + 2:ky + 8, left:left + 20] = color
        draw_text(canvas, left + 26, ky, name)
    if title:
        draw_text(canvas, (width - text_width(title)) // 2, _LINE // 3, title)
    return canvas


def plot_curves(series: Mapping[str, Points], path: PathLike, title: Optional[str] = None,
                size: Tuple[int, int] = (640, 400), log_y: bool = False) -> Path:
    """Write a PNG line plot of ``{name: [(x, y), ...]}`` to ``path``; see :func:`render_curves`."""
    return write_png(render_curves(series, title=title, size=size, log_y=log_y), path)


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """The mean of the last ``window`` values at every position (fewer at the start).

    NaN and infinite values are left out of the means of the windows that hold them (NaN where
    a window holds no finite value): a diverged step gaps its own windows, not the rest of the
    curve, as a running sum would.
    """
    window = check_int("window", window, minimum=1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not len(v):
        return []
    finite = np.isfinite(v)
    kernel = np.ones(min(int(window), len(v)))
    # Sums over each window by convolution, not as differences of one running sum: an inf or a
    # NaN there, or a huge value's rounding, would carry into every later position. Where a
    # window's sum could overflow (values near 1e308), they are summed in units of the largest
    # magnitude (only then: small values would underflow in them).
    unit = _unit([v])
    if unit * len(kernel) < 1e300:
        unit = 1.0
    sums = np.convolve(np.where(finite, v / unit, 0.0), kernel)[:len(v)]
    counts = np.convolve(finite.astype(np.float64), kernel)[:len(v)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1) * unit, np.nan).tolist()
