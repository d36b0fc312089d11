"""Dependency-free PNG line plots (numpy + zlib): the run's metrics without matplotlib.

    line_plot({"loss": (steps, values)}, "plots/loss.png", title="train loss", xlabel="step")

Text uses a built-in 5x7 bitmap font (upper case, digits, a little punctuation),
enough for a title, tick labels and a legend. Non-finite values break the line.
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

# 5x7 glyphs, one 5-bit row per entry (bit 4 is the leftmost pixel).
_GLYPHS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000", "_": "00000 00000 00000 00000 00000 00000 11111",
    "/": "00000 00001 00010 00100 01000 10000 00000", ":": "00000 01100 01100 00000 01100 01100 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    "=": "00000 00000 11111 00000 11111 00000 00000", "%": "11000 11001 00010 00100 01000 10011 00011",
    ",": "00000 00000 00000 00000 01100 00100 01000", " ": "00000 00000 00000 00000 00000 00000 00000",
    "?": "01110 10001 00001 00010 00100 00000 00100",
}
_FONT = {ch: np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool) for ch, rows in _GLYPHS.items()}

# Colour-blind-friendly palette (Okabe-Ito), RGB.
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0)]
_GRID, _AXIS, _TEXT = (225, 225, 225), (60, 60, 60), (30, 30, 30)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image (8-bit truecolour, no filtering)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def draw_text(image: np.ndarray, text: str, x: int, y: int, color=_TEXT, scale: int = 1) -> int:
    """Draw `text` with its top-left corner at (x, y); returns the x after the last glyph."""
    for ch in text.upper():
        glyph = _FONT.get(ch, _FONT["?"])
        if scale > 1:
            glyph = glyph.repeat(scale, 0).repeat(scale, 1)
        h, w = glyph.shape
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, image.shape[0]), min(x + w, image.shape[1])
        if y1 > y0 and x1 > x0:
            image[y0:y1, x0:x1][glyph[y0 - y:y1 - y, x0 - x:x1 - x]] = color
        x += w + scale
    return x


def text_width(text: str, scale: int = 1) -> int:
    return len(text) * 6 * scale


def _draw_segment(image: np.ndarray, p0: Tuple[float, float], p1: Tuple[float, float], color, width: int) -> None:
    steps = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
    xs = np.rint(np.linspace(p0[0], p1[0], steps + 1)).astype(int)
    ys = np.rint(np.linspace(p0[1], p1[1], steps + 1)).astype(int)
    half = width // 2
    for dx in range(-half, width - half):
        for dy in range(-half, width - half):
            px, py = xs + dx, ys + dy
            keep = (px >= 0) & (px < image.shape[1]) & (py >= 0) & (py < image.shape[0])
            image[py[keep], px[keep]] = color


def nice_ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    """About `count` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.4g}"


def _draw_axes(image: np.ndarray, to_px, limits, box) -> None:
    """Grid lines and tick labels at round values, then the two axes."""
    x_lo, x_hi, y_lo, y_hi = limits
    left, right, top, bottom = box
    for tick in nice_ticks(y_lo, y_hi):
        _, py = to_px(x_lo, tick)
        image[int(round(py)), left:right] = _GRID
        label = _fmt(tick)
        draw_text(image, label, left - 6 - text_width(label), int(round(py)) - 3)
    for tick in nice_ticks(x_lo, x_hi):
        px, _ = to_px(tick, y_lo)
        image[top:bottom, int(round(px))] = _GRID
        label = _fmt(tick)
        draw_text(image, label, int(round(px)) - text_width(label) // 2, bottom + 6)
    image[top:bottom + 1, left] = _AXIS
    image[bottom, left:right + 1] = _AXIS


def line_plot(
    series: Dict[str, Tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "step",
    size: Tuple[int, int] = (640, 400),
) -> Path:
    """Write a PNG line plot of one or more (xs, ys) series.

    Args:
        series: legend name -> (xs, ys), equal lengths; non-finite ys break the line.
        path: the .png file to write (parent folders are created).
        title: drawn at the top.
        xlabel: drawn under the x axis.
        size: (width, height) in pixels.
    Returns:
        The path written.
    """
    width, height = size
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 72, width - 16, 34, height - 44
    data = {name: (np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)) for name, (xs, ys) in series.items()}
    for name, (xs, ys) in data.items():
        if xs.shape != ys.shape:
            raise ValueError(f"series[{name!r}]: xs and ys differ in length ({xs.size} vs {ys.size})")
    finite_x = np.concatenate([xs[np.isfinite(ys)] for xs, ys in data.values()] or [np.zeros(0)])
    finite_y = np.concatenate([ys[np.isfinite(ys)] for _, ys in data.values()] or [np.zeros(0)])
    x_lo, x_hi = (finite_x.min(), finite_x.max()) if finite_x.size else (0.0, 1.0)
    y_lo, y_hi = (finite_y.min(), finite_y.max()) if finite_y.size else (0.0, 1.0)
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = (y_hi - y_lo) * 0.05 if y_hi > y_lo else max(abs(y_lo) * 0.1, 0.5)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    _draw_axes(image, to_px, (x_lo, x_hi, y_lo, y_hi), (left, right, top, bottom))
    draw_text(image, title, (width - text_width(title, 2)) // 2, 8, scale=2)
    draw_text(image, xlabel, (left + right - text_width(xlabel)) // 2, bottom + 22)

    for i, (name, (xs, ys)) in enumerate(data.items()):
        color = PALETTE[i % len(PALETTE)]
        points = [to_px(x, y) if math.isfinite(y) else None for x, y in zip(xs, ys)]
        for a, b in zip(points, points[1:]):
            if a is not None and b is not None:
                _draw_segment(image, a, b, color, 2)
        if len(points) == 1 and points[0] is not None:
            _draw_segment(image, points[0], points[0], color, 5)
        if len(data) > 1:  # legend, top right inside the axes
            y = top + 6 + 12 * i
            x = right - 10 - text_width(name) - 16
            _draw_segment(image, (x, y + 3), (x + 10, y + 3), color, 3)
            draw_text(image, name, x + 16, y)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path


def read_png(path: str | Path) -> np.ndarray:
    """Decode a PNG written by `encode_png` (8-bit RGB, filter 0) back to (H, W, 3) uint8; for tests."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * 3)
    return rows[:, 1:].reshape(height, width, 3).copy()
