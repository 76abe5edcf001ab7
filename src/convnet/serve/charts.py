"""Plots as inline SVG, drawn on the server from stored numbers: no JavaScript, no image files,
nothing for the page's Content-Security-Policy to refuse. Every text that reaches the markup
(series names, titles) is escaped here.

    svg = line_chart({"train": [(1, 0.9), (2, 0.6)], "validation": [(1, 1.0), (2, 0.8)]},
                     title="loss", x_label="epoch")
"""

from __future__ import annotations

import math

from markupsafe import Markup, escape

WIDTH, HEIGHT = 420, 250  # the viewBox, in SVG units; the page scales it to the column
MARGIN = {"left": 46, "right": 12, "top": 28, "bottom": 38}
COLOURS = ("#2257c7", "#d9480f", "#2b8a3e", "#7048e8")  # one per series, in order
TICKS = 5  # about this many labelled values per axis
LEGEND_STEP = 90  # SVG units per legend entry, side by side right of the title


def nice_ticks(low: float, high: float, count: int = TICKS) -> list[float]:
    """Round values (1, 2 or 5 x 10^n apart) spanning [low, high]."""
    if not high > low:
        high = low + 1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [round(first + i * step, 10) for i in range(int(math.ceil((high - first) / step)) + 1)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str,
               x_label: str = "") -> Markup:
    """One SVG with a line per series (x, y points) and a legend; empty series are left out."""
    series = {name: points for name, points in series.items() if points}
    xs = [x for points in series.values() for x, _ in points] or [0.0, 1.0]
    ys = [y for points in series.values() for _, y in points] or [0.0, 1.0]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    left, top = MARGIN["left"], MARGIN["top"]
    plot_w = WIDTH - left - MARGIN["right"]
    plot_h = HEIGHT - top - MARGIN["bottom"]

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>",
             f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>']
    for y in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                     'class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">'
                     f"{_label(y)}</text>")
    for x in x_ticks:
        parts.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f"{_label(x)}</text>")
    parts.append(f'<text x="{left + plot_w / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
                 f"{escape(x_label)}</text>")
    for i, (name, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                     'stroke-width="2"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>'
                  for x, y in points]
        legend_x = left + plot_w - LEGEND_STEP * (len(series) - i)  # in the top margin
        legend_y = 16
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{legend_y - 4}" '
                     f'y2="{legend_y - 4}" stroke="{colour}" stroke-width="3"/>')
        parts.append(f'<text x="{legend_x + 24}" y="{legend_y}">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("\n".join(parts))
