"""Export a stage's kept rows as Parquet, JSON Lines or a `datasets` folder, with a dataset card.

    primer export runs/quickstart edu_score --to exports/edu --where "edu_score >= 2.5"
    primer export runs/quickstart dedup --to s3://bucket/web --format jsonl --columns id,text,url
    primer export runs/quickstart edu_score --to exports/edu_hf --format hf --push-to-hub ORG/NAME

    from pipeline.views.export import export_stage
    export_stage("runs/quickstart", "edu_score", "exports/edu", where="edu_score >= 2.5")

Why: a stage's parts hold kept and dropped rows together, and a column part (edu_score)
holds ids and scores without text (pipeline/io.py). A trainer, `datasets.load_dataset` or
the Hub want whole kept rows and a card that says where they came from. This module writes
them; it never changes the run folder.

What an export folder (`--to`, a local path or an s3://, gs:// URI) holds:

    data/train-00000.parquet ...   parquet: zstd, the stage's column types (text large_string)
    data/train-00000.jsonl.gz ...  jsonl: one JSON object a line (timestamps as ISO strings)
    data-00000-of-0000N.arrow,     hf: what `Dataset.save_to_disk` writes (`load_from_disk`);
      state.json, dataset_info.json  one Arrow file per shard
    README.md                      the dataset card: Hub YAML (license, configs), the stages
                                   the rows went through, their thresholds and config
                                   (secrets masked), rows in / kept and drops per reason,
                                   the export's filter and columns, the inputs' licences
    _SUCCESS                       written last: JSON of the files and their rows

Rows: each committed part of the stage (`output_files`: an unfinished stage is an error)
through `pipeline.io.iter_parquet`, kept rows only, a column part joined with its base and
checked id by id; in part order, then row order, so an export is the same every time.
`where` is one SQL expression (`polars.sql_expr`: columns, comparisons, AND/OR, LIKE, IN,
functions; no query, no file access), evaluated per batch; a row where it is null is left
out. Columns default to all but `drop_reason` and `error` (null on every kept row) and
`html` (the raw payload).

Shards end at `shard_rows` rows or `shard_bytes` bytes of data (strings' UTF-8 bytes,
numbers' width), whichever comes first. A local export appears whole or not at all; on
object storage `_SUCCESS`, written last, marks a complete one; `overwrite` replaces an
earlier export only. The files: pipeline/views/export_files.py.

The card (README.md) is pipeline/views/card.py's: the stages the rows went through, their
thresholds and drops per reason, and the inputs' licences, which it never guesses.

`push_to_hub` uploads a local export folder as a Hub dataset repository (huggingface_hub's
`upload_folder`); `check_hub` is the check run before any work (offline mode, a token).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline import storage
from pipeline.io import iter_parquet, stage_schema
from pipeline.parts import utc_now
from pipeline.stage_runner import output_files
from pipeline.views.card import dataset_card, stage_order
from pipeline.views.export_files import (
    ExportError,
    ExportSink,
    ShardWriter,
    build_hf,
    is_bytes,
)
from pipeline.views.runs import Run, resolve_run_dir

log = logging.getLogger("primer")

FORMATS = ("parquet", "jsonl", "hf")
DEFAULT_SHARD_BYTES = 256 << 20
NOT_EXPORTED_BY_DEFAULT = ("drop_reason", "error", "html")

_BATCH_ROWS = 8192


class HubPushError(RuntimeError):
    """The Hub could not be reached or refused the upload; the local export is complete."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def parse_size(text: str | int) -> int:
    """Bytes from "268435456", "256MB" (10^6), "256MiB" (2^20), "1G", "1GiB"."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ExportError(f"{text!r} is not a size (examples: 268435456, 256MB, 256MiB, 1GiB)")
    power = "kmgt".find(m.group(2).lower()) + 1 if m.group(2) else 0
    base = 1024 if m.group(3) else 1000
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise ExportError(f"a shard size must be positive, not {text!r}")
    return size


# --------------------------------------------------------------------------------------------
# Which rows and columns
# --------------------------------------------------------------------------------------------


def _union_schema(files: Sequence[str]) -> pa.Schema:
    fields: dict[str, pa.Field] = {}
    for f in files:
        for fld in stage_schema(f):
            fields.setdefault(fld.name, fld)
    return pa.schema(list(fields.values()))


def _compile_where(where: str, schema: pa.Schema) -> tuple[pl.Expr, list[str]]:
    """The filter as a polars expression and the columns it reads; checked against an
    empty frame of the stage's schema, so a typo fails before any row is read."""
    try:
        expr = pl.sql_expr(where)
    except Exception as e:  # polars raises several kinds for SQL it cannot parse
        raise ExportError(f"--where {where!r} is not an SQL expression: {_one_line(e)}") from e
    cols = expr.meta.root_names()
    unknown = [c for c in cols if c not in schema.names]
    if unknown:
        raise ExportError(
            f"--where {where!r} names column(s) {unknown} that the stage does not have; "
            f"it has: {', '.join(schema.names)}"
        )
    try:
        probe = pl.from_arrow(schema.empty_table()).with_columns(expr.alias("__keep"))
    except Exception as e:
        raise ExportError(f"--where {where!r}: {_one_line(e)}") from e
    if probe.schema["__keep"] != pl.Boolean:
        raise ExportError(
            f"--where {where!r} gives {probe.schema['__keep']}, not true/false; write a "
            f"condition such as \"edu_score >= 2.5 AND lang = 'en'\""
        )
    return expr, cols or ["id"]


def _rows(
    files: Sequence[str],
    out_schema: pa.Schema,
    expr: pl.Expr | None,
    filter_cols: Sequence[str],
) -> Iterator[pa.Table]:
    """Kept rows of every part, filtered, as `out_schema` (a column a part lacks is null)."""
    need = list(dict.fromkeys([*out_schema.names, *(filter_cols if expr is not None else ())]))
    for f in files:
        for batch in iter_parquet(f, _BATCH_ROWS, columns=need, kept_only=True):
            if expr is not None:
                frame = pl.from_arrow(batch.select(list(filter_cols)))
                try:
                    keep = frame.with_columns(expr.alias("__keep"))["__keep"].to_arrow()
                except pl.exceptions.PolarsError as e:  # a type mismatch only real rows show
                    raise ExportError(f"--where failed on {f}: {_one_line(e)}") from e
                batch = batch.filter(keep)  # null -> left out
            if not len(batch):
                continue
            for fld in out_schema:
                if fld.name not in batch.column_names:
                    batch = batch.append_column(fld, pa.nulls(len(batch), fld.type))
            yield batch.select(out_schema.names).cast(out_schema)


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


def export_stage(
    run: str | os.PathLike[str] | Run,
    stage: str,
    to: str,
    *,
    fmt: str = "parquet",
    columns: Sequence[str] | None = None,
    where: str | None = None,
    shard_rows: int | None = None,
    shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `stage`'s kept rows of `run` to `to` (a folder or URI) as `fmt` with a dataset
    card; return what `_SUCCESS` holds (files, rows). Raises ExportError for a mistake in
    the arguments and IncompleteStage for a stage that did not finish, before any write."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    shard_bytes = parse_size(shard_bytes)
    if shard_rows is not None and shard_rows <= 0:
        raise ExportError(f"--shard-rows must be positive, not {shard_rows}")
    run = run if isinstance(run, Run) else Run(resolve_run_dir(run))
    folder = run.path / stage
    if not folder.is_dir():
        have = ", ".join(stage_order(run)) or "none"
        raise ExportError(f"{run.path} has no stage {stage!r} (stages: {have})")
    files = output_files(folder)  # IncompleteStage when it did not finish
    manifest = run.manifests.get(stage) or {}
    if manifest.get("kind") == "artifact":
        raise ExportError(
            f"stage {stage!r} builds an artifact (a model, shards), not rows; export a stage "
            f"that writes documents ({', '.join(s for s in stage_order(run) if run.kind(s) == 'rows')})"
        )
    if not files:
        raise ExportError(f"stage {stage!r} in {run.path} has no parts to export")
    schema = _union_schema(files)
    if columns:
        columns = list(dict.fromkeys(c.strip() for c in columns if c.strip()))
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise ExportError(
                f"stage {stage!r} has no column(s) {unknown}; it has: {', '.join(schema.names)}"
            )
    else:
        columns = [n for n in schema.names if n not in NOT_EXPORTED_BY_DEFAULT]
    out_schema = pa.schema([schema.field(c) for c in columns])
    if fmt == "jsonl":
        binary = [f.name for f in out_schema if is_bytes(f.type)]
        if binary:
            raise ExportError(
                f"column(s) {binary} hold bytes, which JSON Lines cannot; leave them out "
                f"(--columns) or use --format parquet"
            )
    expr, filter_cols = _compile_where(where, schema) if where else (None, [])

    sink = ExportSink(to, overwrite)
    log.info("export: %s/%s -> %s (%s, %d parts)", run.path, stage, to, fmt, len(files))
    rows = _rows(files, out_schema, expr, filter_cols)
    ok = False
    try:
        if fmt == "hf":
            shards = build_hf(sink, out_schema, rows, shard_rows, shard_bytes)
        else:
            writer = ShardWriter(sink.open, fmt, out_schema, shard_rows, shard_bytes)
            try:
                for t in rows:
                    writer.add(t)
                shards = writer.finish()
            except BaseException:
                writer.abort()
                raise
        total = sum(s["rows"] for s in shards)
        card = dataset_card(run, stage, fmt, columns, where, total, shards)
        sink.write_bytes("README.md", card.encode())
        done = {
            "primer_export": 1,
            "run": str(run.path.absolute()),
            "stage": stage,
            "format": fmt,
            "where": where,
            "columns": list(columns),
            "rows": total,
            "stage_kept": manifest.get("rows_out"),
            "files": list(shards),
            "finished": utc_now(),
        }
        sink.write_bytes("_SUCCESS", (json.dumps(done, indent=2) + "\n").encode())
        sink.commit()
        ok = True
    finally:
        sink.cleanup(failed=not ok)
    log.info("export: %d rows in %d file(s) at %s", total, len(shards), to)
    return done


# --------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


def check_hub(repo: str, to: str, fmt: str = "parquet") -> None:
    """What `--push-to-hub` needs, checked before the export: Parquet or JSON Lines, a local
    `--to`, a repo id, the Hub not switched off, a token."""
    if fmt == "hf":
        raise ExportError(
            "--push-to-hub uploads Parquet or JSON Lines files, which the Hub serves and "
            "previews; a save_to_disk folder (--format hf) is for load_from_disk: export "
            "with --format parquet to push"
        )
    if storage.is_remote(to):
        raise ExportError(
            f"--push-to-hub uploads a local export; --to {to} is on object storage: export to "
            f"a local folder to push it"
        )
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo):
        raise ExportError(f"--push-to-hub {repo!r}: a Hub repo id is OWNER/NAME")
    if _offline():
        raise ExportError(
            "--push-to-hub: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it, "
            "or export without --push-to-hub and upload the folder later"
        )
    from huggingface_hub import get_token

    if not os.environ.get("HF_TOKEN") and get_token() is None:
        raise ExportError(
            "--push-to-hub needs a Hub token with write access: set HF_TOKEN or run `hf auth login`"
        )


def push_to_hub(folder: str | os.PathLike[str], repo: str, private: bool = False) -> str:
    """Upload an export folder to the Hub dataset repo `repo` (created if missing); its URL.
    HubPushError, one line, when the Hub cannot be reached or refuses."""
    from huggingface_hub import HfApi

    folder = Path(storage.local(os.fspath(folder)))
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        api = HfApi(endpoint=endpoint, token=os.environ.get("HF_TOKEN") or None)
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo, folder_path=str(folder), repo_type="dataset",
            commit_message=f"Primer export ({folder.name})", ignore_patterns=[".*"],
        )  # fmt: skip
    except Exception as e:
        where = endpoint or "https://huggingface.co"
        raise HubPushError(
            f"could not push {folder} to the Hub dataset {repo} at {where} "
            f"({type(e).__name__}: {_one_line(e)[:300]}); the export itself is complete: "
            f"upload it later with `hf upload {repo} {folder} --repo-type dataset`"
        ) from e
    return f"{(endpoint or 'https://huggingface.co').rstrip('/')}/datasets/{repo}"
