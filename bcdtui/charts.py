"""Terminal charts as plain functions of data -> rich Text lines: braille line charts (2x4 dots per cell, any
number of overlaid series, downsampled per pixel column so 10,000 points draw as fast as 100) and heat maps
(half blocks: two matrix rows per terminal line). The widgets in bcdtui.widgets only call these."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from rich.text import Text

PALETTE = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292", "#a1887f",
           "#90a4ae")
_BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row][col] within a 2x4 cell


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str = PALETTE[0]


def faded(color: str, keep: float = 0.45) -> str:
    """`#rrggbb` moved towards black (`keep` of its brightness): a raw curve drawn under its smoothed one."""
    try:
        r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    except (ValueError, IndexError):
        return color
    return "#{:02x}{:02x}{:02x}".format(*(round(c * keep) for c in (r, g, b)))


LIMIT = 1e300  # values are clipped here: spans of finite float64 values (a diverged loss) must not overflow


def _clip(value: float) -> float:
    return max(-LIMIT, min(LIMIT, value))


def _exp10(value: float) -> float:
    return 10.0 ** value if value < 308 else math.inf


def nice_number(value: float, width: int = 8) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 1e5 or mag < 1e-3:
        text = f"{value:.2e}"
    elif mag >= 100:
        text = f"{value:.0f}"
    elif mag >= 1:
        text = f"{value:.3g}"
    else:
        text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text[:width]


def _downsample(xs: list[float], ys: list[float], x0: float, x1: float, columns: int):
    """Keep, per pixel column, the first, min, max and last points (shape and spikes survive)."""
    if len(xs) <= 4 * columns or x1 <= x0:
        return list(zip(xs, ys))
    buckets: dict[int, list[tuple[float, float]]] = {}
    scale = (columns - 1) / (x1 - x0)
    for x, y in zip(xs, ys):
        buckets.setdefault(int((x - x0) * scale), []).append((x, y))
    out = []
    for key in sorted(buckets):
        pts = buckets[key]
        chosen = {0, len(pts) - 1, min(range(len(pts)), key=lambda i: pts[i][1]),
                  max(range(len(pts)), key=lambda i: pts[i][1])}
        out.extend(pts[i] for i in sorted(chosen))
    return out


def line_chart(series: Sequence[Series], width: int, height: int, *, log_y: bool = False,
               x_label: str = "", y_label: str = "", legend: bool = True) -> list[Text]:
    """`height` lines of `width` cells: y tick labels, a braille plot area, an x axis with tick labels and,
    when there are several series (or `legend`), a legend line."""
    width, height = max(20, width), max(4, height)
    clean: list[tuple[Series, list[float], list[float]]] = []
    for s in series:
        pts = [(_clip(float(x)), _clip(float(y))) for x, y in zip(s.xs, s.ys)
               if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
               and (not log_y or y > 0)]
        clean.append((s, [p[0] for p in pts], [math.log10(p[1]) if log_y else p[1] for p in pts]))
    show_legend = legend and any(s.label for s, _, _ in clean)
    rows = height - 2 - (1 if show_legend else 0)
    all_x = [x for _, xs, _ in clean for x in xs]
    all_y = [y for _, _, ys in clean for y in ys]
    lines: list[Text] = []
    if not all_x or rows < 2:
        msg = "no data yet" if not all_x else ""
        lines = [Text(" " * width) for _ in range(height)]
        if msg:
            lines[height // 2] = Text(msg.center(width), style="dim")
        return lines
    x0, x1 = min(all_x), max(all_x)
    y0, y1 = min(all_y), max(all_y)
    if x1 == x0:
        pad = abs(x0) * 0.05 or 0.5  # relative: x0 +- 0.5 is x0 again for a huge x0
        x0, x1 = x0 - pad, x1 + pad
    if y1 == y0:
        pad = abs(y0) * 0.05 or 0.5
        y0, y1 = y0 - pad, y1 + pad
    label_w = max(len(nice_number(_exp10(v) if log_y else v)) for v in (y0, y1, (y0 + y1) / 2)) + 1
    label_w = min(max(label_w, 5), 10)
    cols = width - label_w - 1
    px_w, px_h = cols * 2, rows * 4
    bits = [[0] * cols for _ in range(rows)]
    color = [[""] * cols for _ in range(rows)]

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = round((x - x0) / (x1 - x0) * (px_w - 1))
        py = round((y1 - y) / (y1 - y0) * (px_h - 1))
        return px, py

    def plot(px: int, py: int, c: str) -> None:
        if 0 <= px < px_w and 0 <= py < px_h:
            cx, cy = px >> 1, py >> 2
            bits[cy][cx] |= _BRAILLE_BITS[py & 3][px & 1]
            color[cy][cx] = c

    for s, xs, ys in clean:
        pts = _downsample(xs, ys, x0, x1, px_w)
        prev = None
        for x, y in pts:
            cur = to_px(x, y)
            if prev is None:
                plot(*cur, s.color)
            else:
                (ax, ay), (bx, by) = prev, cur
                steps = max(abs(bx - ax), abs(by - ay), 1)
                for i in range(1, steps + 1):
                    plot(ax + (bx - ax) * i // steps, ay + (by - ay) * i // steps, s.color)
            prev = cur

    ticks = {0: y1, rows - 1: y0}
    if rows >= 5:
        ticks[(rows - 1) // 2] = (y0 + y1) / 2
    for r in range(rows):
        line = Text()
        label = nice_number(_exp10(ticks[r]) if log_y else ticks[r], label_w - 1) if r in ticks else ""
        line.append(label.rjust(label_w - 1) + " ", style="dim")
        line.append("┤" if r in ticks else "│", style="dim")
        run_color, run = None, []
        for cx in range(cols):
            ch = chr(0x2800 + bits[r][cx]) if bits[r][cx] else " "
            c = color[r][cx] or None
            if c != run_color and run:
                line.append("".join(run), style=run_color)
                run = []
            run_color = c
            run.append(ch)
        if run:
            line.append("".join(run), style=run_color)
        lines.append(line)
    lines.append(Text(" " * label_w + "└" + "─" * cols, style="dim"))
    left, right = nice_number(x0), nice_number(x1)
    mid = f" {x_label} " if x_label else ""
    tick_line = " " * (label_w + 1) + left
    space = width - len(tick_line) - len(right)
    if space > len(mid) + 2:
        pad = space - len(mid)
        tick_line += " " * (pad // 2) + mid + " " * (pad - pad // 2) + right
    elif space > 0:
        tick_line += " " * space + right
    lines.append(Text(tick_line[:width], style="dim"))
    if show_legend:
        legend_line = Text()
        named = [s for s, _, _ in clean if s.label]  # an unlabelled series (a raw curve under its EMA) has none
        room = max(6, (width - (8 if log_y else 0)) // max(1, len(named)) - 4)
        for s in named:
            label = s.label if len(s.label) <= room else s.label[:room - 1] + "…"
            if legend_line.cell_len + len(label) + 4 > width:
                break
            legend_line.append("━ ", style=s.color)
            legend_line.append(label + "  ")
        if log_y:
            legend_line.append("(log y)", style="dim")
        lines.append(legend_line)
    return lines[:height]


# ----------------------------------------------------------------------------------------------------------
# heat maps

_STOPS = ((0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
          (1.0, (253, 231, 37)))  # viridis


def colormap(t: float) -> str:
    if not math.isfinite(t):
        return "#000000"
    t = min(1.0, max(0.0, t))
    for (t0, c0), (t1, c1) in zip(_STOPS, _STOPS[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            r, g, b = (round(a + (b_ - a) * f) for a, b_ in zip(c0, c1))
            return f"#{r:02x}{g:02x}{b:02x}"
    return "#fde725"


def as_matrix(value) -> list[list[float]] | None:
    """A measurement value as rows of floats (a number -> 1x1, a list -> 1xN), or None."""
    def num(v) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return [[num(value)]]
    if isinstance(value, list) and value:
        if all(isinstance(r, list) for r in value):
            return [[num(v) for v in r] for r in value]
        return [[num(v) for v in value]]
    return None


def heat_map(matrix: list[list[float]], width: int, height: int) -> list[Text]:
    """The matrix resampled (nearest) to fit width x (2*height) cells, with a min/max scale line."""
    rows_n, cols_n = len(matrix), max((len(r) for r in matrix), default=0)
    if not rows_n or not cols_n or height < 2:
        return [Text("no data")]
    matrix = [[_clip(v) if math.isfinite(v) else math.nan for v in r] for r in matrix]
    finite = [v for r in matrix for v in r if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = (hi - lo) or 1.0
    out_w = min(width, cols_n * max(1, min(4, width // cols_n)))
    out_h = min((height - 1) * 2, rows_n * max(1, min(4, (height - 1) * 2 // rows_n)))
    out_h += out_h % 2

    def at(y: int, x: int) -> float:
        r = matrix[min(rows_n - 1, y * rows_n // out_h)]
        c = x * cols_n // out_w
        return r[c] if c < len(r) else math.nan

    lines = []
    for y in range(0, out_h, 2):
        line = Text()
        for x in range(out_w):
            top = colormap((at(y, x) - lo) / span)
            bottom = colormap((at(y + 1, x) - lo) / span) if y + 1 < out_h else "#000000"
            line.append("▀", style=f"{top} on {bottom}")
        lines.append(line)
    scale = Text(f"{nice_number(lo)} ", style="dim")
    for i in range(8):
        scale.append("█", style=colormap(i / 7))
    scale.append(f" {nice_number(hi)}  ({rows_n}x{cols_n})", style="dim")
    lines.append(scale)
    return lines


def sparkline(values: Sequence[float], width: int) -> str:
    vals = [_clip(v) for v in values if math.isfinite(v)][-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[int((v - lo) / (hi - lo) * 7) if hi > lo else 3] for v in vals)
