"""Atomic, resumable writes and the reading side of stage outputs.

Every file Primer writes lands in a temporary name beside its target and is renamed into
place (rename is atomic on one filesystem), so a run killed with SIGKILL leaves either the
whole file or nothing; a half-written Parquet part is never mistaken for a finished one.

A stage's output folder `DIR/<stage>/` holds one Parquet file per part and, under
`_parts/`, one small JSON of counts per part written *after* its Parquet file: the JSON
is the commit marker a resumed run checks.

A stage that only adds columns (`Stage.annotates`, the edu_score classifier) writes *column
parts*, as Dolma's taggers write attribute files: `id`, its own columns and `drop_reason`,
one row per kept row of its input part, in order, and the input part's location in the
file's metadata (`primer.base`). Copying and recompressing every document's text would
cost the stage more than its model (benchmarks/edu_score.py). Readers here join a column
part with its base transparently, so every consumer sees whole rows; the ids are checked
row by row, and a base rewritten since is a clear error, never a silent misalignment.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.schema import conform, schema_for


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


_NO_DICTIONARY = frozenset({"text", "html", "seed_text", "prompt", "teacher_answer"})


class AtomicParquetWriter:
    """Stream batches into `path` through a temp file; `close()` renames it into place.

    The schema is fixed by the first batch; later batches are conformed and cast to it, so
    a column that is all-null in one batch does not change the file's type.
    """

    def __init__(
        self,
        path: str | Path,
        compression: str = "zstd",
        metadata: dict[bytes, bytes] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _tmp_path(self.path)
        self._compression = compression
        self._metadata = metadata
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if len(table) == 0:
            # A 0-row row group is legal Parquet, but readers that size batches by row
            # groups (Hugging Face `datasets`: "BatchSize must be greater than 0") fail.
            return
        table = conform(table)
        if self._writer is None:
            # Dictionary-encoding document text only costs time: texts rarely repeat in a
            # row group (benchmarks/edu_score.py: write 47 -> 39 us/doc, same size).
            dictionary = [n for n in table.schema.names if n not in _NO_DICTIONARY]
            schema = table.schema.with_metadata(self._metadata) if self._metadata else table.schema
            self._writer = pq.ParquetWriter(
                self._tmp, schema, compression=self._compression, use_dictionary=dictionary
            )
        elif not table.schema.equals(self._writer.schema, check_metadata=False):
            table = table.select(self._writer.schema.names).cast(self._writer.schema)
        self._writer.write_table(table, row_group_size=max(len(table), 1))
        self.rows += len(table)

    def close(self, empty_schema: pa.Schema | None = None) -> int:
        """Finish the file; with no rows written, an empty file of `empty_schema` (a schema
        and zero row groups)."""
        if self._writer is None:
            if empty_schema is None:
                raise ValueError(f"no rows and no schema for {self.path}")
            if self._metadata:
                empty_schema = empty_schema.with_metadata(self._metadata)
            pq.ParquetWriter(self._tmp, empty_schema, compression=self._compression).close()
        else:
            self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Column parts: a stage's added columns, joined with the part they annotate when read
# --------------------------------------------------------------------------------------------

BASE_KEY = b"primer.base"


class StaleColumnPart(RuntimeError):
    """A column part whose base part is missing or was rewritten after it was written."""


def column_part_metadata(path: str | Path, base: str | Path) -> dict[bytes, bytes]:
    """The `primer.base` metadata of a column part at `path` over the part `base`: where
    the base is, relative to the column part's folder, and its size in bytes (a rewritten
    base is caught before any row). Nothing absolute: the part's bytes are the same wherever
    the run folder is (the mixture keys its draws on them), and the folder can move whole."""
    base = Path(base).resolve()
    info = {
        "path": os.path.relpath(base, Path(path).resolve().parent),
        "bytes": base.stat().st_size,
    }
    return {BASE_KEY: json.dumps(info).encode()}


def column_base(path: str | Path, schema: pa.Schema | None = None) -> tuple[Path, dict] | None:
    """(base part, its recorded info) of a column part, None for an ordinary Parquet file."""
    schema = schema if schema is not None else pq.read_schema(path)
    raw = (schema.metadata or {}).get(BASE_KEY)
    if raw is None:
        return None
    info = json.loads(raw)
    rel = Path(path).resolve().parent / info["path"]
    # "abs": where the base was when written, kept by column parts of earlier versions
    base = rel if rel.is_file() or not info.get("abs") else Path(info["abs"])
    if not base.is_file():
        raise StaleColumnPart(
            f"{path} holds columns for {rel}, which is missing; a column "
            f"part is read with the part it annotates: keep the run folder together, or re-run "
            f"the stage that wrote {Path(path).parent.name}"
        )
    if base.stat().st_size != info["bytes"]:
        raise StaleColumnPart(
            f"{base} changed after {path} was written over it ({base.stat().st_size} bytes, "
            f"{info['bytes']} then); re-run the stage that wrote {Path(path).parent.name}"
        )
    return base, info


def stage_schema(path: str | Path) -> pa.Schema:
    """The schema a reader sees for a stage part: a column part's base columns and its own
    (its `drop_reason` replacing the base's), in the canonical order a stage that copied
    the base would have written; an ordinary file's own schema."""
    own = pq.read_schema(path)
    found = column_base(path, own)
    if found is None:
        return own.remove_metadata()
    return schema_for({*stage_schema(found[0]).names, *own.names})


def _aligned(
    base: Iterator[pa.Table], cols: Iterator[pa.Table]
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Pairs (base batch, the same number of the column part's next rows)."""
    buf: pa.Table | None = None
    for b in base:
        need, pieces = len(b), []
        while need:
            if buf is None or len(buf) == 0:
                buf = next(cols, None)
                if buf is None:
                    raise StaleColumnPart("column part has fewer rows than its base")
                continue
            piece = buf.slice(0, need)
            pieces.append(piece)
            buf = buf.slice(len(piece))
            need -= len(piece)
        yield b, pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    if (buf is not None and len(buf)) or next(cols, None) is not None:
        raise StaleColumnPart("column part has more rows than its base")


def _iter_column_part(
    path: str | Path,
    base: Path,
    batch_rows: int,
    columns: Sequence[str] | None,
    kept_only: bool,
) -> Iterator[pa.Table]:
    own_names = pq.read_schema(path).names
    logical = stage_schema(path)
    want = [c for c in (columns if columns is not None else logical.names) if c in logical.names]
    if kept_only and "drop_reason" not in want:
        want.append("drop_reason")  # as iter_parquet does for an ordinary file
    out_schema = pa.schema([logical.field(c) for c in want])
    own = [c for c in want if c in own_names and c != "id"]
    if "drop_reason" not in own and (kept_only or "drop_reason" in want):
        own.append("drop_reason")
    from_base = [c for c in want if c not in own]
    if "id" not in from_base:
        from_base.append("id")  # the row-by-row alignment check
    base_iter = iter_parquet(base, batch_rows, columns=from_base, kept_only=True)
    own_iter = (
        pa.Table.from_batches([b])
        for b in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=[*own, "id"])
    )
    try:
        for b, c in _aligned(base_iter, own_iter):
            if not pc.all(pc.equal(b["id"], c["id"])).as_py():
                raise StaleColumnPart("ids differ from the base's, row by row")
            table = pa.Table.from_arrays(
                [*(b[n] for n in from_base if n != "drop_reason"), *(c[n] for n in own)],
                names=[*(n for n in from_base if n != "drop_reason"), *own],
            )
            if kept_only and table["drop_reason"].null_count < len(table):
                table = table.filter(pc.is_null(table["drop_reason"]))
            table = table.select(want).cast(out_schema)
            if len(table):
                yield table
    except StaleColumnPart as e:
        raise StaleColumnPart(
            f"{path} does not line up with its base {base}: {e}; re-run the stage that wrote "
            f"{Path(path).parent.name}"
        ) from None


def read_stage_part(
    path: str | Path, columns: Sequence[str] | None = None, kept_only: bool = False
) -> pa.Table:
    """A whole stage part as one table (a column part joined with its base)."""
    tables = list(iter_parquet(path, 64 * 1024, columns=columns, kept_only=kept_only))
    if tables:
        return pa.concat_tables(tables)
    schema = stage_schema(path)
    names = [c for c in (columns or schema.names) if c in schema.names]
    return pa.schema([schema.field(n) for n in names]).empty_table()


def iter_parquet(
    path: str | Path,
    batch_rows: int = 1000,
    columns: Sequence[str] | None = None,
    kept_only: bool = True,
) -> Iterator[pa.Table]:
    """Batches of a Parquet file; with `kept_only`, rows whose `drop_reason` is null. A
    column part comes joined with its base (see the module)."""
    found = column_base(path)
    if found is not None:
        yield from _iter_column_part(path, found[0], batch_rows, columns, kept_only)
        return
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    cols = [c for c in columns if c in names] if columns is not None else None
    if kept_only and cols is not None and "drop_reason" not in cols and "drop_reason" in names:
        cols = [*cols, "drop_reason"]
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        table = pa.Table.from_batches([batch])
        if kept_only and "drop_reason" in names and table["drop_reason"].null_count < len(table):
            table = table.filter(pc.is_null(table["drop_reason"]))  # copies: only when needed
        if len(table):
            yield table


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand globs and folders (local, or URIs: s3://, gs://, hf://, https://, file://; see
    pipeline/storage.py), dataset specs (hf:NAME:SPLIT) and crawl paths listings
    (warc.paths.gz[#FIRST-LAST]) into a sorted, de-duplicated list of files.

    Raises a clear error for a pattern that matches nothing, before any work starts.
    """
    from pipeline import storage
    from pipeline.readers.hf import is_hf_spec, is_saved_dataset, saved_dataset_inputs

    files: list[str] = []
    for pattern in patterns:
        if is_hf_spec(pattern):  # a dataset, not files: checked when the run is planned
            files.append(pattern)
            continue
        if storage.is_paths_file(pattern):  # a crawl's listing: the files it names
            files.extend(storage.paths_listing(pattern))
            continue
        if not storage.is_remote(pattern) and is_saved_dataset(Path(pattern).expanduser()):
            files.extend(saved_dataset_inputs(str(Path(pattern).expanduser())))
            continue
        found = storage.expand(pattern)
        if not found:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        files.extend(found)
    resolved = (
        f if storage.is_remote(f) or is_hf_spec(f) else str(Path(f).resolve()) for f in files
    )
    return sorted(dict.fromkeys(resolved))


def is_stage_parquet(path: str | Path) -> bool:
    """A Primer stage output (Parquet with id, text and drop_reason), read directly."""
    if not str(path).lower().endswith(".parquet"):
        return False
    return {"id", "text", "drop_reason"} <= set(stage_schema(path).names)


def iter_documents(
    inputs: Iterable[str | Path | pa.Table],
    batch_rows: int = 1000,
    columns: Sequence[str] = ("id", "text"),
) -> Iterator[pa.Table]:
    """Kept rows of `inputs`, a batch at a time: tables as given, stage outputs read
    directly (only `columns`), any other file through pipeline.readers, as the runner
    reads it, so ids match those a per-part pass sees."""
    for item in inputs:
        if isinstance(item, pa.Table):
            yield item
        elif is_stage_parquet(item):
            yield from iter_parquet(item, batch_rows, columns=list(columns), kept_only=True)
        else:
            from pipeline.readers import iter_batches

            for table in iter_batches(str(item), batch_rows=batch_rows):
                table = table.filter(pc.is_null(table["drop_reason"]))
                if len(table):
                    yield table
