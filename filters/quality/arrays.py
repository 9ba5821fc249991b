"""numpy building blocks of the quality signals: per-document sums and ratios, flattening
a list column, and finding equal keys within each document of a batch at once.

Used by `words.py` (n-grams) and `lines.py` (lines, paragraphs); see `signals.py` for how
the signals are put together.
"""

from __future__ import annotations

import numpy as np
import polars as pl

MIX_MULT = np.uint64(0x9E3779B97F4A7C15)
"""An odd 64-bit multiplier: n-gram keys are combined as `key * MIX_MULT + next`."""
_P2 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's multipliers
_P3 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread 64-bit value from any integer."""
    x = x ^ (x >> np.uint64(30))
    x = x * _P2
    x = x ^ (x >> np.uint64(27))
    x = x * _P3
    return x ^ (x >> np.uint64(31))


def group_equal(
    seg: np.ndarray, key: np.ndarray, n_seg: int, with_count: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Find equal `key`s within each segment (document).

    Returns, per item: a group id (equal keys in one segment share it), whether the item
    is the first of its group in item order, whether its group has more than one item, and
    (if asked) the group size. An open-addressing table with linear probing is built for
    all documents at once: each round, unplaced items claim empty slots by a scatter,
    items whose slot holds their key are placed, and the others move one slot on. Each
    document owns a power-of-two slice of the table at most half full, so few rounds are
    needed and the random access stays within the slice.
    """
    n = len(key)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, np.zeros(0, bool), np.zeros(0, bool), empty if with_count else None
    per_seg = np.bincount(seg, minlength=n_seg)
    size = np.left_shift(1, np.ceil(np.log2(np.maximum(2 * per_seg, 1))).astype(np.int64))
    base = np.cumsum(size) - size
    n_slots = int(size[-1] + base[-1])
    # The table holds keys, 0 marking an empty slot, so every key gets its top bit set.
    # Keys are already well mixed (polars hashes combined by multiply-add); folding the
    # high half in makes the low bits, which pick the slot, depend on all of them.
    key = (key ^ (key >> np.uint64(32))) | np.uint64(1 << 63)
    table = np.zeros(n_slots, np.uint64)
    mask = (size - 1).astype(np.uint64)
    s = base[seg] + (key & mask[seg]).astype(np.int64)
    table[s] = key  # first round: every slot is empty, any claimant may win
    hit = table[s] == key
    slot = s
    todo = np.flatnonzero(~hit)
    t_key, t_seg = key[todo], seg[todo]
    while todo.size:
        s = base[t_seg] + ((s[~hit] - base[t_seg] + 1).astype(np.uint64) & mask[t_seg]).astype(
            np.int64
        )
        free = table[s] == 0
        table[s[free]] = t_key[free]
        hit = table[s] == t_key
        slot[todo[hit]] = s[hit]
        todo, t_key, t_seg = todo[~hit], t_key[~hit], t_seg[~hit]
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    first = np.full(n_slots, n, idx.dtype)
    np.minimum.at(first, slot, idx)
    is_first = first[slot] == idx
    repeated = np.zeros(n_slots, bool)
    repeated[slot[~is_first]] = True
    count = np.bincount(slot, minlength=n_slots)[slot] if with_count else None
    return slot, is_first, repeated[slot], count


def per_doc(doc: np.ndarray, n_docs: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Sum `weights` (or count items) per document."""
    if weights is not None:
        weights = np.asarray(weights, np.float64)
    return np.bincount(doc, weights=weights, minlength=n_docs)


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, and 0 where den is 0 (an empty document has no lines, words, ...)."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def explode(lists: pl.Series) -> tuple[pl.Series, np.ndarray, np.ndarray]:
    """Flatten a list column: (items, document index per item, items per document)."""
    lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
    items = lists.explode(empty_as_null=False, keep_nulls=False)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    return items, doc, lengths
