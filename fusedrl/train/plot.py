"""Line plots of a run's metrics with matplotlib (Agg canvas: no display, no global backend change).

    line_plot({"loss": (steps, values)}, "plots/loss.png", title="train loss", xlabel="step")
    stage_figure({"loss": {"train": (steps, values)}, "lr": {...}}, "plots/overview.png", title="sft")

Noisy series (RL rewards, per-step losses) are drawn twice: the raw values faint behind, an
exponential moving average (`ema`, TensorBoard's debiased form) on top. Whether a series is noisy
is decided by `is_noisy`, or forced with `smooth=`. Non-finite values break the line.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

# Colour-blind-friendly palette (Okabe-Ito), RGB.
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0)]
DPI = 100
SMOOTHING = 0.8  # EMA weight of the past (TensorBoard's slider value)
_NOISY_MIN_POINTS = 10
_NOISY_ROUGHNESS = 0.1

Series = Tuple[Sequence[float], Sequence[float]]


def _color(i: int) -> Tuple[float, float, float]:
    r, g, b = PALETTE[i % len(PALETTE)]
    return (r / 255, g / 255, b / 255)


def ema(values: Sequence[float], weight: float = SMOOTHING) -> np.ndarray:
    """Debiased exponential moving average; non-finite inputs stay NaN and do not enter the average.

    out[i] = avg[i] / (1 - weight ** n_i), avg[i] = weight * avg + (1 - weight) * values[i], with n_i the
    finite values seen so far (so the first point equals the first value, not a value pulled to 0).
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight: expected a value in [0, 1), got {weight!r}")
    values = np.asarray(values, dtype=float)
    out = np.full(values.shape, np.nan)
    avg, seen = 0.0, 0
    for i, value in enumerate(values):
        if math.isfinite(value):
            avg, seen = weight * avg + (1.0 - weight) * value, seen + 1
            out[i] = avg / (1.0 - weight ** seen)
    return out


def is_noisy(values: Sequence[float]) -> bool:
    """True when a series jumps around more than it trends: mean |step-to-step change| over the range
    exceeds 0.1 (a monotone curve of n points scores 1 / (n - 1)). Short series (< 10 finite points)
    are never smoothed."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < _NOISY_MIN_POINTS:
        return False
    spread = float(values.max() - values.min())
    return spread > 0 and float(np.abs(np.diff(values)).mean()) / spread > _NOISY_ROUGHNESS


def _check(series: Dict[str, Series], name: str = "series") -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    data = {}
    for key, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if xs.shape != ys.shape:
            raise ValueError(f"{name}[{key!r}]: xs and ys differ in length ({xs.size} vs {ys.size})")
        data[key] = (xs, np.where(np.isfinite(ys), ys, np.nan))
    return data


def _draw(ax, data: Dict[str, Tuple[np.ndarray, np.ndarray]], smooth: Optional[bool]) -> None:
    """Draw each series on `ax`: a marker for a lone point, raw faint behind its EMA when smoothed."""
    legend = len(data) > 1
    for i, (name, (xs, ys)) in enumerate(data.items()):
        color = _color(i)
        if np.isfinite(ys).sum() == 1:
            ax.plot(xs, ys, "o", color=color, label=name)
        elif smooth if smooth is not None else is_noisy(ys):
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
            ax.plot(xs, ema(ys), color=color, linewidth=2, label=f"{name} (EMA {SMOOTHING})")
            legend = True
        else:
            ax.plot(xs, ys, color=color, linewidth=2, label=name)
    ax.grid(True, color=(0.88, 0.88, 0.88))
    ax.set_axisbelow(True)
    if legend:
        ax.legend(loc="best", fontsize="small", frameon=False)


def _save(fig, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def line_plot(
    series: Dict[str, Series],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "step",
    size: Tuple[int, int] = (640, 400),
    smooth: Optional[bool] = None,
) -> Path:
    """Write a PNG line plot of one or more (xs, ys) series.

    Args:
        series: legend name -> (xs, ys), equal lengths; non-finite ys break the line.
        path: the .png file to write (parent folders are created).
        title: drawn at the top.
        xlabel: drawn under the x axis.
        size: (width, height) in pixels.
        smooth: draw the EMA over faint raw values (True), raw only (False), or decide per series (None).
    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    data = _check(series)
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    _draw(ax, data, smooth)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _save(fig, path)


# Overview panel geometry (inches): each panel is a cell of PANEL_SIZE; its axes keep these margins
# inside the cell (tick labels left, x label below, title above), so a cell crops out as its own plot.
PANEL_SIZE = (4.2, 2.9)
_PANEL_MARGINS = {"left": 0.7, "right": 0.15, "bottom": 0.5, "top": 0.35}
_TITLE_BAND = 0.4


def stage_figure(
    panels: Dict[str, Dict[str, Series]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "step",
    columns: int = 3,
    panel_paths: Optional[Dict[str, str | Path]] = None,
) -> Path:
    """Write one PNG with a panel per metric (the stage's overview figure in report.md).

    The figure is drawn once; `panel_paths` names panels to also write as their own PNGs, cut
    from the drawn figure (a cell of PANEL_SIZE inches each), which costs a crop and an encode
    instead of a second figure per metric.

    Args:
        panels: panel title -> {legend name -> (xs, ys)} (e.g. {"loss": {"train": ..., "eval": ...}}).
        path: the .png file to write.
        title: the figure's title.
        columns: panels per row (fewer when there are fewer panels).
        panel_paths: panel title -> .png file for that panel alone (keys must be panel titles).
    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("panels: expected at least one metric to draw")
    if columns < 1:
        raise ValueError(f"columns: expected >= 1, got {columns!r}")
    unknown = sorted(set(panel_paths or {}) - set(panels))
    if unknown:
        raise ValueError(f"panel_paths: {unknown} are not panel titles")
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    (cell_w, cell_h), band = PANEL_SIZE, _TITLE_BAND
    width, height = cell_w * cols, cell_h * rows + band
    fig = Figure(figsize=(width, height), dpi=DPI)
    m = _PANEL_MARGINS
    cells = {}
    for i, (name, series) in enumerate(panels.items()):
        row, col = divmod(i, cols)
        x0, y0 = col * cell_w, height - band - (row + 1) * cell_h  # the cell's lower left, inches
        ax = fig.add_axes(((x0 + m["left"]) / width, (y0 + m["bottom"]) / height,
                           (cell_w - m["left"] - m["right"]) / width, (cell_h - m["bottom"] - m["top"]) / height))
        _draw(ax, _check(series, f"panels[{name!r}]"), None)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel(xlabel, fontsize="small")
        cells[name] = (x0, band + row * cell_h)  # the cell's upper left, inches from the top
    if title:
        fig.suptitle(title, y=1.0 - 0.1 / height, va="top")
    out = _save(fig, path)
    if panel_paths:
        _save_cells(fig, {name: (cells[name], p) for name, p in panel_paths.items()}, (cell_w, cell_h))
    return out


def _save_cells(fig, cells, cell_size: Tuple[float, float]) -> None:
    """Write each ((left, top) inches, path) cell of the drawn `fig` as its own RGB PNG."""
    from PIL import Image

    canvas = fig.canvas
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    for (left, top), cell_path in cells.values():
        box = [round(v * DPI) for v in (left, top, left + cell_size[0], top + cell_size[1])]
        cell_path = Path(cell_path)
        cell_path.parent.mkdir(parents=True, exist_ok=True)
        image.crop(box).convert("RGB").save(cell_path)


def read_png(path: str | Path) -> np.ndarray:
    """A PNG as an (H, W, 3) uint8 RGB array (alpha dropped); for tests and checks."""
    from matplotlib.image import imread

    path = Path(path)
    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    image = imread(path)
    if image.dtype != np.uint8:
        image = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3].copy()
