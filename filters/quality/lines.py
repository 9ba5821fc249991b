"""Line and paragraph quality signals: Gopher quality's bullet and ellipsis lines, Gopher
repetition's duplicate lines and paragraphs, C4's document rules and FineWeb's line rules.

Lines are split on "\\n" only (extracted web text has no other line breaks). C4's sentence
count approximates spaCy's sentencizer with a regex (`SENT_BOUNDARY` less `SENT_NOT_END`).
The definition `signals.reference_quality_signals` runs and `kernels.py` transcribes.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from filters.quality.arrays import MIX_MULT, explode, group_equal, mix64, per_doc, safe_div
from filters.quality.words import ABBREVIATIONS

SHORT_LINE_CHARS = 30
"""FineWeb: a line of at most this many characters is "short" (part of the signal)."""

# C4 line rules (the TF-Datasets reference `c4_utils`, as in datatrove's C4QualityFilter).
_C4_CITATION = r"\[\d*\]|\[edit\]|\[citation needed\]"
_C4_END_PUNCT = (".", "?", "!", '"', "'")
C4_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
C4_MAX_WORD_CHARS = 1000
# Sentence boundary as spaCy's sentencizer sees it: a . ! or ? token, maybe more
# punctuation, then a non-punctuation token; abbreviations and initials are not boundaries.
_SENT_TAIL = r"\p{P}*\s[\s\p{P}]*[^\s\p{P}]"  # what follows the terminal, up to the next word
SENT_BOUNDARY = rf"[.!?]+{_SENT_TAIL}"
# Boundaries that are not sentence ends: after an abbreviation or an initial ("Dr.", "e.g.",
# "U.S.A."), or an ellipsis ("wait... then"). One alternation, so a boundary that is both
# ("e.g... ") is taken back once: every match ends on the word that ends some boundary match
# (everything between its "." and that word is punctuation or space), matches do not overlap,
# so there are never more of them than boundaries. ASCII \b keeps the regex on its fast DFA
# path (a Unicode \b does not), hence ASCII initials.
SENT_NOT_END = rf"(?-u:\b)(?:{ABBREVIATIONS}|[A-Za-z])\.{_SENT_TAIL}|\.\.+{_SENT_TAIL}"


def line_signals(text: pl.Series, n_chars: np.ndarray) -> dict[str, np.ndarray]:
    """Line and paragraph signals of Gopher quality, Gopher repetition, C4 and FineWeb.

    Lines are split on "\\n" only (web text extracted here has no other line breaks).
    """
    n_docs = len(text)
    lines, doc, n_lines = explode(text.str.split("\n"))
    idx = np.arange(len(doc))
    start = np.cumsum(n_lines) - n_lines
    is_first_line = idx == start[doc]
    is_last_line = idx == (start + n_lines - 1)[doc]
    frame = pl.DataFrame({"l": lines}).select(
        n=pl.col("l").str.len_chars(),
        h=pl.col("l").hash(11),
        blank=~pl.col("l").str.contains(r"\S"),
        bullet=pl.col("l").str.contains(r"^\s*[•\-]"),
        ellipsis=pl.col("l").str.contains(r"(?:\.\.\.|…)\s*$"),
        punct=pl.col("l").str.contains(r"\p{Sentence_Terminal}$"),
    )
    length = frame["n"].to_numpy().astype(np.int64)
    h = frame["h"].to_numpy()
    blank = frame["blank"].to_numpy()
    out: dict[str, np.ndarray] = {}

    # Gopher quality: lines as str.splitlines() gives them (no empty line after a final \n).
    counted = ~(is_last_line & (length == 0))
    n_qlines = per_doc(doc, n_docs, counted.astype(np.float64))
    out["q_frac_lines_bullet"] = safe_div(
        per_doc(doc, n_docs, frame["bullet"].to_numpy()), n_qlines
    )
    out["q_frac_lines_ellipsis"] = safe_div(
        per_doc(doc, n_docs, (frame["ellipsis"].to_numpy() & counted)), n_qlines
    )

    # Gopher repetition lines: re.split("\n+") keeps empty strings only at either end.
    kept = (length > 0) | is_first_line | is_last_line
    k = np.flatnonzero(kept)
    _, first_seen, _, _ = group_equal(doc[k], h[k], n_docs)
    dup = np.zeros(len(doc), bool)
    dup[k[~first_seen]] = True
    out["q_dup_line_frac"] = safe_div(per_doc(doc, n_docs, dup), per_doc(doc, n_docs, kept))
    out["q_dup_line_char_frac"] = safe_div(per_doc(doc, n_docs, np.where(dup, length, 0)), n_chars)

    # FineWeb: non-blank lines; a blank line is never a duplicate of a non-blank one, so
    # the first-seen flags from the Gopher line set carry over.
    nb = ~blank
    n_nb = per_doc(doc, n_docs, nb)
    out["q_fw_line_punct_frac"] = safe_div(
        per_doc(doc, n_docs, nb & frame["punct"].to_numpy()), n_nb
    )
    out["q_fw_short_line_frac"] = safe_div(
        per_doc(doc, n_docs, nb & (length <= SHORT_LINE_CHARS)), n_nb
    )
    n_newlines = n_lines - 1
    out["q_fw_dup_line_char_frac"] = safe_div(
        per_doc(doc, n_docs, np.where(nb & dup, length, 0)), n_chars - n_newlines
    )
    out["_n_newlines"] = n_newlines

    out.update(_paragraph_signals(lines, doc, length, h, blank, n_docs, n_chars))
    out.update(_c4_signals(lines, doc, n_docs))
    return out


def _paragraph_signals(
    lines: pl.Series,
    doc: np.ndarray,
    length: np.ndarray,
    h: np.ndarray,
    blank: np.ndarray,
    n_docs: int,
    n_chars: np.ndarray,
) -> dict[str, np.ndarray]:
    """Duplicate paragraphs as datatrove: re.split(r"\\n{2,}", text.strip()).

    A paragraph is a run of lines between empty lines. text.strip() drops blank lines at
    either end of the document and the outer whitespace of the first and last non-blank
    lines, so those two lines are re-hashed stripped.
    """
    nb_idx = np.flatnonzero(~blank)
    n = len(doc)
    first_nb = np.full(n_docs, -1, np.int64)
    last_nb = np.full(n_docs, -1, np.int64)
    if nb_idx.size:
        nb_doc = doc[nb_idx]
        opens = np.flatnonzero(np.r_[True, nb_doc[1:] != nb_doc[:-1]])
        closes = np.r_[opens[1:] - 1, nb_idx.size - 1]
        first_nb[nb_doc[opens]] = nb_idx[opens]
        last_nb[nb_doc[opens]] = nb_idx[closes]
    has = first_nb >= 0
    span = np.zeros(n + 1, np.int64)
    np.add.at(span, first_nb[has], 1)
    np.add.at(span, last_nb[has] + 1, -1)
    inside = np.cumsum(span[:-1]) > 0
    length = length.copy()
    h = h.copy()
    edge = np.unique(np.r_[first_nb[has], last_nb[has]])
    if edge.size:
        head = np.isin(edge, first_nb[has])
        tail = np.isin(edge, last_nb[has])
        edge_lines = pl.DataFrame({"l": lines.gather(edge), "head": head, "tail": tail})
        stripped = edge_lines.select(
            pl.when(pl.col("head") & pl.col("tail"))
            .then(pl.col("l").str.strip_chars())
            .when(pl.col("head"))
            .then(pl.col("l").str.strip_chars_start())
            .otherwise(pl.col("l").str.strip_chars_end())
        ).to_series()
        h[edge] = stripped.hash(11).to_numpy()
        length[edge] = stripped.str.len_chars().to_numpy()
    # Paragraph lines: inside the stripped span and not empty (empty lines separate).
    pl_idx = np.flatnonzero(inside & (lines.str.len_bytes().to_numpy() > 0))
    if pl_idx.size == 0:
        zero = np.zeros(n_docs)
        return {"q_dup_para_frac": zero, "q_dup_para_char_frac": zero}
    p_doc = doc[pl_idx]
    new_para = np.ones(pl_idx.size, bool)
    new_para[1:] = (np.diff(pl_idx) != 1) | (p_doc[1:] != p_doc[:-1])
    para_id = np.cumsum(new_para) - 1
    para_start = np.flatnonzero(new_para)
    rank = np.arange(pl_idx.size) - para_start[para_id]
    # Order-sensitive paragraph hash: sum of line hashes times a per-rank odd multiplier.
    weight = mix64(rank.astype(np.uint64) + MIX_MULT) | np.uint64(1)
    para_hash = np.add.reduceat(h[pl_idx] * weight, para_start)
    para_len = (
        np.add.reduceat(length[pl_idx], para_start) + np.diff(np.r_[para_start, pl_idx.size]) - 1
    )
    para_doc = p_doc[para_start]
    _, first_seen, _, _ = group_equal(para_doc, para_hash, n_docs)
    n_para = np.maximum(per_doc(para_doc, n_docs), 1)  # "".split gives one empty paragraph
    return {
        "q_dup_para_frac": safe_div(per_doc(para_doc, n_docs, ~first_seen), n_para),
        "q_dup_para_char_frac": safe_div(
            per_doc(para_doc, n_docs, np.where(first_seen, 0, para_len)), n_chars
        ),
    }


def _c4_signals(lines: pl.Series, doc: np.ndarray, n_docs: int) -> dict[str, np.ndarray]:
    """C4 document signals over the lines C4's line rules keep.

    Per line (stripped): a word over 1,000 characters, no terminal punctuation (after
    removing Wikipedia citation marks) or fewer than 3 words drops the line. Among the
    rest, "lorem ipsum" drops the document; lines mentioning "javascript" are dropped, and
    in the others a curly bracket drops the document; cookie/terms-of-use lines are dropped;
    sentences are counted in what is left. This is the reference implementation's
    behaviour (and datatrove's); the paper states lorem ipsum and curly brackets page-wide.
    """
    frame = pl.DataFrame({"l": lines, "doc": doc}).with_columns(pl.col("l").str.strip_chars())
    frame = frame.with_columns(c=pl.col("l").str.replace_all(_C4_CITATION, ""))
    frame = frame.filter(
        pl.any_horizontal([pl.col("c").str.ends_with(p) for p in _C4_END_PUNCT]),
        ~pl.col("c").str.ends_with("..."),
        pl.col("l").str.contains(r"\S\s+\S+\s+\S"),  # at least 3 words
    )
    # Only a line longer than the limit can hold a too-long word: check those few apart.
    is_long = pl.col("l").str.len_chars() > C4_MAX_WORD_CHARS
    longest_word = (
        pl.col("l").str.extract_all(r"\S+").list.eval(pl.element().str.len_chars()).list.max()
    )
    frame = pl.concat(
        [
            frame.filter(~is_long),
            frame.filter(is_long).filter(longest_word <= C4_MAX_WORD_CHARS),
        ]
    )
    flags = frame.select(
        pl.col("doc"),
        lorem=pl.col("c").str.contains("(?i)lorem ipsum"),
        js=pl.col("c").str.contains("(?i)javascript"),
        curly=pl.col("c").str.contains("{", literal=True),
        policy=pl.col("c").str.contains("(?i)" + "|".join(C4_POLICY)),
        # Signed counts: polars counts matches in UInt32, where a difference below zero
        # would wrap to 4294967295 instead of failing.
        sent=1
        + pl.col("c").str.count_matches(SENT_BOUNDARY).cast(pl.Int64)
        - pl.col("c").str.count_matches(SENT_NOT_END).cast(pl.Int64),
    )
    d = flags["doc"].to_numpy()
    lorem = flags["lorem"].to_numpy()
    js = flags["js"].to_numpy()
    curly = flags["curly"].to_numpy() & ~js
    kept = ~(lorem | js | curly | flags["policy"].to_numpy())
    sent = np.where(kept, flags["sent"].to_numpy(), 0)
    return {
        "q_c4_n_sentences": per_doc(d, n_docs, sent.astype(np.float64)),
        "q_c4_has_lorem": per_doc(d, n_docs, lorem) > 0,
        "q_c4_has_curly": per_doc(d, n_docs, curly) > 0,
    }
