"""Dedup's clusters fanned out: every step that sees the whole corpus as `executor.map`.

For inputs too large for the driver. Each step is one map over a fixed number of items
(`num_partitions`, never the worker count, so the output is the same on any number of
workers), and hands rows to the next through partition files under a scratch folder
(shuffle.py). The driver holds only per-input, per-source and per-partition state: the
source table, a node sample of `SAMPLE_PER_RANGE` nodes per range, the range splitters and
counts, and one flag per partition per components step.

1. `KeysToPartitions` (edges.py), over inputs: long-form keys by (band, key); sources,
   node sample. The driver picks the rank ranges' splitters (ranks.py).
2. `PartitionEdges` (edges.py), over key partitions: bucket edges, routed by rank range.
3. `RangeRanks`, over ranges: each range's nodes sorted, so rank = offset + local index;
   the driver sums the counts into offsets. 4. `RankEdges`: integer edges, exact groups.
5. `StarStep` (components.py), over node partitions, until every component is a star.
6. `NodeRows`, then `SourceFiles` (cluster_files.py): one cluster file per source.

    info = clusters_fanned_out(paths, config, "state/partitions", "state/.clusters", executor)
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filters.dedup.cluster_files import KINDS, NodeRows, SourceFiles, state_info
from filters.dedup.components import components_fanned_out
from filters.dedup.config import DedupConfig
from filters.dedup.edges import KeysToPartitions, PartitionEdges
from filters.dedup.keys import KEYS_SCHEMA, source_table
from filters.dedup.ranks import (
    SAMPLE_PER_RANGE,
    RangeRanks,
    RankEdges,
    choose_splitters,
    node_sample,
)
from filters.dedup.shuffle import remove_step
from pipeline.executor import Executor

MAX_SAMPLE = 1 << 18
"""The most sampled nodes the driver holds, whatever `num_partitions`."""

log = logging.getLogger("primer")


def clusters_fanned_out(
    inputs: Sequence[str], config: DedupConfig, folder: str, out: str, executor: Executor
) -> dict[str, Any]:
    """Write the cluster files of the input files into `out` (cluster_files.py), fanned
    out over `executor`; `folder` holds the partition files meanwhile (emptied first; the
    caller removes it). Returns the counts of each kind, files and steps."""
    shutil.rmtree(folder, ignore_errors=True)
    Path(folder).mkdir(parents=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    p = config.num_partitions
    sample_size = min(SAMPLE_PER_RANGE * p, MAX_SAMPLE)
    jobs = [(i, str(path)) for i, path in enumerate(inputs)]
    by_input: dict[int, pa.Table] = {}
    sample = pa.array([], pa.string())
    for index, rows, part in executor.map(KeysToPartitions(config, folder, sample_size), jobs):
        by_input[index] = rows
        sample = node_sample(pa.concat_arrays([sample, part]), sample_size)
    # Results come back as they finish: the source table is built in input order, so its
    # errors name the same inputs whatever the order; the sample does not depend on it.
    rows = pa.concat_tables([KEYS_SCHEMA.empty_table(), *(by_input[i] for i in sorted(by_input))])
    sources = source_table(rows, list(inputs))
    sources_file = str(Path(folder) / "sources.parquet")
    splitters_file = str(Path(folder) / "splitters.parquet")
    pq.write_table(sources, sources_file)
    pq.write_table(choose_splitters(sample, sources, p), splitters_file)

    fn = PartitionEdges(folder, sources_file, splitters_file, p)
    n_edges = sum(n for _, n in executor.map(fn, range(p)))
    remove_step(folder, "keys")  # each step's files go once read: scratch stays bounded
    return clusters_from_routed_edges(folder, sources_file, p, out, executor, n_edges)


def clusters_from_routed_edges(
    folder: str,
    sources_file: str,
    num_partitions: int,
    out: str,
    executor: Executor,
    n_edges: int = -1,
) -> dict[str, Any]:
    """Steps 3 to 6: from the edges routed by range (`edges.route_edges`, in `folder`) to
    the cluster files in `out`. `n_edges`: how many edges were routed (0 skips it all)."""
    p = num_partitions
    if not n_edges:
        return state_info()
    per_range = dict(executor.map(RangeRanks(folder, sources_file, p), range(p)))
    offsets = tuple(int(x) for x in np.r_[0, np.cumsum([per_range[r] for r in range(p)])])
    log.info("dedup: %d documents in clusters", offsets[-1])
    remove_step(folder, "nodes", "esrc")
    list(executor.map(RankEdges(folder, offsets, p), range(p)))
    remove_step(folder, "edst", "ranks")
    roots, steps = components_fanned_out(folder, p, executor)
    list(executor.map(NodeRows(folder, roots, p), range(p)))
    remove_step(folder, roots, "lookup", "xdup")
    n_files, counts = 0, dict.fromkeys(KINDS, 0)
    for kinds, files in executor.map(SourceFiles(folder, sources_file, out), range(p)):
        n_files += files
        counts = {k: counts[k] + kinds.get(k, 0) for k in KINDS}
    return state_info(offsets[-1], n_files, steps, **counts)
