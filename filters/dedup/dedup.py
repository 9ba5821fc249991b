"""The `dedup` stage: exact and MinHash-LSH near-duplicate detection, one document kept per
cluster.

What: every kept document gets `text_hash` (xxh64 of its normalised text), `dup_cluster`
(the id of the document kept for its cluster; its own id when it has no duplicate) and
`dup_cluster_size`; every other member of a cluster is marked `dedup:exact_duplicate` or
`dedup:near_duplicate` (never removed, so each cut can be audited).

Why: web crawls repeat boilerplate pages, mirrors and templated text; training on repeats
wastes tokens and encourages memorisation. FineWeb deduplicates with MinHash over word
5-grams, 14 bands x 8 rows (datatrove); this stage uses the same settings, vectorised over
a batch with numpy instead of one document at a time (minhash.py).

How: `DedupStage` is a `GlobalStage`. `prepare()` reads the kept rows of every input once
and computes, per document, a key for exact dedup and one LSH key per band (keys.py);
documents that share a (band, key) bucket are linked to one of them, in the driver or
fanned out over the executor the runner passes in (edges.py), and union-find over those
links gives the clusters (clusters.py), written to `state_dir/clusters.parquet`
(duplicates only). A document is known by its (source_path, id) pair (`keys.row_nodes`).
The per-part pass (`process`) then only looks rows up in that table. The runner discards
`state_dir` when the stage's fingerprint changes; `prepare()` reuses a finished one
(`_DONE`) as it is. Run it as a recipe stage (`primer run`) or directly:

    stage = DedupStage()
    stage.prepare(["a.parquet", "b.parquet"], "state/")   # a fresh state folder
    out = stage(pq.read_table("a.parquet"))
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.dedup.clusters import CLUSTERS_SCHEMA, clusters_from_edges
from filters.dedup.config import DedupConfig
from filters.dedup.edges import edges_fanned_out, edges_in_driver, rows_below
from filters.dedup.keys import (
    as_strings,
    check_unique_nodes,
    row_nodes,
    row_sources,
    source_prefix,
)
from filters.dedup.minhash import text_hash
from pipeline.executor import LOCAL, Executor
from pipeline.io import write_json_atomic
from pipeline.stage import GlobalStage, StageConfig, mark_dropped, set_column

CLUSTERS_FILE = "clusters.parquet"
DONE_FILE = "_DONE"
PARTITIONS_DIR = "partitions"
"""Under the state folder: the fan-out's partition files, removed when prepare() ends."""

log = logging.getLogger("primer")


class DedupStage(GlobalStage):
    """Exact + MinHash-LSH dedup: one document kept per cluster, the rest marked dropped.

    Documents are told apart by (source_path, id), not by id alone: two shards that both
    number their rows from 0 hold different documents "0" (see `row_nodes`). The kept
    document of a cluster is the one with the smallest id, then source_path (byte order),
    so the choice depends on neither input order nor partitioning, and `dup_cluster` is its
    id. Exact dedup comes first: a document with exactly the text of an earlier one in that
    order is an `exact_duplicate`; near dedup links what remains. (LSH runs over every
    document, but exact copies share all their band keys, so this equals LSH over one copy
    of each.) Rows dropped by earlier stages, and rows with null text, are singletons. Two
    kept rows with the same (source_path, id) are an error (`DuplicateRowError`), never a
    silent keep of both.
    """

    name: ClassVar[str] = "dedup"
    version: ClassVar[int] = 2  # 2: rows keyed by (source_path, id), no longer by id
    Config: ClassVar[type[StageConfig]] = DedupConfig
    needs: ClassVar[tuple[str, ...]] = ("id", "text")
    adds: ClassVar[tuple[str, ...]] = ("text_hash", "dup_cluster", "dup_cluster_size")
    # Where the clusters are computed never changes them.
    transport_keys: ClassVar[frozenset[str]] = frozenset({"ray_min_rows", "num_partitions"})

    config: DedupConfig

    def prepare(
        self,
        inputs: Sequence[str] | Iterable[pa.Table],
        state_dir: str,
        executor: Executor = LOCAL,
    ) -> None:
        """Find the clusters of all kept rows of `inputs` and write them to `state_dir`.

        `inputs` are file paths (Parquet stage outputs, or raw inputs the readers know); in
        the driver they may also be pyarrow Tables. With an executor that runs work on a
        cluster (`executor.uses_ray`), inputs of `ray_min_rows` rows or more are fanned out
        over it (edges.py). A finished state (`_DONE`) is reused as it is: whoever changes
        the config or the inputs gives a fresh folder (the runner deletes it).
        """
        self.state_dir = str(state_dir)
        state = Path(state_dir)
        done = state / DONE_FILE
        if done.is_file():
            return
        items = list(inputs)
        state.mkdir(parents=True, exist_ok=True)
        fan_out = executor.uses_ray
        if fan_out and rows_below(items, self.config.ray_min_rows):
            log.info("dedup: fewer than %d input rows; clusters computed in the driver",
                     self.config.ray_min_rows)  # fmt: skip
            fan_out = False
        scratch = state / PARTITIONS_DIR
        if fan_out:
            if not items or not all(isinstance(p, str | os.PathLike) for p in items):
                raise TypeError("dedup.prepare fanned out takes a non-empty list of file paths")
            paths = [str(p) for p in items]
            edges, sources = edges_fanned_out(paths, self.config, str(scratch), executor)
            clusters = clusters_from_edges(edges, sources)
        elif items:
            clusters = clusters_from_edges(*edges_in_driver(items, self.config))
        else:
            clusters = CLUSTERS_SCHEMA.empty_table()
        target = state / CLUSTERS_FILE
        tmp = state / f".{CLUSTERS_FILE}.tmp-{os.getpid()}"
        pq.write_table(clusters, tmp, compression="zstd")
        os.replace(tmp, target)
        shutil.rmtree(scratch, ignore_errors=True)
        kinds = pc.value_counts(clusters["dup_kind"]).to_pylist()
        counts = {k["values"]: k["counts"] for k in kinds}
        info = {"documents_in_clusters": len(clusters), **counts, "fanned_out": fan_out}
        write_json_atomic(done, info)

    def setup(self) -> None:
        if self.state_dir is None or not (Path(self.state_dir) / DONE_FILE).is_file():
            raise RuntimeError(
                f"dedup: no finished state in {self.state_dir!r} (missing {DONE_FILE}); "
                "call prepare(inputs, state_dir) over all inputs before process()"
            )
        clusters = pq.read_table(Path(self.state_dir) / CLUSTERS_FILE)
        if "source_path" not in clusters.column_names:
            raise RuntimeError(
                f"dedup: {self.state_dir}/{CLUSTERS_FILE} was written by an older dedup (rows "
                "keyed by id alone); delete the state folder and run prepare() again"
            )
        # Look rows up by a 64-bit hash of their node in a sorted array (no per-batch hash
        # table over the whole cluster file); the node itself is compared after, so a
        # collision cannot mislabel a row.
        nodes = row_nodes(clusters)
        h = _node_hash(nodes)
        order = pa.array(np.argsort(h, kind="stable"))
        self._hashes = h[order.to_numpy()]
        self._nodes = nodes.take(order)
        self._clusters = clusters.take(order)

    def process(self, table: pa.Table) -> pa.Table:
        ids = as_strings(table["id"])
        nodes = row_nodes(table)
        kept = pc.and_(pc.is_valid(nodes), pc.is_null(table["drop_reason"]))
        prefixes = pc.unique(row_sources(table)).to_pylist()
        check_unique_nodes(
            nodes.filter(kept), {source_prefix(s): s for s in prefixes}, "this batch"
        )
        th = text_hash(table["text"], **self.config.norm_flags)
        cluster, size = ids, pa.array(np.ones(len(ids), np.int32))
        rules = []
        if len(self._hashes) and len(ids):
            at = _find(self._hashes, self._nodes, pc.fill_null(nodes, ""))
            hit = pc.and_(pa.array(at >= 0), kept)
            cand = self._clusters.take(pa.array(np.maximum(at, 0)))
            cluster = pc.if_else(hit, cand["dup_cluster"], ids)
            size = pc.if_else(hit, cand["dup_cluster_size"], size)
            kind = pc.if_else(hit, cand["dup_kind"], pa.scalar("kept"))
            rules = [(k, pc.equal(kind, k)) for k in ("exact_duplicate", "near_duplicate")]
        table = set_column(table, "text_hash", th)
        table = set_column(table, "dup_cluster", cluster)
        table = set_column(table, "dup_cluster_size", size)
        return mark_dropped(table, self.name, rules)


def _node_hash(nodes: pa.Array) -> np.ndarray:
    return text_hash(nodes, normalised=True).to_numpy(zero_copy_only=False)


def _find(sorted_hashes: np.ndarray, sorted_nodes: pa.Array, nodes: pa.Array) -> np.ndarray:
    """Position of each of `nodes` (no nulls) among `sorted_nodes`, whose hashes are
    `sorted_hashes`, or -1. Nodes that share a 64-bit hash are told apart by comparing the
    nodes themselves, one step along each run of equal hashes per round."""
    q = _node_hash(nodes)
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
