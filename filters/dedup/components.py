"""Connected components of the rank graph, fanned out: alternating large-star and small-star.

Kiveris et al. 2014 ("Connected Components in MapReduce and Beyond"): over undirected
edges grouped by node, large-star links each larger neighbour of u to the smallest node of
u's neighbourhood (u included), small-star links each smaller neighbour of u, and u, to the
smallest of them. Neither adds edges nor changes connectivity, and alternating them
reaches a forest of stars, each centred on its component's smallest node, in O(log^2 n)
rounds (about log n in practice). Each step is one `executor.map` over hash partitions of
the nodes (`StarStep`): a task reads the edges keyed by its nodes (both directions of each
edge are stored), applies the step and routes the new edges to the partitions of both ends.

Stopping is exact, not a checksum: the graph is a star forest centred on the minima exactly
when every node with a smaller neighbour has one neighbour, which each task checks for its
own nodes. A task whose input passes writes its stars' cluster rows (node, root, root id,
size) straight away; when every task passes, those rows are the answer and no further step
runs. With ranks in (id, source_path) order (ranks.py) the centre is the kept document.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.dedup.keys import PREFIX_CHARS
from filters.dedup.ranks import INT_EDGES_SCHEMA, LOOKUP_SCHEMA
from filters.dedup.shuffle import PartitionWriter, mix_partition, read_partition, remove_step
from pipeline.executor import Executor

MAX_STEPS = 400
"""A bound far above what any graph needs (steps grow with log^2 of the longest chain)."""

ROOTS_SCHEMA = pa.schema(
    [("node", pa.int64()), ("root", pa.int64()), ("root_id", pa.string()), ("size", pa.int32())]
)

log = logging.getLogger("primer")


def cc_step(step: int) -> str:
    return f"cc-{step:03d}"


def roots_step(step: int) -> str:
    return f"roots-{step:03d}"


def unique_pairs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (u, v) pairs, sorted by u then v."""
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    keep = np.ones(len(u), bool)
    keep[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
    return u[keep], v[keep]


@dataclass(frozen=True)
class StarStep:
    """Map step over node partitions k: step `step` (even: large-star, odd: small-star) on
    the edges keyed by k's nodes. Returns (k, whether k's nodes are all star centres or
    leaves, its distinct directed edges)."""

    folder: str
    step: int
    num_partitions: int

    def __call__(self, k: int) -> tuple[int, bool, int]:
        edges = read_partition(self.folder, cc_step(self.step), k, INT_EDGES_SCHEMA)
        u, v = unique_pairs(edges["u"].to_numpy(), edges["v"].to_numpy())
        starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1] if len(u) else np.zeros(0, np.int64)
        run = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(u)]))
        key, first = u[starts], v[starts]  # first: the node's smallest neighbour
        degree = np.diff(np.r_[starts, len(u)])
        centre = first > key
        star = bool(np.all(centre | (degree == 1)))
        if star:
            self._write_roots(k, u, v, run, key, centre, degree)
        if self.step % 2 == 0:  # large-star: larger neighbours -> the neighbourhood's minimum
            low = np.minimum(key, first)[run]
            larger = v > u
            a, b = v[larger], low[larger]
        else:  # small-star: smaller neighbours, and the node, -> the smallest of them
            smaller = v < u
            low = first[run]
            link = smaller & (v != low)
            has = first < key
            a, b = np.r_[v[link], key[has]], np.r_[low[link], first[has]]
        out = pa.table({"u": np.r_[a, b], "v": np.r_[b, a]})
        p = self.num_partitions
        with PartitionWriter(self.folder, cc_step(self.step + 1), k, p, INT_EDGES_SCHEMA) as w:
            w.add(out, mix_partition(out["u"].to_numpy(), p))
        return k, star, len(u)

    def _write_roots(
        self,
        k: int,
        u: np.ndarray,
        v: np.ndarray,
        run: np.ndarray,
        key: np.ndarray,
        centre: np.ndarray,
        degree: np.ndarray,
    ) -> None:
        """The rows of the stars centred in k: every member -> (root, root's id, size)."""
        centres = key[centre]
        lookup = read_partition(self.folder, "lookup", k, LOOKUP_SCHEMA)
        at = pc.index_in(pa.array(centres), value_set=lookup["rank"])
        if at.null_count:
            raise RuntimeError(f"dedup: partition {k} lacks the node of one of its ranks")
        root_id = pc.utf8_slice_codeunits(lookup["node"].take(at), PREFIX_CHARS)
        size = (degree[centre] + 1).astype(np.int32)
        of_centre = centre[run]  # the edges from a centre to its leaves
        index = np.cumsum(centre) - 1  # run -> its position among the centres
        members = np.r_[centres, v[of_centre]]
        which = pa.array(np.r_[np.arange(len(centres)), index[run[of_centre]]])
        rows = pa.table(
            {
                "node": members,
                "root": np.r_[centres, u[of_centre]],
                "root_id": root_id.take(which),
                "size": size[which.to_numpy()],
            }
        )
        p = self.num_partitions
        with PartitionWriter(self.folder, roots_step(self.step), k, p, ROOTS_SCHEMA) as w:
            w.add(rows, mix_partition(members, p))


def components_fanned_out(folder: str, num_partitions: int, executor: Executor) -> tuple[str, int]:
    """Run star steps from `cc-000` until the graph is a star forest; returns the step that
    holds every clustered node's (root, root id, size), by node partition, and how many
    steps ran."""
    step = 0
    while True:
        fn = StarStep(folder, step, num_partitions)
        results = list(executor.map(fn, range(num_partitions)))
        done = all(star for _, star, _ in results)
        remove_step(folder, cc_step(step))
        remove_step(folder, cc_step(step + 1) if done else roots_step(step))
        edges = sum(n for _, _, n in results)
        log.info("dedup: components step %d: %d directed edges%s", step, edges,
                 ", converged" if done else "")  # fmt: skip
        if done:
            return roots_step(step), step + 1
        step += 1
        if step >= MAX_STEPS:
            raise RuntimeError(
                f"dedup: connected components did not converge in {MAX_STEPS} steps; this "
                "is a bug (the star steps converge on every graph), please report it"
            )
