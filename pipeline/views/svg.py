"""SVG charts for the run report, drawn as strings: stacked bars, histograms, a line.

Why not matplotlib: no plotting dependency in a core install, less import time per run,
and text in charts stays text (searchable, copyable, crisp at any zoom). Every label is
HTML-escaped (`esc`): chart labels are stage names, sources and reasons from the run.

    from pipeline.views.frames import histogram
    from pipeline.views.svg import svg_hbars, svg_hist, svg_line
    svg_hist(histogram(lf, "edu_score", bins=30, by="kept"), "edu_score")
    svg_hbars(["quality"], [("kept", [90], KEPT), ("dropped", [10], DROPPED)], "Rows per stage")
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import polars as pl

KEPT, DROPPED = "#4e79a7", "#e15759"
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"]


def esc(value: object) -> str:
    """HTML-escape anything (quotes too: the result may sit in an attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_num(v: float | int | None, digits: int = 3) -> str:
    """A number for a table or chart label: thousands separated, `digits` significant."""
    if v is None:
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1):
        return f"{int(v):,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(label)}">'
        + "".join(body)
        + "</svg>"
    )


def _text(x: float, y: float, s: object, anchor: str = "start", cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{c}>{esc(s)}</text>'


def _legend(items: Sequence[tuple[str, str]], x: float, y: float) -> list[str]:
    out = []
    for name, color in items:
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{color}"/>')
        out.append(_text(x + 14, y, name))
        x += 24 + 7 * len(name)
    return out


def svg_hbars(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float], str]],
    title: str,
    width: int = 720,
    fmt: Callable[[float], str] = fmt_num,
) -> str:
    """Horizontal bars, one per label, each stacked from `series` (name, values, color)."""
    row, gap, left, right, top = 18, 6, 150, 90, 40
    totals = [sum(s[1][i] for s in series) for i in range(len(labels))]
    scale = (width - left - right) / (max(totals, default=0) or 1)
    height = top + len(labels) * (row + gap) + 4
    body = [_text(0, 14, title, cls="t"), *_legend([(n, c) for n, _, c in series], left, 32)]
    for i, label in enumerate(labels):
        y = top + i * (row + gap)
        short = label if len(label) <= 22 else label[:21] + "…"
        body.append(_text(left - 6, y + row - 5, short, anchor="end"))
        x = float(left)
        for name, values, color in series:
            w = values[i] * scale
            if w > 0:
                body.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row}" fill="{color}">'
                    f"<title>{esc(label)}: {esc(name)} {esc(fmt(values[i]))}</title></rect>"
                )
            x += w
        body.append(_text(x + 4, y + row - 5, fmt(totals[i])))
    return _svg(width, height, body, title)


def svg_hist(
    h: pl.DataFrame,
    title: str,
    width: int = 340,
    height: int = 180,
    by: str | None = "kept",
    names: tuple[str, str] = ("kept", "dropped"),
) -> str:
    """A histogram from `frames.histogram` (bin, lo, hi, [by], count), stacked by `by`
    (True at the bottom, in KEPT's color; False above it, in DROPPED's)."""
    left, right, top, bottom = 44, 10, 34, 30
    pw, ph = width - left - right, height - top - bottom
    bins = h["bin"].unique().sort().to_list()
    lo = h.select(pl.col("lo").min()).item()
    hi = h.select(pl.col("hi").max()).item()
    if by is not None and by in h.columns:
        layers = [(True, KEPT, names[0]), (False, DROPPED, names[1])]
        counts = {
            flag: dict(h.filter(pl.col(by) == flag).select("bin", "count").iter_rows())
            for flag, _, _ in layers
        }
    else:
        layers = [(True, KEPT, "documents")]
        counts = {True: dict(h.select("bin", "count").iter_rows())}
    stacks = [sum(counts[f].get(b, 0) for f, _, _ in layers) for b in bins]
    ymax = max(stacks, default=0) or 1
    bw = pw / max(len(bins), 1)
    body = [_text(0, 13, title, cls="t")]
    if len(layers) > 1:
        body += _legend([(n, c) for _, c, n in layers], left, 28)
    for i, b in enumerate(bins):
        y = top + ph
        for flag, color, name in layers:
            c = counts[flag].get(b, 0)
            if not c:
                continue
            bh = c / ymax * ph
            y -= bh
            row = h.filter(pl.col("bin") == b).row(0, named=True)
            tip = f"{fmt_num(row['lo'])} to {fmt_num(row['hi'])}: {name} {c:,}"
            body.append(
                f'<rect x="{left + i * bw + 0.5:.1f}" y="{y:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                f'height="{bh:.1f}" fill="{color}"><title>{esc(tip)}</title></rect>'
            )
    axis_y = top + ph
    body.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + pw}" y2="{axis_y}" class="ax"/>')
    body.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" class="ax"/>')
    body.append(_text(left - 4, top + 8, fmt_num(ymax), anchor="end"))
    body.append(_text(left - 4, axis_y, "0", anchor="end"))
    if lo is not None:
        body.append(_text(left, axis_y + 14, fmt_num(lo), anchor="start"))
        body.append(_text(left + pw / 2, axis_y + 14, fmt_num((lo + hi) / 2), anchor="middle"))
        body.append(_text(left + pw, axis_y + 14, fmt_num(hi), anchor="end"))
    return _svg(width, height, body, title)


def svg_line(ys: Sequence[float], title: str, width: int = 720, height: int = 220) -> str:
    """A line over steps 1..len(ys) with the y range and first/last step on the axes."""
    left, right, top, bottom = 50, 12, 26, 30
    pw, ph = width - left - right, height - top - bottom
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    n = len(ys)
    pts = " ".join(
        f"{left + (i / max(n - 1, 1)) * pw:.1f},{top + (hi - v) / span * ph:.1f}"
        for i, v in enumerate(ys)
    )
    axis_y = top + ph
    body = [
        _text(0, 14, title, cls="t"),
        f'<line x1="{left}" y1="{axis_y}" x2="{left + pw}" y2="{axis_y}" class="ax"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" class="ax"/>',
        f'<polyline points="{pts}" fill="none" stroke="{KEPT}" stroke-width="2"/>',
        _text(left - 4, top + 8, f"{hi:.3g}", anchor="end"),
        _text(left - 4, axis_y, f"{lo:.3g}", anchor="end"),
        _text(left, axis_y + 14, "step 1"),
        _text(left + pw, axis_y + 14, f"step {n}", anchor="end"),
    ]
    return _svg(width, height, body, title)
