"""Which documents a mixture phase draws, and in which order: pure functions, run by workers.

Why: a phase can hold billions of documents, so the driver cannot hold (or loop over) one
entry per document. Every per-document decision here is a function of (seed, phase,
source, cache part, document index, epoch) alone, computed where the part's tokens are:

- two 64-bit keys per (document, epoch), both an xxh64 of the part's identity mixed with
  the document index (splitmix64, vectorised): the *select* key orders a fractional epoch,
  the *order* key places a drawn document in the phase's shuffle. They are independent, so
  the documents a fractional epoch keeps are spread over the whole phase, not its start;
- whole epochs draw every document; a fractional epoch of `rest` tokens draws documents by
  ascending (select key, part, document) and cuts the one that crosses `rest`. The cut is a
  distributed quantile: `KeyHistogram` (per part, tokens per top-16-bit key bucket) summed on
  the driver finds the bucket that crosses `rest`, `BoundaryRows` returns that bucket's
  documents, and `find_cut` resolves it exactly;
- `Route` writes a part's drawn rows (order key, document, epoch, tokens taken), sorted
  by order key, into one route file (`ROUTE_DTYPE` columns back to back) and returns
  per-key-bucket token and document counts; shards are contiguous ranges of that order
  (pipeline/tokens/shard_writer.py).

The driver holds per source and per part only counts and the `SourceDraw`.

    draws = cut_fractional(seed, {"web": (plan_draw(available, tokens), parts)}, executor)
    result = Route(seed)(RouteJob(part, draws["web"], route_path, bits))   # per part, a worker
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from pipeline.executor import LOCAL, Executor

KEY_VERSION = "primer-mixture-keys/1"
# Select-key buckets of the fractional-epoch quantile: a part sends at most 2**12 sums, the
# crossing bucket holds about 1/4096 of a source's documents.
HIST_BITS = 12
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)

# A route file holds these columns back to back (n rows each, n from the file's size);
# the key column comes first and sorted, so a key range is two binary searches.
ROUTE_COLUMNS = (("key", "<u8"), ("doc", "<u4"), ("epoch", "<u4"), ("take", "<u4"))
ROUTE_ROW_BYTES = sum(np.dtype(t).itemsize for _, t in ROUTE_COLUMNS)


@dataclass(frozen=True)
class PartRef:
    """One token-cache part as one source of one phase uses it (counts only)."""

    phase: str
    phase_index: int
    source: str
    source_index: int
    part: int  # ordinal among the source's parts
    prefix: str  # token cache prefix (`.bin`/`.idx`/`.ids.arrow`)
    input: str  # the input file (a stage output part)
    sha256: str  # the input file's content hash
    documents: int
    tokens: int

    @classmethod
    def of(
        cls, phase: str, pi: int, source: str, si: int, j: int, job: Any, stats: dict
    ) -> PartRef:
        """From a `TokenizeJob` and its cache part's stats (`prefix.json`)."""
        return cls(
            phase, pi, source, si, j, job.prefix, job.path, stats["input_sha256"],
            int(stats["documents"]), int(stats["tokens"]),
        )  # fmt: skip

    @staticmethod
    def totals(refs: list[PartRef]) -> tuple[int, int]:
        """(tokens, documents) of a source's parts."""
        return sum(r.tokens for r in refs), sum(r.documents for r in refs)

    def base(self, seed: int, epoch: int, purpose: str) -> int:
        blob = (
            f"{KEY_VERSION}\0{seed}\0{self.phase}\0{self.source}\0{self.part}\0"
            f"{self.sha256}\0{epoch}\0{purpose}"
        )
        return xxhash.xxh64_intdigest(blob.encode())

    def lengths(self) -> np.ndarray:
        from pipeline.tokens.shards import IndexedDataset

        lengths = np.asarray(IndexedDataset(self.prefix).lengths, dtype=np.int64)
        if len(lengths) != self.documents:
            raise RuntimeError(
                f"{self.prefix}: the token cache holds {len(lengths)} documents but its "
                f"stats say {self.documents}; delete {self.prefix}.* and rerun the mixture"
            )
        return lengths


def doc_keys(base: int, docs: np.ndarray) -> np.ndarray:
    """splitmix64 of `base` stepped by each document index: uniform, independent uint64s."""
    z = _U64(base) + (docs.astype(_U64) + _U64(1)) * _GOLDEN  # uint64 arrays wrap
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


@dataclass(frozen=True)
class SourceDraw:
    """How one source fills its tokens in a phase: `full` whole epochs, then `rest` tokens
    of epoch `full` taken by select key up to `cut` (select key, part, doc), whose document
    gives `cut_take` tokens (the last one EOS)."""

    full: int
    rest: int
    cut: tuple[int, int, int] | None = None
    cut_take: int = 0


def plan_draw(available_tokens: int, tokens: int) -> SourceDraw:
    full, rest = divmod(tokens, available_tokens) if available_tokens else (0, 0)
    return SourceDraw(full, rest)


# -- the fractional epoch's quantile ---------------------------------------------------


@dataclass(frozen=True)
class KeyJob:
    part: PartRef
    epoch: int
    source: Any  # the caller's key for the part's source
    bucket: int = -1  # BoundaryRows: the crossing bucket


class KeyHistogram:
    """Tokens per top-`HIST_BITS` select-key bucket of one part: (buckets, tokens), sparse."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, job: KeyJob) -> tuple[KeyJob, np.ndarray, np.ndarray]:
        lengths = job.part.lengths()
        keys = doc_keys(job.part.base(self.seed, job.epoch, "select"), np.arange(len(lengths)))
        buckets = (keys >> _U64(64 - HIST_BITS)).astype(np.int64)
        sums = np.bincount(buckets, weights=lengths, minlength=1 << HIST_BITS)  # exact < 2**53
        b = np.flatnonzero(sums)
        return job, b.astype(np.uint16), sums[b].astype(np.int64)


class BoundaryRows:
    """The documents of one part whose select key falls in `job.bucket`: (key, doc, tokens)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, job: KeyJob) -> tuple[KeyJob, np.ndarray, np.ndarray, np.ndarray]:
        lengths = job.part.lengths()
        keys = doc_keys(job.part.base(self.seed, job.epoch, "select"), np.arange(len(lengths)))
        docs = np.flatnonzero((keys >> _U64(64 - HIST_BITS)) == _U64(job.bucket))
        return job, keys[docs], docs, lengths[docs]


def crossing_bucket(hist: np.ndarray, rest: int) -> tuple[int, int]:
    """The bucket in which the running token count reaches `rest`, and the tokens before it."""
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, rest, side="left"))
    if b >= len(hist):
        raise RuntimeError(f"the fractional epoch needs {rest} tokens but holds {int(cum[-1])}")
    return b, int(cum[b - 1]) if b else 0


def find_cut(
    draw: SourceDraw,
    before: int,
    keys: np.ndarray,
    parts: np.ndarray,
    docs: np.ndarray,
    lengths: np.ndarray,
) -> SourceDraw:
    """Resolve the crossing bucket exactly: its documents in (key, part, doc) order, the one
    whose tokens reach `rest` is cut to fit."""
    order = np.lexsort((docs, parts, keys))
    cum = before + np.cumsum(lengths[order])
    k = int(np.searchsorted(cum, draw.rest, side="left"))
    i = order[k]
    take = draw.rest - (int(cum[k]) - int(lengths[i]))
    return SourceDraw(draw.full, draw.rest, (int(keys[i]), int(parts[i]), int(docs[i])), take)


def cut_fractional(
    seed: int,
    sources: dict[Any, tuple[SourceDraw, list[PartRef]]],
    executor: Executor = LOCAL,
) -> dict[Any, SourceDraw]:
    """Each fractional epoch's cut, for sources keyed however the caller likes: two maps
    over the parts (histograms, then the crossing bucket's documents), sums here."""
    sources = {k: v for k, v in sources.items() if v[0].rest}
    jobs = [KeyJob(r, d.full, k) for k, (d, refs) in sources.items() for r in refs if r.documents]
    hists = {k: np.zeros(1 << HIST_BITS, np.int64) for k in sources}
    for job, buckets, sums in executor.map(KeyHistogram(seed), jobs):
        hists[job.source][buckets] += sums
    crossing = {k: crossing_bucket(hists[k], d.rest) for k, (d, _) in sources.items()}
    found: dict[Any, list[tuple[np.ndarray, ...]]] = {k: [] for k in sources}
    jobs = [KeyJob(j.part, j.epoch, j.source, crossing[j.source][0]) for j in jobs]
    for job, keys, docs, lengths in executor.map(BoundaryRows(seed), jobs):
        found[job.source].append((keys, np.full(len(keys), job.part.part), docs, lengths))
    return {
        k: find_cut(d, crossing[k][1], *(np.concatenate(c) for c in zip(*found[k], strict=True)))
        for k, (d, _) in sources.items()
    }


# -- routing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteJob:
    part: PartRef
    draw: SourceDraw
    path: str  # the route file to write
    bits: int  # order-key buckets counted: the top `bits` bits


@dataclass(frozen=True)
class RouteResult:
    job: RouteJob
    rows: int  # drawn (document, epoch) pairs
    tokens: int
    used: int  # distinct documents drawn at least once
    buckets: np.ndarray  # order-key buckets present (sorted)
    bucket_tokens: np.ndarray


def drawn(part: PartRef, draw: SourceDraw, seed: int) -> tuple[np.ndarray, ...]:
    """(document, epoch, tokens taken) of every draw of one part, epoch by epoch."""
    lengths = part.lengths()
    n = len(lengths)
    docs = [np.tile(np.arange(n, dtype=np.int64), draw.full)]
    epochs = [np.repeat(np.arange(draw.full, dtype=np.int64), n)]
    takes = [np.tile(lengths, draw.full)]
    if draw.rest:
        if draw.cut is None:
            raise RuntimeError(f"{part.prefix}: a fractional epoch without its cut")
        key, cut_part, cut_doc = draw.cut
        sel = doc_keys(part.base(seed, draw.full, "select"), np.arange(n))
        # Equal select keys fall back to (part, document) order.
        tie = np.arange(n) <= cut_doc if part.part == cut_part else np.full(n, part.part < cut_part)
        keep = np.flatnonzero((sel < _U64(key)) | ((sel == _U64(key)) & tie))
        take = lengths[keep].copy()
        if part.part == cut_part:
            take[keep == cut_doc] = draw.cut_take
        docs.append(keep)
        epochs.append(np.full(len(keep), draw.full, np.int64))
        takes.append(take)
    return np.concatenate(docs), np.concatenate(epochs), np.concatenate(takes)


class Route:
    """Write one part's drawn rows, sorted by order key, to its route file; count them per
    order-key bucket (the top `job.bits` bits) for the driver to group buckets into shards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, job: RouteJob) -> RouteResult:
        part = job.part
        docs, epochs, takes = drawn(part, job.draw, self.seed)
        keys = np.empty(len(docs), _U64)
        for e in np.unique(epochs):  # one vectorised pass per epoch
            at = epochs == e
            keys[at] = doc_keys(part.base(self.seed, int(e), "order"), docs[at])
        order = np.lexsort((epochs, docs, keys))
        cols = {
            "key": keys[order],
            "doc": docs[order],
            "epoch": epochs[order],
            "take": takes[order],
        }
        if len(docs) and (int(docs.max()) >= 2**32 or int(takes.max()) >= 2**32):
            raise ValueError(f"{part.prefix}: a part over 2**32 documents cannot be routed")
        write_route(job.path, cols)
        buckets = bucket_of(cols["key"], job.bits)
        b, first = np.unique(buckets, return_index=True)  # keys are sorted: buckets too
        sums = np.add.reduceat(cols["take"], first) if len(b) else np.empty(0, np.int64)
        used = len(np.unique(docs)) if job.draw.full == 0 else part.documents
        return RouteResult(job, len(docs), int(takes.sum()), used, b.astype(np.uint32), sums)


def bucket_of(keys: np.ndarray, bits: int) -> np.ndarray:
    return (keys >> _U64(64 - bits)).astype(np.int64)


def write_route(path: str, cols: dict[str, np.ndarray]) -> None:
    """The columns back to back, written under a temporary name and renamed into place."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        for name, dtype in ROUTE_COLUMNS:
            f.write(np.ascontiguousarray(cols[name], dtype=dtype).data)
    os.replace(tmp, path)


def read_route(path: str, lo_key: int, hi_key: int | None) -> dict[str, np.ndarray]:
    """The rows of a route file with lo_key <= key <= hi_key (None: to the end)."""
    size = os.path.getsize(path)
    n, extra = divmod(size, ROUTE_ROW_BYTES)
    if extra:
        raise ValueError(f"{path}: {size} bytes is not a whole number of route rows")
    if n == 0:
        return {name: np.empty(0, dtype) for name, dtype in ROUTE_COLUMNS}
    keys = np.memmap(path, dtype="<u8", mode="r", shape=(n,))
    i0 = int(np.searchsorted(keys, _U64(lo_key), side="left"))
    i1 = n if hi_key is None else int(np.searchsorted(keys, _U64(hi_key), side="right"))
    out, offset = {}, 0
    with open(path, "rb") as f:
        for name, dtype in ROUTE_COLUMNS:
            size = np.dtype(dtype).itemsize
            f.seek(offset + i0 * size)
            out[name] = np.frombuffer(f.read((i1 - i0) * size), dtype=dtype)
            offset += n * size
    return out
