"""The bucket edges of all of dedup's inputs, computed in the driver or fanned out.

In the driver (`edges_in_driver`): the long form of every input is held in memory (1 +
bands rows of (node, band, key) per document, no text) and grouped at once; inputs may be
files or pyarrow Tables, and node repeats are checked across all inputs.

Fanned out (`edges_fanned_out`), for inputs too large for that, in two `executor.map` steps
with files under a scratch folder between them:
1. map: each input file -> its long-form keys, hash-partitioned by (band, key) into
   `num_partitions` Parquet files of its own (`KeysToPartitions`); the task returns only the
   input's source rows (one per source_path), and checks node repeats within its input;
2. map: each partition -> the edges of its buckets (`PartitionEdges`, `bucket_edges`): a
   bucket lies whole in one partition, so the edges of all partitions are those of the
   whole long form.
Only edges reach the driver (they grow with the number of duplicates, not with the corpus),
where union-find makes the clusters (clusters.py). The clusters are identical to the
in-driver path's (tests/filters/test_dedup.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.dedup.clusters import EDGES_SCHEMA, bucket_edges, unique_edges
from filters.dedup.config import DedupConfig
from filters.dedup.keys import (
    KEYS_SCHEMA,
    READ_COLUMNS,
    SOURCE_BAND,
    SeenNodes,
    input_keys,
    source_table,
)
from pipeline.executor import Executor
from pipeline.io import iter_documents

_FLUSH_ROWS = 1 << 20  # long-form rows a map task buffers before writing its partitions
_COMPACT_ROWS = 4_000_000  # edges the driver gathers before de-duplicating them again
_PARTITION_MULT = np.uint64(0x9E3779B97F4A7C15)


def input_name(item: str | os.PathLike | pa.Table, i: int) -> str:
    return f"<table {i}>" if isinstance(item, pa.Table) else str(item)


def rows_below(items: Sequence, limit: int) -> bool:
    """Whether `items`, all Parquet files, hold fewer than `limit` rows (footers only)."""
    total = 0
    for item in items:
        if not (isinstance(item, str | os.PathLike) and str(item).endswith(".parquet")):
            return False
        total += pq.ParquetFile(item).metadata.num_rows
        if total >= limit:
            return False
    return True


def edges_in_driver(
    inputs: Sequence[str | pa.Table], config: DedupConfig
) -> tuple[pa.Table, pa.Table]:
    """(edges, sources) of all `inputs`, computed in this process."""
    seen = SeenNodes()
    parts = [KEYS_SCHEMA.empty_table()]
    for i, item in enumerate(inputs):
        tables = iter_documents([item], config.batch_rows, READ_COLUMNS)
        parts.extend(input_keys(tables, config, i, seen))
    keys = pa.concat_tables(parts)
    is_source = pc.equal(keys["band"], SOURCE_BAND)
    names = [input_name(t, i) for i, t in enumerate(inputs)]
    sources = source_table(keys.filter(is_source), names)
    # All nodes are at hand here, so repeats are checked across inputs too, rows without a
    # source_path included (the fan-out checks within each input).
    seen.check_unique("the inputs" if len(inputs) > 1 else names[0])
    return bucket_edges(keys.filter(pc.invert(is_source))), sources


def _input_dir(folder: str, index: int) -> Path:
    return Path(folder) / f"in-{index:06d}"


def _partition_name(partition: int) -> str:
    return f"part-{partition:05d}.parquet"


def partition_of(keys: pa.Table, num_partitions: int) -> np.ndarray:
    """The hash partition of each long-form row, from its (band, key)."""
    key = keys["key"].to_numpy()
    band = keys["band"].to_numpy().astype(np.int64).astype(np.uint64)
    return ((key + band * _PARTITION_MULT) % np.uint64(num_partitions)).astype(np.int64)


@dataclass(frozen=True)
class KeysToPartitions:
    """Map step: one input file -> its long-form keys in `num_partitions` Parquet files
    under `folder/in-<index>/` (written to a temporary folder, then renamed, so a retried
    task never leaves half its files). Returns (index, the input's SOURCE_BAND rows)."""

    config: DedupConfig
    folder: str

    def __call__(self, job: tuple[int, str]) -> tuple[int, pa.Table]:
        index, path = job
        final = _input_dir(self.folder, index)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        seen = SeenNodes()
        writers: dict[int, pq.ParquetWriter] = {}
        pending: dict[int, list[pa.Table]] = {}
        sources = [KEYS_SCHEMA.empty_table()]
        n_pending = 0

        def flush() -> None:
            for p, tables in sorted(pending.items()):
                if p not in writers:
                    writers[p] = pq.ParquetWriter(tmp / _partition_name(p), KEYS_SCHEMA)
                writers[p].write_table(pa.concat_tables(tables))
            pending.clear()

        try:
            tables = iter_documents([path], self.config.batch_rows, READ_COLUMNS)
            for keys in input_keys(tables, self.config, index, seen):
                is_source = pc.equal(keys["band"], SOURCE_BAND)
                if pc.any(is_source).as_py():
                    sources.append(keys.filter(is_source))
                    keys = keys.filter(pc.invert(is_source))
                if not len(keys):
                    continue
                part = partition_of(keys, self.config.num_partitions)
                order = np.argsort(part, kind="stable")
                part = part[order]
                keys = keys.take(pa.array(order))
                cuts = np.flatnonzero(np.diff(part)) + 1
                for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(part)], strict=True):
                    pending.setdefault(int(part[lo]), []).append(keys.slice(lo, hi - lo))
                n_pending += len(keys)
                if n_pending >= _FLUSH_ROWS:
                    flush()
                    n_pending = 0
            flush()
        finally:
            for w in writers.values():
                w.close()
        seen.check_unique(path)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return index, pa.concat_tables(sources)


@dataclass(frozen=True)
class PartitionEdges:
    """Map step: one hash partition of the long form (its file from each input) -> the
    edges of its buckets."""

    folder: str
    n_inputs: int

    def __call__(self, partition: int) -> pa.Table:
        name = _partition_name(partition)
        files = [_input_dir(self.folder, i) / name for i in range(self.n_inputs)]
        tables = [pq.read_table(f) for f in files if f.is_file()]
        if not tables:
            return EDGES_SCHEMA.empty_table()
        return bucket_edges(pa.concat_tables(tables)).cast(EDGES_SCHEMA)


def edges_fanned_out(
    inputs: Sequence[str], config: DedupConfig, folder: str, executor: Executor
) -> tuple[pa.Table, pa.Table]:
    """(edges, sources) of the input files, fanned out over `executor`; `folder` holds the
    partition files meanwhile (emptied first; the caller removes it when done)."""
    shutil.rmtree(folder, ignore_errors=True)
    Path(folder).mkdir(parents=True)
    jobs = [(i, str(p)) for i, p in enumerate(inputs)]
    # Results come back as they finish: in input order, the source table and its errors
    # name the same inputs whatever the order.
    done = sorted(executor.map(KeysToPartitions(config, folder), jobs), key=lambda r: r[0])
    rows = pa.concat_tables([KEYS_SCHEMA.empty_table(), *(r[1] for r in done)])
    sources = source_table(rows, [str(p) for p in inputs])
    # Edges are compacted again as they stream in: each partition's are unique already,
    # but a pair of documents linked in several bands has an edge in several partitions.
    pending, n = [EDGES_SCHEMA.empty_table()], 0
    partitions = list(range(config.num_partitions))
    for edges in executor.map(PartitionEdges(folder, len(inputs)), partitions):
        pending.append(edges)
        n += len(edges)
        if n > _COMPACT_ROWS:
            pending = [unique_edges(pa.concat_tables(pending))]
            n = len(pending[0])
    return unique_edges(pa.concat_tables(pending)), sources
