"""Exact and MinHash-LSH near-duplicate detection: one document kept per cluster.

What: every kept document gets `text_hash` (xxh64 of its normalised text), `dup_cluster`
(the id of the document kept for its cluster; its own id when it has no duplicate) and
`dup_cluster_size`; every other member of a cluster is marked `dedup:exact_duplicate` or
`dedup:near_duplicate` (never removed, so each cut can be audited).

Why: web crawls repeat boilerplate pages, mirrors and templated text; training on repeats
wastes tokens and encourages memorisation. FineWeb deduplicates with MinHash over word
5-grams, 14 bands x 8 rows (datatrove); this module uses the same settings, vectorised over
a batch with numpy instead of one document at a time: ~3,000 FineWeb documents (7 KB) a
second on one core for normalise + text_hash + signatures + band keys, where datatrove's
signature step does ~45.

How: `DedupStage` is a `GlobalStage`. `prepare()` reads the kept rows of every input once
and computes, per document, a key for exact dedup and one LSH key per band; documents that
share a (band, key) bucket are linked to one of them, and union-find over those links gives
the clusters, written to `state_dir/clusters.parquet` (duplicates only). A document is known
by its (source_path, id) pair, carried as one short string (`row_nodes`), because ids are
unique only within the file a row was read from: two JSONL shards that both number their
rows from 0 hold two different documents "0". The per-part pass (`process`) then only looks
rows up in that table. Run it as a recipe stage (`primer run`) or directly:

    stage = DedupStage()
    stage.prepare(["a.parquet", "b.parquet"], "state/")
    out = stage(pq.read_table("a.parquet"))

Hashing is defined here, not borrowed: the shingle hash is a polynomial hash over the UTF-8
bytes of the normalised n-gram, finished with murmur3's fmix64; MinHash permutations are
multiply-add-shift hashes (Dietzfelbinger, 2-universal for 32-bit keys) with parameters
from numpy's PCG64 bit stream, whose output numpy guarantees across versions. Signatures of
a normalised text are therefore the same in every process, run and library version
(`version` bumps if they or the clusters' meaning ever change); normalisation follows
Arrow's Unicode tables. Whitespace-free scripts (Chinese, Japanese, Thai) become one "word"
per run of text, so their near-duplicate recall is poor: a known limitation, as for FineWeb.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import Field, model_validator

from pipeline.executor import LOCAL, Executor
from pipeline.io import iter_documents, write_json_atomic
from pipeline.stage import GlobalStage, StageConfig, StageFatal, mark_dropped, set_column

EXACT_BAND = -1
"""The `band` value of a document's exact-dedup key in the long form (its text_hash)."""

SOURCE_BAND = -2
"""Long-form rows that are no LSH key: one per (input, source_path) met, `node` = the
source's prefix + its path, `key` = the input's position in the list. They bring the
per-source table (prefix -> path) to the driver and are kept out of every bucket."""

_PREFIX_CHARS = 16  # hex digits of a node's source hash (`row_nodes`)

CLUSTERS_FILE = "clusters.parquet"
DONE_FILE = "_DONE"
CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_path", pa.string()),  # null: the row had none
        pa.field("dup_cluster", pa.string(), nullable=False),
        pa.field("dup_cluster_size", pa.int32(), nullable=False),
        pa.field("dup_kind", pa.string(), nullable=False),  # kept|exact_duplicate|near_duplicate
    ]
)
KEYS_SCHEMA = pa.schema([("node", pa.string()), ("band", pa.int16()), ("key", pa.uint64())])

# Scratch memory bounds. numpy work runs over groups of documents of about _GROUP_BYTES of
# text (a longer document is a group of its own), and MinHash holds permutations x shingles
# of at most _SCRATCH_BYTES: small arrays stay in cache and in malloc's reused heap, where
# large fresh ones cost page faults (measured: a 56 MB cumsum 10x slower than a reused one).
_GROUP_BYTES = 1 << 20
_SCRATCH_BYTES = 12 << 20

# Settings that change the clusters; a finished state is reused only when they match.
_RESULT_FIELDS = (
    "exact",
    "near",
    "ngram",
    "bands",
    "rows_per_band",
    "seed",
    "lowercase",
    "strip_punct",
    "strip_accents",
)

_U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2^64
_LEN_MIX = np.uint64(0xC2B2AE3D27D4EB4F)


log = logging.getLogger("primer")


class DedupConfig(StageConfig):
    """Dedup settings. Defaults are FineWeb's (datatrove `MinhashConfig`): word 5-grams,
    14 bands of 8 rows, seed 1. With b bands of r rows, a pair with Jaccard similarity s
    becomes a candidate with probability 1 - (1 - s^r)^b: 0.92 at s = 0.8, 0.5 near 0.72."""

    exact: bool = True
    """Cluster documents whose normalised text is identical (reason `exact_duplicate`).
    Off, identical texts are still found by `near`, as near duplicates."""

    near: bool = True
    """Cluster near duplicates found by MinHash LSH (reason `near_duplicate`)."""

    ngram: int = Field(5, ge=1)
    """Words per shingle (FineWeb: 5). Documents shorter than this get one shingle."""

    bands: int = Field(14, ge=1, le=255)
    """LSH bands (FineWeb: 14). More bands find less similar pairs."""

    rows_per_band: int = Field(8, ge=1)
    """MinHash values per band (FineWeb: 8). More rows demand more similarity per band."""

    seed: int = Field(1, ge=0)
    """Seed of the MinHash permutations (FineWeb: 1). Changing it changes every signature."""

    lowercase: bool = True
    """Compare text case-insensitively."""

    strip_punct: bool = True
    """Drop Unicode punctuation and symbols before comparing (as FineWeb's simplify_text)."""

    strip_accents: bool = True
    """Decompose (NFKD) and drop combining marks, so "café" matches "cafe" (as FineWeb)."""

    num_partitions: int = Field(32, ge=1)
    """Ray mode: hash partitions of the (band, key) shuffle; raise it with the corpus size."""

    ray_min_rows: int = Field(50_000, ge=0)
    """Ray mode: inputs (Parquet stage outputs) with fewer rows than this get their clusters
    computed in the driver, the in-process path (identical clusters, tested): Ray Data's
    groupby and join cost ~10 s of fixed start-up, more than a small input's whole work."""

    @model_validator(mode="after")
    def _something_to_do(self) -> DedupConfig:
        if not (self.exact or self.near):
            raise ValueError("dedup: `exact` and `near` are both false; enable at least one")
        return self

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows_per_band


# --- normalisation and exact hash ---------------------------------------------------------


def _as_large_string(texts: pa.Array | pa.ChunkedArray) -> pa.LargeStringArray:
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks else pa.array([], pa.large_string())
    return texts.cast(pa.large_string())


def _buffers(arr: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes and the offsets (starting at 0) of a large_string array."""
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    buf = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    if len(offsets) == 0:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    return buf[offsets[0] : offsets[-1]], offsets - offsets[0]


def normalise(
    texts: pa.Array | pa.ChunkedArray,
    *,
    lowercase: bool = True,
    strip_punct: bool = True,
    strip_accents: bool = True,
) -> pa.LargeStringArray:
    """Text as dedup compares it: NFKC (NFKD with `strip_accents`), lower-cased, without
    punctuation, symbols or control characters, words separated by single spaces, trimmed.
    Null stays null. ~4,500 docs/s on one core for 7 KB web documents."""
    arr = _as_large_string(texts)
    validity = pc.is_valid(arr)
    arr = pc.fill_null(arr, "")
    arr = pc.utf8_normalize(arr, "NFKD" if strip_accents else "NFKC")
    if lowercase:
        arr = pc.utf8_lower(arr)
    drop = r"\p{Cf}\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f"  # invisible and control characters
    if strip_punct:
        drop += r"\p{P}\p{S}"
    if strip_accents:
        drop += r"\p{Mn}"
    arr = pc.replace_substring_regex(arr, f"[{drop}]+", "")
    # Unicode spaces that NFK* does not map to U+0020; ASCII whitespace is handled below.
    for ws in ("\x85", "\u1680", "\u2028", "\u2029"):
        arr = pc.replace_substring(arr, ws, " ")
    arr = _collapse_ascii_whitespace(_as_large_string(arr))
    if validity.false_count:
        arr = pc.if_else(validity, arr, pa.scalar(None, pa.large_string()))
    return arr


_IS_WS = np.zeros(256, bool)
_IS_WS[[9, 10, 11, 12, 13, 32]] = True


def _doc_groups(off: np.ndarray, max_bytes: int = _GROUP_BYTES) -> Iterator[tuple[int, int]]:
    """Consecutive document ranges [lo, hi) of about `max_bytes` of text each."""
    n_docs = len(off) - 1
    cuts = np.searchsorted(off, np.arange(0, off[-1], max_bytes), side="right") - 1
    cuts = np.unique(np.concatenate([[0], cuts, [n_docs]]))
    return zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)


def _collapse_ascii_whitespace(arr: pa.LargeStringArray) -> pa.LargeStringArray:
    # numpy over the bytes; a regex `\s+` -> " " costs 2x the rest of `normalise`.
    buf, off = _buffers(arr)
    if len(buf) == 0:
        return arr
    out = np.empty_like(buf)
    new_off = np.zeros_like(off)
    n_out = 0
    for lo, hi in _doc_groups(off):
        if off[hi] == off[lo]:  # only empty documents in this group
            new_off[lo + 1 : hi + 1] = n_out
            continue
        b = buf[off[lo] : off[hi]]
        o = off[lo : hi + 1] - off[lo]
        ws = _IS_WS[b]
        nonws = ~ws
        # cumsum over uint8 with a wide accumulator: 6x faster than over bool.
        seen = np.cumsum(nonws.view(np.uint8), dtype=np.int64)  # non-space bytes so far
        before = np.concatenate([[0], seen])[o[:-1]]  # ... before each document
        next_nonws = np.empty_like(nonws)
        next_nonws[:-1] = nonws[1:]
        next_nonws[-1] = False
        next_nonws[o[1:][o[1:] > o[:-1]] - 1] = False  # the next byte is another document's
        # Keep a space where a run of whitespace sits between two words of one document.
        inner = seen > np.repeat(before, np.diff(o))
        keep = nonws | (ws & next_nonws & inner)
        kept = np.where(ws, np.uint8(32), b)[keep]
        out[n_out : n_out + len(kept)] = kept
        csum = np.concatenate([[0], np.cumsum(keep.view(np.uint8), dtype=np.int64)])
        new_off[lo + 1 : hi + 1] = n_out + csum[o[1:]]
        n_out += len(kept)
    return pa.LargeStringArray.from_buffers(
        len(arr), pa.py_buffer(new_off), pa.py_buffer(out[:n_out])
    )


def text_hash(
    texts: pa.Array | pa.ChunkedArray, *, normalised: bool = False, **norm: bool
) -> pa.UInt64Array:
    """xxh64 (seed 0) of the UTF-8 normalised text; null for null text. `norm` takes the
    keyword flags of `normalise`; `normalised=True` hashes `texts` as given. The Python
    loop is one call per document (~1 ms per 1,000 docs), not per word."""
    arr = _as_large_string(texts) if normalised else normalise(texts, **norm)
    buf, off = _buffers(arr)
    mv = memoryview(buf)
    starts, ends = off[:-1].tolist(), off[1:].tolist()
    digest = xxhash.xxh64_intdigest
    out = np.fromiter(
        (digest(mv[s:e]) for s, e in zip(starts, ends, strict=True)), np.uint64, len(arr)
    )
    return pa.array(out, pa.uint64(), mask=pc.is_null(arr).to_numpy(zero_copy_only=False))


# --- MinHash ---------------------------------------------------------------------------------


def _fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, in place: every input bit affects every output bit."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the `num_perm` hash functions h(x) = ((a*x + b) mod 2^64) >> 32."""
    raw = np.random.PCG64(seed).random_raw(2 * num_perm).astype(np.uint64)
    return raw[:num_perm].copy(), raw[num_perm:].copy()


def _powers(n: int) -> np.ndarray:
    pw = np.full(n, _POLY, np.uint64)
    pw[0] = 1
    return np.multiply.accumulate(pw, out=pw)


def word_bounds(buf: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte offsets where each word of normalised documents (single spaces, trimmed) starts
    and ends, and per document the index of its first word: document d has words
    [first_word[d], first_word[d + 1])."""
    nonempty = off[1:] > off[:-1]
    spaces = np.flatnonzero(buf == 32)
    mark = np.zeros(len(buf) + 1, bool)
    mark[spaces + 1] = True
    mark[off[:-1][nonempty]] = True
    word_start = np.flatnonzero(mark)
    mark[:] = False
    mark[spaces] = True
    mark[off[1:][nonempty]] = True
    word_end = np.flatnonzero(mark)
    return word_start, word_end, np.searchsorted(word_start, off)


def shingle_hashes(buf: np.ndarray, off: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes (held in uint64) of every word n-gram of normalised documents.

    `buf`/`off` are the bytes and offsets of normalised text (single spaces, trimmed).
    Returns the hashes and, per document, offsets into them (n+1). A document with fewer
    than `ngram` words has one shingle of all its words; an empty one has none.
    """
    n_docs, size = len(off) - 1, len(buf)
    word_start, word_end, first_word = word_bounds(buf, off)
    n_words = np.diff(first_word)
    n_sh = np.where(n_words > 0, np.maximum(n_words - ngram + 1, 1), 0)
    sh_off = np.zeros(n_docs + 1, np.int64)
    np.cumsum(n_sh, out=sh_off[1:])
    first_w = np.repeat(first_word[:-1] - sh_off[:-1], n_sh) + np.arange(sh_off[-1])
    last_w = np.minimum(first_w + (ngram - 1), np.repeat(first_word[1:] - 1, n_sh))
    s, e = word_start[first_w], word_end[last_w]
    # Polynomial hash of buf[s:e] from prefix sums: G[k] = sum_{j<k} c_j P^j (mod 2^64),
    # so sum_{j=s}^{e-1} c_j P^(j-s) = (G[e] - G[s]) * P^(size-s) * P^-size.
    pw = _powers(size + 1)
    g = np.zeros(size + 1, np.uint64)
    np.cumsum(buf * pw[:size], out=g[1:])
    h = g[e] - g[s]
    h *= pw[size - s]
    h *= np.uint64(pow(int(_POLY), -size, 1 << 64))
    h ^= (e - s).astype(np.uint64) * _LEN_MIX
    return _fmix64(h) >> np.uint64(32), sh_off


def minhash(
    texts: pa.Array | pa.ChunkedArray,
    config: DedupConfig | None = None,
    *,
    normalised: bool = False,
) -> np.ndarray:
    """MinHash signatures, (n_docs, bands * rows_per_band) uint32.

    The batch's shingles are hashed together; each permutation is applied to a slice of
    them and `np.minimum.reduceat` takes the minimum per document, so scratch memory stays
    under ~`_SCRATCH_BYTES` whatever the batch. Empty or null documents get all 0xFFFFFFFF
    (no shingles); callers leave them out of LSH.
    """
    config = config or DedupConfig()
    arr = _as_large_string(texts) if normalised else normalise(texts, **_norm_flags(config))
    buf, off = _buffers(pc.fill_null(arr, ""))
    a, b = permutations(config.num_perm, config.seed)
    a, b = a[:, None], b[:, None]
    n_docs = len(off) - 1
    # (permutation, document): a permutation's values for a slice of shingles are one
    # contiguous row, and reduceat along rows is ~4x faster than the transposed layout.
    sig = np.full((config.num_perm, n_docs), _U64_MAX, np.uint64)
    step = max(1, _SCRATCH_BYTES // (8 * config.num_perm))
    scratch = np.empty((config.num_perm, step), np.uint64)
    for d_lo, d_hi in _doc_groups(off):
        x, sh_off = shingle_hashes(
            buf[off[d_lo] : off[d_hi]], off[d_lo : d_hi + 1] - off[d_lo], config.ngram
        )
        for lo in range(0, len(x), step):
            hi = min(lo + step, len(x))
            # Documents overlapping shingles [lo, hi): those at the edges get partial
            # minima, merged by np.minimum. An empty document's column gets garbage (reduceat
            # of an empty segment) and is reset after the loop.
            first = int(np.searchsorted(sh_off, lo, side="right")) - 1
            last = int(np.searchsorted(sh_off, hi - 1, side="right")) - 1
            seg = np.maximum(sh_off[first : last + 1], lo) - lo
            vals = scratch[:, : hi - lo]
            np.multiply(x[None, lo:hi], a, out=vals)
            vals += b
            part = np.minimum.reduceat(vals, seg, axis=1)
            cols = sig[:, d_lo + first : d_lo + last + 1]
            np.minimum(cols, part, out=cols)
        sig[:, np.flatnonzero(np.diff(sh_off) == 0) + d_lo] = _U64_MAX
    sig = sig.T
    return (sig >> np.uint64(32)).astype(np.uint32)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Share of equal MinHash values: an unbiased estimate of the shingle-set Jaccard."""
    return float(np.mean(sig_a == sig_b))


def band_keys(sig: np.ndarray, bands: int, rows_per_band: int, seed: int = 1) -> np.ndarray:
    """One uint64 key per (document, band): a multilinear hash of the band's values.

    Two documents share a key exactly when their band values agree (up to 64-bit
    collisions, ~n^2 / 2^65 spurious pairs per band for n documents)."""
    n = sig.shape[0]
    vals = sig.reshape(n, bands, rows_per_band).astype(np.uint64)
    raw = np.random.PCG64([seed, 1]).random_raw(rows_per_band + bands).astype(np.uint64)
    mult, salt = raw[:rows_per_band] | np.uint64(1), raw[rows_per_band:]
    keys = (vals * mult).sum(axis=2, dtype=np.uint64) + salt
    return _fmix64(keys)


def _norm_flags(config: DedupConfig) -> dict[str, bool]:
    return {
        "lowercase": config.lowercase,
        "strip_punct": config.strip_punct,
        "strip_accents": config.strip_accents,
    }


# --- rows: the internal key that tells documents apart ---------------------------------------


class DuplicateRowError(StageFatal, ValueError):
    """Two kept rows with the same (source_path, id): dedup could not tell them apart. Fatal
    for the part: splitting the batch to find "the bad row" would separate the pair."""


def _strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values.cast(pa.string())


def row_sources(table: pa.Table) -> pa.Array:
    """Each row's `source_path`; "" where it has none (synthetic rows, tables built in
    memory), so all such rows count as one source and need ids unique among them."""
    if "source_path" not in table.column_names:
        return pa.array(np.full(len(table), ""), pa.string())
    return pc.fill_null(_strings(table["source_path"]), "")


def _prefix(source: str) -> str:
    return f"{xxhash.xxh64_intdigest(source.encode()):016x}"


def row_nodes(table: pa.Table) -> pa.Array:
    """The key dedup clusters over: 16 hex digits of xxh64(source_path), then the id.

    Ids repeat across parts (two JSONL shards both numbered from 0) but not within the
    file a row was read from (the runner numbers a repeated id "X#1"), so the pair is
    unique per row; hashing the path, not the row, keeps the key short and exact (two
    paths sharing a hash would be caught by `_source_table`). The prefix has a fixed width:
    a node's id is `node[16:]`. Null for a null id."""
    enc = pc.dictionary_encode(row_sources(table))
    prefixes = pa.array([_prefix(s) for s in enc.dictionary.to_pylist()], pa.string())
    return pc.binary_join_element_wise(prefixes.take(enc.indices), _strings(table["id"]), "")


def _kept(table: pa.Table) -> pa.Table:
    """The rows dedup judges: not dropped by an earlier stage, with an id."""
    mask = pc.is_valid(table["id"])
    if "drop_reason" in table.column_names:
        mask = pc.and_(mask, pc.is_null(table["drop_reason"]))
    return table.filter(mask)


def _duplicate_error(nodes: pa.Array, sources: dict[str, str], where: str) -> None:
    """Raise DuplicateRowError if `nodes` (no nulls) repeat; `sources` maps prefixes."""
    if pc.count_distinct(nodes).as_py() == len(nodes):
        return
    counts = pc.value_counts(nodes)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    node = repeated[0]["values"].as_py()
    source = sources.get(node[:_PREFIX_CHARS], "?")
    raise DuplicateRowError(
        f"dedup: {len(repeated)} (source_path, id) pairs occur on more than one kept row of "
        f"{where}, e.g. id {node[_PREFIX_CHARS:]!r} from source_path {source!r}; dedup tells "
        "documents apart by that pair, so it would judge two documents as one. Give every "
        "row of an input file its own id (the runner numbers a repeated id X as X#1, X#2) "
        "and rows of different files their file in `source_path`"
    )


# --- keys: what leaves a worker ------------------------------------------------------------


def dedup_keys(table: pa.Table, config: DedupConfig) -> pa.Table:
    """Long form (node, band, key) of a batch: with `exact`, one row per document with
    band = EXACT_BAND and key = text_hash; with `near`, one row per band for documents
    with at least one word. `node` is the row's `row_nodes` key. Rows with null text or a
    drop_reason are left out. This is all that leaves a worker in Ray mode: ~27 bytes plus
    the id per row, no text."""
    table = _kept(table)
    return _keys(table, row_nodes(table), config)


def _keys(table: pa.Table, nodes: pa.Array, config: DedupConfig) -> pa.Table:
    if table["text"].null_count:
        has_text = pc.is_valid(table["text"])
        table, nodes = table.filter(has_text), nodes.filter(has_text.combine_chunks())
    norm = normalise(table["text"], **_norm_flags(config))
    parts = []
    if config.exact:
        th = text_hash(norm, normalised=True)
        band = pa.array(np.full(len(nodes), EXACT_BAND, np.int16))
        parts.append(pa.table([nodes, band, th], schema=KEYS_SCHEMA))
    if config.near:
        sig = minhash(norm, config, normalised=True)
        has_words = pc.greater(pc.binary_length(norm), 0).to_numpy(zero_copy_only=False)
        keys = band_keys(sig[has_words], config.bands, config.rows_per_band, config.seed)
        n, nb = keys.shape
        doc_nodes = nodes.filter(pa.array(has_words)).take(pa.array(np.repeat(np.arange(n), nb)))
        band = np.tile(np.arange(nb, dtype=np.int16), n)
        parts.append(pa.table([doc_nodes, band, keys.ravel()], schema=KEYS_SCHEMA))
    return pa.concat_tables(parts) if parts else KEYS_SCHEMA.empty_table()


@dataclass
class _Seen:
    """What one pass over inputs saw: each kept row's node, to check that none repeats, and
    the source_path behind each prefix (per source, not per row)."""

    nodes: list[pa.Array] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def check_unique(self, where: str) -> None:
        if self.nodes:
            _duplicate_error(pa.concat_arrays(self.nodes), self.sources, where)


def _input_keys(
    tables: Iterable[pa.Table], config: DedupConfig, index: int, seen: _Seen
) -> Iterator[pa.Table]:
    """The long-form keys of one input's batches, then its SOURCE_BAND rows: one per
    source_path met, `node` = prefix + path and `key` = the input's position `index`."""
    met: dict[str, str] = {}
    for table in tables:
        table = _kept(table)
        if not len(table):
            continue
        nodes = row_nodes(table)
        seen.nodes.append(nodes)
        for source in pc.unique(row_sources(table)).to_pylist():
            met.setdefault(_prefix(source), source)
        yield _keys(table, nodes, config)
    seen.sources.update(met)
    if met:
        n = len(met)
        yield pa.table(
            [
                pa.array([p + s for p, s in met.items()], pa.string()),
                pa.array(np.full(n, SOURCE_BAND, np.int16)),
                pa.array(np.full(n, index, np.uint64)),
            ],
            schema=KEYS_SCHEMA,
        )


def _source_table(rows: pa.Table, names: Sequence[str]) -> pa.Table:
    """SOURCE_BAND rows -> (prefix, source_path), one row per source, after checking the
    two things that keep nodes unique across inputs: a prefix names one source_path, and
    a source_path (other than "", rows without one) comes through one input only, as the
    runner's parts do (one part per input file). `names` are the inputs' names, in order."""
    node = rows["node"]
    table = pa.table(
        {
            "prefix": pc.utf8_slice_codeunits(node, 0, _PREFIX_CHARS),
            "source_path": pc.utf8_slice_codeunits(node, _PREFIX_CHARS),
            "input": rows["key"],
        }
    )
    per_source = table.group_by("source_path").aggregate(
        [("input", "count_distinct"), ("input", "min"), ("input", "max")]
    )
    split = per_source.filter(
        pc.and_(
            pc.greater(per_source["input_count_distinct"], 1),
            pc.not_equal(per_source["source_path"], ""),
        )
    )
    if len(split):
        row = split.slice(0, 1).to_pylist()[0]
        a, b = names[row["input_min"]], names[row["input_max"]]
        raise DuplicateRowError(
            f"dedup: rows read from source_path {row['source_path']!r} come in through "
            f"{row['input_count_distinct']} inputs ({a!r} and {b!r}, ...); ids are unique "
            "only within one source file, so the same source in two inputs can repeat a "
            "document. Give dedup each stage output once (check the stage's `input` list)"
        )
    distinct = table.group_by(["prefix", "source_path"]).aggregate([])
    per_prefix = distinct.group_by("prefix").aggregate([("source_path", "count")])
    clash = per_prefix.filter(pc.greater(per_prefix["source_path_count"], 1))
    if len(clash):
        prefix = clash["prefix"][0].as_py()
        paths = distinct.filter(pc.equal(distinct["prefix"], prefix))["source_path"].to_pylist()
        raise DuplicateRowError(
            f"dedup: source paths {paths[:2]} share the 64-bit hash {prefix}, so their rows "
            "cannot be told apart; rename one of the files"
        )
    return distinct.select(["prefix", "source_path"])


# --- clustering ------------------------------------------------------------------------------


def bucket_edges(keys: pa.Table) -> pa.Table:
    """Edges (src, dst, exact) linking every member of a (band, key) bucket with more than
    one member to the bucket's smallest node, de-duplicated. `exact` is 1 when the edge
    comes from the exact-hash bucket. Any member would do as the bucket's hub (components
    and labels are decided in `clusters_from_edges`); the smallest is one that the Ray path
    finds the same way."""
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
    return _unique_edges(edges)


def _unique_edges(edges: pa.Table) -> pa.Table:
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


def clusters_from_edges(edges: pa.Table, sources: pa.Table) -> pa.Table:
    """Union-find over the edges -> (id, source_path, dup_cluster, dup_cluster_size,
    dup_kind) for every document of a non-singleton cluster, sorted by (id, source_path).

    `sources` maps node prefixes to source paths (`_source_table`). Documents are ordered
    by id, then source_path (byte order), which depends on neither input order nor
    partitioning; the kept document of a cluster is its first. Every other member is an
    `exact_duplicate` when a document earlier in that order has exactly its normalised
    text (that one is then dropped or kept for it), else a `near_duplicate`."""
    if len(edges) == 0:
        return CLUSTERS_SCHEMA.empty_table()
    src, dst = _strings(edges["src"]), _strings(edges["dst"])
    nodes = pc.unique(pa.concat_arrays([src, dst]))
    ids = pc.utf8_slice_codeunits(nodes, _PREFIX_CHARS)
    at = pc.index_in(pc.utf8_slice_codeunits(nodes, 0, _PREFIX_CHARS), value_set=sources["prefix"])
    if at.null_count:
        raise RuntimeError("dedup: a clustered row's source is missing from the source table")
    paths = sources["source_path"].combine_chunks().take(at)
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
    # An exact bucket is a star around its hub: its group is the hub's, and a member is an
    # exact duplicate when the group has a member earlier in the order.
    exact = edges["exact"].to_numpy() > 0
    group = np.arange(n)
    group[s[exact]] = d[exact]
    first_of_group = np.arange(n)
    np.minimum.at(first_of_group, d[exact], s[exact])
    exact_dup = first_of_group[group] < np.arange(n)
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


# --- reading inputs ----------------------------------------------------------------------------

_READ = ("id", "text", "source_path")


def _keys_of_files(batch: pa.Table, config: DedupConfig) -> Iterator[pa.Table]:
    """Ray UDF: the long-form keys of the input files named in `batch`, a batch at a time.
    Each file's nodes are checked for repeats here, per part; across parts, nodes stay
    unique as long as each source_path comes in through one input (`_source_table`)."""
    for path, index in zip(batch["path"].to_pylist(), batch["index"].to_pylist(), strict=True):
        seen = _Seen()
        tables = iter_documents([path], config.batch_rows, _READ)
        yield from _input_keys(tables, config, index, seen)
        seen.check_unique(path)


def _members_to_edges(batch: pa.Table) -> pa.Table:
    return _edges_from_members(batch.select(["node", "band", "dst"]))


def _input_name(item: str | os.PathLike | pa.Table, i: int) -> str:
    return f"<table {i}>" if isinstance(item, pa.Table) else str(item)


def _prepare_local(
    inputs: Sequence[str | pa.Table], config: DedupConfig
) -> tuple[pa.Table, pa.Table]:
    # Holds the long form of the whole input in memory: 1 + bands rows of (node, band, key)
    # a document, no text (under 1 KB a document with uuid ids); Ray for what does not fit.
    seen = _Seen()
    parts = [KEYS_SCHEMA.empty_table()]
    for i, item in enumerate(inputs):
        tables = iter_documents([item], config.batch_rows, _READ)
        parts.extend(_input_keys(tables, config, i, seen))
    keys = pa.concat_tables(parts)
    is_source = pc.equal(keys["band"], SOURCE_BAND)
    names = [_input_name(t, i) for i, t in enumerate(inputs)]
    sources = _source_table(keys.filter(is_source), names)
    # All nodes are at hand here, so repeats are checked across inputs too, rows without a
    # source_path included (the Ray path checks within each input).
    seen.check_unique("the inputs" if len(inputs) > 1 else names[0])
    return bucket_edges(keys.filter(pc.invert(is_source))), sources


def _prepare_ray(inputs: Sequence[str], config: DedupConfig) -> tuple[pa.Table, pa.Table]:
    import ray
    from ray.data.aggregate import Count, Min
    from ray.data.expressions import col

    # One task per input file (the runner's parts), read as the in-process pass reads it.
    # Not ray.data.read_parquet: its path listing imports fsspec's HTTP filesystem from
    # several threads, which fails at random where fsspec is installed without aiohttp.
    paths = ray.data.from_items(
        [{"path": p, "index": i} for i, p in enumerate(inputs)], override_num_blocks=len(inputs)
    )
    keys = paths.map_batches(
        _keys_of_files, fn_kwargs={"config": config}, batch_format="pyarrow", batch_size=1
    )
    # The long form is read twice (bucket sizes, then members); keep it rather than
    # re-reading and re-hashing the text. It holds keys and nodes only, ~(27 + len(id))
    # bytes per row and 1 + bands rows per document; Ray spills it to disk when it must.
    keys = keys.materialize()
    source_rows = keys.filter(expr=col("band") == SOURCE_BAND)
    sources = _source_table(
        pa.concat_tables(
            [KEYS_SCHEMA.empty_table()]
            + [b.cast(KEYS_SCHEMA) for b in source_rows.iter_batches(batch_format="pyarrow")]
        ),
        list(inputs),
    )
    buckets = (
        keys.filter(expr=col("band") >= EXACT_BAND)
        .groupby(["band", "key"], num_partitions=config.num_partitions)
        .aggregate(Count(alias_name="n"), Min("node", alias_name="dst"))
        .filter(expr=col("n") > 1)
    )
    # Source rows find no bucket: the inner join leaves them out.
    members = keys.join(
        buckets.select_columns(["band", "key", "dst"]),
        join_type="inner",
        num_partitions=config.num_partitions,
        on=("band", "key"),
    )
    edges = members.map_batches(_members_to_edges, batch_format="pyarrow", batch_size=None)
    # Only edges reach the driver: at most one per (duplicate document, band), each join
    # partition already de-duplicated, compacted again here as they stream in. They grow
    # with the number of duplicates, not with the corpus; the union-find needs nothing else.
    schema = pa.schema([("src", pa.string()), ("dst", pa.string()), ("exact", pa.int8())])
    pending, rows = [schema.empty_table()], 0
    for batch in edges.iter_batches(batch_format="pyarrow", batch_size=None):
        pending.append(batch.cast(schema))
        rows += len(batch)
        if rows > 4_000_000:
            pending = [_unique_edges(pa.concat_tables(pending))]
            rows = len(pending[0])
    return _unique_edges(pa.concat_tables(pending)), sources


# --- the stage ---------------------------------------------------------------------------------


def _rows_below(items: list, limit: int) -> bool:
    """Whether `items`, all Parquet files, hold fewer than `limit` rows (footers only)."""
    total = 0
    for item in items:
        if not (isinstance(item, str | os.PathLike) and str(item).endswith(".parquet")):
            return False
        total += pq.ParquetFile(item).metadata.num_rows
        if total >= limit:
            return False
    return True


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
    transport_keys: ClassVar[frozenset[str]] = frozenset({"ray_min_rows"})

    config: DedupConfig

    def prepare(
        self,
        inputs: Sequence[str] | Iterable[pa.Table],
        state_dir: str,
        executor: Executor = LOCAL,
    ) -> None:
        """Find the clusters of all kept rows of `inputs` and write them to `state_dir`.

        `inputs` are file paths (Parquet stage outputs, or raw inputs the readers know);
        in-process (`use_ray=False`) they may also be pyarrow Tables. A finished state for
        the same config is reused; one for another config is recomputed.
        """
        self.state_dir = str(state_dir)
        state = Path(state_dir)
        done = state / DONE_FILE
        items = list(inputs)
        stamp = self._stamp(items)
        if done.is_file():
            try:
                previous = json.loads(done.read_text())
            except ValueError:
                previous = {}
            if stamp is not None and {k: previous.get(k) for k in stamp} == stamp:
                return
            done.unlink()
        state.mkdir(parents=True, exist_ok=True)
        use_ray = executor.uses_ray
        if use_ray and _rows_below(items, self.config.ray_min_rows):
            log.info("dedup: fewer than %d input rows; clusters computed in the driver",
                     self.config.ray_min_rows)  # fmt: skip
            use_ray = False
        if use_ray:
            if not items or not all(isinstance(p, str | os.PathLike) for p in items):
                raise TypeError("dedup.prepare on Ray takes a non-empty list of file paths")
            edges, sources = _prepare_ray([str(p) for p in items], self.config)
        elif items:
            edges, sources = _prepare_local(items, self.config)
        else:
            edges = sources = None
        clusters = (
            clusters_from_edges(edges, sources)
            if edges is not None
            else CLUSTERS_SCHEMA.empty_table()
        )
        target = state / CLUSTERS_FILE
        tmp = state / f".{CLUSTERS_FILE}.tmp-{os.getpid()}"
        pq.write_table(clusters, tmp, compression="zstd")
        os.replace(tmp, target)
        kinds = pc.value_counts(clusters["dup_kind"]).to_pylist()
        counts = {k["values"]: k["counts"] for k in kinds}
        info = {"documents_in_clusters": len(clusters), **counts}
        write_json_atomic(done, {**(stamp or {}), **info})

    def _stamp(self, items: list) -> dict | None:
        """What a finished state was computed from: the settings that change clusters and
        each input file's path, size and mtime. None (never reused) for in-memory tables."""
        if not all(isinstance(p, str | os.PathLike) for p in items):
            return None
        cfg = self.config.model_dump(include=set(_RESULT_FIELDS))
        files = [f"{p}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in map(str, items)]
        return {"stage": self.name, "version": self.version, "config": cfg, "inputs": files}

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
        ids = _strings(table["id"])
        nodes = row_nodes(table)
        kept = pc.and_(pc.is_valid(nodes), pc.is_null(table["drop_reason"]))
        prefixes = pc.unique(row_sources(table)).to_pylist()
        _duplicate_error(nodes.filter(kept), {_prefix(s): s for s in prefixes}, "this batch")
        th = text_hash(table["text"], **_norm_flags(self.config))
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
