"""From long-form keys to clusters: bucket edges, union-find and the cluster table.

Documents that share a (band, key) bucket are linked to one of them (`bucket_edges`), and
union-find over those links (`connected_components`) gives the clusters; the kept document
of a cluster is its smallest (id, source_path), so the choice depends on neither input order
nor partitioning (`clusters_from_edges`). This is the in-driver path; fanout.py computes the
same table in map steps, from the same `bucket_edges`, `node_order` and
`exact_duplicate_nodes`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.dedup.keys import EXACT_BAND, PREFIX_CHARS, as_strings

CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_path", pa.string()),  # null: the row had none
        pa.field("dup_cluster", pa.string(), nullable=False),
        pa.field("dup_cluster_size", pa.int32(), nullable=False),
        pa.field("dup_kind", pa.string(), nullable=False),  # kept|exact_duplicate|near_duplicate
    ]
)
EDGES_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string()), ("exact", pa.int8())])


def bucket_edges(keys: pa.Table) -> pa.Table:
    """Edges (src, dst, exact) linking every member of a (band, key) bucket with more than
    one member to the bucket's smallest node, de-duplicated. `exact` is 1 when the edge
    comes from the exact-hash bucket. Any member would do as the bucket's hub (components
    and labels are decided in `clusters_from_edges`); the smallest does not depend on the
    order rows come in. `keys` may be the whole long form or one hash partition of it by
    (band, key): the edges of all partitions are those of the whole."""
    keys = keys.filter(pc.greater_equal(keys["band"], EXACT_BAND))
    grouped = keys.group_by(["band", "key"]).aggregate([("node", "count"), ("node", "min")])
    dup = grouped.filter(pc.greater(grouped["node_count"], 1))
    members = keys.join(dup.select(["band", "key", "node_min"]), ["band", "key"], join_type="inner")
    return _edges_from_members(members.rename_columns({"node_min": "dst"}))


def _edges_from_members(members: pa.Table) -> pa.Table:
    """(node, band, dst) rows of duplicate buckets -> unique edges (src, dst, exact)."""
    members = members.filter(pc.not_equal(members["node"], members["dst"]))
    exact = pc.cast(pc.equal(members["band"], EXACT_BAND), pa.int8())
    edges = pa.table({"src": members["node"], "dst": members["dst"], "exact": exact})
    return unique_edges(edges)


def unique_edges(edges: pa.Table) -> pa.Table:
    """`edges` with each (src, dst) once; `exact` is 1 when any of its copies was exact."""
    out = edges.group_by(["src", "dst"]).aggregate([("exact", "max")])
    return out.rename_columns({"exact_max": "exact"}).select(["src", "dst", "exact"])


def connected_components(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """Root of every node 0..n-1 under the undirected edges (src, dst): the smallest node
    of its component. Union by smaller root with full path compression, vectorised over
    all edges per round (a few rounds, logarithmic in the longest chain)."""
    parent = np.arange(n, dtype=np.int64)
    while True:
        ru, rv = parent[src], parent[dst]
        if np.array_equal(ru, rv):
            return parent
        lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
        np.minimum.at(parent, hi, lo)  # roots only point to smaller nodes: no cycles
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


def node_order(nodes: pa.Array, sources: pa.Table) -> tuple[pa.Array, pa.Array]:
    """(id, source_path) of each node, the pair documents are ordered by; source_path is
    "" for rows that had none. `sources` maps node prefixes to paths (`source_table`)."""
    nodes = as_strings(nodes)
    ids = pc.utf8_slice_codeunits(nodes, PREFIX_CHARS)
    at = pc.index_in(pc.utf8_slice_codeunits(nodes, 0, PREFIX_CHARS), value_set=sources["prefix"])
    if at.null_count:
        raise RuntimeError("dedup: a clustered row's source is missing from the source table")
    return ids, as_strings(sources["source_path"]).take(at)


def exact_duplicate_nodes(src: np.ndarray, hub: np.ndarray) -> np.ndarray:
    """Exact edges (src -> hub, integer ranks) -> the ranks that are exact duplicates.

    An exact bucket is a star around its hub: its group is the hub and its srcs, and a
    member is an exact duplicate when the group has a member earlier in the order (a
    smaller rank). Each node has one exact key, so it is in at most one group."""
    order = np.argsort(hub, kind="stable")
    h, s = hub[order], src[order]
    starts = np.r_[0, np.flatnonzero(np.diff(h)) + 1] if len(h) else np.zeros(0, np.int64)
    hubs = h[starts]
    first = np.minimum(np.minimum.reduceat(s, starts), hubs) if len(h) else hubs
    per_edge = np.repeat(first, np.diff(np.r_[starts, len(h)]))
    return np.r_[s[per_edge < s], hubs[first < hubs]]


def clusters_from_edges(edges: pa.Table, sources: pa.Table) -> pa.Table:
    """Union-find over the edges -> (id, source_path, dup_cluster, dup_cluster_size,
    dup_kind) for every document of a non-singleton cluster, sorted by (id, source_path).

    `sources` maps node prefixes to source paths (`source_table`). Documents are ordered
    by id, then source_path (byte order), which depends on neither input order nor
    partitioning; the kept document of a cluster is its first. Every other member is an
    `exact_duplicate` when a document earlier in that order has exactly its normalised
    text (that one is then dropped or kept for it), else a `near_duplicate`. The in-driver
    path; components.py computes the same table fanned out."""
    if len(edges) == 0:
        return CLUSTERS_SCHEMA.empty_table()
    src, dst = as_strings(edges["src"]), as_strings(edges["dst"])
    nodes = pc.unique(pa.concat_arrays([src, dst]))
    ids, paths = node_order(nodes, sources)
    order = pc.sort_indices(
        pa.table({"id": ids, "source_path": paths}),
        sort_keys=[("id", "ascending"), ("source_path", "ascending")],
    )
    nodes, ids, paths = nodes.take(order), ids.take(order), paths.take(order)  # node = rank
    s = pc.index_in(src, value_set=nodes).to_numpy()
    d = pc.index_in(dst, value_set=nodes).to_numpy()
    n = len(nodes)
    root = connected_components(s, d, n)
    size = np.bincount(root, minlength=n)[root]
    exact = edges["exact"].to_numpy() > 0
    exact_dup = np.zeros(n, bool)
    exact_dup[exact_duplicate_nodes(s[exact], d[exact])] = True
    kind = np.where(
        root == np.arange(n), "kept", np.where(exact_dup, "exact_duplicate", "near_duplicate")
    )
    no_source = pc.equal(paths, "")
    return pa.table(
        [
            ids,
            pc.if_else(no_source, pa.scalar(None, pa.string()), paths),
            ids.take(pa.array(root)),
            pa.array(size, pa.int32()),
            pa.array(kind),
        ],
        schema=CLUSTERS_SCHEMA,
    )
