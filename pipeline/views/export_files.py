"""The files of an export (`primer export`, pipeline/views/export.py): where they go and
where one shard ends.

    sink = ExportSink("s3://bucket/edu", overwrite=False)     # or a local folder
    shards = ShardWriter(sink.open, "parquet", schema, shard_rows=None, shard_bytes=256 << 20)
    for table in rows:
        shards.add(table)
    files = shards.finish()          # [{"path": "data/train-00000.parquet", "rows": ...}, ...]
    sink.write_bytes("_SUCCESS", b"...")
    sink.commit()

`ExportSink` is the destination. Locally it is a hidden folder beside the target, renamed
into place by `commit` (a killed export leaves nothing at the target). On object storage,
which has no rename, it writes each object under its final name, and the caller writes
`_SUCCESS` last. An existing target is replaced only with `overwrite`, and only when it
holds nothing but what an export writes.

`ShardWriter` cuts rows into `data/train-NNNNN.parquet` (zstd, row groups of at most
64 MiB of data, text not dictionary-encoded) or `.jsonl.gz` (gzip with no name or time in
its header, so the same rows give the same bytes). A shard ends at `shard_rows` rows or
`shard_bytes` data bytes (`row_bytes`: strings' and binaries' own bytes, numbers' width),
whichever comes first; a row over `shard_bytes` is a shard of its own. `build_hf` stages
such Parquet shards and turns them into a `Dataset.save_to_disk` folder with as many
Arrow files.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

SUFFIX = {"parquet": ".parquet", "jsonl": ".jsonl.gz"}

# A Parquet row group holds at most this much data (the Hub's viewer pages by row groups)
_ROW_GROUP_BYTES = 64 << 20
# What an export folder holds (what `overwrite` may replace); hidden names are ours too
_EXPORT_NAMES = re.compile(
    r"^(data|data/train-\d+\.(parquet|jsonl\.gz)|README\.md|_SUCCESS|state\.json|"
    r"dataset_info\.json|data-\d+-of-\d+\.arrow|(.*/)?\..*)$"
)


class ExportError(ValueError):
    """A mistake in the export's arguments (an unknown stage or column, a bad filter, a
    folder in the way), found before any row is written; the CLI exits 2 with its line."""


def row_bytes(table: pa.Table) -> np.ndarray:
    """Data bytes of each row: strings' and binaries' own bytes, numbers' width; a nested
    column's bytes spread evenly over its rows."""
    n = len(table)
    total = np.zeros(n, dtype=np.int64)
    for col in table.columns:
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or is_bytes(t):
            total += pc.fill_null(pc.binary_length(col), 0).to_numpy().astype(np.int64)
        elif pa.types.is_boolean(t):
            total += 1
        elif getattr(t, "bit_width", 0):
            total += t.bit_width // 8
        elif n:
            total += col.nbytes // n
    return total


# --------------------------------------------------------------------------------------------
# Where the files go
# --------------------------------------------------------------------------------------------


class ExportSink:
    """The export's destination: a hidden local folder renamed into place at the end, or a
    prefix on object storage written object by object."""

    def __init__(self, to: str, overwrite: bool) -> None:
        self.to = to
        self.remote = storage.is_remote(to)
        self.written: list[str] = []
        if self.remote:
            self.fs, self.inner = storage.filesystem(to)
            self.inner = self.inner.rstrip("/")
            self.fs.invalidate_cache()
            names = (
                [p[len(self.inner) + 1 :] for p in self.fs.find(self.inner)]
                if self.fs.exists(self.inner)
                else []
            )
            self._check_target(names, overwrite)
            if names:
                self.fs.rm(self.inner, recursive=True)
        else:
            self.target = Path(storage.local(to)).expanduser().absolute()
            if self.target.exists() and not self.target.is_dir():
                raise ExportError(f"--to {to}: {self.target} is a file; name a folder")
            names = (
                [str(p.relative_to(self.target)) for p in self.target.rglob("*")]
                if self.target.is_dir()
                else []
            )
            self._check_target(names, overwrite)
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.root = self.target.parent / f".{self.target.name}.export-{uuid.uuid4().hex[:8]}"
            self.root.mkdir()

    def _check_target(self, names: list[str], overwrite: bool) -> None:
        if not names:
            return
        if not overwrite:
            raise ExportError(
                f"--to {self.to} is not empty; choose another folder, or pass --overwrite to "
                f"replace an earlier export there"
            )
        foreign = sorted(n for n in names if not _EXPORT_NAMES.match(n.replace(os.sep, "/")))
        if foreign:
            raise ExportError(
                f"--to {self.to} holds files an export does not write ({', '.join(foreign[:5])}); "
                f"--overwrite replaces only an earlier export: choose another folder"
            )

    def local_dir(self) -> Path:
        """A local folder the files can be built in (the hidden one, or a temporary one for
        a remote export, uploaded by `put_dir`)."""
        if not self.remote:
            return self.root
        if not hasattr(self, "_tmp"):
            self._tmp = Path(tempfile.mkdtemp(prefix="primer-export-"))
        return self._tmp

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[IO[bytes]]:
        if self.remote:
            with self.fs.open(f"{self.inner}/{rel}", "wb") as f:
                yield f
        else:
            with open_local(self.root, rel) as f:
                yield f
        self.written.append(rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open(rel) as f:
            f.write(data)

    def put_dir(self, folder: Path) -> None:
        """Upload the files of a local build folder (remote); locally they are in place."""
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = str(p.relative_to(folder))
                if self.remote:
                    self.fs.put_file(str(p), f"{self.inner}/{rel}")
                self.written.append(rel)

    def commit(self) -> None:
        if self.remote:
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.root, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def cleanup(self, failed: bool) -> None:
        if hasattr(self, "_tmp"):
            shutil.rmtree(self._tmp, ignore_errors=True)
        if failed and not self.remote:
            shutil.rmtree(self.root, ignore_errors=True)
        elif failed:
            with contextlib.suppress(Exception):  # best effort: no _SUCCESS marks it partial
                for rel in self.written:
                    self.fs.rm(f"{self.inner}/{rel}")


@contextlib.contextmanager
def open_local(root: Path, rel: str) -> Iterator[IO[bytes]]:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        yield f


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Rows in, shards out: `data/train-NNNNN.<suffix>`, each ending at `shard_rows` rows or
    `shard_bytes` data bytes."""

    def __init__(
        self,
        opener: Callable[[str], contextlib.AbstractContextManager[IO[bytes]]],
        fmt: str,
        schema: pa.Schema,
        shard_rows: int | None,
        shard_bytes: int,
    ) -> None:
        self.opener, self.fmt, self.schema = opener, fmt, schema
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._ctx: contextlib.AbstractContextManager | None = None
        self._writer: Any = None
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self.rows = self.bytes = 0

    def _open(self) -> None:
        rel = f"data/train-{len(self.shards):05d}{SUFFIX[self.fmt]}"
        self._ctx = self.opener(rel)
        f = self._ctx.__enter__()
        if self.fmt == "parquet":
            plain = [n.name for n in self.schema if not _is_large(n.type)]
            self._writer = pq.ParquetWriter(
                f, self.schema, compression="zstd", use_dictionary=plain
            )
        else:
            self._writer = gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="")
        self.shards.append({"path": rel, "rows": 0, "data_bytes": 0})
        self.rows = self.bytes = 0

    def _flush(self) -> None:
        if self._pending and self.fmt == "parquet":
            t = pa.concat_tables(self._pending)
            self._writer.write_table(t, row_group_size=len(t))
        self._pending, self._pending_bytes = [], 0

    def _close(self) -> None:
        if self._ctx is None:
            return
        self._flush()
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        self._ctx = self._writer = None

    def _write(self, table: pa.Table, nbytes: int) -> None:
        if self.fmt == "parquet":
            self._pending.append(table)
            self._pending_bytes += nbytes
            if self._pending_bytes >= _ROW_GROUP_BYTES:
                self._flush()
        else:
            buf = io.BytesIO()
            pl.from_arrow(table).write_ndjson(buf)
            self._writer.write(buf.getvalue())
        self.rows += len(table)
        self.bytes += nbytes
        self.shards[-1]["rows"] = self.rows
        self.shards[-1]["data_bytes"] = self.bytes

    def add(self, table: pa.Table) -> None:
        sizes = row_bytes(table)
        off = 0
        while off < len(table):
            if self._ctx is None:
                self._open()
            n = len(table) - off
            if self.shard_rows:
                n = min(n, self.shard_rows - self.rows)
            cum = np.cumsum(sizes[off : off + n])
            fit = int(np.searchsorted(cum, self.shard_bytes - self.bytes, side="right"))
            n = max(fit, 1) if self.rows == 0 else fit  # a row over the limit: alone
            if n == 0:
                self._close()
                continue
            self._write(table.slice(off, n), int(cum[n - 1]))
            off += n
            full_rows = self.shard_rows is not None and self.rows >= self.shard_rows
            if full_rows or self.bytes >= self.shard_bytes:
                self._close()

    def finish(self) -> list[dict[str, Any]]:
        """Close the last shard; an export of no rows is one empty shard with the schema
        (pyarrow and polars read it; `datasets` refuses a split of no rows)."""
        if not self.shards:
            self._open()
        self._close()
        return self.shards

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
            if self._ctx is not None:
                self._ctx.__exit__(None, None, None)


def _is_large(t: pa.DataType) -> bool:
    return pa.types.is_large_string(t) or pa.types.is_large_binary(t)


def is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def build_hf(
    sink: ExportSink, schema: pa.Schema, rows: Iterator[pa.Table], shard_rows: int | None,
    shard_bytes: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """A `save_to_disk` folder with as many Arrow shards as the Parquet export would have."""
    import datasets
    from datasets.table import InMemoryTable
    from datasets.utils.tqdm import are_progress_bars_disabled

    work = Path(tempfile.mkdtemp(prefix="primer-export-hf-"))
    try:
        writer = ShardWriter(partial(open_local, work / "pq"), "parquet", schema, shard_rows,
                             shard_bytes)  # fmt: skip
        for t in rows:
            writer.add(t)
        staged = writer.finish()
        quiet = are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            files = [str(work / "pq" / s["path"]) for s in staged]
            if sum(s["rows"] for s in staged):
                ds = datasets.Dataset.from_parquet(files, cache_dir=str(work / "cache"))
            else:
                ds = datasets.Dataset(InMemoryTable(schema.empty_table()))
            out = sink.local_dir()
            ds.save_to_disk(str(out), num_shards=len(staged))
        finally:
            if not quiet:
                datasets.enable_progress_bars()
        state = json.loads((out / "state.json").read_text())
        shards = []
        for entry in state["_data_files"]:
            with pa.memory_map(str(out / entry["filename"])) as f:
                shards.append(
                    {"path": entry["filename"], "rows": pa.ipc.open_stream(f).read_all().num_rows}
                )
        sink.put_dir(out)
        return shards
    finally:
        shutil.rmtree(work, ignore_errors=True)
