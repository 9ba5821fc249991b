"""Dense integer ranks for the fanned-out clusters: rank order is (id, source_path) order.

The clustered documents (every node of an edge) are numbered 0..n-1 in the order that
decides which document a cluster keeps, by a distributed sort: the driver picks range
splitters from a small sample of nodes (`node_sample`, `choose_splitters`), each edge
partition routes its nodes and edges by range (`range_of`, in edges.py), each range sorts
its own nodes (`RangeRanks`: a node's rank is its range's offset + its local index, and
the driver holds only the per-range counts), and each range then turns the edges ending in
it into integer edges (`RankEdges`). With ranks in that order, a component's smallest rank
is its kept document, and the exact/near decision is a group-by over exact edges by hub
(`exact_duplicate_nodes`), done where the hub's range is.

Run through `fanout.clusters_fanned_out`; each class here is one `executor.map` step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.dedup.clusters import exact_duplicate_nodes, node_order
from filters.dedup.keys import as_strings, node_hash
from filters.dedup.shuffle import PartitionWriter, mix_partition, read_partition

SAMPLE_PER_RANGE = 64
"""Sampled nodes per range: the splitters' quantiles are then off by about 1/8 of a range."""

SPLITTERS_SCHEMA = pa.schema([("id", pa.string()), ("source_path", pa.string())])
NODES_SCHEMA = pa.schema([("node", pa.string())])
SRC_EDGES_SCHEMA = pa.schema(
    [("src", pa.string()), ("dst", pa.string()), ("exact", pa.int8()), ("dst_range", pa.int32())]
)
DST_EDGES_SCHEMA = pa.schema(
    [("src_range", pa.int32()), ("src_local", pa.int64()), ("dst", pa.string()),
     ("exact", pa.int8())]
)  # fmt: skip
INT_EDGES_SCHEMA = pa.schema([("u", pa.int64()), ("v", pa.int64())])
LOOKUP_SCHEMA = pa.schema([("rank", pa.int64()), ("node", pa.string())])
RANKS_SCHEMA = pa.schema([("rank", pa.int64())])


def node_sample(nodes: pa.Array, k: int) -> pa.Array:
    """The `k` nodes of smallest (xxh64, node): a uniform sample that does not depend on
    how the nodes were split, so merging two samples (`node_sample(concat, k)`) gives the
    sample of their union."""
    nodes = pc.unique(as_strings(nodes))
    if len(nodes) == 0:
        return nodes
    table = pa.table({"h": node_hash(nodes), "node": nodes})
    order = pc.sort_indices(table, sort_keys=[("h", "ascending"), ("node", "ascending")])
    return nodes.take(order[:k])


def choose_splitters(sample: pa.Array, sources: pa.Table, n_ranges: int) -> pa.Table:
    """At most n_ranges - 1 (id, source_path) keys cutting the sorted sample into equal
    ranges; range r holds the keys from splitter r-1 (included) to splitter r."""
    ids, paths = node_order(sample, sources)
    keys = pa.table({"id": ids, "source_path": paths})
    keys = keys.take(
        pc.sort_indices(keys, sort_keys=[("id", "ascending"), ("source_path", "ascending")])
    )
    if not len(keys) or n_ranges < 2:
        return SPLITTERS_SCHEMA.empty_table()
    at = np.unique(np.arange(1, n_ranges) * len(keys) // n_ranges)
    return keys.take(pa.array(at)).cast(SPLITTERS_SCHEMA)


def range_of(ids: pa.Array, paths: pa.Array, splitters: pa.Table) -> np.ndarray:
    """The range of each (id, source_path) key: how many splitters are at or below it.
    One sort of keys and splitters together (a splitter sorts before an equal key)."""
    n, m = len(ids), len(splitters)
    if not m:
        return np.zeros(n, np.int64)
    table = pa.table(
        {
            "id": pa.concat_arrays([as_strings(splitters["id"]), as_strings(ids)]),
            "path": pa.concat_arrays([as_strings(splitters["source_path"]), as_strings(paths)]),
            "is_key": np.r_[np.zeros(m, np.int8), np.ones(n, np.int8)],
        }
    )
    keys = [("id", "ascending"), ("path", "ascending"), ("is_key", "ascending")]
    order = pc.sort_indices(table, sort_keys=keys).to_numpy()
    is_splitter = order < m
    below = np.cumsum(is_splitter)
    out = np.empty(n, np.int64)
    out[order[~is_splitter] - m] = below[~is_splitter]
    return out


def ranks_file(folder: str | Path, r: int) -> Path:
    return Path(folder) / "ranks" / f"r-{r:05d}.parquet"


@dataclass(frozen=True)
class RangeRanks:
    """Map step over ranges r: the nodes routed to r, sorted by (id, source_path), saved as
    `ranks/r-<r>.parquet` (row i has rank offset_r + i); the edges whose src is in r, their
    src as (r, local index), routed on by the range of their dst. Returns (r, its nodes)."""

    folder: str
    sources_file: str
    num_partitions: int

    def __call__(self, r: int) -> tuple[int, int]:
        nodes = pc.unique(as_strings(read_partition(self.folder, "nodes", r, NODES_SCHEMA)["node"]))
        ids, paths = node_order(nodes, pq.read_table(self.sources_file))
        order = pc.sort_indices(
            pa.table({"id": ids, "path": paths}),
            sort_keys=[("id", "ascending"), ("path", "ascending")],
        )
        nodes = nodes.take(order)
        target = ranks_file(self.folder, r)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        pq.write_table(pa.table([nodes], schema=NODES_SCHEMA), tmp)
        tmp.replace(target)

        edges = read_partition(self.folder, "esrc", r, SRC_EDGES_SCHEMA)
        # A pair linked in several bands has an edge in several partitions: one here.
        edges = edges.group_by(["src", "dst", "dst_range"]).aggregate([("exact", "max")])
        local = pc.index_in(edges["src"], value_set=nodes)
        if local.null_count:
            raise RuntimeError(f"dedup: range {r} lacks the node of one of its edges")
        out = pa.table(
            {
                "src_range": pa.array(np.full(len(edges), r, np.int32)),
                "src_local": pc.cast(local, pa.int64()),
                "dst": edges["dst"],
                "exact": edges["exact_max"],
            }
        )
        with PartitionWriter(
            self.folder, "edst", r, self.num_partitions, DST_EDGES_SCHEMA
        ) as writer:
            writer.add(out, edges["dst_range"].to_numpy())
        return r, len(nodes)


@dataclass(frozen=True)
class RankEdges:
    """Map step over ranges r: the edges whose dst is in r -> integer edges (u, v), both
    directions, hash-partitioned by u for the components (step `cc-000`); the rank -> node
    table of r's nodes and the ranks that are exact duplicates, hash-partitioned by rank
    (`lookup`, `xdup`). `offsets[r]` is the rank of range r's first node."""

    folder: str
    offsets: tuple[int, ...]
    num_partitions: int

    def __call__(self, r: int) -> tuple[int, int]:
        nodes = pq.read_table(ranks_file(self.folder, r))["node"]
        base = self.offsets[r]
        edges = read_partition(self.folder, "edst", r, DST_EDGES_SCHEMA)
        local = pc.index_in(edges["dst"], value_set=nodes)
        if local.null_count:
            raise RuntimeError(f"dedup: range {r} lacks the node of one of its edges")
        starts = np.asarray(self.offsets, np.int64)[edges["src_range"].to_numpy()]
        u = starts + edges["src_local"].to_numpy()
        v = base + local.to_numpy().astype(np.int64)
        exact = edges["exact"].to_numpy() > 0
        dup = exact_duplicate_nodes(u[exact], v[exact])
        ranks = base + np.arange(len(nodes), dtype=np.int64)
        p = self.num_partitions
        both = pa.table({"u": np.r_[u, v], "v": np.r_[v, u]})
        with PartitionWriter(self.folder, "cc-000", r, p, INT_EDGES_SCHEMA) as writer:
            writer.add(both, mix_partition(both["u"].to_numpy(), p))
        with PartitionWriter(self.folder, "lookup", r, p, LOOKUP_SCHEMA) as writer:
            writer.add(pa.table({"rank": ranks, "node": nodes}), mix_partition(ranks, p))
        with PartitionWriter(self.folder, "xdup", r, p, RANKS_SCHEMA) as writer:
            writer.add(pa.table({"rank": dup}), mix_partition(dup, p))
        return r, len(edges)
