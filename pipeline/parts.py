"""The unit of work: a *part*, and the exactly-once protocol that commits it.

A part is one input file (a WARC, a JSONL, a previous stage's Parquet part). `process_part`
reads it in batches of `batch_rows`, sends each batch through the stage, and streams kept
and dropped rows into `DIR/<stage>/<part>.parquet`, which is renamed into place when
complete; then `DIR/<stage>/_parts/<part>.json` (its counts) commits it. A re-run skips
committed parts, so a run killed with SIGKILL and started again ends with the same rows as
an uninterrupted one, none lost and none doubled. Downstream parts keep their upstream
part's name, so a document's path through the stages is easy to follow.

Raw inputs are fingerprinted by their *stable path* (relative to the working directory when
inside it, so the working dir a `ray job submit --working-dir` uploads to a new temporary
path resumes the same run), size and a hash of their first and last 64 KiB.

One document never stops a part: when `stage(table)` raises, the batch is split in halves
until the rows that fail are found, and each is written with `drop_reason =
"<stage>:error"` and the exception in `error`; the part goes on. Duplicate ids inside one raw
input file are made unique (the second "7" becomes "7#1") and counted (`ids_renamed`), so
no two rows of a part share an id.

`PartTask` is what the runner maps over pending parts (pipeline/stage_runner.py): it holds
the stage, pickles as its config, and builds it once per worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from pipeline import storage
from pipeline.io import (
    AtomicParquetWriter,
    column_part_metadata,
    iter_parquet,
    read_json,
    stage_schema,
    write_json_atomic,
)
from pipeline.readers import is_dataset_input
from pipeline.readers.hf import dataset_spans
from pipeline.readers.splits import byte_spans, row_group_spans
from pipeline.remote import push_part
from pipeline.schema import READ_COLUMNS, schema_for
from pipeline.stage import MissingColumns, Stage, StageFatal

log = logging.getLogger("primer")


# Failures that are not one row's fault: bisecting a batch over them would only turn the
# whole corpus into error rows. They stop the part (and the run) with a clear message.
_FATAL = (MemoryError, OSError, MissingColumns, StageFatal)

_SAMPLE_BYTES = 64 << 10


@dataclass(frozen=True)
class Part:
    name: str
    source: str  # where to open it
    from_stage: bool  # a Primer stage output (Parquet with drop_reason) vs a raw input file
    stable: str = ""  # the path recorded in fingerprints and lineage (see stable_path)
    row_groups: tuple[int, int] | None = None  # a sub-part: row groups [a, b) of a Parquet
    byte_range: tuple[int, int] | None = None  # a sub-part: records starting in bytes [a, b)
    shards: tuple[int, int] | None = None  # a sub-part: data files or rows [a, b) of a dataset

    @property
    def label(self) -> str:
        """The part's `source_path`: the stable path, and for a sub-part its row groups or
        bytes (ids are unique within a part, so (source_path, id) names one document)."""
        path = self.stable or self.source
        if self.row_groups is not None:
            return f"{path}#row_groups={self.row_groups[0]}-{self.row_groups[1] - 1}"
        if self.byte_range is not None:
            return f"{path}#bytes={self.byte_range[0]}-{self.byte_range[1] - 1}"
        if self.shards is not None:
            return f"{path}#shards={self.shards[0]}-{self.shards[1] - 1}"
        return path


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def stable_path(path: str, anchor: str | Path | None = None) -> str:
    """`path` as fingerprints and lineage record it: relative to `anchor` (default: the
    working directory) when inside it, else absolute. A Ray job's working dir is unpacked to
    a new temporary folder on every submission; its files keep their relative paths.
    A remote URI is its own stable path."""
    if storage.is_remote(path) or path.startswith("hf:"):
        return path  # a URI, or a dataset spec hf:NAME[:CONFIG]:SPLIT
    absolute = os.path.abspath(storage.local(path))
    root = os.path.abspath(anchor if anchor is not None else os.getcwd())
    try:
        rel = os.path.relpath(absolute, root)
    except ValueError:  # another drive (Windows)
        return absolute
    return absolute if rel == ".." or rel.startswith(".." + os.sep) else rel


def part_name(path: str, stable: str | None = None) -> str:
    """A stable, readable part name for a raw input file (its name and a digest of its
    stable path)."""
    stem = Path(path).name
    for ext in (
        ".gz",
        ".zst",
        ".warc",
        ".wet",
        ".jsonl",
        ".json",
        ".ndjson",
        ".parquet",
        ".html",
        ".htm",
    ):
        stem = stem.removesuffix(ext)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:48] or "part"
    key = stable if stable is not None else stable_path(path)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def is_stage_output(path: str) -> bool:
    """A Parquet file written by a Primer stage (it has `id` and `drop_reason`). A file
    whose footer does not read is not one: the reader records it as a bad input."""
    if not path.lower().endswith(".parquet"):
        return False
    try:
        names = storage.parquet_schema(path).names
    except (pa.ArrowException, OSError):
        return False
    return "id" in names and "drop_reason" in names


def _sub_name(name: str, part: Part) -> str:
    for suffix, span, width in (("rg", part.row_groups, 5), ("b", part.byte_range, 13),
                                ("s", part.shards, 9)):  # fmt: skip
        if span is not None:
            return f"{name}.{suffix}{span[0]:0{width}d}"
    return name


def plan_parts(
    files: Sequence[str],
    anchor: str | Path | None = None,
    read: ReadOptions | None = None,
    run_root: str | Path | None = None,
) -> list[Part]:
    """One part per file, except a raw Parquet file with more than `read.max_rows_per_part`
    rows (one sub-part per range of row groups) and a gzip WARC or plain JSONL file over
    `read.max_bytes_per_part` (one per byte range), so no file is a single-task bottleneck.
    Files inside `run_root` (an earlier stage's output) are named by their path in it
    ("RUN/seeds/seeds-00000.parquet"), so the run folder can move, or resume from object
    storage into another staging folder, with the same part names and fingerprints."""
    read = read or ReadOptions()
    root = os.path.abspath(run_root) if run_root is not None else None
    parts = []
    for f in files:
        stable = stable_path(f, anchor)
        if root is not None and not storage.is_remote(f):
            inside = os.path.relpath(os.path.abspath(storage.local(f)), root)
            if not inside.startswith(".."):
                stable = "RUN/" + Path(inside).as_posix()
        if is_stage_output(f) and storage.is_dir(storage.join(storage.parent(f), "_parts")):
            parts.append(Part(Path(f).stem, f, True, stable))
            continue
        from_stage = is_stage_output(f)
        name = part_name(f, stable)
        if from_stage:
            parts.append(Part(name, f, from_stage, stable))
            continue
        if is_dataset_input(f):
            spans = dataset_spans(f, read.max_rows_per_part) or ()
            subs = [Part(name, f, False, stable, shards=span) for span in spans]
        else:
            subs = [
                Part(name, f, False, stable, span)
                for span in row_group_spans(f, read.max_rows_per_part) or ()
            ]
        if not subs:
            spans = byte_spans(f, read.max_bytes_per_part) or ()
            subs = [Part(name, f, False, stable, byte_range=span) for span in spans]
        if subs:
            parts += [replace(p, name=_sub_name(name, p)) for p in subs]
        else:
            parts.append(Part(name, f, False, stable))
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        # Two inputs from different stage folders with the same part name: disambiguate.
        parts = [replace(p, name=_sub_name(part_name(p.source, p.stable), p)) for p in parts]
    return parts


def _content_sample(path: str, size: int) -> str:
    """xxh64 of the first and last 64 KiB: content, not mtime, which copies and Ray's
    working-dir unpacking do not keep. Two small reads per file, even on object storage."""
    h = xxhash.xxh64()
    with storage.open_input(path) as f:
        h.update(f.read(_SAMPLE_BYTES))
        if size > 2 * _SAMPLE_BYTES:
            f.seek(size - _SAMPLE_BYTES)
            h.update(f.read(_SAMPLE_BYTES))
        elif size > _SAMPLE_BYTES:
            h.update(f.read())
    return h.hexdigest()


def input_fingerprint(parts: Sequence[Part], read: str = "") -> str:
    """What the raw inputs are: stable path, size and content sample of each (and `read`,
    the reader settings that change what is read from them)."""
    from pipeline.readers import dataset_digest, is_dataset_input

    h = hashlib.sha256(read.encode())
    for p in parts:
        if is_dataset_input(p.source):
            h.update(f"{p.name}\0{p.label}\0{dataset_digest(p.source)}\n".encode())
            continue
        size = storage.size(p.source)
        h.update(f"{p.name}\0{p.label}\0{size}\0{_content_sample(p.source, size)}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ReadOptions:
    """How raw input files are read (the recipe's `read:` section)."""

    text_column: str = "text"
    id_column: str = "id"
    max_rows_per_part: int | None = None  # a larger raw Parquet file becomes sub-parts
    max_bytes_per_part: int | None = None  # a larger gzip WARC or plain JSONL file too

    @classmethod
    def of(cls, section: Any) -> ReadOptions:
        """From a recipe's `read:` section (pipeline.recipe.ReadConfig)."""
        return cls(
            section.text_column,
            section.id_column,
            section.max_rows_per_part,
            section.max_bytes_per_part,
        )

    def fingerprint(self) -> str:
        # Byte ranges need no entry: they change only split files' part labels, which
        # input_fingerprint hashes.
        split = "" if self.max_rows_per_part is None else f"\0split={self.max_rows_per_part}"
        return f"text={self.text_column}\0id={self.id_column}{split}"


def input_columns(part: Part) -> list[str]:
    if part.from_stage:
        return stage_schema(part.source).names
    return list(READ_COLUMNS)


def iter_input(
    part: Part,
    batch_rows: int,
    columns: Sequence[str] | None = None,
    read: ReadOptions | None = None,
    unique: Any = None,
) -> Iterator[pa.Table]:
    """The part's rows to process; `columns` (stage outputs only) reads just those;
    `unique` (a readers.UniqueIds) counts the ids a raw file repeats."""
    if part.from_stage:
        yield from iter_parquet(part.source, batch_rows=batch_rows, columns=columns)
        return
    from pipeline.readers import iter_batches

    read = read or ReadOptions()
    lineage = pa.scalar(part.label, pa.string())
    for table in iter_batches(
        part.source,
        batch_rows=batch_rows,
        text_column=read.text_column,
        id_column=read.id_column,
        unique_ids=unique,
        row_groups=part.row_groups,
        byte_range=part.byte_range,
        shards=part.shards,
    ):
        # Lineage names the stable path, not wherever this worker found the file.
        idx = table.column_names.index("source_path")
        yield table.set_column(idx, "source_path", pa.repeat(lineage, len(table)))


def fill_columns(table: pa.Table, schema: pa.Schema) -> pa.Table:
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table.select(schema.names).cast(schema)


def _error_text(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:500]}" if msg else type(e).__name__


def _guarded(stage: Stage, table: pa.Table) -> Iterator[pa.Table]:
    """`stage(table)`, or, when it raises, the same batch split in halves until the rows
    that fail are alone; each of those comes back as an error row (`<stage>:error`, the
    exception in `error`) and the rest as the stage made them."""
    try:
        yield stage(table)
        return
    except _FATAL:
        raise
    except Exception as e:
        if len(table) > 1:
            mid = len(table) // 2
            yield from _guarded(stage, table.slice(0, mid))
            yield from _guarded(stage, table.slice(mid))
            return
        log.warning(
            "%s: row %r could not be processed (%s); recorded as %s:error",
            stage.name, table["id"][0].as_py() if "id" in table.column_names else "?",
            _error_text(e), stage.name,
        )  # fmt: skip
        reason = pa.array([f"{stage.name}:error"], pa.string())
        out = table.set_column(table.column_names.index("drop_reason"), "drop_reason", reason)
        error = pa.array([_error_text(e)], pa.string())
        if "error" in out.column_names:
            yield out.set_column(out.column_names.index("error"), "error", error)
        else:
            yield out.append_column("error", error)


def process_part(
    stage: Stage, part: Part, out_dir: Path, fingerprint: str, read: ReadOptions | None = None
) -> dict[str, Any]:
    """Run `stage` over one part and commit its output; returns the part's counts."""
    t0 = time.monotonic()
    batch_rows = stage.config.batch_rows
    path = out_dir / f"{part.name}.parquet"
    columns: list[str] | None = None
    if stage.annotates and part.from_stage:
        # A column part: read only what the stage needs, write only what it adds.
        if stage.unwritten_reasons:
            raise TypeError(f"stage {stage.name!r} annotates, so it must write every row")
        columns = ["id", *stage.needs]
        schema = schema_for({"id", *stage.adds, "drop_reason", "error"})
        writer = AtomicParquetWriter(path, metadata=column_part_metadata(path, part.source))
    else:
        schema = schema_for({*input_columns(part), *stage.adds, "drop_reason", "error"})
        writer = AtomicParquetWriter(path)
    from pipeline.readers import UniqueIds

    unique = None if part.from_stage else UniqueIds()
    unwritten = pa.array([f"{stage.name}:{r}" for r in stage.unwritten_reasons], pa.string())
    rows_in = 0
    dropped: Counter[str] = Counter()
    try:
        stage.ensure_setup()
        for table in iter_input(part, batch_rows, columns, read, unique):
            rows_in += len(table)
            if "drop_reason" in table.column_names and table["drop_reason"].null_count < len(table):
                # Rows a reader already rejected (bad records) pass through, counted.
                bad = table.filter(pc.is_valid(table["drop_reason"]))
                table = table.filter(pc.is_null(table["drop_reason"]))
                writer.write(fill_columns(bad, schema))
                dropped.update(bad["drop_reason"].to_pylist())
            if len(table) == 0:
                continue
            for out in _guarded(stage, table):
                reasons = out["drop_reason"]
                if reasons.null_count < len(out):
                    dropped.update(pc.drop_null(reasons).to_pylist())
                    if len(unwritten):
                        out = out.filter(
                            pc.invert(pc.fill_null(pc.is_in(reasons, unwritten), False))
                        )
                writer.write(fill_columns(out, schema))
        nbytes = writer.close(empty_schema=schema)
    except BaseException as e:
        writer.abort()
        raise PartError(stage.name, part.label, e, str(path)) from e
    n_dropped = sum(dropped.values())
    stats = {
        "part": part.name,
        "source": part.label,
        "fingerprint": fingerprint,
        "rows_in": rows_in,
        "rows_out": rows_in - n_dropped,
        "dropped": dict(sorted(dropped.items())),
        "ids_renamed": unique.renamed if unique is not None else 0,
        "bytes": nbytes,
        "seconds": round(time.monotonic() - t0, 3),
        "finished": utc_now(),
    }
    write_json_atomic(out_dir / "_parts" / f"{part.name}.json", stats)
    return stats


class PartError(RuntimeError):
    """A part that could not be processed at all (its file vanished, the disk is full, the
    stage's model did not load); `cause` is the original exception."""

    def __init__(
        self, stage: str, source: str, cause: BaseException, path: str | None = None
    ) -> None:
        super().__init__(f"stage {stage!r} failed on {source}: {_error_text(cause)}")
        self.cause = cause
        self.path = path  # the part file it was writing


@dataclass
class PartTask:
    """`process_part` for one stage, as the executor maps it over parts: the stage is built
    (and its model loaded) once per worker that runs it."""

    stage: Stage
    out_dir: str
    fingerprint: str
    read: ReadOptions | None = None
    remote: str | None = None  # the stage's URI on object storage (pipeline/remote.py)

    def __call__(self, part: Part) -> dict[str, Any]:
        stats = process_part(self.stage, part, Path(self.out_dir), self.fingerprint, self.read)
        if self.remote:
            push_part(self.remote, self.out_dir, part.name)
        return stats


def remark_part(stage: Stage, name: str, out_dir: Path, fingerprint: str) -> dict[str, Any]:
    """Mark a committed part's rows again from the scores stored in it: only the stage's
    `threshold_keys` changed. The stage's own reasons are cleared (except `error` and its
    `score_reasons`), `stage.mark` decides them again, and the part and its commit record
    are replaced atomically, in that order: a part killed between the two is marked again
    on the next attempt, which gives the same rows."""
    t0 = time.monotonic()
    path = out_dir / f"{name}.parquet"
    commit = out_dir / "_parts" / f"{name}.json"
    old = read_json(commit)
    if stage.unwritten_reasons:
        raise TypeError(f"stage {stage.name!r} leaves rows unwritten; it cannot mark again")
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    writer = AtomicParquetWriter(path, metadata=schema.metadata)
    keep = pa.array(
        [f"{stage.name}:error", *(f"{stage.name}:{r}" for r in stage.score_reasons)], pa.string()
    )
    dropped: Counter[str] = Counter()
    try:
        for batch in pf.iter_batches(batch_size=stage.config.batch_rows):
            table = pa.Table.from_batches([batch], schema)
            reason = table["drop_reason"]
            ours = pc.and_(
                pc.starts_with(reason, f"{stage.name}:"), pc.invert(pc.is_in(reason, keep))
            )
            cleared = pc.if_else(pc.fill_null(ours, False), pa.scalar(None, pa.string()), reason)
            table = table.set_column(schema.get_field_index("drop_reason"), "drop_reason", cleared)
            out = stage.mark(table).select(schema.names).cast(schema)
            dropped.update(pc.drop_null(out["drop_reason"]).to_pylist())
            writer.write(out)
        nbytes = writer.close(empty_schema=schema)
    except BaseException as e:
        writer.abort()
        raise PartError(stage.name, old.get("source", name), e, str(path)) from e
    n_dropped = sum(dropped.values())
    stats = old | {
        "fingerprint": fingerprint,
        "rows_out": old["rows_in"] - n_dropped,
        "dropped": dict(sorted(dropped.items())),
        "bytes": nbytes,
        "seconds": round(old["seconds"] + time.monotonic() - t0, 3),
        "scores_reused": True,
        "finished": utc_now(),
    }
    write_json_atomic(commit, stats)
    return stats


@dataclass
class RemarkTask:
    """`remark_part` for one stage, as the executor maps it over part names."""

    stage: Stage
    out_dir: str
    fingerprint: str
    remote: str | None = None

    def __call__(self, name: str) -> dict[str, Any]:
        stats = remark_part(self.stage, name, Path(self.out_dir), self.fingerprint)
        if self.remote:
            push_part(self.remote, self.out_dir, name)
        return stats
