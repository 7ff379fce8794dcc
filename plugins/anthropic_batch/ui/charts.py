"""Small inline SVG charts (no JavaScript, no external assets: the page must work offline).

Each function returns ``markupsafe.Markup``; every text that goes into the SVG is escaped here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from markupsafe import Markup

WIDTH, HEIGHT = 560, 210
LEFT, RIGHT, TOP, BOTTOM = 60, 12, 14, 30
MAX_X_LABELS = 10


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value``."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10**exponent
        if candidate >= value:
            return candidate
    return 10 ** (exponent + 1)


def _frame(
    title: str, body: list[str], y_max: float, fmt: Callable[[float], str], labels: Sequence[str]
) -> str:
    plot_h = HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for i in range(5):
        value = y_max * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(value))}</text>'
        )
    band = (WIDTH - LEFT - RIGHT) / max(len(labels), 1)
    every = max(1, math.ceil(len(labels) / MAX_X_LABELS))
    for i, label in enumerate(labels):
        if i % every:
            continue
        x = LEFT + band * (i + 0.5)
        parts.append(
            f'<text class="axis" x="{x:.1f}" y="{HEIGHT - 10}" text-anchor="middle">{escape(label)}</text>'
        )
    parts.extend(body)
    parts.append("</svg>")
    return "".join(parts)


def _empty(title: str) -> Markup:
    return Markup(f'<div class="chart-empty" role="img" aria-label="{escape(title)}">No runs yet</div>')


def _short_date(date: str) -> str:
    return date[5:] if len(date) == 10 else date


def bar_chart(
    points: Sequence[dict[str, Any]],
    series: Sequence[tuple[str, str, str]],
    fmt: Callable[[float], str],
    title: str,
) -> Markup:
    """Grouped bars per point; ``series`` is ``(key, legend label, css class)``."""
    if not points:
        return _empty(title)
    values = [[float(p.get(key) or 0.0) for key, _, _ in series] for p in points]
    y_max = _nice_max(max((max(v) for v in values), default=0.0))
    plot_h = HEIGHT - TOP - BOTTOM
    band = (WIDTH - LEFT - RIGHT) / len(points)
    bar_w = min(28.0, band * 0.8 / len(series))
    body = []
    for i, (point, vals) in enumerate(zip(points, values, strict=True)):
        x0 = LEFT + band * (i + 0.5) - bar_w * len(series) / 2
        for j, ((_, label, css), value) in enumerate(zip(series, vals, strict=True)):
            h = plot_h * max(value, 0.0) / y_max
            tip = f"{point.get('date')} {label}: {fmt(value)}"
            body.append(
                f'<rect class="{escape(css)}" x="{x0 + j * bar_w:.1f}" y="{TOP + plot_h - h:.1f}" '
                f'width="{bar_w - 2:.1f}" height="{h:.1f}" rx="2">'
                f"<title>{escape(tip)}</title></rect>"
            )
    labels = [_short_date(str(p.get("date"))) for p in points]
    return Markup(_frame(title, body, y_max, fmt, labels))


def line_chart(
    points: Sequence[dict[str, Any]], key: str, fmt: Callable[[float], str], title: str, y_max: float = 1.0
) -> Markup:
    """A line through the points that have a value (a gap where one has none), with dots."""
    if not points:
        return _empty(title)
    plot_h = HEIGHT - TOP - BOTTOM
    band = (WIDTH - LEFT - RIGHT) / len(points)
    body, segment = [], []
    dots = []
    for i, point in enumerate(points):
        value = point.get(key)
        if value is None:
            if len(segment) > 1:
                body.append(f'<polyline class="line" points="{" ".join(segment)}"/>')
            segment = []
            continue
        x = LEFT + band * (i + 0.5)
        y = TOP + plot_h - plot_h * min(max(float(value), 0.0), y_max) / y_max
        segment.append(f"{x:.1f},{y:.1f}")
        dots.append(
            f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="3.5">'
            f"<title>{escape(str(point.get('date')))}: {escape(fmt(float(value)))}</title></circle>"
        )
    if len(segment) > 1:
        body.append(f'<polyline class="line" points="{" ".join(segment)}"/>')
    body.extend(dots)
    labels = [_short_date(str(p.get("date"))) for p in points]
    return Markup(_frame(title, body, y_max, fmt, labels))
