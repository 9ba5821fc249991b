"""The cluster table, one Parquet file per source: written by either path, read lazily.

`state_dir/clusters/<prefix>.parquet` holds the duplicates of one source_path (prefix: its
xxh64, `keys.source_prefix`; rows without a source_path share the prefix of ""), sorted by
id, in `CLUSTERS_SCHEMA`; a source without duplicates has no file. No process loads all of
it: `ClusterLookup` loads the files of the sources in a batch, keeping a few (a part is
usually one source). Both paths write it with `write_source_files`: the in-driver path from
`clusters_from_edges`, the fanned-out path from the last two map steps (`NodeRows`: each
node's rank becomes its node string and kind, routed by source; `SourceFiles`: one file per
source), so the two give identical files.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.dedup.clusters import CLUSTERS_SCHEMA, node_order
from filters.dedup.components import ROOTS_SCHEMA
from filters.dedup.keys import PREFIX_CHARS, as_strings, node_hash, source_prefix
from filters.dedup.ranks import LOOKUP_SCHEMA, RANKS_SCHEMA
from filters.dedup.shuffle import PartitionWriter, read_partition

KINDS = ("kept", "exact_duplicate", "near_duplicate")
ROWS_SCHEMA = pa.schema(
    [("node", pa.string()), ("dup_cluster", pa.string()), ("dup_cluster_size", pa.int32()),
     ("dup_kind", pa.string())]
)  # fmt: skip
FOUND_SCHEMA = pa.schema([CLUSTERS_SCHEMA.field(n) for n in CLUSTERS_SCHEMA.names[2:]])
_CACHED_SOURCES = 8  # sources whose cluster rows a worker keeps between batches


def source_file(folder: str | Path, prefix: str) -> Path:
    return Path(folder) / f"{prefix}.parquet"


def kind_counts(clusters: pa.Table) -> dict[str, int]:
    """How many rows of each kind (all of KINDS, 0 included)."""
    counts = {k["values"]: k["counts"] for k in pc.value_counts(clusters["dup_kind"]).to_pylist()}
    return {kind: counts.get(kind, 0) for kind in KINDS}


def state_info(clusters: int = 0, files: int = 0, steps: int = 0, **kinds: int) -> dict[str, int]:
    """What `_DONE` records of a state, the same keys on both paths."""
    return {"documents_in_clusters": clusters, **{k: kinds.get(k, 0) for k in KINDS},
            "files": files, "components_steps": steps}  # fmt: skip


def write_source_files(clusters: pa.Table, folder: str | Path) -> int:
    """Write `clusters` (CLUSTERS_SCHEMA) as one file per source_path under `folder`, each
    sorted by id (temporary file, then rename). Returns how many files."""
    if not len(clusters):
        return 0
    paths = pc.dictionary_encode(pc.fill_null(as_strings(clusters["source_path"]), ""))
    group = paths.indices.to_numpy()
    order = np.argsort(group, kind="stable")
    cuts = np.flatnonzero(np.diff(group[order])) + 1
    for rows in np.split(order, cuts):
        table = clusters.take(pa.array(rows))
        table = table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))
        target = source_file(folder, source_prefix(paths.dictionary[group[rows[0]]].as_py()))
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        pq.write_table(table.cast(CLUSTERS_SCHEMA), tmp, compression="zstd")
        os.replace(tmp, target)
    return len(cuts) + 1


def source_bucket(nodes: pa.Array, n: int) -> np.ndarray:
    """The partition (0..n-1) of each node's source: its prefix, a hash already, mod n."""
    enc = pc.dictionary_encode(pc.utf8_slice_codeunits(as_strings(nodes), 0, PREFIX_CHARS))
    buckets = np.array([int(p, 16) % n for p in enc.dictionary.to_pylist()], np.int64)
    return buckets[enc.indices.to_numpy()] if len(nodes) else np.zeros(0, np.int64)


@dataclass(frozen=True)
class NodeRows:
    """Map step over node partitions k: k's nodes with their root's id, cluster size and
    kind (kept: the root itself; exact: a rank in `xdup`), routed by source bucket."""

    folder: str
    roots_step: str
    num_partitions: int

    def __call__(self, k: int) -> int:
        roots = read_partition(self.folder, self.roots_step, k, ROOTS_SCHEMA)
        lookup = read_partition(self.folder, "lookup", k, LOOKUP_SCHEMA)
        exact = read_partition(self.folder, "xdup", k, RANKS_SCHEMA)["rank"]
        at = pc.index_in(roots["node"], value_set=lookup["rank"])
        if at.null_count:
            raise RuntimeError(f"dedup: partition {k} lacks the node of one of its ranks")
        nodes = as_strings(lookup["node"]).take(at)
        kept = pc.equal(roots["node"], roots["root"])
        dup = pc.if_else(pc.is_in(roots["node"], value_set=exact), KINDS[1], KINDS[2])
        rows = pa.table(
            {
                "node": nodes,
                "dup_cluster": roots["root_id"],
                "dup_cluster_size": roots["size"],
                "dup_kind": pc.if_else(kept, KINDS[0], dup),
            }
        )
        with PartitionWriter(self.folder, "rows", k, self.num_partitions, ROWS_SCHEMA) as writer:
            writer.add(rows, source_bucket(nodes, self.num_partitions))
        return len(rows)


@dataclass(frozen=True)
class SourceFiles:
    """Map step over source buckets b: the rows of b's sources -> one file per source in
    `out`. Returns the count of each kind and the number of files."""

    folder: str
    sources_file: str
    out: str

    def __call__(self, b: int) -> tuple[dict[str, int], int]:
        rows = read_partition(self.folder, "rows", b, ROWS_SCHEMA)
        if not len(rows):
            return {}, 0
        ids, paths = node_order(rows["node"], pq.read_table(self.sources_file))
        clusters = pa.table(
            [
                ids,
                pc.if_else(pc.equal(paths, ""), pa.scalar(None, pa.string()), paths),
                rows["dup_cluster"],
                rows["dup_cluster_size"],
                rows["dup_kind"],
            ],
            schema=CLUSTERS_SCHEMA,
        )
        return kind_counts(clusters), write_source_files(clusters, self.out)


@dataclass
class _Entry:
    hashes: np.ndarray  # the files' node hashes, sorted
    nodes: pa.Array  # their nodes, in that order
    found: pa.Table  # FOUND_SCHEMA rows, in that order


class ClusterLookup:
    """The cluster rows of a batch's documents, from the files of its sources only."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._cache: OrderedDict[str, _Entry | None] = OrderedDict()

    def _entry(self, prefix: str) -> _Entry | None:
        if prefix in self._cache:
            self._cache.move_to_end(prefix)
            return self._cache[prefix]
        path = source_file(self.folder, prefix)
        entry = None
        if path.is_file():
            clusters = pq.read_table(path)
            nodes = pc.binary_join_element_wise(prefix, as_strings(clusters["id"]), "")
            # Rows are found by a 64-bit hash of their node in a sorted array; the node
            # itself is compared after, so a collision cannot mislabel a row.
            h = node_hash(nodes)
            order = np.argsort(h, kind="stable")
            at = pa.array(order)
            entry = _Entry(h[order], nodes.take(at), clusters.select(FOUND_SCHEMA.names).take(at))
        self._cache[prefix] = entry
        if len(self._cache) > _CACHED_SOURCES:
            self._cache.popitem(last=False)
        return entry

    def find(self, sources: pa.Array, nodes: pa.Array) -> pa.Table:
        """FOUND_SCHEMA rows for each (source, node) pair (no nulls); null where the node is
        in no cluster."""
        enc = pc.dictionary_encode(as_strings(sources))
        group = enc.indices.to_numpy()
        order = np.argsort(group, kind="stable")
        cuts = np.flatnonzero(np.diff(group[order])) + 1
        pieces = [FOUND_SCHEMA.empty_table()]
        for rows in np.split(order, cuts) if len(order) else []:
            entry = self._entry(source_prefix(enc.dictionary[group[rows[0]]].as_py()))
            if entry is None:
                pieces.append(pa.table([pa.nulls(len(rows), f.type) for f in FOUND_SCHEMA],
                                       schema=FOUND_SCHEMA))  # fmt: skip
                continue
            at = find_sorted(entry.hashes, entry.nodes, nodes.take(pa.array(rows)))
            pieces.append(entry.found.take(pa.array(at, mask=at < 0)))
        inverse = np.empty(len(order), np.int64)
        inverse[order] = np.arange(len(order))
        return pa.concat_tables(pieces).take(pa.array(inverse))


def find_sorted(sorted_hashes: np.ndarray, sorted_nodes: pa.Array, nodes: pa.Array) -> np.ndarray:
    """Position of each of `nodes` (no nulls) among `sorted_nodes`, whose hashes are
    `sorted_hashes`, or -1. Nodes that share a 64-bit hash are told apart by comparing the
    nodes themselves, one step along each run of equal hashes per round."""
    q = node_hash(nodes)
    n = len(sorted_hashes)
    pos = np.searchsorted(sorted_hashes, q)
    out = np.full(len(q), -1, np.int64)
    todo = np.arange(len(q))
    step = 0
    while todo.size:
        p = pos[todo] + step
        inside = p < n
        todo, p = todo[inside], p[inside]
        same = sorted_hashes[p] == q[todo]
        todo, p = todo[same], p[same]
        if not todo.size:
            break
        equal = pc.equal(sorted_nodes.take(pa.array(p)), nodes.take(pa.array(todo)))
        equal = equal.to_numpy(zero_copy_only=False)
        out[todo[equal]] = p[equal]
        todo = todo[~equal]
        step += 1
    return out
