"""Write `RUN/report.html`: a run's funnel, distributions, samples and mixture on one page.

    python -m pipeline.views.report runs/quickstart        # -> runs/quickstart/report.html

`primer run` writes it after `run_summary.json`, so every run folder can be read in a
browser without a notebook. It holds: the run header (recipe, invocations, attempts, wall
time), the funnel (table and bar chart), drop reasons per stage, the language-score,
quality-signal and edu_score histograms (kept vs dropped), sample documents per edu bucket,
synthetic samples with their lineage, the mixture per phase (table and stacked bar) and
the smoke train's loss curve. A section whose stage is not in the run says so and is
skipped; a section that fails says why and the rest of the report is still written.

Why this shape:
- One self-contained file: CSS and charts are inline; charts are SVG drawn as strings
  (pipeline/views/svg.py: bars, histograms, one line chart), not matplotlib.
- Document text is untrusted (any web page, any teacher output): every string from the run
  is HTML-escaped, URLs are shown as text and never linked, and a Content-Security-Policy
  forbids scripts and remote loads even if something slipped through.
- Cheap: counts come from the manifests; distributions are polars aggregations over single
  columns, on at most `max_parts` parts per stage (evenly spread, said in the section when
  it samples), so a report on a TB-scale run stays seconds, not a second pass over the data.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from pipeline.views.frames import SAMPLE_SEED, histogram
from pipeline.views.runs import MissingData, Run, open_run
from pipeline.views.svg import DROPPED, KEPT, PALETTE, esc, fmt_num, svg_hbars, svg_hist, svg_line

log = logging.getLogger("primer")

MAX_PARTS = 64  # parts scanned per stage for distributions and samples
QUALITY_SIGNALS = [  # (column, clip at this quantile: long tails squash the rest)
    ("q_n_words", 0.99),
    ("q_mean_word_len", 0.995),
    ("q_frac_words_alpha", None),
    ("q_fw_line_punct_frac", None),
    ("q_dup_line_frac", None),
    ("q_top_2gram_frac", None),
]


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


# --- HTML pieces ---------------------------------------------------------------------------
def table(rows: Sequence[Sequence[object]], header: Sequence[str], num: Sequence[int] = ()) -> str:
    """A table; every cell escaped; columns in `num` right-aligned. A cell that is a
    `Raw` is inserted as is (only for markup built here)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            inner = v.html if isinstance(v, Raw) else esc(v)
            cells.append(f'<td class="n">{inner}</td>' if i in num else f"<td>{inner}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(rows: Sequence[tuple[str, object]]) -> str:
    """A two-column key/value table, both escaped."""
    cells = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{cells}</table>'


class Raw:
    """Markup made by this module (never data), to put in a table cell unescaped."""

    def __init__(self, markup: str) -> None:
        self.html = markup


def _doc(text: str | None, truncated: bool, n_chars: int | None) -> str:
    more = ""
    if truncated and n_chars is not None:
        more = f'<span class="more">… ({n_chars - len(text or ""):,} more characters)</span>'
    return f'<pre class="doc">{esc(text)}{more}</pre>'


def _sampled_note(run: Run, stage: str, max_parts: int | None) -> str:
    n = len(run.files(stage))
    if max_parts is not None and n > max_parts:
        return (
            f'<p class="note">From {max_parts} of {n:,} parts of {esc(stage)}, evenly spread.</p>'
        )
    return ""


# --- sections ------------------------------------------------------------------------------
def section_header(run: Run, **_) -> str:
    h = run.header()
    rows = [
        ("recipe", h["recipe"] or "(no run_summary.json: rebuilt from the stage manifests)"),
        ("recipe file", h["recipe_path"] or "-"),
        ("output", h["output"]),
        ("invocations of primer run", h["runs"]),
        ("stage attempts", h["attempts"]),
        ("first started", h["first_started"] or "-"),
        ("last finished", h["last_finished"] or "-"),
        ("wall time, all runs", _secs(h["wall_seconds"]) + " s" if h["wall_seconds"] else "-"),
    ]
    runs = run.summary.get("runs") or []
    out = _kv(rows)
    if len(runs) > 1:
        out += "<h3>Invocations</h3>" + table(
            [(r.get("started"), r.get("finished"), _secs(r.get("wall_seconds"))) for r in runs],
            ["started", "finished", "wall s"],
            num=[2],
        )
    return out


def section_funnel(run: Run, **_) -> str:
    f = run.funnel()
    if f.is_empty():
        raise MissingData(f"{run.path} has no finished stage")
    rows = []
    for r in f.iter_rows(named=True):
        flag = Raw('<b class="bad">exceeded</b>') if r["guardrail_exceeded"] else "ok"
        rows.append(
            (
                r["stage"],
                r["uses"] if r["uses"] != r["stage"] else "",
                r["kind"],
                fmt_num(r["rows_in"]),
                fmt_num(r["kept"]),
                fmt_num(r["dropped"]),
                f"{r['drop_fraction']:.1%}",
                _secs(r["wall_seconds"]),
                r["attempts"],
                flag,
            )
        )
    header = ["stage", "stage class", "kind", "rows in", "kept", "dropped", "dropped %", "wall s"]
    out = table(rows, [*header, "attempts", "guardrail"], num=[3, 4, 5, 6, 7, 8])
    docs = f.filter(pl.col("kind") == "rows")
    if not docs.is_empty():
        out += svg_hbars(
            docs["stage"].to_list(),
            [
                ("kept", docs["kept"].to_list(), KEPT),
                ("dropped", docs["dropped"].to_list(), DROPPED),
            ],
            "Rows per stage: kept and dropped",
        )
    out += (
        '<p class="note">Artifact stages (edu_train, mixture, train_smoke, ...) count what '
        "they read and built; their rows are not part of the document funnel.</p>"
    )
    return out


def section_drops(run: Run, **_) -> str:
    d = run.drop_reasons()
    if d.is_empty():
        return "<p>No stage dropped anything.</p>"
    out = []
    for (stage,), g in d.group_by("stage", maintain_order=True):
        total = int(g["count"].sum())
        rows = [
            (
                r["reason"],
                fmt_num(r["count"]),
                f"{r['share']:.1%}",
                Raw(f'<span class="bar" style="width:{100 * r["count"] / total:.0f}px"></span>'),
            )
            for r in g.iter_rows(named=True)
        ]
        out.append(f"<h3>{esc(stage)}: {total:,} dropped</h3>")
        out.append(table(rows, ["reason", "rows", "of stage input", ""], num=[1, 2]))
    return "".join(out)


def section_language(run: Run, max_parts: int | None = MAX_PARTS, **_) -> str:
    stage = run.require("langid")
    lf = run.lang_scores(max_parts=max_parts)
    h = histogram(lf, "lang_score", bins=30, by="kept")
    langs = (
        lf.group_by("lang")
        .agg(documents=pl.len(), kept=pl.col("kept").sum())
        .sort("documents", descending=True)
        .head(10)
        .collect()
    )
    out = _sampled_note(run, stage, max_parts)
    out += svg_hist(h, f"lang_score ({stage})", width=720, names=("kept", f"dropped by {stage}"))
    out += "<h3>Top languages</h3>" + table(
        [
            (r["lang"], fmt_num(r["documents"]), fmt_num(r["kept"]))
            for r in langs.iter_rows(named=True)
        ],
        ["lang", "documents", "kept"],
        num=[1, 2],
    )
    return out


def section_quality(run: Run, max_parts: int | None = MAX_PARTS, **_) -> str:
    stage = run.require("quality")
    have = run.stage(stage).collect_schema().names()
    signals = [(c, q) for c, q in QUALITY_SIGNALS if c in have]
    if not signals:
        raise MissingData(f"stage {stage!r} has none of the plotted q_* signals")
    lf = run.quality_signals([c for c, _ in signals], max_parts=max_parts)
    charts = [
        svg_hist(
            histogram(lf, c, bins=24, by="kept", clip_quantile=q),
            c + (f" (clipped at p{q * 100:g})" if q else ""),
            names=("kept", f"dropped by {stage}"),
        )
        for c, q in signals
    ]
    return _sampled_note(run, stage, max_parts) + '<div class="grid">' + "".join(charts) + "</div>"


def section_edu(run: Run, max_parts: int | None = MAX_PARTS, **_) -> str:
    stage = run.require("edu_score")
    lf = run.edu_scores(max_parts=max_parts)
    out = _sampled_note(run, stage, max_parts)
    out += svg_hist(
        histogram(lf, "edu_score", bins=30, by="kept"),
        f"edu_score ({stage}; dropped = below phase 1)",
        width=720,
    )
    have = lf.collect_schema().names()
    aggs = [pl.len().alias("documents")]
    aggs += [pl.col(c).sum().alias(c) for c in ("edu_phase1", "edu_phase2") if c in have]
    buckets = lf.group_by("edu_int").agg(aggs).sort("edu_int").collect()
    out += "<h3>Documents per edu_int</h3>" + table(
        [tuple(fmt_num(v) if i else v for i, v in enumerate(r)) for r in buckets.iter_rows()],
        buckets.columns,
        num=list(range(1, buckets.width)),
    )
    try:
        m = run.metrics(run.find("edu_train") or "edu_train")
    except MissingData:
        return out
    rows = []
    for name in ("held_out", "cross_validation"):
        part = m.get(name) or {}
        base = part.get("baseline_length") or {}
        for key in ("spearman", "roc_auc", "roc_auc_ge2", "macro_f1"):
            if key in part:
                rows.append((name, key, fmt_num(part[key]), fmt_num(base.get(key))))
    if rows:
        out += "<h3>edu_train: classifier against the ratings</h3>" + table(
            rows, ["split", "metric", "edu_score", "document length (baseline)"], num=[2, 3]
        )
    return out


def section_edu_samples(
    run: Run, max_parts: int | None = MAX_PARTS, samples: int = 2, chars: int = 400, **_
) -> str:
    stage = run.require("edu_score")
    s = run.samples_per_edu_bucket(n=samples, chars=chars, max_parts=max_parts)
    if s.is_empty():
        raise MissingData(f"stage {stage!r} has no scored documents")
    out = [
        _sampled_note(run, stage, max_parts),
        f'<p class="note">Picked by the xxh64 of the id (seed {SAMPLE_SEED}): the same '
        "documents each time the report is written, on any machine.</p>",
    ]
    for (bucket,), g in s.group_by("edu_int", maintain_order=True):
        out.append(f"<h3>edu_int {esc(bucket)}</h3>")
        for r in g.iter_rows(named=True):
            status = "kept" if r.get("drop_reason") is None else f"dropped: {r['drop_reason']}"
            meta = f"{r['id']} · edu_score {fmt_num(r.get('edu_score'))} · {status}"
            if r.get("url"):
                meta += f" · {r['url']}"
            out.append(f'<div class="meta">{esc(meta)}</div>')
            out.append(_doc(r["text"], r["truncated"], r["n_chars"]))
    return "".join(out)


def section_synthetic(run: Run, max_parts: int | None = MAX_PARTS, chars: int = 400, **_) -> str:
    lf = run.synthetic(max_parts=max_parts)
    stage = run.synthetic_stage()
    have = lf.collect_schema().names()
    group = "style" if "style" in have else "template_id"
    counts = (
        lf.group_by(group).agg(documents=pl.len(), kept=pl.col("kept").sum()).sort(group).collect()
    )
    out = [
        _sampled_note(run, stage, max_parts),
        f"<p>Rows of <b>{esc(stage)}</b> (the last stage with synthetic lineage).</p>",
        table(
            [
                (r[group], fmt_num(r["documents"]), fmt_num(r["kept"]))
                for r in counts.iter_rows(named=True)
            ],
            [group, "documents", "kept"],
            num=[1, 2],
        ),
    ]
    s = run.synthetic_samples(per_style=1, chars=chars, max_parts=max_parts)
    if s.is_empty():
        out.append("<p>No kept synthetic document to show.</p>")
    for r in s.iter_rows(named=True):
        out.append(f"<h3>{esc(r.get(group))}: {esc(r['id'])}</h3>")
        skip = {"id", "text", "kept", "n_chars", "truncated"}
        lineage = [(k, fmt_num(v, 4) if isinstance(v, float) else v) for k, v in r.items()]
        lineage = [(k, v) for k, v in lineage if k not in skip and v is not None]
        out.append(_kv(lineage))
        out.append(_doc(r["text"], r["truncated"], r["n_chars"]))
    return "".join(out)


def section_mixture(run: Run, **_) -> str:
    mix = run.mixture_manifest()
    df = run.mixture()
    tok = mix.get("tokenizer") or {}
    out = [
        f"<p>Tokenizer <b>{esc(tok.get('name'))}</b> (vocabulary {fmt_num(tok.get('vocab_size'))}, "
        f"EOS {esc(tok.get('eos_id'))}), seq_len {fmt_num(mix.get('seq_len'))}, "
        f"seed {esc(mix.get('seed'))}.</p>"
    ]
    rows = [
        (
            r["phase"],
            r["source"],
            fmt_num(r["tokens"]),
            f"{r['share']:.1%}",
            fmt_num(r["weight"]),
            fmt_num(r["documents"]),
            f"{fmt_num(r['epochs'])} / {fmt_num(r['max_epochs'])}",
            r["filter"] or "",
        )
        for r in df.iter_rows(named=True)
    ]
    header = ["phase", "source", "tokens", "share", "weight", "documents", "epochs / max", "filter"]
    out.append(table(rows, header, num=[2, 3, 4, 5, 6]))
    phases = df["phase"].unique(maintain_order=True).to_list()
    sources = df["source"].unique(maintain_order=True).to_list()
    tokens = {(r["phase"], r["source"]): r["tokens"] for r in df.iter_rows(named=True)}
    series = [
        (src, [tokens.get((p, src), 0) for p in phases], PALETTE[i % len(PALETTE)])
        for i, src in enumerate(sources)
    ]
    out.append(svg_hbars(phases, series, "Tokens per phase, by source"))
    return "".join(out)


def section_train_smoke(run: Run, **_) -> str:
    m = run.metrics("train_smoke")
    losses = m.get("losses") or []
    if not losses:
        raise MissingData("train_smoke/metrics.json has no losses")
    fell = "fell" if m.get("loss_fell") else "DID NOT FALL"
    out = (
        f"<p>{len(losses)} steps, loss {fmt_num(m.get('first_loss'))} → {fmt_num(m.get('last_loss'))} "
        f"({esc(fell)}); {fmt_num(m.get('tokens'))} tokens at {fmt_num(m.get('tokens_per_s'))} "
        f"tokens/s; {fmt_num(m.get('parameters'))} parameters.</p>"
    )
    return out + svg_line(losses, "Smoke-train loss per step")


SECTIONS: list[tuple[str, str, Callable[..., str]]] = [
    ("run", "Run", section_header),
    ("funnel", "Funnel", section_funnel),
    ("drops", "Drop reasons per stage", section_drops),
    ("language", "Language scores", section_language),
    ("quality", "Quality signals", section_quality),
    ("edu", "Educational value", section_edu),
    ("edu-samples", "Sample documents per edu bucket", section_edu_samples),
    ("synthetic", "Synthetic samples with lineage", section_synthetic),
    ("mixture", "Mixture composition per phase", section_mixture),
    ("train-smoke", "Smoke train", section_train_smoke),
]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:14px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border-bottom:1px solid #eee;padding:3px 10px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{color:#555;font-weight:normal}
pre.doc{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;border-left:3px solid #ccc;
padding:8px 10px;max-height:16em;overflow:auto;font-size:12px}
.meta{color:#555;font-size:12px;margin-top:10px;word-break:break-all}
.more{color:#888}.note,.skip{color:#666;font-style:italic}.err{color:#b00}.bad{color:#b00}
.bar{display:inline-block;height:10px;background:#e15759}
.grid{display:flex;flex-wrap:wrap;gap:12px}
svg{display:block;margin:10px 0;font-size:11px}svg .t{font-size:13px;font-weight:600}
svg .ax{stroke:#999}nav a{margin-right:10px}
"""

# No scripts, no remote anything: the page only draws what is in it.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render(run: Run, max_parts: int | None = MAX_PARTS, samples: int = 2, chars: int = 400) -> str:
    """The whole page as a string (see `write_report`)."""
    parts, nav = [], []
    for anchor, title, fn in SECTIONS:
        t0 = time.perf_counter()
        try:
            body = fn(run, max_parts=max_parts, samples=samples, chars=chars)
        except MissingData as e:
            body = f'<p class="skip">Skipped: {esc(e)}</p>'
        except Exception as e:  # one broken section must not cost the whole report
            log.warning("report: section %r failed", title, exc_info=True)
            body = f'<p class="err">This section failed: {esc(type(e).__name__)}: {esc(e)}</p>'
        log.debug("report: %s in %.2f s", title, time.perf_counter() - t0)
        nav.append(f'<a href="#{anchor}">{esc(title)}</a>')
        parts.append(f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>')
    name = run.summary.get("recipe") or run.path.name
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Primer run report: {esc(name)}</title><style>{CSS}</style></head><body>"
        f"<h1>Primer run report: {esc(name)}</h1>"
        f'<p class="note">{esc(run.path)} · written {now} · regenerate with '
        f"<code>python -m pipeline.views.report {esc(run.path)}</code></p>"
        f"<nav>{''.join(nav)}</nav>{''.join(parts)}</body></html>\n"
    )


def write_report(
    run_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    max_parts: int | None = MAX_PARTS,
    samples: int = 2,
    chars: int = 400,
) -> Path:
    """Write RUN/report.html (or `output`) atomically and return its path."""
    run = open_run(Path(run_dir))
    path = Path(output) if output else run.path / "report.html"
    page = render(run, max_parts=max_parts, samples=samples, chars=chars)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(page.encode("utf-8", "replace"))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.views.report", description="Write RUN_DIR/report.html for a run."
    )
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", help="where to write (default RUN_DIR/report.html)")
    p.add_argument("--max-parts", type=int, default=MAX_PARTS, help="parts scanned per stage")
    p.add_argument("--samples", type=int, default=2, help="documents per edu bucket")
    p.add_argument("--chars", type=int, default=400, help="characters shown per document")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    t0 = time.perf_counter()
    try:
        path = write_report(args.run_dir, args.output, args.max_parts, args.samples, args.chars)
    except FileNotFoundError as e:
        print(f"primer report: {e}", file=sys.stderr)
        return 2
    print(f"{path} ({time.perf_counter() - t0:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
