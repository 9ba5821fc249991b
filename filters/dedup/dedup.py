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
documents that share a (band, key) bucket are linked to one of them (edges.py) and the
connected components of those links are the clusters. Small inputs are clustered in the
driver (union-find, clusters.py); from `ray_min_rows` rows on, every step is fanned out
over the executor the runner passes in (fanout.py), so the driver's memory does not grow
with the corpus. Both write the same table of duplicates, one file per source under
`state_dir/clusters/` (cluster_files.py). A document is known by its (source_path, id)
pair (`keys.row_nodes`). The per-part pass (`process`) looks its rows up in the files of
its batch's sources only. The runner discards `state_dir` when the stage's fingerprint
changes; `prepare()` reuses a finished one (`_DONE`, written last) as it is, and starts a
killed one again from scratch. Run it as a recipe stage (`primer run`) or directly:

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

from filters.dedup.cluster_files import (
    ClusterLookup,
    kind_counts,
    state_info,
    write_source_files,
)
from filters.dedup.clusters import clusters_from_edges
from filters.dedup.config import DedupConfig
from filters.dedup.edges import edges_in_driver, rows_below
from filters.dedup.fanout import clusters_fanned_out
from filters.dedup.keys import as_strings, check_unique_nodes, row_nodes, row_sources, source_prefix
from filters.dedup.minhash import text_hash
from pipeline.executor import LOCAL, Executor
from pipeline.io import write_json_atomic
from pipeline.stage import GlobalStage, StageConfig, mark_dropped, set_column

CLUSTERS_DIR = "clusters"
"""Under the state folder: the cluster table, one file per source (cluster_files.py)."""
DONE_FILE = "_DONE"
PARTITIONS_DIR = "partitions"
"""Under the state folder: the fan-out's partition files, removed when prepare() ends."""
OLD_CLUSTERS_FILE = "clusters.parquet"  # version 2's single table

log = logging.getLogger("primer")


def fans_out(items: Sequence, config: DedupConfig, executor: Executor) -> bool:
    """Whether prepare() fans out: for input files with at least `ray_min_rows` rows, over
    any executor (this process runs the steps one partition at a time). Parquet inputs are
    counted from their footers; other files (raw inputs) cannot be counted cheaply and fan
    out on a cluster (`executor.uses_ray`) or with `ray_min_rows: 0`. Tables never do."""
    if not items or not all(isinstance(p, str | os.PathLike) for p in items):
        return False
    if config.ray_min_rows == 0:
        return True
    if all(str(p).endswith(".parquet") for p in items):
        return not rows_below(items, config.ray_min_rows)
    return executor.uses_ray


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
    version: ClassVar[int] = 3  # 2: rows keyed by (source_path, id); 3: a file per source
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
        the driver they may also be pyarrow Tables. Inputs of `ray_min_rows` rows or more
        are fanned out over `executor` (`fans_out`, fanout.py). A finished state (`_DONE`)
        is reused as it is: whoever changes the config or the inputs gives a fresh folder
        (the runner deletes it). An unfinished one (a killed prepare) is started again.
        """
        self.state_dir = str(state_dir)
        state = Path(state_dir)
        done = state / DONE_FILE
        if done.is_file():
            return
        items = list(inputs)
        state.mkdir(parents=True, exist_ok=True)
        scratch, target = state / PARTITIONS_DIR, state / CLUSTERS_DIR
        tmp = state / f".{CLUSTERS_DIR}.tmp"
        for stale in (scratch, target, tmp):
            shutil.rmtree(stale, ignore_errors=True)
        fan_out = fans_out(items, self.config, executor)
        if fan_out:
            paths = [str(p) for p in items]
            info = clusters_fanned_out(paths, self.config, str(scratch), str(tmp), executor)
        else:
            if self.config.ray_min_rows and executor.uses_ray:
                log.info("dedup: fewer than %d input rows; clusters computed in the driver",
                         self.config.ray_min_rows)  # fmt: skip
            tmp.mkdir()
            clusters = clusters_from_edges(*edges_in_driver(items, self.config)) if items else None
            info = state_info()
            if clusters is not None and len(clusters):
                files = write_source_files(clusters, tmp)
                info = state_info(len(clusters), files, **kind_counts(clusters))
        os.replace(tmp, target)
        shutil.rmtree(scratch, ignore_errors=True)
        write_json_atomic(done, {**info, "fanned_out": fan_out})

    def setup(self) -> None:
        state = Path(self.state_dir) if self.state_dir is not None else None
        if state is None or not (state / DONE_FILE).is_file():
            raise RuntimeError(
                f"dedup: no finished state in {self.state_dir!r} (missing {DONE_FILE}); "
                "call prepare(inputs, state_dir) over all inputs before process()"
            )
        if not (state / CLUSTERS_DIR).is_dir():
            old = (state / OLD_CLUSTERS_FILE).is_file()
            raise RuntimeError(
                f"dedup: {self.state_dir} has no {CLUSTERS_DIR}/ folder"
                + (f" ({OLD_CLUSTERS_FILE} was written by an older dedup)" if old else "")
                + "; delete the state folder and run prepare() again"
            )
        self._lookup = ClusterLookup(state / CLUSTERS_DIR)

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
        if len(ids):
            found = self._lookup.find(row_sources(table), pc.fill_null(nodes, ""))
            hit = pc.and_(pc.is_valid(found["dup_kind"]), kept)
            cluster = pc.if_else(hit, found["dup_cluster"], ids)
            size = pc.if_else(hit, found["dup_cluster_size"], size)
            kind = pc.if_else(hit, found["dup_kind"], pa.scalar("kept"))
            rules = [(k, pc.equal(kind, k)) for k in ("exact_duplicate", "near_duplicate")]
        table = set_column(table, "text_hash", th)
        table = set_column(table, "dup_cluster", cluster)
        table = set_column(table, "dup_cluster_size", size)
        return mark_dropped(table, self.name, rules)
