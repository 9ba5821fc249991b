"""Hashes of normalised text for dedup: the exact hash, word shingles, MinHash signatures
and LSH band keys.

Hashing is defined here, not borrowed: the exact hash is xxh64 of the normalised text; the
shingle hash is the polynomial hash of `filters.text` over the UTF-8 bytes of the
normalised n-gram, finished with murmur3's fmix64 (its top 32 bits); MinHash permutations
are multiply-add-shift hashes (Dietzfelbinger, 2-universal for 32-bit keys) with parameters
from numpy's PCG64 bit stream, whose output numpy guarantees across versions. Signatures of
a normalised text are therefore the same in every process, run and library version (the
stage's `version` bumps if they ever change). Whitespace-free scripts (Chinese, Japanese,
Thai) become one "word" per run of text, so their near-duplicate recall is poor: a known
limitation, as for FineWeb.

How: Arrow applies the Unicode steps of `filters.normalise.normalise` (NFKD or NFKC, lower
case), NFKD only to the documents it can change (most have no character it decomposes or
reorders); one compiled pass per document (numba, built ahead of time once per machine:
filters/compiled.py) then drops what `normalise`'s regex drops (punctuation, symbols, control
characters: classes read from Arrow's regex engine), splits words on whitespace, hashes
each shingle and keeps the minimum of every permutation, with no array per word or
shingle. Signatures equal those of `normalise` + `filters.text.WordSpans`
(tests/filters/test_kernels.py checks that on real and random text). Speed against rensa,
datasketch and datatrove: `benchmarks/web_stages.py --stages minhash`.

    sig = minhash(table["text"])                      # (n_docs, 112) uint32, FineWeb's settings
    keys = band_keys(sig, bands=14, rows_per_band=8)  # (n_docs, 14) uint64
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from filters.compiled import Kernels
from filters.dedup.config import DedupConfig
from filters.normalise import CLASS as _CLASS
from filters.normalise import KEEP as _KEEP
from filters.normalise import SPACE as _SPACE
from filters.normalise import code_point_table, learn, normalise, unicode_steps
from filters.text import (
    LEN_MIX,
    POLY,
    as_large_string,
    drop_pattern,
    fmix64,
    utf8_buffers,
)


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


def minhash(
    texts: pa.Array | pa.ChunkedArray,
    config: DedupConfig | None = None,
    *,
    normalised: bool = False,
) -> np.ndarray:
    """MinHash signatures, (n_docs, bands * rows_per_band) uint32.

    A document's shingles are its word n-grams; one with fewer than `ngram` words has one
    shingle of all its words. Empty or null documents get all 0xFFFFFFFF (no shingles);
    callers leave them out of LSH. `normalised=True` takes `normalise` output as it is.
    """
    config = config or DedupConfig()
    arr = pc.fill_null(as_large_string(texts), "")
    drop = None
    if not normalised:
        drop = drop_pattern(config.strip_punct, config.strip_accents)
    table = code_point_table(drop)
    if normalised:
        every = np.arange(len(arr))
        parts = [(arr, every, every)]
    else:
        parts = unicode_steps(arr, config.lowercase, config.strip_accents, table, drop)
    a, b = permutations(config.num_perm, config.seed)
    a_lo = (a & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    a_hi = (a >> np.uint64(32)).astype(np.uint32)
    out = np.full((len(arr), config.num_perm), 0xFFFFFFFF, np.uint32)
    signatures = KERNELS.load().signatures
    for text, docs, rows in parts:
        buf, off = utf8_buffers(as_large_string(text))
        learn(table, drop, buf, off)
        # Per-word scratch for the longest document: a word takes a byte and a break.
        words = np.empty((3, int(np.diff(off).max(initial=0)) // 2 + 1), np.uint64)
        signatures(buf, off, docs, rows, table, config.ngram, a_lo, a_hi, b, words, out)
    return out


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


# --- the numba kernel -----------------------------------------------------------------------
# Written as plain Python over numpy arrays; `KERNELS` (filters/compiled.py) compiles them,
# ahead of time once per machine. Every hash is uint64 arithmetic modulo 2^64, as the numpy definitions above.


def _signatures(buf, off, docs, rows, table, ngram, a_lo, a_hi, b, words, out):  # pragma: no cover
    """out[rows[r]] = the MinHash signature of document docs[r]; see `minhash`.

    Per document: each word's polynomial hash, P^length and length in bytes (over the
    bytes of kept characters, words split at `_SPACE`, `_DROP` characters skipped), then
    each n-gram's hash from its words' (a space between words is the byte 32), then the
    permutations. A permutation's value, the top 32 bits of (a*x + b) mod 2^64 for a 32-bit
    x, is computed as ((a_lo*x + b) >> 32) + a_hi*x mod 2^32 (a = a_hi * 2^32 + a_lo):
    AVX2 has no 64-bit multiply, and this needs only a 32x32-bit one per half. The top
    32 bits of a minimum are the minimum of the top 32 bits."""
    m = len(a_lo)
    w_hash = words[0]
    w_pow = words[1]
    w_len = words[2]
    mins = np.empty(m, np.uint32)
    for r in range(len(docs)):
        d = docs[r]
        # 1. words
        n_words = 0
        h = np.uint64(0)
        pw = np.uint64(1)
        length = 0
        i = off[d]
        end = off[d + 1]
        while i <= end:
            size = 1
            kind = _SPACE
            if i < end:
                c = buf[i]
                if c < 0x80:
                    kind = table[c] & _CLASS
                else:
                    if c >= 0xF0:
                        size = 4
                        cp = np.int64(c & 0x07)
                    elif c >= 0xE0:
                        size = 3
                        cp = np.int64(c & 0x0F)
                    else:
                        size = 2
                        cp = np.int64(c & 0x1F)
                    size = min(size, end - i)
                    for k in range(1, size):
                        cp = (cp << 6) | np.int64(buf[i + k] & 0x3F)
                    kind = table[min(cp, 0x10FFFF)] & _CLASS
            if kind == _KEEP:
                for k in range(size):
                    h += np.uint64(buf[i + k]) * pw
                    pw *= POLY
                length += size
            elif kind == _SPACE and length > 0:
                w_hash[n_words] = h
                w_pow[n_words] = pw
                w_len[n_words] = length
                n_words += 1
                h = np.uint64(0)
                pw = np.uint64(1)
                length = 0
            i += size
        # 2. shingles and permutations
        for j in range(m):
            mins[j] = np.uint32(0xFFFFFFFF)
        n_shingles = max(n_words - ngram + 1, 1) if n_words > 0 else 0
        for s in range(n_shingles):
            sh = w_hash[s]
            spw = w_pow[s]
            slen = w_len[s]
            for k in range(s + 1, min(s + ngram, n_words)):
                sh += np.uint64(32) * spw
                spw *= POLY
                sh += w_hash[k] * spw
                spw *= w_pow[k]
                slen += w_len[k] + np.uint64(1)
            sh ^= slen * LEN_MIX
            sh ^= sh >> np.uint64(33)
            sh *= np.uint64(0xFF51AFD7ED558CCD)
            sh ^= sh >> np.uint64(33)
            sh *= np.uint64(0xC4CEB9FE1A85EC53)
            sh ^= sh >> np.uint64(33)
            x = np.uint32(sh >> np.uint64(32))
            for j in range(m):
                t = np.uint64(a_lo[j]) * np.uint64(x) + b[j]
                v = np.uint32(t >> np.uint64(32)) + np.uint32(a_hi[j] * x)
                mins[j] = min(mins[j], np.uint32(v))
        for j in range(m):
            out[rows[r], j] = mins[j]


_ARRAYS = "u1[::1], i8[::1]"  # UTF-8 bytes, document offsets
KERNELS = Kernels(
    "minhash",
    __name__,
    {
        "signatures": (
            "_signatures",
            f"void({_ARRAYS}, i8[::1], i8[::1], u1[::1], i8, u4[::1], u4[::1], u8[::1], "
            "u8[:, ::1], u4[:, ::1])",
        ),
    },
    sources=("filters.normalise", "filters.text"),
)
