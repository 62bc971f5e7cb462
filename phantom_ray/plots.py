"""Small PNG charts drawn with PIL (already a dependency): training curves and benchmark bars.

PIL rather than matplotlib keeps the install as it is (matplotlib is ~40 MB with its fonts) for two
simple chart types: lines over steps in stacked panels, and grouped bars per category.

    line_chart("curves.png", [Panel("loss", [Series("step 1", xs, ys)])], title="training")
    bar_chart("scores.png", ["sqa", "pope"], [Series("ours", values=[50.0, 61.2]), Series("paper", values=[83.2, None])])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
_BG, _AXIS, _GRID, _TEXT = "white", "#333333", "#e3e3e3", "#222222"


@dataclass
class Series:
    label: str
    x: Sequence[float] = ()
    y: Sequence[float | None] = ()
    color: str | None = None
    values: Sequence[float | None] = ()   # bar charts: one value per category (None: no bar)


@dataclass
class Panel:
    title: str
    series: list[Series]
    ylabel: str = ""
    ylim: tuple[float, float] | None = None
    vlines: list[tuple[float, str]] = field(default_factory=list)  # (x, label): e.g. where step 2 starts
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label): e.g. chance level


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        if t >= lo - 1e-9 * step:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10 or float(v).is_integer():
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _text(draw: ImageDraw.ImageDraw, xy, s: str, font, anchor: str = "la", fill: str = _TEXT) -> None:
    draw.text(xy, s, font=font, fill=fill, anchor=anchor)


def line_chart(path: str, panels: list[Panel], title: str = "", width: int = 900, panel_height: int = 300) -> str:
    """Stacked panels of lines over a shared x axis; writes ``path`` (PNG) and returns it."""
    f_title, f_label, f_tick = _font(20), _font(15), _font(13)
    top = 44 if title else 12
    height = top + panel_height * len(panels) + 40
    img = Image.new("RGB", (width, height), _BG)
    d = ImageDraw.Draw(img)
    if title:
        _text(d, (width // 2, 12), title, f_title, anchor="ma")
    xs_all = [x for p in panels for s in p.series for x in s.x]
    x0, x1 = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    left, right = 80, width - 170  # room on the right for the legend
    for i, p in enumerate(panels):
        ptop = top + i * panel_height + 26
        pbot = top + (i + 1) * panel_height - 34
        ys = [y for s in p.series for y in s.y if y is not None and math.isfinite(y)] + [h for h, _ in p.hlines]
        y0, y1 = p.ylim if p.ylim else ((min(ys), max(ys)) if ys else (0.0, 1.0))
        if y1 == y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        if not p.ylim:
            pad = (y1 - y0) * 0.06
            y0, y1 = y0 - pad, y1 + pad

        def X(v: float) -> float:
            return left + (v - x0) / (x1 - x0) * (right - left)

        def Y(v: float) -> float:
            return pbot - (v - y0) / (y1 - y0) * (pbot - ptop)

        _text(d, (left, ptop - 22), p.title, f_label)
        for t in _nice_ticks(y0, y1):
            d.line([(left, Y(t)), (right, Y(t))], fill=_GRID)
            _text(d, (left - 6, Y(t)), _fmt(t), f_tick, anchor="rm")
        for t in _nice_ticks(x0, x1, 8):
            d.line([(X(t), pbot), (X(t), pbot + 4)], fill=_AXIS)
            _text(d, (X(t), pbot + 6), _fmt(t), f_tick, anchor="ma")
        d.rectangle([left, ptop, right, pbot], outline=_AXIS)
        if p.ylabel:
            lbl = Image.new("RGBA", (pbot - ptop, 20), (255, 255, 255, 0))
            _text(ImageDraw.Draw(lbl), ((pbot - ptop) // 2, 10), p.ylabel, f_tick, anchor="mm")
            img.paste(lbl.rotate(90, expand=True), (14, ptop), lbl.rotate(90, expand=True))
        for v, label in p.vlines:
            for yy in range(int(ptop), int(pbot), 8):
                d.line([(X(v), yy), (X(v), min(yy + 4, pbot))], fill="#888888")
            _text(d, (X(v) + 4, ptop + 4), label, f_tick, fill="#666666")
        for k, (v, label) in enumerate(p.hlines):
            for xx in range(int(left), int(right), 8):
                d.line([(xx, Y(v)), (min(xx + 4, right), Y(v))], fill="#aa3333")
            # labels alternate right/left so that two close lines (chance 0.28, before 0.30) stay legible
            at, anchor = ((right - 4, "rb") if k % 2 == 0 else (left + 4, "lb"))
            _text(d, (at, Y(v) - 4), label, f_tick, anchor=anchor, fill="#aa3333")
        ly = ptop + 4
        for j, s in enumerate(p.series):
            color = s.color or PALETTE[j % len(PALETTE)]
            pts = [(X(x), Y(y)) for x, y in zip(s.x, s.y) if y is not None and math.isfinite(y)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for px, py in pts if len(pts) <= 60 else []:
                d.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=color)
            if len(pts) == 1:
                d.ellipse([pts[0][0] - 4, pts[0][1] - 4, pts[0][0] + 4, pts[0][1] + 4], fill=color)
            d.line([(right + 14, ly + 8), (right + 38, ly + 8)], fill=color, width=3)
            _text(d, (right + 44, ly + 8), s.label, f_tick, anchor="lm")
            ly += 20
    _text(d, ((left + right) // 2, height - 12), "optimizer step", f_label, anchor="ms")
    img.save(path, format="PNG")
    return path


def bar_chart(path: str, categories: Sequence[str], groups: list[Series], title: str = "", ylabel: str = "",
              ymax: float | None = None, width: int | None = None, height: int = 420) -> str:
    """Grouped bars: one group per category, one bar per series (value None: no bar, "n/a" shown)."""
    f_title, f_label, f_tick = _font(20), _font(14), _font(12)
    width = width or max(560, 110 + len(categories) * (30 + 26 * len(groups)) + 40)
    img = Image.new("RGB", (width, height), _BG)
    d = ImageDraw.Draw(img)
    if title:
        _text(d, (width // 2, 12), title, f_title, anchor="ma")
    left, right, ptop, pbot = 70, width - 20, 96, height - 60
    vals = [v for g in groups for v in g.values if v is not None]
    top_v = ymax if ymax is not None else max([1.0, *vals]) * 1.1
    ticks = _nice_ticks(0, top_v)
    top_v = max(top_v, ticks[-1])

    def Y(v: float) -> float:
        return pbot - v / top_v * (pbot - ptop)

    for t in ticks:
        d.line([(left, Y(t)), (right, Y(t))], fill=_GRID)
        _text(d, (left - 6, Y(t)), _fmt(t), f_tick, anchor="rm")
    d.line([(left, pbot), (right, pbot)], fill=_AXIS)
    d.line([(left, ptop), (left, pbot)], fill=_AXIS)
    if ylabel:
        _text(d, (left - 60, ptop - 12), ylabel, f_tick, anchor="ls")
    lx = left
    for j, g in enumerate(groups):  # legend above the plot
        color = g.color or PALETTE[j % len(PALETTE)]
        d.rectangle([lx, 44, lx + 14, 58], fill=color)
        _text(d, (lx + 20, 51), g.label, f_label, anchor="lm")
        lx += 34 + int(d.textlength(g.label, font=f_label))
    slot = (right - left) / max(1, len(categories))
    bw = min(36.0, (slot - 16) / max(1, len(groups)))
    for i, cat in enumerate(categories):
        cx = left + slot * (i + 0.5)
        gx = cx - bw * len(groups) / 2
        for j, g in enumerate(groups):
            color = g.color or PALETTE[j % len(PALETTE)]
            v = g.values[i] if i < len(g.values) else None
            x_a, x_b = gx + j * bw + 1, gx + (j + 1) * bw - 1
            if v is None:
                _text(d, ((x_a + x_b) / 2, pbot - 4), "n/a", f_tick, anchor="ms", fill="#999999")
                continue
            d.rectangle([x_a, Y(v), x_b, pbot], fill=color)
            _text(d, ((x_a + x_b) / 2, Y(v) - 3), _fmt(v), f_tick, anchor="ms")
        _text(d, (cx, pbot + 8), cat, f_label, anchor="ma")
    img.save(path, format="PNG")
    return path
