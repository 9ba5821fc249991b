"""Hashes of normalised text for dedup: the exact hash, word shingles, MinHash signatures
and LSH band keys, vectorised over a batch with numpy.

Hashing is defined here, not borrowed: the exact hash is xxh64 of the normalised text; the
shingle hash is the polynomial hash of `filters.text` over the UTF-8 bytes of the
normalised n-gram, finished with murmur3's fmix64 (its top 32 bits); MinHash permutations
are multiply-add-shift hashes (Dietzfelbinger, 2-universal for 32-bit keys) with parameters
from numpy's PCG64 bit stream, whose output numpy guarantees across versions. Signatures of
a normalised text are therefore the same in every process, run and library version (the
stage's `version` bumps if they ever change). Whitespace-free scripts (Chinese, Japanese,
Thai) become one "word" per run of text, so their near-duplicate recall is poor: a known
limitation, as for FineWeb. Speed against datatrove's signature step:
`benchmarks/web_stages.py --stages minhash`.

    sig = minhash(table["text"])                      # (n_docs, 112) uint32, FineWeb's settings
    keys = band_keys(sig, bands=14, rows_per_band=8)  # (n_docs, 14) uint64
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from filters.dedup.config import DedupConfig
from filters.text import (
    LEN_MIX,
    POLY,
    as_large_string,
    doc_groups,
    fmix64,
    normalise,
    powers,
    utf8_buffers,
    word_bounds,
)

# MinHash holds permutations x shingles of at most this many bytes of scratch, reused.
_SCRATCH_BYTES = 12 << 20

_U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)


def text_hash(
    texts: pa.Array | pa.ChunkedArray, *, normalised: bool = False, **norm: bool
) -> pa.UInt64Array:
    """xxh64 (seed 0) of the UTF-8 normalised text; null for null text. `norm` takes the
    keyword flags of `normalise`; `normalised=True` hashes `texts` as given. The Python
    loop is one call per document, not per word."""
    arr = as_large_string(texts) if normalised else normalise(texts, **norm)
    buf, off = utf8_buffers(arr)
    mv = memoryview(buf)
    starts, ends = off[:-1].tolist(), off[1:].tolist()
    digest = xxhash.xxh64_intdigest
    out = np.fromiter(
        (digest(mv[s:e]) for s, e in zip(starts, ends, strict=True)), np.uint64, len(arr)
    )
    return pa.array(out, pa.uint64(), mask=pc.is_null(arr).to_numpy(zero_copy_only=False))


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the `num_perm` hash functions h(x) = ((a*x + b) mod 2^64) >> 32."""
    raw = np.random.PCG64(seed).random_raw(2 * num_perm).astype(np.uint64)
    return raw[:num_perm].copy(), raw[num_perm:].copy()


def shingle_hashes(buf: np.ndarray, off: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes (held in uint64) of every word n-gram of normalised documents.

    `buf`/`off` are the bytes and offsets of normalised text (single spaces, trimmed).
    Returns the hashes and, per document, offsets into them (n+1). A document with fewer
    than `ngram` words has one shingle of all its words; an empty one has none. A hash is
    the top 32 bits of `filters.text.WordSpans.span_hashes` over the same words.
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
    pw = powers(size + 1)
    g = np.zeros(size + 1, np.uint64)
    np.cumsum(buf * pw[:size], out=g[1:])
    h = g[e] - g[s]
    h *= pw[size - s]
    h *= np.uint64(pow(int(POLY), -size, 1 << 64))
    h ^= (e - s).astype(np.uint64) * LEN_MIX
    return fmix64(h) >> np.uint64(32), sh_off


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
    arr = as_large_string(texts) if normalised else normalise(texts, **config.norm_flags)
    buf, off = utf8_buffers(pc.fill_null(arr, ""))
    a, b = permutations(config.num_perm, config.seed)
    a, b = a[:, None], b[:, None]
    n_docs = len(off) - 1
    # (permutation, document): a permutation's values for a slice of shingles are one
    # contiguous row, and reduceat along rows is several times faster than the transposed
    # layout.
    sig = np.full((config.num_perm, n_docs), _U64_MAX, np.uint64)
    step = max(1, _SCRATCH_BYTES // (8 * config.num_perm))
    scratch = np.empty((config.num_perm, step), np.uint64)
    for d_lo, d_hi in doc_groups(off):
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
    return fmix64(keys)
