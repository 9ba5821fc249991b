"""The n-gram index of benchmark items, and finding and scoring its n-grams in documents.

What is indexed, per item (`build_index`):
- its full text (question or passage, choices, answer or solution, in file order);
- for multiple-choice items, the lettered prompt "question A. c1 B. c2 ..." (MMLU's own
  prompt format and the usual quiz-page layout; "A)", "(a)" and "A." all normalise to the
  same word), so a copy with labelled choices keeps its cross-choice n-grams;
- other renderings: GSM8K answers with and without their calculator annotations.
A question or item shorter than `ngram` words but with at least `short_min_words` (8) is
also indexed whole, as one n-gram of its own length; a document is searched for those by
their first 8 words (an anchor array that stays in cache), then the whole span is compared.
Many MMLU, TriviaQA and CommonsenseQA questions are 8-12 words: without this, a page quoting
one of them would never match. Fewer than 8 words is no evidence ("The Voting Rights Act of
1965", an MMLU question, occurs in a FineWeb sample document that has nothing to do with
MMLU): such questions are found only with their choices, and a few items (mostly TriviaQA
and PIQA) have no n-gram at all. n-grams shared by more than `max_items_per_ngram` items are
templates (MMLU's moral_scenarios header is in hundreds of items) and are left out: they
name no item.

How: the index is the sorted unique 64-bit hashes of every item's n-grams, each pointing to
the items that contain it (CSR arrays), with a bit filter that turns away most absent
n-grams before the binary search. Text is normalised with `filters.text.normalise`, as dedup
does, and n-grams hashed with `filters.text.WordSpans` (dedup's shingle hash kept 64 bits
wide, so a false match is negligible); matching runs in numpy over a whole batch
(`find_matches`, `score_hits`). Only `cut_spans` works on one text at a time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.decontam.benchmarks import Item
from filters.normalise import normalise
from filters.text import WordSpans, doc_groups, utf8_buffers

_BUILD_ITEMS = 4096  # items normalised and hashed together while building the index


class _BitFilter:
    """A one-hash Bloom filter over the top bits of 64-bit keys, sized for ~1.5% of its
    bits set: it rejects ~98% of absent hashes with one memory read, before the binary
    search (which costs ~20 cache misses in a large key array)."""

    def __init__(self, keys: np.ndarray, max_bits: int = 27) -> None:
        self.nbits = int(min(max(np.ceil(np.log2(max(len(keys), 1) * 64)), 16), max_bits))
        self.shift = np.uint64(64 - self.nbits)
        self.bits = np.zeros(1 << (self.nbits - 3), np.uint8)
        top = keys >> self.shift
        np.bitwise_or.at(
            self.bits, top >> np.uint64(3), np.left_shift(1, top & np.uint64(7)).astype(np.uint8)
        )

    def maybe(self, h: np.ndarray) -> np.ndarray:
        """Positions of `h` that may be keys."""
        top = h >> self.shift
        return np.flatnonzero((self.bits[top >> np.uint64(3)] >> (top & np.uint64(7))) & 1)


@dataclass
class NgramIndex:
    """Sorted unique n-gram hashes, each pointing to the items that contain it.

    Short passages (`short_min` <= k < `ngram` words) are keys too, hashed whole. A document
    is not hashed at every length k to find them: each short passage's first `short_min`
    words are an *anchor*, documents are searched for anchors (a small array that stays in
    cache) and the k-word window starting at an anchor hit is then hashed and compared."""

    keys: np.ndarray  # uint64, sorted, unique
    item_off: np.ndarray  # keys[k] is in items item_idx[item_off[k]:item_off[k + 1]]
    item_idx: np.ndarray  # int32 into `item_ids`
    item_ids: list[str]
    item_benchmark: np.ndarray  # int16 into `benchmarks`
    benchmarks: list[str]
    item_ngrams: np.ndarray  # int32: distinct indexed n-grams per item
    ngram: int
    short_min: int
    anchors: np.ndarray  # uint64, sorted: hashes of short passages' first short_min words
    anchor_off: np.ndarray  # anchors[a] starts passages anchor_key/len[off[a]:off[a + 1]]
    anchor_key: np.ndarray  # int64 into `keys`: the whole passage's key
    anchor_len: np.ndarray  # int64: its length in words
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        self.key_filter = _BitFilter(self.keys)
        self.anchor_filter = _BitFilter(self.anchors)

    def lookup(self, h: np.ndarray) -> np.ndarray:
        """Index into `keys` of each hash, -1 where absent."""
        return _search(self.keys, h, self.key_filter.maybe(h))

    def lookup_anchor(self, h: np.ndarray) -> np.ndarray:
        """Index into `anchors` of each hash, -1 where absent."""
        return _search(self.anchors, h, self.anchor_filter.maybe(h))

    @property
    def nbytes(self) -> int:
        arrays = (self.keys, self.item_off, self.item_idx, self.anchors, self.anchor_off)
        arrays += (self.anchor_key, self.anchor_len, self.key_filter.bits, self.anchor_filter.bits)
        return sum(a.nbytes for a in arrays)


def _search(keys: np.ndarray, h: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Index into sorted `keys` of `h[where]` (all of `h` when None); -1 where absent."""
    out = np.full(len(h), -1, np.int64)
    sel = np.arange(len(h)) if where is None else where
    if len(sel) and len(keys):
        q = h[sel]
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        found = keys[pos] == q
        out[sel[found]] = pos[found]
    return out


def build_index(
    items: Sequence[Item],
    ngram: int = 13,
    short_min_words: int = 8,
    max_items_per_ngram: int = 10,
) -> NgramIndex:
    """The n-gram index of `items`; see the module docstring for what is indexed."""
    t0 = time.perf_counter()
    hashes, item_of, short_parts = [], [], []
    n_passages = 0
    # A few thousand items at a time: Arrow's scratch for normalising stays small.
    for first_item in range(0, len(items), _BUILD_ITEMS):
        texts, owner, kind = _passages(items, first_item, first_item + _BUILD_ITEMS)
        n_passages += len(texts)
        buf, off = utf8_buffers(normalise(pa.array(texts, pa.large_string())))
        for lo, hi in doc_groups(off):
            words = WordSpans.of(buf[off[lo] : off[hi]], off[lo : hi + 1] - off[lo])
            h, text, _ = words.kgrams(ngram, mask=(kind[lo:hi] & 1) > 0)
            hashes.append(h)
            item_of.append(owner[lo + text])
            n_words = words.n_words
            short = np.flatnonzero(
                ((kind[lo:hi] & 2) > 0) & (n_words >= short_min_words) & (n_words < ngram)
            )
            first, n_short = words.first_word[short], n_words[short]
            whole = words.span_hashes(first, first + n_short - 1)
            hashes.append(whole)
            item_of.append(owner[lo + short])
            anchor = words.span_hashes(first, first + short_min_words - 1)
            short_parts.append((whole, anchor, n_short))
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    it_arr = np.concatenate(item_of) if item_of else np.zeros(0, np.int32)
    del hashes, item_of

    keys, item_off, item_idx, n_template = _csr(h, it_arr, max_items_per_ngram)
    del h, it_arr
    anchors, anchor_off, anchor_key, anchor_len = _anchors(keys, short_parts)
    benchmarks = sorted({it.benchmark for it in items})
    code = {b: i for i, b in enumerate(benchmarks)}
    index = NgramIndex(
        keys=keys,
        item_off=item_off,
        item_idx=item_idx,
        item_ids=[it.id for it in items],
        item_benchmark=np.array([code[it.benchmark] for it in items], np.int16),
        benchmarks=benchmarks,
        item_ngrams=np.bincount(item_idx, minlength=len(items)).astype(np.int32),
        ngram=ngram,
        short_min=short_min_words,
        anchors=anchors,
        anchor_off=anchor_off,
        anchor_key=anchor_key,
        anchor_len=anchor_len,
        stats={},
    )
    index.stats = {
        "items": len(items),
        "passages": n_passages,
        "ngrams": int(len(keys)),
        "short_passages": int(len(anchor_key)),
        "template_ngrams_dropped": n_template,
        "items_without_ngrams": int((index.item_ngrams == 0).sum()),
        "index_bytes": index.nbytes,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    return index


def _passages(items: Sequence[Item], lo: int, hi: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The passages of items [lo, hi): (texts, owning item, kind bits). Each item's full
    text (n-grams, and whole when short), its main fields when they are not the whole full
    text (whole when short; their n-grams are already in the full text), and its other
    renderings (n-grams only). Kind bit 0: n-grams; bit 1: whole when short."""
    texts: list[str] = []
    owner: list[int] = []
    kind: list[int] = []
    for i in range(lo, min(hi, len(items))):
        it = items[i]
        main = it.main if len(it.main) > 1 or it.extra else ()
        for text, k in (("\n".join((*it.main, *it.extra)), 3), *((m, 2) for m in main)):
            texts.append(text)
            owner.append(i)
            kind.append(k)
        for text in it.alt:
            texts.append(text)
            owner.append(i)
            kind.append(1)
    return texts, np.asarray(owner, np.int32), np.asarray(kind, np.uint8)


def _csr(
    h: np.ndarray, item: np.ndarray, max_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(hash, item) pairs -> sorted unique keys, CSR offsets and item lists, with keys of
    more than `max_items` items left out; also how many were left out."""
    order = np.lexsort((item, h))
    h, item = h[order], item[order]
    del order
    keep = np.ones(len(h), bool)
    keep[1:] = (h[1:] != h[:-1]) | (item[1:] != item[:-1])
    h, item = h[keep], item[keep]
    first = np.flatnonzero(np.r_[True, h[1:] != h[:-1]]) if len(h) else np.zeros(0, np.int64)
    per_key = np.diff(np.append(first, len(h)))
    template = per_key > max_items
    keep = ~np.repeat(template, per_key)
    keys, per_key = h[first[~template]], per_key[~template]
    item_off = np.zeros(len(keys) + 1, np.int64)
    np.cumsum(per_key, out=item_off[1:])
    return keys, item_off, item[keep].astype(np.int32), int(template.sum())


def _anchors(
    keys: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted unique anchors with, per anchor, the (key, length) of its short passages;
    passages whose key was left out of `keys` (a template) are left out."""
    whole = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint64)
    anchor = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint64)
    length = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    key = _search(keys, whole)
    ok = key >= 0
    anchor, key, length = anchor[ok], key[ok], length[ok].astype(np.int64)
    order = np.lexsort((length, key, anchor))
    anchor, key, length = anchor[order], key[order], length[order]
    keep = np.ones(len(anchor), bool)
    keep[1:] = (anchor[1:] != anchor[:-1]) | (key[1:] != key[:-1])
    anchor, key, length = anchor[keep], key[keep], length[keep]
    first = np.flatnonzero(np.r_[True, anchor[1:] != anchor[:-1]]) if len(anchor) else key[:0]
    off = np.append(first, len(anchor)).astype(np.int64)
    return anchor[first], off, key, length


# --- matching ---------------------------------------------------------------------------------


@dataclass
class Matches:
    """Every n-gram of a batch found in the index: its row, key, first word and length."""

    row: np.ndarray  # int64
    key: np.ndarray  # int64 into index.keys
    start: np.ndarray  # int64, first word in the row's normalised text
    size: np.ndarray  # int64, words


def find_matches(norm: pa.Array | pa.ChunkedArray, index: NgramIndex) -> Matches:
    """The n-grams of normalised texts (`normalise` output) that are in `index`."""
    if isinstance(norm, pa.ChunkedArray):
        norm = norm.combine_chunks() if norm.num_chunks else pa.array([], pa.large_string())
    buf, off = utf8_buffers(pc.fill_null(norm, "").cast(pa.large_string()))
    parts: list[tuple[np.ndarray, ...]] = []
    for lo, hi in doc_groups(off):
        words = WordSpans.of(buf[off[lo] : off[hi]], off[lo : hi + 1] - off[lo])
        h, text, rel = words.kgrams(index.ngram)
        pos = index.lookup(h)
        f = np.flatnonzero(pos >= 0)
        parts.append((lo + text[f], pos[f], rel[f], np.full(len(f), index.ngram)))
        if len(index.anchors):
            parts.append(_short_matches(words, index, lo))
    if not parts:
        empty = np.zeros(0, np.int64)
        return Matches(empty, empty, empty, empty)
    return Matches(*(np.concatenate(c).astype(np.int64) for c in zip(*parts, strict=True)))


def _short_matches(words: WordSpans, index: NgramIndex, lo: int) -> tuple[np.ndarray, ...]:
    """Short passages found whole: anchor hits, each checked against the passages it starts."""
    h, text, rel = words.kgrams(index.short_min)
    a = index.lookup_anchor(h)
    f = np.flatnonzero(a >= 0)
    a, text, rel = a[f], text[f], rel[f]
    per = index.anchor_off[a + 1] - index.anchor_off[a]
    starts = np.zeros(len(per) + 1, np.int64)
    np.cumsum(per, out=starts[1:])
    cand = np.repeat(index.anchor_off[a] - starts[:-1], per) + np.arange(starts[-1])
    text, rel = np.repeat(text, per), np.repeat(rel, per)
    key, size = index.anchor_key[cand], index.anchor_len[cand]
    fits = np.flatnonzero(rel + size <= words.n_words[text])
    key, size, text, rel = key[fits], size[fits], text[fits], rel[fits]
    first = words.first_word[text] + rel
    same = np.flatnonzero(words.span_hashes(first, first + size - 1) == index.keys[key])
    return lo + text[same], key[same], rel[same], size[same]


@dataclass
class Hits:
    """Which items each row hits (>= min_ngrams shared n-grams, or all the item has)."""

    row: np.ndarray  # (row, item) pairs that are hits, sorted by row then item
    item: np.ndarray
    ngrams: np.ndarray  # per row: distinct n-grams shared with its hit items


def score_hits(m: Matches, index: NgramIndex, n_rows: int, min_ngrams: int) -> Hits:
    n_keys, n_items = max(len(index.keys), 1), max(len(index.item_ids), 1)
    rk = np.unique(m.row * n_keys + m.key)
    row, key = rk // n_keys, rk % n_keys
    per = index.item_off[key + 1] - index.item_off[key]
    starts = np.zeros(len(per) + 1, np.int64)
    np.cumsum(per, out=starts[1:])
    pos = np.repeat(index.item_off[key] - starts[:-1], per) + np.arange(starts[-1])
    t_row, t_key, t_item = np.repeat(row, per), np.repeat(key, per), index.item_idx[pos]
    pairs, inv, shared = np.unique(
        t_row * n_items + t_item, return_inverse=True, return_counts=True
    )
    need = np.minimum(min_ngrams, index.item_ngrams[pairs % n_items])
    hit = shared >= need
    hit_t = hit[inv.reshape(-1)]
    hit_keys = np.unique(t_row[hit_t] * n_keys + t_key[hit_t])
    return Hits(
        row=pairs[hit] // n_items,
        item=pairs[hit] % n_items,
        ngrams=np.bincount(hit_keys // n_keys, minlength=n_rows),
    )


# --- cutting ---------------------------------------------------------------------------------


def cut_spans(text: str, items: set[int], index: NgramIndex, margin: int) -> list[tuple[int, int]]:
    """Character spans of `text` covered by n-grams of `items`, widened by `margin` words on
    each side and merged. The text is split into whitespace tokens and each token normalised
    alone, so every normalised word points back to the token it came from."""
    tokens = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    if not tokens:
        return []
    normed = normalise(pa.array([text[s:e] for s, e in tokens], pa.large_string())).to_pylist()
    word_tok = [t for t, w in enumerate(normed) for _ in (w.split(" ") if w else ())]
    joined = " ".join(w for w in normed if w)
    m = find_matches(pa.array([joined], pa.large_string()), index)
    intervals = []
    for key, start, size in zip(m.key.tolist(), m.start.tolist(), m.size.tolist(), strict=True):
        owners = index.item_idx[index.item_off[key] : index.item_off[key + 1]].tolist()
        if items.intersection(owners):
            lo, hi = max(start - margin, 0), min(start + size + margin, len(word_tok))
            intervals.append((tokens[word_tok[lo]][0], tokens[word_tok[hi - 1]][1]))
    merged: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def remove_spans(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """`text` without `spans`; the pieces left are joined by a blank line."""
    pieces, prev = [], 0
    for s, e in spans:
        pieces.append(text[prev:s])
        prev = e
    pieces.append(text[prev:])
    return "\n\n".join(p.strip() for p in pieces if p.strip())
