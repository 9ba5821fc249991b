"""Text as dedup and decontamination compare it, in one compiled pass per document, and the
per-code-point table that MinHash reads the same rules from.

What: `normalise(texts, ...)` gives what `filters.text.reference_normalise` gives (NFKD or
NFKC, lower case, no punctuation, symbols or control characters, words separated by single
spaces, trimmed; null stays null), byte for byte (tests/filters/test_kernels.py checks it on
real and random text). `code_point_table(drop)`, `learn` and `unicode_steps` are the pieces
`filters.dedup.minhash` shares.

Why: the regex definition copies a batch's text seven times (NFKD, lower case, the regex,
four space replacements) and collapses whitespace in numpy arrays of eight bytes per byte
of text; it was most of `dedup_keys` and of decontamination's normalisation.

How: Arrow applies the Unicode steps (NFKD only to the documents it can change: most have no
character it decomposes or reorders; then lower case). One compiled loop per document then
reads each character's class from a table (`_KEEP`, `_DROP`, `_SPACE`), filled in from
Arrow's own regex engine for the code points the process meets, and writes the kept
characters with one space between words. The loop is built ahead of time once per machine
(filters/compiled.py).
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.compiled import Kernels
from filters.quality.kernels import (
    one_string_each,
    unknown_code_points,  # noqa: F401 - compiled in KERNELS
)
from filters.text import as_large_string, drop_pattern, utf8_buffers

SPACES = (9, 10, 11, 12, 13, 32, 0x85, 0x1680, 0x2028, 0x2029)
"""The whitespace left after NFK* normalisation (it maps the other Unicode spaces to U+0020)."""

# A code point's entry in a table: its class (`CLASS` bits), whether NFKD leaves it alone,
# and whether it has been asked about yet.
KEEP, DROP, SPACE, CLASS = 0, 1, 2, 3
NFKD_STABLE, KNOWN = 4, 128


def normalise(
    texts: pa.Array | pa.ChunkedArray,
    *,
    lowercase: bool = True,
    strip_punct: bool = True,
    strip_accents: bool = True,
) -> pa.LargeStringArray:
    """Text as dedup compares it: NFKC (NFKD with `strip_accents`), lower-cased, without
    punctuation, symbols or control characters, words separated by single spaces, trimmed.
    Null stays null. The same bytes as `filters.text.reference_normalise`, its definition."""
    arr = as_large_string(texts)
    validity = pc.is_valid(arr) if arr.null_count else None
    arr = pc.fill_null(arr, "")
    drop = drop_pattern(strip_punct, strip_accents)
    table = code_point_table(drop)
    pieces, order = [], []
    for text, docs, rows in unicode_steps(arr, lowercase, strip_accents, table, drop):
        buf, off = utf8_buffers(as_large_string(text))
        learn(table, drop, buf, off)
        out = np.empty(int((off[docs + 1] - off[docs]).sum()), np.uint8)
        lengths = np.zeros(len(docs) + 1, np.int64)
        KERNELS.load().normalised(buf, off, docs, table, out, lengths)
        np.cumsum(lengths, out=lengths)
        size = int(lengths[-1])
        pieces.append(
            pa.LargeStringArray.from_buffers(
                len(docs), pa.py_buffer(lengths), pa.py_buffer(out[:size])
            )
        )
        order.append(rows)
    result = pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)
    rows = np.concatenate(order)
    if not np.array_equal(rows, np.arange(len(rows))):
        back = np.empty_like(rows)
        back[rows] = np.arange(len(rows))
        result = result.take(pa.array(back))
    if validity is not None:
        result = pc.if_else(validity, result, pa.scalar(None, pa.large_string()))
    return result


def unicode_steps(
    arr: pa.LargeStringArray,
    lowercase: bool,
    strip_accents: bool,
    table: np.ndarray,
    drop: str | None,
) -> list[tuple[pa.Array, np.ndarray, np.ndarray]]:
    """`normalise`'s Unicode steps (NFKD or NFKC, then lower case) as parts (text, documents
    of it to read, their rows in the batch). NFKD changes no document made only of
    characters it leaves alone (`NFKD_STABLE`, most documents): only the others go
    through it."""
    form = "NFKD" if strip_accents else "NFKC"
    lower = pc.utf8_lower if lowercase else (lambda text: text)
    every = np.arange(len(arr))
    if form == "NFKC":  # composition depends on the neighbours: every document
        return [(lower(pc.utf8_normalize(arr, form)), every, every)]
    buf, off = utf8_buffers(arr)
    learn(table, drop, buf, off)
    changes = KERNELS.load().changed_by_nfkd(buf, off, table).view(bool)
    changed = np.flatnonzero(changes)
    same = every[~changes]
    parts = [(lower(arr), same, same)]
    if len(changed):
        nfkd = pc.utf8_normalize(arr.take(pa.array(changed)), form)
        parts.append((lower(nfkd), np.arange(len(changed)), changed))
    return parts


@functools.cache
def code_point_table(drop: str | None) -> np.ndarray:
    """Per code point (a uint8 each), what `normalise` with the regex `[drop]+` does with
    it (None: the text is already normalised) and what NFKD does with it, filled in as the
    process meets code points (`learn`), from Arrow itself."""
    table = np.zeros(0x110000, np.uint8)
    _describe(table, drop, np.arange(128))
    return table


def learn(table: np.ndarray, drop: str | None, buf: np.ndarray, off: np.ndarray) -> None:
    """Describes the code points of the documents that `table` does not know yet."""
    leads = np.flatnonzero(buf[off[0] : off[-1]] >= 0xC0) + off[0]  # non-ASCII characters
    if len(leads):
        new = KERNELS.load().unknown_code_points(buf, leads, table, KNOWN)
        if len(new):
            _describe(table, drop, new)


def _describe(table: np.ndarray, drop: str | None, code_points: np.ndarray) -> None:
    """table[code_points]: `DROP` where Arrow's regex `[drop]` deletes the character, else
    `SPACE` for the whitespace that separates words, else `KEEP`; `NFKD_STABLE` where
    NFKD leaves any text made only of such characters alone: the character has no
    decomposition and is a starter (combining class 0, so never reordered), which Arrow's
    NFKD shows on the character alone, followed by a mark of class 1 and after a mark of
    class 240 (a character of any other class would move); `KNOWN`."""
    chars = one_string_each(code_points)
    classes = np.full(len(code_points), KEEP, np.uint8)
    if drop is not None:
        left = pc.binary_length(pc.replace_substring_regex(chars, f"[{drop}]", ""))
        gone = pc.equal(left, 0)
        classes[gone.to_numpy(zero_copy_only=False)] = DROP
    classes[(classes == KEEP) & np.isin(code_points, SPACES)] = SPACE
    same = pc.equal(pc.utf8_normalize(chars, "NFKD"), chars)
    for before, after in (("", "\u0334"), ("\u0345", "")):
        pieces = (pa.scalar(before, chars.type), chars, pa.scalar(after, chars.type))
        pair = pc.binary_join_element_wise(*pieces, pa.scalar("", chars.type))
        same = pc.and_(same, pc.equal(pc.utf8_normalize(pair, "NFKD"), pair))
    stable = np.where(same.to_numpy(zero_copy_only=False), NFKD_STABLE, 0)
    table[code_points] = classes | stable | KNOWN


# --- the numba kernels -----------------------------------------------------------------------
# Plain Python over numpy arrays until `KERNELS` (filters/compiled.py) builds them.


def _normalised(buf, off, docs, table, out, lengths):  # pragma: no cover - compiled by numba
    """Document docs[r]'s kept characters, one space between words, appended to `out`;
    its length in bytes in lengths[r + 1]."""
    n = 0
    for r in range(len(docs)):
        d = docs[r]
        start = n
        space = False
        i = off[d]
        end = off[d + 1]
        while i < end:
            c = buf[i]
            size = 1
            if c < 0x80:
                kind = table[c] & CLASS
            else:
                size = 4 if c >= 0xF0 else 3 if c >= 0xE0 else 2
                size = min(size, end - i)
                cp = np.int64(c & (0x07 if size == 4 else 0x0F if size == 3 else 0x1F))
                for k in range(1, size):
                    cp = (cp << 6) | np.int64(buf[i + k] & 0x3F)
                kind = table[min(cp, 0x10FFFF)] & CLASS
            if kind == KEEP:
                if space and n > start:
                    out[n] = 32
                    n += 1
                space = False
                for k in range(size):
                    out[n + k] = buf[i + k]
                n += size
            elif kind == SPACE:
                space = True
            i += size
        lengths[r + 1] = n - start


def _changed_by_nfkd(buf, off, table):  # pragma: no cover - compiled by numba
    """Per document, 1 where a character is not `NFKD_STABLE` (NFKD may change it)."""
    out = np.zeros(len(off) - 1, np.uint8)
    for d in range(len(off) - 1):
        i = off[d]
        end = off[d + 1]
        while i < end:
            c = buf[i]
            if c < 0x80:
                i += 1
                continue
            size = 4 if c >= 0xF0 else 3 if c >= 0xE0 else 2
            cp = np.int64(c & (0x07 if size == 4 else 0x0F if size == 3 else 0x1F))
            for k in range(1, min(size, end - i)):
                cp = (cp << 6) | np.int64(buf[i + k] & 0x3F)
            if not table[min(cp, 0x10FFFF)] & NFKD_STABLE:
                out[d] = 1
                break
            i += size
    return out


_ARRAYS = "u1[::1], i8[::1]"  # UTF-8 bytes, document offsets
KERNELS = Kernels(
    "normalise",
    __name__,
    {
        "normalised": (
            "_normalised",
            f"void({_ARRAYS}, i8[::1], u1[::1], u1[::1], i8[::1])",
        ),
        "changed_by_nfkd": ("_changed_by_nfkd", f"u1[::1]({_ARRAYS}, u1[::1])"),
        # the quality pass's UTF-8 lead-byte scan, over this module's table
        "unknown_code_points": ("unknown_code_points", f"i8[::1]({_ARRAYS}, u1[::1], i8)"),
    },
    sources=("filters.quality.kernels", "filters.text"),
)
