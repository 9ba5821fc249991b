"""The bucket edges of all of dedup's inputs, computed in the driver or fanned out.

In the driver (`edges_in_driver`): the long form of every input is held in memory (1 +
bands rows of (node, band, key) per document, no text) and grouped at once; inputs may be
files or pyarrow Tables, and node repeats are checked across all inputs.

Fanned out, for inputs too large for that, the first two `executor.map` steps of
`fanout.clusters_fanned_out`, with partition files between them (shuffle.py):
1. `KeysToPartitions`, over input files: an input -> its long-form keys, hash-partitioned by
   (band, key) (step `keys`); the task returns only the input's source rows (one per
   source_path) and a sample of its nodes (for the rank ranges, ranks.py), and checks node
   repeats within its input;
2. `PartitionEdges`, over key partitions: a partition -> the edges of its buckets
   (`bucket_edges`; a bucket lies whole in one partition, so the edges of all partitions are
   those of the whole long form), routed by the rank range of their src (step `esrc`),
   and their nodes by their own range (step `nodes`). Nothing but counts returns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.dedup.clusters import bucket_edges, node_order
from filters.dedup.config import DedupConfig
from filters.dedup.keys import (
    KEYS_SCHEMA,
    READ_COLUMNS,
    SOURCE_BAND,
    SeenNodes,
    as_strings,
    input_keys,
    source_table,
)
from filters.dedup.ranks import NODES_SCHEMA, SRC_EDGES_SCHEMA, node_sample, range_of
from filters.dedup.shuffle import PartitionWriter, read_partition
from pipeline.io import iter_documents

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


def partition_of(keys: pa.Table, num_partitions: int) -> np.ndarray:
    """The hash partition of each long-form row, from its (band, key)."""
    key = keys["key"].to_numpy()
    band = keys["band"].to_numpy().astype(np.int64).astype(np.uint64)
    return ((key + band * _PARTITION_MULT) % np.uint64(num_partitions)).astype(np.int64)


@dataclass(frozen=True)
class KeysToPartitions:
    """Map step over input files: an input -> its long-form keys, by (band, key) partition
    (step `keys`). Returns (index, the input's SOURCE_BAND rows, the `sample` nodes of
    smallest hash among its kept rows)."""

    config: DedupConfig
    folder: str
    sample: int

    def __call__(self, job: tuple[int, str]) -> tuple[int, pa.Table, pa.Array]:
        index, path = job
        seen = SeenNodes()
        sources = [KEYS_SCHEMA.empty_table()]
        sample = pa.array([], pa.string())
        sampled = 0  # batches of seen.nodes already in the sample
        with PartitionWriter(
            self.folder, "keys", index, self.config.num_partitions, KEYS_SCHEMA
        ) as writer:
            tables = iter_documents([path], self.config.batch_rows, READ_COLUMNS)
            for keys in input_keys(tables, self.config, index, seen):
                is_source = pc.equal(keys["band"], SOURCE_BAND)
                if pc.any(is_source).as_py():
                    sources.append(keys.filter(is_source))
                    keys = keys.filter(pc.invert(is_source))
                if sampled < len(seen.nodes):
                    batch = [sample, *seen.nodes[sampled:]]
                    sample = node_sample(pa.concat_arrays(batch), self.sample)
                    sampled = len(seen.nodes)
                writer.add(keys, partition_of(keys, self.config.num_partitions))
            seen.check_unique(path)
        return index, pa.concat_tables(sources), sample


@dataclass(frozen=True)
class PartitionEdges:
    """Map step over key partitions p: p's buckets -> edges (src, dst, exact) routed by
    the range of src (step `esrc`, with the range of dst), and their distinct nodes by
    their range (step `nodes`). Returns (p, its edges)."""

    folder: str
    sources_file: str
    splitters_file: str
    num_partitions: int

    def __call__(self, p: int) -> tuple[int, int]:
        edges = bucket_edges(read_partition(self.folder, "keys", p, KEYS_SCHEMA))
        sources, splitters = pq.read_table(self.sources_file), pq.read_table(self.splitters_file)
        route_edges(edges, self.folder, p, sources, splitters, self.num_partitions)
        return p, len(edges)


def route_edges(
    edges: pa.Table,
    folder: str,
    writer: int,
    sources: pa.Table,
    splitters: pa.Table,
    n_ranges: int,
) -> None:
    """Write `edges` (src, dst, exact) by the rank range of src (step `esrc`, with the
    range of dst) and their distinct nodes by range (step `nodes`), as map task `writer`;
    `splitters` cut the ranks into `n_ranges` ranges."""
    nodes = pc.unique(pa.concat_arrays([as_strings(edges["src"]), as_strings(edges["dst"])]))
    ids, paths = node_order(nodes, sources)
    ranges = range_of(ids, paths, splitters)
    with PartitionWriter(folder, "nodes", writer, n_ranges, NODES_SCHEMA) as out:
        out.add(pa.table([nodes], schema=NODES_SCHEMA), ranges)
    src = pc.index_in(edges["src"], value_set=nodes).to_numpy()
    dst = pc.index_in(edges["dst"], value_set=nodes).to_numpy()
    routed = edges.append_column("dst_range", pa.array(ranges[dst], pa.int32()))
    with PartitionWriter(folder, "esrc", writer, n_ranges, SRC_EDGES_SCHEMA) as out:
        out.add(routed, ranges[src])
