"""Partition files: how dedup's fanned-out map steps hand rows to the next step.

A map task routes each row it produces to one of `n` destination partitions and writes one
Arrow IPC file, `folder/<step>/w-<writer>.arrow`: at each flush, one record batch per
destination in destination order (empty ones too), so batch `f * n + dest` holds flush f's
rows for `dest`. The task of the next step that owns partition `dest` reads just those
batches from every writer's file (`read_partition`). One file per writer, not one per
writer and destination, keeps a step at `n` files however large `n` grows, which a shared
filesystem needs. A writer's file is written under a temporary name and renamed when the
task commits, so a retried or killed task never leaves half a file and a reader never sees
one. This is the shuffle of a MapReduce, through a shared filesystem, with the executor's
`map` calls as the barriers between steps (pipeline/executor.py).

    with PartitionWriter(folder, "edges", writer=3, n=8, schema=SCHEMA) as out:
        out.add(table, dest)          # dest: the partition of each row (numpy ints)
    table = read_partition(folder, "edges", 5, SCHEMA)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa

FLUSH_ROWS = 1 << 20
"""Rows a writer buffers before writing them out (bounds a task's memory, not its output)."""

_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def mix_partition(values: np.ndarray, n: int) -> np.ndarray:
    """The partition (0..n-1) of each integer in `values` (ranks, hashes), by a Fibonacci
    hash: consecutive ranks spread over all partitions."""
    mixed = values.astype(np.int64).view(np.uint64) * _MIX
    return ((mixed >> np.uint64(29)) % np.uint64(n)).astype(np.int64)


def writer_file(folder: str | Path, step: str, writer: int) -> Path:
    return Path(folder) / step / f"w-{writer:06d}.arrow"


class PartitionWriter:
    """One map task's rows for one step, routed to their destination partitions."""

    def __init__(
        self, folder: str | Path, step: str, writer: int, n: int, schema: pa.Schema
    ) -> None:
        self.final = writer_file(folder, step, writer)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        self.n = n
        self.schema = schema
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._file = pa.ipc.new_file(
            str(self.tmp), schema, options=_IPC_OPTIONS, metadata={"partitions": str(n)}
        )
        self._pending: dict[int, list[pa.Table]] = {}
        self._n_pending = 0
        self._flushed = False

    def add(self, table: pa.Table, dest: np.ndarray) -> None:
        """Route row i of `table` to partition `dest[i]`."""
        if not len(table):
            return
        order = np.argsort(dest, kind="stable")
        dest = dest[order]
        table = table.select(self.schema.names).cast(self.schema).take(pa.array(order))
        cuts = np.flatnonzero(np.diff(dest)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(dest)], strict=True):
            self._pending.setdefault(int(dest[lo]), []).append(table.slice(lo, hi - lo))
        self._n_pending += len(table)
        if self._n_pending >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        empty = self.schema.empty_table()
        for p in range(self.n):
            table = pa.concat_tables(self._pending.get(p, [empty])).combine_chunks()
            batches = table.to_batches()
            self._file.write_batch(batches[0] if batches else _empty_batch(self.schema))
        self._pending.clear()
        self._n_pending = 0
        self._flushed = True

    def commit(self) -> None:
        """Write what is buffered and move the file into place."""
        try:
            if self._n_pending or not self._flushed:
                self._flush()
        finally:
            self._file.close()
        os.replace(self.tmp, self.final)

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            self.commit()
        else:
            self._file.close()
            self.tmp.unlink(missing_ok=True)


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


def read_partition(folder: str | Path, step: str, dest: int, schema: pa.Schema) -> pa.Table:
    """Partition `dest` of `step`: its batches from every committed writer (writer order)."""
    root = Path(folder) / step
    names = os.listdir(root) if root.is_dir() else []
    files = sorted(n for n in names if n.startswith("w-") and n.endswith(".arrow"))
    batches = []
    for name in files:
        with pa.OSFile(str(root / name)) as source:
            reader = pa.ipc.open_file(source)
            n = int(reader.metadata[b"partitions"])
            for i in range(dest, reader.num_record_batches, n):
                batches.append(reader.get_batch(i))
    return pa.Table.from_batches(batches, schema) if batches else schema.empty_table()


def remove_step(folder: str | Path, *steps: str) -> None:
    """Delete the files of `steps` (read by every task that needed them)."""
    for step in steps:
        shutil.rmtree(Path(folder) / step, ignore_errors=True)
