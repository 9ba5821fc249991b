"""The compiled quality-signal pass: `document_counts`, one numba loop per document over the
UTF-8 bytes of an Arrow string column, for `signals.compute_quality_signals`.

What: per document, the integer counts every `q_*` signal is a ratio of (`COUNTS` names
them): words and symbols as `TOKEN_PATTERN` (words.py) finds them, top and duplicate
n-grams, lines, paragraphs and C4's line rules and sentence count (lines.py).

Why: the regex definitions in words.py and lines.py explode a batch into one polars string
per token and per line and make a dozen array passes over them; matching `TOKEN_PATTERN`
alone cost more than everything here together. This loop decodes each document once into
code points and reads each one a few times, with no Python object or batch-wide array per
token or line.

How: each regex is transcribed by hand with its own semantics (leftmost-first
alternation, greedy repetition; see the matchers below), and reads the character classes
it names (\\p{L}, \\s, \\w, \\d, \\p{P}, Sentence_Terminal, case folding, what
`strip_chars` strips) from a table that `char_flags` fills by asking polars' own regex
engine about each code point the process meets, so the classes are exactly the engine's. Repeated lines,
paragraphs and n-grams are found by 64-bit hashes in an open-addressing table per
document, as the regex definitions find them by polars' hashes. tests/filters/
test_kernels.py checks every signal against the regex definitions on real and random text.
numba builds this ahead of time once per machine (filters/compiled.py), so a process that
runs it does not import numba.

It is over 500 lines because the hand-transcribed matchers and the loop that calls them
compile as one unit and are read against the regex definitions side by side; split across
modules they would only be harder to check.
"""

from __future__ import annotations

import functools

import numpy as np
import polars as pl
import pyarrow as pa

from filters.compiled import Kernels, helper
from filters.quality.arrays import MIX_MULT
from filters.quality.lines import C4_MAX_WORD_CHARS, C4_POLICY, SHORT_LINE_CHARS
from filters.quality.words import ABBREVIATIONS, STOP_WORDS

COUNTS: tuple[str, ...] = (
    "chars", "tokens", "words", "word_chars", "alpha_tokens", "stop_words",
    "top_2gram_chars", "top_3gram_chars", "top_4gram_chars",
    "dup_5gram_chars", "dup_6gram_chars", "dup_7gram_chars",
    "dup_8gram_chars", "dup_9gram_chars", "dup_10gram_chars",
    "hashes", "ellipses", "newlines",
    "lines", "bullet_lines", "ellipsis_lines",
    "rep_lines", "dup_lines", "dup_line_chars",
    "nonblank_lines", "punct_lines", "short_lines", "dup_nonblank_chars",
    "paragraphs", "dup_paragraphs", "dup_paragraph_chars",
    "c4_sentences", "c4_lorem", "c4_curly",
)  # fmt: skip
"""The columns of `document_counts`, per document (see `signals.py` for each use)."""

# Character classes, one bit each in `char_flags`; bits 16-23 hold the ASCII letter a
# character matches case-insensitively (its simple case folding), else 0.
_L, _M, _N, _W, _S, _P, _ST, _D, _TRIM = 1, 2, 4, 8, 16, 32, 64, 128, 256
_KNOWN = 1 << 31  # in `_known_flags`: the code point's classes have been asked
_LMN = _L | _M | _N
_CLASSES = {
    _L: r"\p{L}",
    _M: r"\p{M}",
    _N: r"\p{N}",
    _W: r"\w",
    _S: r"\s",
    _P: r"\p{P}",
    _ST: r"\p{Sentence_Terminal}",
    _D: r"\d",
}


def _pack(word: str) -> int:
    """An ASCII word of at most 8 characters as one integer (its bytes, little-endian)."""
    return int.from_bytes(word.encode("ascii"), "little")


_ABBREVIATIONS = np.array(sorted(_pack(w) for w in ABBREVIATIONS.split("|")), np.int64)
_STOP_WORDS = np.array([_pack(w) for w in STOP_WORDS], np.int64)
_STOP_FIRST = tuple(sorted({ord(w[0]) for w in STOP_WORDS}))

# C4's case-insensitive phrases (lorem ipsum, javascript, then the policy phrases) as code
# points one after another, where each starts, and for each first letter, the phrases
# (bits) that start with it.
_PHRASES = ("lorem ipsum", "javascript", *C4_POLICY)
_PHRASE_CHARS = np.array([ord(c) for p in _PHRASES for c in p], np.int32)
_PHRASE_OFF = np.cumsum([0, *map(len, _PHRASES)]).astype(np.int64)
_BY_FIRST = np.zeros(128, np.int64)
for _f, _phrase in enumerate(_PHRASES):
    _BY_FIRST[ord(_phrase[0])] |= 1 << _f


def char_flags(code_points: np.ndarray) -> np.ndarray:
    """The class bits above of each code point (no surrogates), asked of polars' regex
    engine and of its `strip_chars`."""
    chars = pl.Series(one_string_each(code_points))
    flags = np.zeros(len(code_points), np.uint32)
    for bit, cls in _CLASSES.items():
        flags[chars.str.contains(cls).to_numpy()] |= bit
    flags[(chars.str.strip_chars().str.len_bytes() == 0).to_numpy()] |= _TRIM
    for i in np.flatnonzero(chars.str.contains("(?i)^[a-z]$").to_numpy()):
        one = pl.Series([chr(code_points[i])])
        letter = next(x for x in range(97, 123) if one.str.contains(f"(?i)^{chr(x)}$")[0])
        flags[i] |= letter << 16
    return flags


@functools.cache
def _known_flags() -> np.ndarray:
    """`char_flags` of every code point met so far (with `_KNOWN`; 0 for the others), for
    the whole process: `document_counts` asks about a batch's new code points before it
    reads the batch, so a process only ever asks about the characters of its text."""
    flags = np.zeros(0x110000, np.uint32)
    ascii_ = np.arange(128, dtype=np.uint32)
    flags[ascii_] = char_flags(ascii_) | _KNOWN
    return flags


def one_string_each(code_points: np.ndarray) -> pa.LargeStringArray:
    """An Arrow array of one single-character string per code point."""
    code_points = code_points.astype(np.uint32)
    utf8 = code_points.tobytes().decode("utf-32-le").encode("utf-8")
    sizes = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    offsets = np.zeros(len(code_points) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return pa.LargeStringArray.from_buffers(
        len(code_points), pa.py_buffer(offsets), pa.py_buffer(utf8)
    )


def document_counts(text: pa.LargeStringArray) -> np.ndarray:
    """(n_docs, len(COUNTS)) int64: the counts of each document of `text` (no nulls)."""
    n = len(text)
    out = np.zeros((n, len(COUNTS)), np.int64)
    if n == 0:
        return out
    offsets = np.frombuffer(text.buffers()[1], np.int64, n + 1, text.offset * 8)
    data = text.buffers()[2]
    buf = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    # Scratch for the longest document: code points, tokens, lines (at most one per byte).
    longest = int(np.diff(offsets).max(initial=0)) + 2
    slots = 1 << max(4, (2 * longest - 1).bit_length())  # tables at most half full
    flags = _known_flags()
    leads = np.flatnonzero(buf[offsets[0] : offsets[-1]] >= 0xC0) + offsets[0]  # non-ASCII
    compiled = KERNELS.load()
    new = compiled.unknown_code_points(buf, leads, flags, _KNOWN) if len(leads) else leads
    if len(new):
        flags[new] = char_flags(new) | _KNOWN
    inv_pow = np.full(longest, pow(int(_POLY), -1, 1 << 64), np.uint64)
    inv_pow[0] = 1
    np.multiply.accumulate(inv_pow, out=inv_pow)  # P^-k
    compiled.counts(
        buf, offsets, flags, _ABBREVIATIONS, _STOP_WORDS,
        _PHRASE_CHARS, _PHRASE_OFF, _BY_FIRST, inv_pow,
        np.empty((6, longest), np.int32), np.empty((3, longest), np.uint64),
        np.empty(slots, np.uint64), np.zeros((3, slots), np.int32), out,
    )  # fmt: skip
    return out


# --- the numba kernel -----------------------------------------------------------------------
# Built ahead of time once per machine (filters/compiled.py); the helpers are plain Python
# functions until then. Indices are code point positions in one document; `fl` is
# `_known_flags()`; a matcher returns the end of its match, or -1 when it does not match at `p`.

KERNELS = Kernels(
    "quality",
    __name__,
    {
        "counts": (
            "_counts",
            "void(u1[::1], i8[::1], u4[::1], i8[::1], i8[::1], i4[::1], i8[::1], i8[::1], "
            "u8[::1], i4[:, ::1], u8[:, ::1], u8[::1], i4[:, ::1], i8[:, ::1])",
        ),
        "unknown_code_points": ("unknown_code_points", "i8[::1](u1[::1], i8[::1], u4[::1], i8)"),
    },
    sources=("filters.quality.arrays", "filters.quality.lines", "filters.quality.words"),
)

_POLY = np.uint64(0x9E3779B97F4A7C15)
_HTTP, _HTTPS, _WWW, _PHD = _pack("http://"), _pack("https://"), _pack("www."), _pack("Ph.D.")
_EDIT, _CITATION, _NEEDED = _pack("[edit]"), _pack("[citatio"), _pack("n needed")


def unknown_code_points(buf, leads, flags, known):  # pragma: no cover - numba
    """The distinct code points starting at UTF-8 lead bytes buf[leads] whose `flags` lack
    the bit `known` (MinHash's normalisation table asks the same of its own table)."""
    seen = np.zeros(0x110000, np.bool_)
    out = []
    for i in leads:
        c = np.int64(buf[i])
        size = 4 if c >= 0xF0 else 3 if c >= 0xE0 else 2
        cp = c & (0x07 if size == 4 else 0x0F if size == 3 else 0x1F)
        for k in range(1, min(size, len(buf) - i)):
            cp = (cp << 6) | np.int64(buf[i + k] & 0x3F)
        cp = min(cp, 0x10FFFF)
        if not flags[cp] & known and not seen[cp]:
            seen[cp] = True
            out.append(cp)
    return np.array(out, np.int64)


@helper()
def _decode(buf, lo, hi, cps):  # pragma: no cover - numba
    """UTF-8 bytes buf[lo:hi] as code points into `cps`; returns how many."""
    n = 0
    i = lo
    while i < hi:
        c = np.int32(buf[i])
        if c < 0x80:
            size = 1
        elif c >= 0xF0:
            size = 4
            c &= 0x07
        elif c >= 0xE0:
            size = 3
            c &= 0x0F
        else:
            size = 2
            c &= 0x1F
        for k in range(1, min(size, hi - i)):
            c = (c << 6) | np.int32(buf[i + k] & 0x3F)
        cps[n] = min(c, 0x10FFFF)
        n += 1
        i += size
    return n


@helper("b1(i8)")
def _is_letter(c):  # pragma: no cover - numba
    """[A-Za-z]"""
    return (65 <= c <= 90) or (97 <= c <= 122)


@helper("b1(i8)")
def _is_ascii_word(c):  # pragma: no cover - numba
    """[0-9A-Za-z_], the word characters of an ASCII \\b"""
    return _is_letter(c) or (48 <= c <= 57) or c == 95


@helper("i8(i8, u4[::1])")
def _fold(c, fl):  # pragma: no cover - numba
    """The ASCII letter `c` matches case-insensitively, else `c` itself."""
    f = (fl[c] >> 16) & 0xFF
    return np.int32(f) if f else c


@helper("i8(i4[::1], i8, i8, u4[::1], i8)")
def _run(cps, n, q, fl, bits):  # pragma: no cover - numba
    """The end of the run of characters with any of `bits`, from q."""
    while q < n and fl[cps[q]] & bits:
        q += 1
    return q


@helper("i8(i4[::1], i8, i8)")
def _packed(cps, lo, hi):  # pragma: no cover - numba
    """cps[lo:hi] as `_pack` packs it, or -1 if it is not ASCII of at most 8 characters."""
    if hi - lo > 8:
        return -1
    code = np.int64(0)
    for k in range(hi - lo):
        if cps[lo + k] >= 128:
            return -1
        code |= np.int64(cps[lo + k]) << (8 * k)
    return code


@helper("b1(i4[::1], i8, i8, i8[::1])")
def _in_packed(cps, lo, hi, packed):  # pragma: no cover - numba
    """Whether cps[lo:hi] is one of the `_pack`ed ASCII words (sorted)."""
    code = _packed(cps, lo, hi)
    a = 0
    b = len(packed)
    while a < b:  # binary search
        m = (a + b) // 2
        if packed[m] < code:
            a = m + 1
        else:
            b = m
    return code >= 0 and a < len(packed) and packed[a] == code


@helper("b1(i4[::1], i8, i8, i8, i8)")
def _starts_with(cps, n, p, code, length):  # pragma: no cover - numba
    """Whether cps[p:n] starts with the ASCII word of `length` (<= 8) `_pack`ed as `code`."""
    return p + length <= n and _packed(cps, p, p + length) == code


# TOKEN_PATTERN (words.py), alternative by alternative, in its order.


@helper("i8(i4[::1], i8, i8, u4[::1])")
def _url(cps, n, p, fl):  # pragma: no cover - numba
    """(?:https?://|www\\.)\\S*[^\\s.,;:!?)\\]}'\\"]"""
    q = -1
    if _starts_with(cps, n, p, _HTTP, 7):
        q = p + 7
    elif _starts_with(cps, n, p, _HTTPS, 8):
        q = p + 8
    elif _starts_with(cps, n, p, _WWW, 4):
        q = p + 4
    if q < 0:
        return -1
    end = -1
    while q < n and not fl[cps[q]] & _S:
        c = cps[q]
        if not (c == 46 or c == 44 or c == 59 or c == 58 or c == 33 or c == 63 or c == 41
                or c == 93 or c == 125 or c == 39 or c == 34):  # fmt: skip
            end = q + 1
        q += 1
    return end


@helper("i8(i4[::1], i8, i8, u4[::1])")
def _email(cps, n, p, fl):  # pragma: no cover - numba
    """[\\w.+-]+@[\\w-]+(?:\\.[\\w-]+)+"""
    q = p
    while q < n and (fl[cps[q]] & _W or cps[q] == 46 or cps[q] == 43 or cps[q] == 45):
        q += 1
    if q == p or q >= n or cps[q] != 64:
        return -1
    r = q + 1
    while r < n and (fl[cps[r]] & _W or cps[r] == 45):
        r += 1
    if r == q + 1:
        return -1
    parts = 0
    while r + 1 < n and cps[r] == 46 and (fl[cps[r + 1]] & _W or cps[r + 1] == 45):
        r += 1
        while r < n and (fl[cps[r]] & _W or cps[r] == 45):
            r += 1
        parts += 1
    return r if parts else -1


@helper("i8(i4[::1], i8, i8, i8[::1])")
def _abbreviation(cps, n, p, abbreviations):  # pragma: no cover - numba
    """(?:ABBREVIATIONS|Ph\\.D)\\. -- the abbreviations are letters only, so the one that
    can be followed by "." is the whole run of letters."""
    q = p
    while q < n and _is_letter(cps[q]):
        q += 1
    if q > p and q < n and cps[q] == 46 and _in_packed(cps, p, q, abbreviations):
        return q + 1
    if _starts_with(cps, n, p, _PHD, 5):
        return p + 5
    return -1


@helper("i8(i4[::1], i8, i8, u4[::1])")
def _initials(cps, n, p, fl):  # pragma: no cover - numba
    """(?:\\p{L}\\.){2,}[\\p{L}\\p{M}\\p{N}]*"""
    q = p
    k = 0
    while q + 1 < n and fl[cps[q]] & _L and cps[q + 1] == 46:
        q += 2
        k += 1
    return _run(cps, n, q, fl, _LMN) if k >= 2 else -1


@helper("i8(i4[::1], i8, i8, u4[::1])")
def _dotted(cps, n, p, fl):  # pragma: no cover - numba
    """[\\p{L}\\p{M}\\p{N}]*(?:\\.[\\p{L}\\p{M}\\p{N}]+)+"""
    q = _run(cps, n, p, fl, _LMN)
    k = 0
    while q + 1 < n and cps[q] == 46 and fl[cps[q + 1]] & _LMN:
        q = _run(cps, n, q + 1, fl, _LMN)
        k += 1
    return q if k else -1


@helper("b1(i8)")
def _is_inner(c):  # pragma: no cover - numba
    """words._INNER: [()\\[\\]|&#*@$%~^\\\\;!?_\\"+·´]"""
    return (c == 40 or c == 41 or c == 91 or c == 93 or c == 124 or c == 38 or c == 35
            or c == 42 or c == 64 or c == 36 or c == 37 or c == 126 or c == 94 or c == 92
            or c == 59 or c == 33 or c == 63 or c == 95 or c == 34 or c == 43
            or c == 0xB7 or c == 0xB4)  # fmt: skip


@helper("b1(i4[::1], i8, i8, u4[::1])")
def _letter_hyphen_digit(cps, n, q, fl):  # pragma: no cover - numba
    """\\p{L}-\\p{N} at q"""
    return q + 2 < n and fl[cps[q]] & _L and cps[q + 1] == 45 and fl[cps[q + 2]] & _N


@helper("i8(i4[::1], i8, i8, u4[::1])")
def _word(cps, n, p, fl):  # pragma: no cover - numba
    """\\|* + words._CORE: a first character, then pieces while one of the loop's
    alternatives matches (the first that does, as a backtracking engine takes it), then
    [+|]*. Nothing after the loop can fail, so no piece is ever given back."""
    q = p
    while q < n and cps[q] == 124:
        q += 1
    if _letter_hyphen_digit(cps, n, q, fl):
        q += 3
    elif q < n and fl[cps[q]] & _LMN:
        q += 1
    else:
        return -1
    while q < n:
        c = cps[q]
        if _letter_hyphen_digit(cps, n, q, fl):
            q += 3
            continue
        if fl[c] & _LMN or c == 95:
            q += 1
            continue
        r = q
        while r < n and _is_inner(cps[r]):
            r += 1
        if r > q and r < n and fl[cps[r]] & _LMN:
            q = r + 1
            continue
        if q + 1 < n and fl[cps[q + 1]] & _N and (
            c == 44 or c == 58 or c == 47 or c == 61 or c == 60 or c == 62
            or c == 0x2013 or c == 0x2014 or c == 126
        ):  # fmt: skip
            q += 2
            continue
        if c == 39 or c == 0x2019:
            r = _run(cps, n, q + 1, fl, _LMN)
            if r - q - 1 >= 3:
                q = r
                continue
            if q + 1 < n:
                d = cps[q + 1]
                lower = d | 32
                if (48 <= d <= 57) or (
                    _is_letter(d)
                    and lower != 100 and lower != 108 and lower != 109 and lower != 114
                    and lower != 115 and lower != 116 and lower != 118
                ):  # fmt: skip  # [a-ce-kn-quw-zA-CE-KN-QUW-Z0-9]
                    q += 2
                    while q < n and (fl[cps[q]] & _LMN or cps[q] == 95):
                        q += 1
                    continue
        break
    while q < n and (cps[q] == 43 or cps[q] == 124):
        q += 1
    return q


@helper("i8(i4[::1], i8, i8)")
def _clitic_or_emoticon(cps, n, p):  # pragma: no cover - numba
    """['’](?:s|m|d|ll|re|ve|t|S|M|D|LL|RE|VE|T), then :-?\\)|;-?\\)|:-?\\(|\\):|''"""
    c = cps[p]
    c1 = cps[p + 1] if p + 1 < n else -1
    c2 = cps[p + 2] if p + 2 < n else -1
    if c == 39 or c == 0x2019:
        lower = c1 | 32
        if lower == 115 or lower == 109 or lower == 100 or lower == 116:  # s m d t S M D T
            return p + 2
        if (c1 == 108 and c2 == 108) or (c1 == 114 and c2 == 101) or (c1 == 118 and c2 == 101):
            return p + 3  # ll re ve
        if (c1 == 76 and c2 == 76) or (c1 == 82 and c2 == 69) or (c1 == 86 and c2 == 69):
            return p + 3  # LL RE VE
    if c == 58 or c == 59:  # :-) :) ;-) ;)
        if c1 == 45 and c2 == 41:
            return p + 3
        if c1 == 41:
            return p + 2
    if c == 58:  # :-( :(
        if c1 == 45 and c2 == 40:
            return p + 3
        if c1 == 40:
            return p + 2
    if (c == 41 and c1 == 58) or (c == 39 and c1 == 39):  # ): ''
        return p + 2
    return -1


@helper("i8(i4[::1], i8, i8, u4[::1], i8[::1])")
def _token_end(cps, n, p, fl, abbreviations):  # pragma: no cover - numba
    """The end of the TOKEN_PATTERN match at p (p is not whitespace, so one matches)."""
    c = cps[p]
    if c == 104 or c == 119:
        end = _url(cps, n, p, fl)
        if end >= 0:
            return end
    if fl[c] & _W or c == 46 or c == 43 or c == 45:
        end = _email(cps, n, p, fl)
        if end >= 0:
            return end
    if _is_letter(c):
        end = _abbreviation(cps, n, p, abbreviations)
        if end >= 0:
            return end
    if fl[c] & _LMN or c == 46:
        end = _initials(cps, n, p, fl)
        if end < 0:
            end = _dotted(cps, n, p, fl)
        if end < 0 and fl[c] & _L and p + 1 < n and cps[p + 1] == 46:
            end = p + 2  # \p{L}\.
        if end >= 0:
            return end
    end = _word(cps, n, p, fl)
    if end < 0:
        end = _clitic_or_emoticon(cps, n, p)
    if end < 0 and (c == 46 or c == 45) and p + 1 < n and cps[p + 1] == c:
        end = p + 2  # \.{2,} and -{2,}
        while end < n and cps[end] == c:
            end += 1
    return end if end >= 0 else p + 1  # [^\s\p{L}\p{M}\p{N}]


# C4 sentences (lines.SENT_BOUNDARY, lines.SENT_NOT_END) in a line with citations removed.


@helper("i8(i4[::1], i8, i8, u4[::1])")
def _tail(c, n, q, fl):  # pragma: no cover - numba
    """lines._SENT_TAIL at q: \\p{P}*\\s[\\s\\p{P}]*[^\\s\\p{P}]. Returns its end, -1 when it
    does not match, or -2 when it runs off the end of the line (so nothing later can)."""
    q = _run(c, n, q, fl, _P)
    if q >= n or not fl[c[q]] & _S:
        return -1
    q = _run(c, n, q, fl, _S | _P)
    return q + 1 if q < n else -2


@helper("i8(i4[::1], i8, u4[::1])")
def _sentence_boundaries(c, n, fl):  # pragma: no cover - numba
    """Matches of [.!?]+ _SENT_TAIL. A failed start fails for the rest of its run of
    punctuation too (the run ends at the same place), so the scan goes on after it."""
    count = 0
    p = 0
    while p < n:
        if c[p] == 46 or c[p] == 33 or c[p] == 63:
            end = _tail(c, n, p, fl)  # [.!?]+\p{P}* is the run of punctuation from p
            if end == -2:
                break
            if end >= 0:
                count += 1
                p = end
            else:
                p = max(_run(c, n, p, fl, _P), p + 1)
            continue
        p += 1
    return count


@helper("i8(i4[::1], i8, u4[::1], i8[::1])")
def _sentence_non_ends(c, n, fl, abbreviations):  # pragma: no cover - numba
    """Matches of SENT_NOT_END: (?-u:\\b)(?:ABBREVIATIONS|[A-Za-z])\\. _SENT_TAIL, or
    \\.\\.+ _SENT_TAIL; as for `_abbreviation`, the abbreviation is a whole run of letters."""
    count = 0
    p = 0
    while p < n:
        end = -1
        skip = p + 1
        if _is_letter(c[p]) and (p == 0 or not _is_ascii_word(c[p - 1])):
            q = p
            while q < n and _is_letter(c[q]):
                q += 1
            if q < n and c[q] == 46 and (q - p == 1 or _in_packed(c, p, q, abbreviations)):
                end = _tail(c, n, q + 1, fl)
            skip = q  # no \b before the other letters of the run
        elif c[p] == 46 and p + 1 < n and c[p + 1] == 46:
            q = p
            while q < n and c[q] == 46:
                q += 1
            end = _tail(c, n, q, fl)
            skip = q  # every start in this run of dots ends the same way
        if end == -2:
            break
        if end >= 0:
            count += 1
            p = end
        else:
            p = skip
    return count


@helper("i8(i4[::1], i8, i4[::1], i8[::1], i8[::1], u4[::1])")
def _phrases_in(c, n, phrases, phrase_off, by_first, fl):  # pragma: no cover - numba
    """Which of the lower-case ASCII `phrases` c[:n] contains, case-insensitively as
    polars' (?i) matches (simple case folding): bit f for phrase f. by_first[x] has the
    bits of the phrases that start with the letter x."""
    found = 0
    for s in range(n):
        first = _fold(c[s], fl)
        if first >= 128 or not by_first[first]:
            continue
        for f in range(len(phrase_off) - 1):
            lo = phrase_off[f]
            m = phrase_off[f + 1] - lo
            if not (by_first[first] >> f) & 1 or s + m > n:
                continue
            k = 1
            while k < m and _fold(c[s + k], fl) == phrases[lo + k]:
                k += 1
            if k == m:
                found |= 1 << f
    return found


# Hashing and the per-document table.


@helper("void(i4[::1], i8, u8[::1])")
def _prefix_hashes(cps, n, g):  # pragma: no cover - numba
    """g[k] = sum over j < k of (cps[j] + 1) * P^j (mod 2^64), so that any run of the
    document hashes in O(1) (`_hash`)."""
    pw = np.uint64(1)
    h = np.uint64(0)
    g[0] = h
    for k in range(n):
        h += np.uint64(cps[k] + 1) * pw
        pw *= _POLY
        g[k + 1] = h


@helper("u8(u8[::1], u8[::1], i8, i8)")
def _hash(g, inv_pow, lo, hi):  # pragma: no cover - numba
    """64-bit hash of cps[lo:hi]: its polynomial hash (from `_prefix_hashes`), with the
    length mixed in, finished by fmix64."""
    h = (g[hi] - g[lo]) * inv_pow[lo] ^ np.uint64(hi - lo) * np.uint64(0xC2B2AE3D27D4EB4F)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@helper("i8(i8)")
def _mask(items):  # pragma: no cover - numba
    """The mask of a table for `items` keys: a power of two at least twice as large, - 1."""
    mask = 15
    while mask < 2 * items + 1:
        mask = 2 * mask + 1
    return mask


@helper("Tuple((i8, b1))(u8[::1], i4[::1], i8, u8, i8)")
def _slot(keys, stamps, mask, key, stamp):  # pragma: no cover - numba
    """The slot of `key` in the table of `stamp` (linear probing; a slot whose stamp is
    older is empty), claimed if new. Returns (slot, whether it was new)."""
    j = np.int64((key ^ (key >> np.uint64(29))) & np.uint64(mask))
    while stamps[j] == stamp:
        if keys[j] == key:
            return j, False
        j = (j + 1) & mask
    stamps[j] = stamp
    keys[j] = key
    return j, True


def _counts(buf, offsets, fl, abbreviations, stop_words, phrases, phrase_off, by_first, inv_pow,
            ints, words, keys, table, out):  # fmt: skip  # pragma: no cover - numba
    """out[d] = the COUNTS of document d, in their order."""
    cps = ints[0]
    tok_len = ints[1]
    slot_of = ints[2]
    cand = ints[3]
    nxt = ints[4]
    aux = ints[5]  # repeats of the last n-gram size, then where each line starts
    line = ints[1]  # C4's line text, once tokens are done with
    tok_hash = words[0]
    gram = words[1]
    g = words[2]  # prefix hashes
    stamps = table[0]  # a slot is in use when its stamp is the table's current one
    count = table[1]
    seen = table[2]
    stamp = 0
    for d in range(len(offsets) - 1):
        n = _decode(buf, offsets[d], offsets[d + 1], cps)
        _prefix_hashes(cps, n, g)
        o = out[d]
        o[0] = n  # chars

        # --- tokens (TOKEN_PATTERN, left to right) and word statistics ------------------
        nt = 0
        stops = 0
        p = 0
        while p < n:
            if fl[cps[p]] & _S:
                p += 1
                continue
            # Most tokens are a run of letters, marks and digits that are also \w, up to a
            # space: there no alternative of the pattern can match differently, and the
            # other alternatives can only differ from a plain word (`_word`) where the run
            # is followed by one of . + - @ : or by another \w, letter, mark or digit.
            end = p
            kinds = 0
            while end < n and fl[cps[end]] & _LMN and fl[cps[end]] & _W:
                kinds |= fl[cps[end]]
                end += 1
            if end == p or (end < n and not fl[cps[end]] & _S):
                x = cps[end] if end < n else 0
                if end > p and not (
                    x == 46 or x == 43 or x == 45 or x == 64 or x == 58 or fl[x] & (_W | _LMN)
                ):
                    end = _word(cps, n, p, fl)
                else:
                    end = _token_end(cps, n, p, fl, abbreviations)
                kinds = 0
                for k in range(p, end):
                    kinds |= fl[cps[k]]
            if kinds & _L:
                o[4] += 1  # alpha_tokens
            if kinds & _LMN:  # a word; other tokens are symbols
                o[2] += 1  # words
                o[3] += end - p  # word_chars
            if end - p <= 4 and cps[p] in _STOP_FIRST:
                code = _packed(cps, p, end)
                for j in range(len(stop_words)):
                    if stop_words[j] == code:
                        stops |= 1 << j
            tok_len[nt] = end - p
            tok_hash[nt] = _hash(g, inv_pow, p, end)
            nt += 1
            p = end
        o[1] = nt  # tokens
        while stops:
            o[5] += stops & 1  # stop_words
            stops >>= 1

        # --- n-grams: the top 2..4-gram by count, duplicate 5..10-grams -----------------
        # An n-gram can repeat only where the (n-1)-grams at i and i+1 both repeat, so each
        # size looks only at those positions (`cand`); aux[i] says the one at i repeats.
        nc = max(nt - 1, 0)
        for i in range(nt):
            aux[i] = 0
        for i in range(nc):
            cand[i] = i
            gram[i] = tok_hash[i] * MIX_MULT + tok_hash[i + 1]
        for size in range(2, 11):
            if size > 2:
                kept = 0
                for t in range(nc):
                    i = cand[t]
                    if aux[i] and i + size <= nt and aux[i + 1]:
                        nxt[kept] = i
                        kept += 1
                for t in range(nc):
                    aux[cand[t]] = 0
                nc = kept
                for t in range(nc):
                    i = nxt[t]
                    cand[t] = i
                    gram[i] = gram[i] * MIX_MULT + tok_hash[i + size - 1]
            stamp += 1
            mask = _mask(nc)
            for t in range(nc):
                i = cand[t]
                j, new = _slot(keys, stamps, mask, gram[i], stamp)
                count[j] = 1 if new else count[j] + 1
                slot_of[i] = j
            repeats = 0
            for t in range(nc):
                i = cand[t]
                aux[i] = count[slot_of[i]] >= 2
                repeats += aux[i]
            if size <= 4 and nt >= size:
                # Counter.most_common(1): the most frequent, the first seen among equals;
                # with no repeat, the first n-gram once
                best = 1
                top = 0
                for t in range(nc):
                    if count[slot_of[cand[t]]] > best:
                        best = count[slot_of[cand[t]]]
                        top = cand[t]
                chars = size - 1
                for k in range(top, top + size):
                    chars += tok_len[k]
                o[4 + size] = chars * best  # top_{size}gram_chars
            elif size > 4 and repeats:
                # datatrove's find_all_duplicate: reading left to right, an n-gram read
                # before counts its characters and the reader jumps n words on; any other
                # is remembered and the reader steps one word. An n-gram that occurs once
                # is never met again, so only the repeated ones need reading.
                chars = 0
                at = 0  # the reader's position
                for t in range(nc):
                    i = cand[t]
                    if i < at or not aux[i]:
                        continue
                    j = slot_of[i]
                    if seen[j] == stamp:
                        for k in range(i, i + size):
                            chars += tok_len[k]
                        at = i + size
                    else:
                        seen[j] = stamp
                        at = i + 1
                o[4 + size] = chars  # dup_{size}gram_chars

        # --- characters and lines ------------------------------------------------------
        dots = 0
        n_lines = 0
        aux[0] = 0
        for p in range(n):
            c = cps[p]
            if c == 46:
                dots += 1
                if dots == 3:  # "..." counted without overlaps
                    o[16] += 1  # ellipses
                    dots = 0
                continue
            dots = 0
            if c == 35:
                o[15] += 1  # hashes
            elif c == 0x2026:
                o[16] += 1
            elif c == 10:
                n_lines += 1
                aux[n_lines] = p + 1
        o[17] = n_lines  # newlines
        n_lines += 1
        aux[n_lines] = n + 1  # line i is cps[aux[i] : aux[i + 1] - 1]
        stamp += 1
        mask = _mask(n_lines)
        first_nb = -1
        last_nb = -1
        for li in range(n_lines):
            a = aux[li]
            b = aux[li + 1] - 1
            length = b - a
            last = li == n_lines - 1
            q = _run(cps, b, a, fl, _S)
            blank = q == b
            if not (last and length == 0):  # str.splitlines() has no line after a final \n
                o[18] += 1  # lines
                if q < b and (cps[q] == 0x2022 or cps[q] == 45):  # ^\s*[•\-]
                    o[19] += 1  # bullet_lines
                e = b
                while e > a and fl[cps[e - 1]] & _S:
                    e -= 1
                if (e > a and cps[e - 1] == 0x2026) or (
                    e - a >= 3 and cps[e - 1] == 46 and cps[e - 2] == 46 and cps[e - 3] == 46
                ):  # (?:\.\.\.|…)\s*$
                    o[20] += 1  # ellipsis_lines
            dup = False
            if length > 0 or li == 0 or last:  # re.split("\n+") keeps empty ends only
                o[21] += 1  # rep_lines
                _, new = _slot(keys, stamps, mask, _hash(g, inv_pow, a, b), stamp)
                if not new:
                    dup = True
                    o[22] += 1  # dup_lines
                    o[23] += length  # dup_line_chars
            if not blank:
                o[24] += 1  # nonblank_lines
                if fl[cps[b - 1]] & _ST:
                    o[25] += 1  # punct_lines
                if length <= SHORT_LINE_CHARS:
                    o[26] += 1  # short_lines
                if dup:
                    o[27] += length  # dup_nonblank_chars
                if first_nb < 0:
                    first_nb = li
                last_nb = li

        # --- paragraphs: re.split(r"\n{2,}", text.strip()) -----------------------------
        # Runs of non-empty lines between the first and last non-blank line, those two
        # stripped; a paragraph is compared as its text, newlines included.
        stamp += 1
        li = first_nb
        while 0 <= li <= last_nb:
            if aux[li + 1] - 1 == aux[li]:
                li += 1
                continue
            a = aux[li]
            if li == first_nb:
                while a < aux[li + 1] - 1 and fl[cps[a]] & _TRIM:
                    a += 1
            while li < last_nb and aux[li + 2] - 1 > aux[li + 1]:
                li += 1
            b = aux[li + 1] - 1
            if li == last_nb:
                while b > aux[li] and fl[cps[b - 1]] & _TRIM:
                    b -= 1
            o[28] += 1  # paragraphs
            _, new = _slot(keys, stamps, mask, _hash(g, inv_pow, a, b), stamp)
            if not new:
                o[29] += 1  # dup_paragraphs
                o[30] += b - a  # dup_paragraph_chars
            li += 1

        # --- C4: the lines its rules keep; lorem ipsum, curly brackets, sentences --------
        for li in range(n_lines):
            a = aux[li]
            b = aux[li + 1] - 1
            while a < b and fl[cps[a]] & _TRIM:
                a += 1
            while b > a and fl[cps[b - 1]] & _TRIM:
                b -= 1
            z = cps[b - 1] if b > a else 0
            if not (z == 46 or z == 63 or z == 33 or z == 34 or z == 39 or z == 93):
                continue  # cannot end in punctuation, even with a citation mark removed
            # at least 3 words (\S\s+\S+\s+\S), none over the limit
            n_words = 0
            space = True
            for p in range(a, b):
                was = space
                space = fl[cps[p]] & _S != 0
                if was and not space:
                    n_words += 1
                    if n_words == 3:
                        break
            if n_words < 3:
                continue
            if b - a > C4_MAX_WORD_CHARS:
                run = 0
                for p in range(a, b):
                    run = 0 if fl[cps[p]] & _S else run + 1
                    if run > C4_MAX_WORD_CHARS:
                        break
                if run > C4_MAX_WORD_CHARS:
                    continue
            # the line without citation marks: \[\d*\]|\[edit\]|\[citation needed\]
            m = 0
            p = a
            while p < b:
                if cps[p] == 91:
                    q = _run(cps, b, p + 1, fl, _D)
                    if q < b and cps[q] == 93:
                        p = q + 1
                        continue
                    if _starts_with(cps, b, p, _EDIT, 6):
                        p += 6
                        continue
                    if (
                        _starts_with(cps, b, p, _CITATION, 8)
                        and _starts_with(cps, b, p + 8, _NEEDED, 8)
                        and p + 16 < b
                        and cps[p + 16] == 93
                    ):  # [citation needed]
                        p += 17
                        continue
                line[m] = cps[p]
                m += 1
                p += 1
            z = line[m - 1] if m else 0
            if not (z == 46 or z == 63 or z == 33 or z == 34 or z == 39):
                continue
            if m >= 3 and z == 46 and line[m - 2] == 46 and line[m - 3] == 46:
                continue
            found = _phrases_in(line, m, phrases, phrase_off, by_first, fl)
            lorem = found & 1
            js = found & 2
            curly = False
            if not js:
                for k in range(m):
                    if line[k] == 123:
                        curly = True
                        break
            policy = found >> 2
            if lorem:
                o[32] = 1  # c4_lorem
            if curly:
                o[33] = 1  # c4_curly
            if not (lorem or js or curly or policy):
                o[31] += (  # c4_sentences
                    1
                    + _sentence_boundaries(line, m, fl)
                    - _sentence_non_ends(line, m, fl, abbreviations)
                )
