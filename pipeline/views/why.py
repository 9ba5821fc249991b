"""Why was this document dropped? Every stage a document went through, and which dropped it.

Each stage writes the rows it drops with `drop_reason` and passes on only the kept ones,
so a document's rows across the stages, in run order, end at the stage that dropped it
(a `<stage>:error` row also has the message in `error`):

    from pipeline.views.runs import open_run
    open_run("runs/quickstart").why("DOC_ID")    # stage, part, drop_reason, error

    python -m pipeline.views.why runs/quickstart DOC_ID      # or: primer why RUN DOC_ID

`Run.why` (pipeline/views/runs.py) reads three columns (id, drop_reason, error) of the
committed parts, filtered on the id while scanning; column parts (edu_score) hold id and
drop_reason themselves, so no base part is joined. This module turns its rows into the
answer (`dropped_by`, `format_why`) and is the command line. Without pipeline installed,
the same with polars alone (stages differ in their columns, and older parts have no
`error`: the scan takes the three, fills a missing one with nulls and ignores the rest;
rows come in path order):

    import polars as pl
    pl.scan_parquet("runs/quickstart/*/*.parquet", schema={"id": pl.String, "drop_reason": pl.String, "error": pl.String}, missing_columns="insert", extra_columns="ignore", include_file_paths="part").filter(pl.col("id") == "DOC_ID").collect()
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import polars as pl

from pipeline.secrets import scrub
from pipeline.views.runs import open_run


def dropped_by(why: pl.DataFrame) -> dict[str, Any] | None:
    """The row of `Run.why` that dropped the document (the first with a drop_reason), as a
    dict; None when every stage it reached kept it (or it is in none)."""
    rows = why.filter(pl.col("drop_reason").is_not_null())
    return rows.row(0, named=True) if rows.height else None


def format_why(why: pl.DataFrame, doc_id: str, run: str | os.PathLike | None = None) -> str:
    """`Run.why` as text: a line per stage (kept, or the reason and any error message),
    then which stage dropped the document, or that none did."""
    where = f" in {run}" if run is not None else ""
    if why.is_empty():
        return (
            f"no stage{where} has a document with id {doc_id!r} (ids are the input's own `id`, "
            f'else "<file name>:<row>"; run.stage("extract").select("id") lists them)'
        )
    width = max(why["stage"].str.len_chars().max(), 5)
    lines = [f"document {doc_id!r}{where}:"]
    for r in why.iter_rows(named=True):
        lines.append(f"  {r['stage']:<{width}}  {r['drop_reason'] or 'kept'}  ({r['part']})")
        if r["error"]:
            # the message may quote a request or a config value: no credential in a terminal
            lines.append(f"  {'':<{width}}  error: {scrub(r['error'])}")
    hit = dropped_by(why)
    if hit is None:
        lines.append(f"kept by every stage it went through (the last: {why['stage'][-1]})")
    else:
        lines.append(f"dropped by {hit['stage']}: {hit['drop_reason']}")
    return "\n".join(lines)


def why_command(run: str, doc_id: str) -> int:
    """Print why `doc_id` was dropped in the run folder `run`; the exit code: 0 when some
    stage has the document, 1 when none does, 2 when `run` is not a run folder.
    `python -m pipeline.views.why RUN ID` (and `primer why RUN ID`) call this."""
    try:
        opened = open_run(run)
    except FileNotFoundError as e:
        print(f"primer why: {e}", file=sys.stderr)
        return 2
    frame = opened.why(doc_id)
    print(format_why(frame, doc_id, opened.path))
    return 0 if frame.height else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.views.why", description=__doc__.split("\n")[0]
    )
    p.add_argument("run", help="the run folder (what `primer run` wrote)")
    p.add_argument("doc_id", help="the document's id")
    args = p.parse_args(argv)
    return why_command(args.run, args.doc_id)


if __name__ == "__main__":
    sys.exit(main())
