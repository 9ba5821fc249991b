"""Atomic, resumable writes and the reading side of stage outputs.

Every file Primer writes lands in a temporary name beside its target and is renamed into
place (rename is atomic on one filesystem), so a run killed with SIGKILL leaves either the
whole file or nothing; a half-written Parquet part is never mistaken for a finished one.

A stage's output folder `DIR/<stage>/` holds one Parquet file per part and, under
`_parts/`, one small JSON of counts per part written *after* its Parquet file: the JSON
is the commit marker a resumed run checks.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.schema import conform


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

    def __init__(self, path: str | Path, compression: str = "zstd") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _tmp_path(self.path)
        self._compression = compression
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        table = conform(table)
        if self._writer is None:
            # Dictionary-encoding document text only costs time: texts rarely repeat in a
            # row group (benchmarks/edu_score.py: write 47 -> 39 us/doc, same size).
            dictionary = [n for n in table.schema.names if n not in _NO_DICTIONARY]
            self._writer = pq.ParquetWriter(
                self._tmp, table.schema, compression=self._compression, use_dictionary=dictionary
            )
        elif not table.schema.equals(self._writer.schema, check_metadata=False):
            table = table.select(self._writer.schema.names).cast(self._writer.schema)
        self._writer.write_table(table, row_group_size=max(len(table), 1))
        self.rows += len(table)

    def close(self, empty_schema: pa.Schema | None = None) -> int:
        """Finish the file; with no batches written, write an empty file of `empty_schema`."""
        if self._writer is None:
            if empty_schema is None:
                raise ValueError(f"no rows and no schema for {self.path}")
            pq.write_table(empty_schema.empty_table(), self._tmp)
        else:
            self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._tmp.unlink(missing_ok=True)


def iter_parquet(
    path: str | Path,
    batch_rows: int = 1000,
    columns: Sequence[str] | None = None,
    kept_only: bool = True,
) -> Iterator[pa.Table]:
    """Batches of a Parquet file; with `kept_only`, rows whose `drop_reason` is null."""
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    cols = [c for c in columns if c in names] if columns is not None else None
    if kept_only and cols is not None and "drop_reason" not in cols and "drop_reason" in names:
        cols = [*cols, "drop_reason"]
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        table = pa.Table.from_batches([batch])
        if kept_only and "drop_reason" in names:
            table = table.filter(pc.is_null(table["drop_reason"]))
        if len(table):
            yield table


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand globs and folders into a sorted, de-duplicated list of files.

    Raises a clear error for a pattern that matches nothing, before any work starts.
    """
    files: list[str] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            found = sorted(
                str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_"))
            )
        elif any(ch in pattern for ch in "*?["):
            found = sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        elif p.is_file():
            found = [str(p)]
        else:
            found = []
        if not found:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        files.extend(found)
    return sorted(dict.fromkeys(str(Path(f).resolve()) for f in files))


def is_stage_parquet(path: str | Path) -> bool:
    """A Primer stage output (Parquet with id, text and drop_reason), read directly."""
    if not str(path).endswith(".parquet"):
        return False
    return {"id", "text", "drop_reason"} <= set(pq.read_schema(path).names)


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
