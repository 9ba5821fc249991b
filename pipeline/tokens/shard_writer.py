"""Step 4 of the mixture: a phase's shards, cut from its seeded order, written in parallel.

A phase's order is every drawn row sorted by (order key, source, part, document, epoch)
(pipeline/tokens/draws.py); `Route` left each part's rows in a route file sorted by key
and counted tokens per key bucket. `plan_shards` (driver) groups contiguous buckets into
shards of at most `shard_max_tokens` (a bucket larger than that alone is split between
documents, read from the route files; a single document larger than it is a shard of its
own), so a shard is a half-open range [lo, hi) of that order. `WriteShard` (a worker) reads
the range from every route file of the phase, sorts it, reads the tokens from the token
cache part by part and writes the shard and its provenance sidecar. The same seed gives
the same bytes whatever the number of workers: nothing depends on which worker ran what,
or when.

Provenance: beside each `shard-NNNNN.bin/.idx`, `shard-NNNNN.docs.parquet` has one row per
document of the shard, in shard order:

    source   the mixture source's name
    input    the input part (the stage output file the document came from)
    id       the document's id in that file
    epoch    0 for its first repetition in the phase, 1 for the second, ...
    tokens   its tokens in the shard (EOS included)
    offset   where its first token is in the shard's token stream
    cut      true when the phase's fractional epoch cut it (its first `tokens - 1`
             tokens, then EOS)

so any token of a shard traces back to a row of a stage output:

    docs = pq.read_table("RUN/mixture/phase1/shard-00000.docs.parquet")
    i = np.searchsorted(docs["offset"], token_offset, side="right") - 1
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tokens.draws import ROUTE_COLUMNS, PartRef, bucket_of, read_route
from pipeline.tokens.token_cache import IDS_SCHEMA, ids_path

Position = tuple[int, int, int, int, int]  # (order key, source, part, document, epoch)
ORIGIN: Position = (0, 0, 0, 0, 0)
SIDECAR_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("input", pa.string()),
        ("id", pa.string()),
        ("epoch", pa.int32()),
        ("tokens", pa.int32()),
        ("offset", pa.int64()),
        ("cut", pa.bool_()),
    ]
)
ROUTE_NAMES = {name for name, _ in ROUTE_COLUMNS}
_CHUNK_TOKENS = 1 << 18  # tokens gathered and scattered per step while writing a shard
_SIDECAR_ROWS = 1 << 16  # sidecar rows per step (and Parquet row group)


def sidecar_path(prefix: str | Path) -> str:
    return f"{prefix}.docs.parquet"


# -- the phase's parts, as the workers see them ------------------------------------------


def write_parts(path: Path, parts: list[tuple[PartRef, str]]) -> None:
    """The phase's parts and their route files, for the shard writers (one file, not per job)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps([[asdict(p), route] for p, route in parts])
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(blob)
    os.replace(tmp, path)


_PARTS: OrderedDict[str, list[tuple[PartRef, str]]] = OrderedDict()


def read_parts(path: str) -> list[tuple[PartRef, str]]:
    if path not in _PARTS:
        _PARTS[path] = [(PartRef(**p), route) for p, route in json.loads(Path(path).read_text())]
        if len(_PARTS) > 4:
            _PARTS.popitem(last=False)
    return _PARTS[path]


# -- grouping buckets into shards (driver) ----------------------------------------------


def bucket_bits(tokens: int, max_tokens: int) -> int:
    """Order-key buckets for a phase, as a power of two: four to eight per shard, so shards
    pack to about 90% of the limit and a bucket over it is rare, while each route task
    sends the driver one count per bucket it touches; at most 2**20."""
    return min(20, max(1, math.ceil(math.log2(max(2.0, 4 * tokens / max_tokens)))))


def bucket_start(b: int, bits: int) -> Position:
    return (b << (64 - bits), 0, 0, 0, 0)


def read_range(
    parts: list[tuple[PartRef, str]], lo: Position, hi: Position | None
) -> dict[str, np.ndarray]:
    """Every route row of a phase in [lo, hi), sorted in the phase's order. Columns: key,
    source, part, doc, epoch, take, and pid (the part's index in `parts`)."""
    names = ("key", "source", "part", "doc", "epoch", "take", "pid")
    found: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for pid, (ref, route) in enumerate(parts):
        rows = read_route(route, lo[0], None if hi is None else hi[0])
        if not len(rows["key"]):
            continue
        cols = [rows["key"], ref.source_index, ref.part, rows["doc"], rows["epoch"]]
        keep = _at_least(cols, lo)
        if hi is not None:
            keep &= ~_at_least(cols, hi)
        m = int(keep.sum())
        rows |= {"source": ref.source_index, "part": ref.part, "pid": pid}
        for k in names:
            found[k].append(rows[k][keep] if k in ROUTE_NAMES else np.full(m, rows[k]))
    out = {
        k: np.concatenate(v).astype(np.uint64 if k == "key" else np.int64)
        if v
        else np.empty(0, np.uint64 if k == "key" else np.int64)
        for k, v in found.items()
    }
    order = np.lexsort((out["epoch"], out["doc"], out["part"], out["source"], out["key"]))
    return {k: v[order] for k, v in out.items()}


def _at_least(cols: list[Any], bound: Position) -> np.ndarray:
    """Rows whose (key, source, part, doc, epoch) is >= `bound`, lexicographically."""
    n = len(cols[0])
    greater = np.zeros(n, bool)
    equal = np.ones(n, bool)
    for i, (col, b) in enumerate(zip(cols, bound, strict=True)):
        b = np.uint64(b) if i == 0 else b
        greater |= equal & (col > b)
        equal &= col == b
    return greater | equal


def plan_shards(
    bucket_tokens: np.ndarray,
    bits: int,
    max_tokens: int,
    expand: Callable[[int], dict[str, np.ndarray]],
) -> list[Position]:
    """Where each shard starts: contiguous buckets while they fit in `max_tokens`; a bucket
    over it alone (`expand(b)` gives its rows in order) is split between documents."""
    cum = np.cumsum(bucket_tokens, dtype=np.int64)
    total, n = (int(cum[-1]), len(cum)) if len(cum) else (0, 0)
    starts, cur, i = [ORIGIN], 0, 0
    while i < n:
        base = int(cum[i - 1]) if i else 0
        if base == total:
            break
        j = int(np.searchsorted(cum, base + max_tokens - cur, side="right"))
        if j > i:  # buckets i..j-1 join the current shard
            cur += int(cum[j - 1]) - base
            i = j
        elif cur:  # bucket i does not fit: it starts the next shard
            starts.append(bucket_start(i, bits))
            cur = 0
        else:  # bucket i alone is over the limit: cut it between documents
            rows = expand(i)
            take = np.cumsum(rows["take"])
            k = 0
            while k < len(take):
                before = int(take[k - 1]) if k else 0
                m = max(k + 1, int(np.searchsorted(take, before + max_tokens, side="right")))
                if m < len(take):
                    starts.append(tuple(int(rows[c][m]) for c in _POSITION))  # type: ignore[arg-type]
                else:
                    cur = int(take[-1]) - before
                k = m
            i += 1
    return starts


_POSITION = ("key", "source", "part", "doc", "epoch")


def expand_bucket(parts: list[tuple[PartRef, str]], b: int, bits: int) -> dict[str, np.ndarray]:
    hi = None if b + 1 == 1 << bits else bucket_start(b + 1, bits)
    rows = read_range(parts, bucket_start(b, bits), hi)
    assert (bucket_of(rows["key"], bits) == b).all()
    return rows


# -- writing one shard (worker) ---------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    index: int
    prefix: str  # the shard's path without .bin/.idx
    parts_file: str  # write_parts' file for the phase
    lo: Position
    hi: Position | None
    eos: int


class WriteShard:
    """Write one shard (tokens, index, provenance sidecar) from its range of the order.

    Two passes, so the work is one visit per cache part and one vectorised step per chunk
    of the shard, however many parts the phase has:
    1. part by part (each cache part opened once): its documents' tokens are read in one
       gather and scattered to their places in the shard's `.bin` (reserved up front, the
       lengths being known), their ids appended to a temporary Arrow file in part order;
    2. in shard order, a chunk at a time: the sidecar's rows, ids taken from that file.
    Memory: the shard's route rows (about 60 bytes a document) and one chunk."""

    def __call__(self, job: ShardJob) -> dict[str, Any]:
        from pipeline.tokens.shards import IndexedDatasetWriter

        parts = read_parts(job.parts_file)
        rows = read_range(parts, job.lo, job.hi)
        take = rows["take"]
        starts = np.cumsum(take) - take
        by = np.lexsort((rows["doc"], rows["pid"]))  # part by part, documents ascending
        folder, name = Path(job.prefix).parent, Path(job.prefix).name
        tag = uuid.uuid4().hex[:8]
        tmp_ids, tmp_sidecar = folder / f".{name}.ids.tmp-{tag}", folder / f".{name}.docs.tmp-{tag}"
        try:
            with IndexedDatasetWriter(job.prefix, dtype=np.uint16) as writer:
                writer.reserve(take)
                cut = self._scatter(parts, rows, by, starts, writer, tmp_ids)
                ends = starts[cut] + take[cut]
                writer.scatter(ends - 1, np.full(len(ends), job.eos))  # a cut one ends with EOS
                self._sidecar(parts, rows, by, starts, cut, tmp_ids, tmp_sidecar)
                info = writer.finalize()
            os.replace(tmp_sidecar, sidecar_path(job.prefix))
        finally:
            tmp_ids.unlink(missing_ok=True)
            tmp_sidecar.unlink(missing_ok=True)
        sources: dict[int, list[int]] = {}
        for s in np.unique(rows["source"]).tolist():
            at = rows["source"] == s
            sources[s] = [int(at.sum()), int(take[at].sum())]
        return {
            "prefix": job.prefix,
            "documents": int(info["documents"]),
            "tokens": int(info["tokens"]),
            "sources": sources,
        }

    @staticmethod
    def _scatter(
        parts: list[tuple[PartRef, str]],
        rows: dict[str, np.ndarray],
        by: np.ndarray,
        starts: np.ndarray,
        writer: Any,
        tmp_ids: Path,
    ) -> np.ndarray:
        """Pass 1: every part's tokens to their places, its ids in part order; returns which
        rows are cut (tokens taken < the document's length)."""
        from pipeline.tokens.shards import IndexedDataset

        take, doc = rows["take"], rows["doc"]
        cut = np.zeros(len(take), bool)
        upids, first = np.unique(rows["pid"][by], return_index=True)
        bounds = np.append(first, len(by)).tolist()
        positions: list[np.ndarray] = []
        tokens: list[np.ndarray] = []
        pending = 0
        with pa.OSFile(str(tmp_ids), "wb") as sink, pa.ipc.new_file(sink, IDS_SCHEMA) as ids_out:
            for u, a, b in zip(upids.tolist(), bounds[:-1], bounds[1:], strict=True):
                prefix = parts[u][0].prefix
                ds = IndexedDataset(prefix, check=False)  # the cache this stage wrote
                sel = by[a:b]
                cut[sel] = take[sel] < ds.lengths[doc[sel]]
                ids = pa.ipc.open_file(pa.memory_map(ids_path(prefix))).read_all()["id"]
                ids_out.write_table(pa.table({"id": ids.take(pa.array(doc[sel]))}))
                for piece in _pieces(take[sel]):
                    rs = sel[piece]
                    positions.append(_spans(starts[rs], take[rs]))
                    tokens.append(ds.gather(doc[rs], take[rs]))
                    pending += len(tokens[-1])
                    if pending >= _CHUNK_TOKENS:
                        writer.scatter(np.concatenate(positions), np.concatenate(tokens))
                        positions, tokens, pending = [], [], 0
        if pending:
            writer.scatter(np.concatenate(positions), np.concatenate(tokens))
        return cut

    @staticmethod
    def _sidecar(
        parts: list[tuple[PartRef, str]],
        rows: dict[str, np.ndarray],
        by: np.ndarray,
        starts: np.ndarray,
        cut: np.ndarray,
        tmp_ids: Path,
        out: Path,
    ) -> None:
        """Pass 2: the sidecar in shard order, a chunk of rows at a time."""
        ids = pa.ipc.open_file(pa.memory_map(str(tmp_ids))).read_all()["id"]
        at = np.empty(len(by), np.int64)
        at[by] = np.arange(len(by))  # each row's place in part order, where its id is
        names = pa.array([p.source for p, _ in parts], pa.string())
        inputs = pa.array([p.input for p, _ in parts], pa.string())
        with pq.ParquetWriter(str(out), SIDECAR_SCHEMA) as writer:
            for c0 in range(0, len(by), _SIDECAR_ROWS):
                c = slice(c0, c0 + _SIDECAR_ROWS)
                pid = pa.array(rows["pid"][c])
                table = {
                    "source": names.take(pid),
                    "input": inputs.take(pid),
                    "id": ids.take(pa.array(at[c])),
                    "epoch": pa.array(rows["epoch"][c].astype(np.int32)),
                    "tokens": pa.array(rows["take"][c].astype(np.int32)),
                    "offset": pa.array(starts[c]),
                    "cut": pa.array(cut[c]),
                }
                writer.write_table(pa.table(table, schema=SIDECAR_SCHEMA))


def _pieces(takes: np.ndarray) -> list[slice]:
    """Consecutive slices of documents holding at most `_CHUNK_TOKENS` tokens (or one)."""
    cum = np.cumsum(takes)
    out, lo = [], 0
    while lo < len(takes):
        before = int(cum[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, before + _CHUNK_TOKENS, side="right")))
        out.append(slice(lo, hi))
        lo = hi
    return out


def _spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Every position of the spans [starts[i], starts[i] + lengths[i]), back to back."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(
        int(ends[-1]) if len(ends) else 0
    )
