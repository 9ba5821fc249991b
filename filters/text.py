"""Text primitives that dedup and decontamination share: normalisation, word bounds and
word-span hashes over the UTF-8 bytes of a whole batch.

What: `reference_normalise` defines the form both stages compare texts in (NFKD or NFKC,
lower-cased, no punctuation, symbols or control characters, single spaces, trimmed), which
`filters.normalise.normalise` computes in one compiled pass per document; `utf8_buffers`
exposes the bytes and offsets of a large_string array to numpy; `word_bounds` finds the
words of normalised text; `WordSpans` hashes any run of words with a polynomial hash over
the bytes, finished with murmur3's `fmix64`.

Why here: decontamination must see text exactly as dedup does and hash an n-gram the same
way, so the two share one definition: dedup's shingle hash (filters/dedup/minhash.py) is the
top 32 bits of `WordSpans.span_hashes` over the same words. Normalisation follows Arrow's
Unicode tables; hashes depend on nothing but the bytes, so they are the same in every
process, run and library version.

    arr = filters.normalise.normalise(table["text"])  # pyarrow large_string, nulls kept
    buf, off = utf8_buffers(arr)                # bytes and offsets (from 0)
    words = WordSpans.of(buf, off)
    hashes, text, first_word = words.kgrams(13)  # every 13-word window
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

GROUP_BYTES = 1 << 20
"""numpy work over a batch runs over groups of documents of about this much text (a longer
document is a group of its own): small arrays stay in cache and in malloc's reused heap,
where large fresh ones cost page faults."""

POLY = np.uint64(0x9E3779B97F4A7C15)
"""The polynomial hash's base: odd, so invertible mod 2^64."""

LEN_MIX = np.uint64(0xC2B2AE3D27D4EB4F)
"""A span's length in bytes is mixed into its hash with this multiplier."""

_P_INV = np.uint64(pow(int(POLY), -1, 1 << 64))


def as_large_string(texts: pa.Array | pa.ChunkedArray) -> pa.LargeStringArray:
    """`texts` as one large_string array (chunks combined)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks else pa.array([], pa.large_string())
    return texts.cast(pa.large_string())


def utf8_buffers(arr: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes and the offsets (starting at 0) of a large_string array."""
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    buf = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    if len(offsets) == 0:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    return buf[offsets[0] : offsets[-1]], offsets - offsets[0]


def drop_pattern(strip_punct: bool = True, strip_accents: bool = True) -> str:
    """What `normalise` deletes, as the body of a regex character class: invisible and
    control characters, punctuation and symbols (`strip_punct`), combining marks
    (`strip_accents`, after NFKD has split them off)."""
    drop = r"\p{Cf}\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f"
    if strip_punct:
        drop += r"\p{P}\p{S}"
    if strip_accents:
        drop += r"\p{Mn}"
    return drop


def reference_normalise(
    texts: pa.Array | pa.ChunkedArray,
    *,
    lowercase: bool = True,
    strip_punct: bool = True,
    strip_accents: bool = True,
) -> pa.LargeStringArray:
    """Text as dedup compares it: NFKC (NFKD with `strip_accents`), lower-cased, without
    punctuation, symbols or control characters, words separated by single spaces, trimmed.
    Null stays null. The definition, in Arrow string kernels and numpy:
    `filters.normalise.normalise` computes the same bytes in one compiled pass per
    document (the tests hold it to this)."""
    arr = as_large_string(texts)
    validity = pc.is_valid(arr)
    arr = pc.fill_null(arr, "")
    arr = pc.utf8_normalize(arr, "NFKD" if strip_accents else "NFKC")
    if lowercase:
        arr = pc.utf8_lower(arr)
    drop = drop_pattern(strip_punct, strip_accents)
    arr = pc.replace_substring_regex(arr, f"[{drop}]+", "")
    # Unicode spaces that NFK* does not map to U+0020; ASCII whitespace is handled below.
    for ws in ("\x85", "\u1680", "\u2028", "\u2029"):
        arr = pc.replace_substring(arr, ws, " ")
    arr = _collapse_ascii_whitespace(as_large_string(arr))
    if validity.false_count:
        arr = pc.if_else(validity, arr, pa.scalar(None, pa.large_string()))
    return arr


_IS_WS = np.zeros(256, bool)
_IS_WS[[9, 10, 11, 12, 13, 32]] = True


def doc_groups(off: np.ndarray, max_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """Consecutive document ranges [lo, hi) of about `max_bytes` (`GROUP_BYTES`) of text each."""
    max_bytes = max_bytes or GROUP_BYTES
    n_docs = len(off) - 1
    cuts = np.searchsorted(off, np.arange(0, off[-1], max_bytes), side="right") - 1
    cuts = np.unique(np.concatenate([[0], cuts, [n_docs]]))
    return zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)


def _collapse_ascii_whitespace(arr: pa.LargeStringArray) -> pa.LargeStringArray:
    # numpy over the bytes: a regex `\s+` -> " " costs more than the rest of `normalise`.
    buf, off = utf8_buffers(arr)
    if len(buf) == 0:
        return arr
    out = np.empty_like(buf)
    new_off = np.zeros_like(off)
    n_out = 0
    for lo, hi in doc_groups(off):
        if off[hi] == off[lo]:  # only empty documents in this group
            new_off[lo + 1 : hi + 1] = n_out
            continue
        b = buf[off[lo] : off[hi]]
        o = off[lo : hi + 1] - off[lo]
        ws = _IS_WS[b]
        nonws = ~ws
        # cumsum over uint8 with a wide accumulator: much faster than over bool.
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


def fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, in place: every input bit affects every output bit."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def powers(n: int) -> np.ndarray:
    """POLY^0 .. POLY^(n-1) (mod 2^64)."""
    pw = np.full(n, POLY, np.uint64)
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


@dataclass
class WordSpans:
    """Word boundaries and span hashing over normalised text (single spaces, trimmed)."""

    buf: np.ndarray  # UTF-8 bytes
    word_start: np.ndarray  # byte offset of each word
    word_end: np.ndarray
    first_word: np.ndarray  # text t has words [first_word[t], first_word[t + 1])
    _g: np.ndarray | None = field(default=None, repr=False)  # prefix sums, on first use
    _inv: np.ndarray | None = field(default=None, repr=False)  # P^-k

    @classmethod
    def of(cls, buf: np.ndarray, off: np.ndarray) -> WordSpans:
        return cls(buf, *word_bounds(buf, off))

    @property
    def n_words(self) -> np.ndarray:
        return np.diff(self.first_word)

    def span_hashes(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """64-bit hashes of the text from word `first` to word `last` (inclusive): a
        polynomial hash of the bytes from prefix sums, G[k] = sum_{j<k} c_j P^j, so the
        span [s, e) is (G[e] - G[s]) * P^-s (mod 2^64); its length mixed in, then fmix64."""
        if self._g is None:
            size = len(self.buf)
            pw = powers(size + 1)
            self._g = np.zeros(size + 1, np.uint64)
            np.cumsum(self.buf * pw[:size], out=self._g[1:])
            inv = np.full(size + 1, _P_INV, np.uint64)
            inv[0] = 1
            self._inv = np.multiply.accumulate(inv, out=inv)
        s, e = self.word_start[first], self.word_end[last]
        h = self._g[e] - self._g[s]
        h *= self._inv[s]
        h ^= (e - s).astype(np.uint64) * LEN_MIX
        return fmix64(h)

    def kgrams(
        self, k: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hashes of every k-word window (of the texts in `mask`), with its text and its
        first word (counted in the text)."""
        n = np.maximum(self.n_words - k + 1, 0)
        if mask is not None:
            n = np.where(mask, n, 0)
        total = int(n.sum())
        text = np.repeat(np.arange(len(n)), n)
        starts = np.zeros(len(n) + 1, np.int64)
        np.cumsum(n, out=starts[1:])
        rel = np.arange(total) - starts[:-1][text]
        first = self.first_word[:-1][text] + rel
        return self.span_hashes(first, first + (k - 1)), text, rel
