"""Inline SVG charts for the HTML report: axes, ticks, labels and a legend; no libraries, no scripts, no URLs."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442")
WIDTH, HEIGHT = 560, 300
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 30, 44
LEGEND_WIDTH = 150


@dataclass(frozen=True)
class Series:
    """A line: (x, y) points joined in the order given."""

    label: str
    points: Sequence[tuple[float, float]]


@dataclass(frozen=True)
class Point:
    """One labelled dot of a scatter chart; points of the same group share a colour and a legend entry."""

    label: str
    x: float
    y: float
    group: str


@dataclass(frozen=True)
class Box:
    """The plot area in pixels (SVG y grows downwards)."""

    left: float
    top: float
    right: float
    bottom: float


@dataclass(frozen=True)
class Scale:
    """Maps data values in [lo, hi] to pixels in [start, end], linearly or by log10."""

    lo: float
    hi: float
    start: float
    end: float
    log: bool = False

    def _unit(self, value: float) -> float:
        f = math.log10 if self.log else float
        return (f(value) - f(self.lo)) / (f(self.hi) - f(self.lo))

    def __call__(self, value: float) -> float:
        return self.start + self._unit(value) * (self.end - self.start)

    def ticks(self) -> list[float]:
        return log_ticks(self.lo, self.hi) if self.log else linear_ticks(self.lo, self.hi)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def nice_step(span: float, target: int = 5) -> float:
    """A 1, 2 or 5 x 10^k step that cuts span into about `target` intervals."""
    raw = span / target
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))


def linear_ticks(lo: float, hi: float) -> list[float]:
    step = nice_step(hi - lo)
    # integer multiples of the step, so ticks do not drift by float accumulation
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(n * step, 12) for n in range(first, last + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten; with two decades or fewer, also 2x and 5x each power; within one, linear steps."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    multiples = (1, 2, 5) if last - first <= 2 else (1,)
    ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in multiples]
    ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return ticks if len(ticks) >= 2 else linear_ticks(lo, hi)


def linear_domain(values: Iterable[float], pad: float = 0.05) -> tuple[float, float]:
    """[lo, hi] covering the values with `pad` of the span spare on each side, widened to whole tick steps."""
    values = list(values)
    lo, hi = min(values), max(values)
    if lo == hi:  # one value: an axis around it
        width = abs(lo) * 0.1 or 1.0
        lo, hi = lo - width, hi + width
    else:
        margin = (hi - lo) * pad
        # the margin must not invent a sign the data does not have (a speed axis reaching below zero)
        lo = max(lo - margin, 0.0) if lo >= 0 else lo - margin
        hi = min(hi + margin, 0.0) if hi <= 0 else hi + margin
    step = nice_step(hi - lo)
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step


def log_domain(values: Iterable[float], pad: float = 0.05) -> tuple[float, float]:
    """[lo, hi] covering the (positive) values with `pad` of the span in decades spare on each side."""
    values = list(values)
    lo, hi = math.log10(min(values)), math.log10(max(values))
    margin = max((hi - lo) * pad, 0.1)  # a single value still gets an axis around it
    return 10.0 ** (lo - margin), 10.0 ** (hi + margin)


def format_tick(value: float, digits: int = 3) -> str:
    """Short axis labels: 20k, 1.5M, 0.25."""
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor:
            return f"{value / divisor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def tick_labels(values: Sequence[float]) -> list[str]:
    """Labels with the fewest significant digits (3 or more) that tell every tick apart."""
    for digits in range(3, 13):
        labels = [format_tick(v, digits) for v in values]
        if len(set(labels)) == len(labels):
            break
    return labels


def _box(legend: bool) -> Box:
    right = WIDTH - MARGIN_RIGHT - (LEGEND_WIDTH if legend else 0)
    return Box(MARGIN_LEFT, MARGIN_TOP, right, HEIGHT - MARGIN_BOTTOM)


def _scale(values: list[float], start: float, end: float, log: bool, pad: float = 0.05) -> Scale:
    if not values:
        lo, hi = (1.0, 10.0) if log else (0.0, 1.0)
    else:
        lo, hi = log_domain(values, pad) if log else linear_domain(values, pad)
    return Scale(lo, hi, start, end, log)


def _axes(box: Box, x: Scale, y: Scale, x_label: str, y_label: str) -> list[str]:
    """Plot box, grid lines and tick labels on both axes, and the axis titles."""
    parts = [f'<rect class="plot-box" x="{box.left:.1f}" y="{box.top:.1f}" width="{box.right - box.left:.1f}" '
             f'height="{box.bottom - box.top:.1f}" fill="none" stroke="#888"/>']
    for value, label in zip(x.ticks(), tick_labels(x.ticks())):
        px = x(value)
        parts.append(f'<line class="grid" x1="{px:.1f}" y1="{box.top:.1f}" x2="{px:.1f}" y2="{box.bottom:.1f}" '
                     f'stroke="#e3e3e3"/>')
        parts.append(f'<text class="tick x-tick" x="{px:.1f}" y="{box.bottom + 14:.1f}" text-anchor="middle">'
                     f'{_esc(label)}</text>')
    for value, label in zip(y.ticks(), tick_labels(y.ticks())):
        py = y(value)
        parts.append(f'<line class="grid" x1="{box.left:.1f}" y1="{py:.1f}" x2="{box.right:.1f}" y2="{py:.1f}" '
                     f'stroke="#e3e3e3"/>')
        parts.append(f'<text class="tick y-tick" x="{box.left - 6:.1f}" y="{py + 4:.1f}" text-anchor="end">'
                     f'{_esc(label)}</text>')
    mid_x, mid_y = (box.left + box.right) / 2, (box.top + box.bottom) / 2
    parts.append(f'<text class="axis-label" x="{mid_x:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
                 f'{_esc(x_label)}</text>')
    parts.append(f'<text class="axis-label" x="14" y="{mid_y:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {mid_y:.1f})">{_esc(y_label)}</text>')
    return parts


def _legend(box: Box, entries: Sequence[tuple[str, str, str]]) -> list[str]:
    """One swatch and label per (label, colour, "line" | "dashed" | "dot") entry, right of the plot box."""
    parts = ['<g class="legend">']
    for i, (label, colour, swatch) in enumerate(entries):
        y = box.top + 8 + 18 * i
        if swatch == "dot":
            parts.append(f'<circle cx="{box.right + 22:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}"/>')
        else:
            dash = ' stroke-dasharray="5 3"' if swatch == "dashed" else ""
            parts.append(f'<line x1="{box.right + 12:.1f}" y1="{y:.1f}" x2="{box.right + 32:.1f}" y2="{y:.1f}" '
                         f'stroke="{colour}" stroke-width="3"{dash}/>')
        parts.append(f'<text class="legend-label" x="{box.right + 38:.1f}" y="{y + 4:.1f}">{_esc(label)}</text>')
    return parts + ["</g>"]


def _svg(title: str, parts: list[str], note: str = "") -> str:
    text = f'<text class="note" x="{WIDTH / 2:.1f}" y="{HEIGHT / 2:.1f}" text-anchor="middle">{_esc(note)}</text>' \
        if note else ""
    return (f'<svg class="plot" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label="{_esc(title)}" font-family="sans-serif" font-size="11">'
            f'<title>{_esc(title)}</title>'
            f'<text class="chart-title" x="{MARGIN_LEFT}" y="18" font-size="13" font-weight="bold">{_esc(title)}</text>'
            + "".join(parts) + text + "</svg>")


def _dot(x: float, y: float, colour: str, tooltip: str, radius: float = 3.5) -> str:
    return (f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{colour}">'
            f'<title>{_esc(tooltip)}</title></circle>')


def _usable(points: Iterable[tuple], log_x: bool) -> list[tuple]:
    """Finite points (positive x on a log axis); anything else cannot be placed."""
    return [p for p in points if _finite(p[0]) and _finite(p[1]) and (p[0] > 0 or not log_x)]


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str, log_x: bool = False,
               max_markers: int = 40) -> str:
    """Lines through each series' points; markers too when a series is short enough to show them."""
    cleaned = [(s.label, _usable(s.points, log_x)) for s in series]
    cleaned = [(label, pts) for label, pts in cleaned if pts]
    box = _box(legend=True)
    x = _scale([p[0] for _, pts in cleaned for p in pts], box.left, box.right, log_x, pad=0.0)
    y = _scale([p[1] for _, pts in cleaned for p in pts], box.bottom, box.top, False)
    parts = _axes(box, x, y, x_label, y_label)
    for i, (label, pts) in enumerate(cleaned):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{x(px):.1f},{y(py):.1f}" for px, py in pts)
        parts.append(f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" stroke-width="1.8">'
                     f'<title>{_esc(label)}</title></polyline>')
        if len(pts) <= max_markers:
            parts += [_dot(x(px), y(py), colour, f"{label}: {format_tick(px)}, {py:.4g}", 2.5) for px, py in pts]
    parts += _legend(box, [(label, PALETTE[i % len(PALETTE)], "line") for i, (label, _) in enumerate(cleaned)])
    return _svg(title, parts, "" if cleaned else "no data")


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both axes: lower x (size, latency) and higher y (quality)."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.x, -p.y)):
        if not front or p.y > front[-1].y:
            front.append(p)
    return front


def scatter_chart(points: Sequence[Point], *, title: str, x_label: str, y_label: str, log_x: bool = False,
                  frontier: bool = True, y_reference: Optional[tuple[float, str]] = None) -> str:
    """Labelled dots coloured by group, the Pareto frontier dashed, and an optional horizontal reference line."""
    usable = [p for p in points if _usable([(p.x, p.y)], log_x)]
    groups = list(dict.fromkeys(p.group for p in usable))
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    box = _box(legend=True)
    ys = [p.y for p in usable] + ([y_reference[0]] if y_reference and usable else [])
    x = _scale([p.x for p in usable], box.left, box.right, log_x)
    y = _scale(ys, box.bottom, box.top, False)
    parts = _axes(box, x, y, x_label, y_label)
    if y_reference and usable:
        ref_y = y(y_reference[0])
        parts.append(f'<line class="reference" x1="{box.left:.1f}" y1="{ref_y:.1f}" x2="{box.right:.1f}" '
                     f'y2="{ref_y:.1f}" stroke="#999" stroke-dasharray="2 3"><title>{_esc(y_reference[1])}</title>'
                     f'</line>')
    front = pareto_front(usable) if frontier else []
    if len(front) > 1:
        # a staircase: from each frontier point, right at its quality, then up to the next
        steps = [(front[0].x, front[0].y)]
        for p in front[1:]:
            steps += [(p.x, steps[-1][1]), (p.x, p.y)]
        coords = " ".join(f"{x(px):.1f},{y(py):.1f}" for px, py in steps)
        parts.append(f'<polyline class="frontier" points="{coords}" fill="none" stroke="#555" '
                     f'stroke-dasharray="5 3"/>')
    for p in usable:
        px, py = x(p.x), y(p.y)
        parts.append(_dot(px, py, colour[p.group], f"{p.label}: {format_tick(p.x)}, {p.y:.4g}", 4.5))
        parts.append(f'<text class="point-label" x="{px + 7:.1f}" y="{py - 6:.1f}">{_esc(p.label)}</text>')
    entries = [(g, colour[g], "dot") for g in groups]
    parts += _legend(box, entries + ([("Pareto frontier", "#555", "dashed")] if len(front) > 1 else []))
    return _svg(title, parts, "" if usable else "no data")


def calibration_bins(data: dict) -> list[dict]:
    """The bins of a calibration record that hold tokens and a confidence and accuracy to place."""
    bins = data.get("bins") if isinstance(data.get("bins"), list) else []
    return [b for b in bins if isinstance(b, dict) and _finite(b.get("count")) and b["count"] > 0
            and _finite(b.get("confidence")) and _finite(b.get("accuracy"))]


def reliability_diagram(models: dict[str, dict], *, title: str = "Calibration") -> str:
    """Accuracy against confidence per bin for each model, over the y = x line of perfect calibration.

    models maps a name to {"ece": float, "bins": [{"lo", "hi", "count", "confidence", "accuracy"}]};
    empty bins are skipped, and a dot's area grows with its bin's share of the tokens.
    """
    box = _box(legend=True)
    x = Scale(0.0, 1.0, box.left, box.right)
    y = Scale(0.0, 1.0, box.bottom, box.top)
    parts = _axes(box, x, y, "confidence (probability of the top token)", "accuracy")
    parts.append(f'<line class="diagonal" x1="{x(0):.1f}" y1="{y(0):.1f}" x2="{x(1):.1f}" y2="{y(1):.1f}" '
                 f'stroke="#999" stroke-dasharray="5 3"><title>perfect calibration</title></line>')
    entries, plotted = [], 0
    for i, (name, data) in enumerate(models.items()):
        colour = PALETTE[i % len(PALETTE)]
        bins = calibration_bins(data)
        total = sum(b["count"] for b in bins) or 1
        coords = " ".join(f"{x(b['confidence']):.1f},{y(b['accuracy']):.1f}" for b in bins)
        parts.append(f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for b in bins:
            tip = (f"{name}: bin {b.get('lo', '?')}-{b.get('hi', '?')}, {b['count']} tokens, "
                   f"confidence {b['confidence']:.3f}, accuracy {b['accuracy']:.3f}")
            parts.append(_dot(x(b["confidence"]), y(b["accuracy"]), colour, tip, 2 + 6 * math.sqrt(b["count"] / total)))
        ece = data.get("ece")
        entries.append((f"{name} (ECE {ece:.3f})" if _finite(ece) else name, colour, "line"))
        plotted += len(bins)
    entries.append(("perfect calibration", "#999", "dashed"))
    parts += _legend(box, entries)
    return _svg(title, parts, "" if plotted else "no data")


def stacked_bar(parts_in: Sequence[tuple[str, float]], *, title: str) -> str:
    """One horizontal bar split into parts proportional to their values (e.g. wins, ties, losses)."""
    total = sum(v for _, v in parts_in if _finite(v) and v > 0)
    height, left, right = 90, 16, WIDTH - 16
    parts, offset = [], left
    for i, (label, value) in enumerate(parts_in):
        if not (_finite(value) and value > 0 and total):
            continue
        width = (right - left) * value / total
        colour = PALETTE[i % len(PALETTE)]
        share = f"{label}: {value:g} ({100 * value / total:.1f}%)"
        parts.append(f'<rect class="bar" x="{offset:.1f}" y="28" width="{width:.1f}" height="24" fill="{colour}">'
                     f'<title>{_esc(share)}</title></rect>')
        # labels in a row of their own: a thin part's label would not fit on its bar
        parts.append(f'<rect x="{left + 180 * i}" y="62" width="10" height="10" fill="{colour}"/>'
                     f'<text class="bar-label" x="{left + 180 * i + 14}" y="71">{_esc(share)}</text>')
        offset += width
    body = "".join(parts) if parts else f'<text class="note" x="{left}" y="44">no data</text>'
    return (f'<svg class="plot" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-label="{_esc(title)}" font-family="sans-serif" font-size="11"><title>{_esc(title)}</title>'
            f'<text class="chart-title" x="{left}" y="18" font-size="13" font-weight="bold">{_esc(title)}</text>'
            f'{body}</svg>')
