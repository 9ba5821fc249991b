"""Word and n-gram quality signals: Gopher quality's word statistics and Gopher
repetition's top and duplicate n-gram fractions.

Words come from `TOKEN_PATTERN`, a regex that approximates the spaCy English tokenizer
datatrove uses (the alpha-word fraction is the one rule sensitive to the difference).
n-grams are compared word by word; datatrove compares them joined without spaces. The
definition `signals.reference_quality_signals` runs and `kernels.py` transcribes.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from filters.quality.arrays import MIX_MULT, explode, group_equal, per_doc, safe_div

STOP_WORDS: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")
"""Gopher's stop-word list (Rae et al. 2021, App. A); a document needs two of them."""

# Abbreviations the spaCy English tokenizer keeps as one token with their period.
ABBREVIATIONS = (
    "Adm|Ak|Ala|Apr|Ariz|Ark|Aug|Bros|Calif|Co|Colo|Conn|Corp|Dec|Del|Dr|Feb|Fla|Ga|Gen|Gov|"
    "Ia|Id|Ill|Inc|Ind|Jan|Jr|Jul|Jun|Kans|Kan|Ky|La|Ltd|Mar|Mass|Md|Messrs|Mich|Minn|Miss|"
    "Mo|Mont|Mrs|Mr|Ms|Mt|Nebr|Neb|Nev|Nov|Oct|Okla|Ore|Pa|Prof|Rep|Rev|Sen|Sept|Sep|St|Tenn|"
    "Va|Wash|Wis|co|vs"
)

# Words: a regex that approximates the spaCy English tokenizer (what datatrove's
# `split_into_words` runs for English), so word counts and the alpha-word fraction match.
# spaCy splits on spaces, peels punctuation off both ends of each chunk and splits inside a
# chunk only at a few "infixes" (hyphen or "/" before a letter, digit-digit arithmetic);
# other inner punctuation stays in the token: "a)(1", "50–59", "Ratchet+Wrench".
_W = r"[\p{L}\p{M}\p{N}]"  # a letter, mark or digit
_W_ = r"[\p{L}\p{M}\p{N}_]"
_INNER = r"[()\[\]|&#*@$%~^\\;!?_\"+·´]"  # kept inside a token when a letter/digit follows
_CORE = (
    rf"(?:\p{{L}}-\p{{N}}|{_W})"  # COVID-19: hyphen then digit stays in the token
    rf"(?:\p{{L}}-\p{{N}}|{_W_}|{_INNER}+{_W}"
    r"|[,:/=<>–—~]\p{N}"  # 1,000 12:30 1/2 50–59
    # o'clock, O'Malley stay whole; 's 're 've 'll 'd 'm n't are split off as clitics
    rf"|['’](?:{_W}{{3,}}|[a-ce-kn-quw-zA-CE-KN-QUW-Z0-9]{_W_}*)"
    r")*[+|]*"  # A+, and a trailing pipe, are not split off by spaCy either
)
# Few distinct character classes on purpose: the regex engine's lazy DFA stays small, and
# extraction runs several times faster than with the same rules spelled with more classes.
TOKEN_PATTERN = "|".join(
    [
        r"(?:https?://|www\.)\S*[^\s.,;:!?)\]}'\"]",  # URL, trailing punctuation split off
        r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",  # e-mail address
        rf"(?:{ABBREVIATIONS}|Ph\.D)\.",  # Mr. Dr. Jan. ...
        rf"(?:\p{{L}}\.){{2,}}{_W}*",  # U.S. e.g. N.W.2d
        rf"{_W}*(?:\.{_W}+)+",  # 3.5 .5 example.com S.Ct
        r"\p{L}\.",  # initials: J. Smith
        r"\|*" + _CORE,  # words and numbers
        r"['’](?:s|m|d|ll|re|ve|t|S|M|D|LL|RE|VE|T)",  # clitics: 's 're; "don't" -> don 't
        r":-?\)|;-?\)|:-?\(|\):|''",  # emoticons spaCy keeps whole
        r"\.{2,}",  # ellipsis
        r"-{2,}",  # dash
        r"[^\s\p{L}\p{M}\p{N}]",  # any other symbol, one character each
    ]
)


def word_signals(text: pl.Series, n_chars: np.ndarray) -> dict[str, np.ndarray]:
    """Gopher quality word statistics and Gopher repetition n-gram statistics."""
    n_docs = len(text)
    tokens, doc, n_tok = explode(text.str.extract_all(TOKEN_PATTERN))
    frame = pl.DataFrame({"t": tokens}).select(
        h=pl.col("t").hash(7),
        n=pl.col("t").str.len_chars(),
        alpha=pl.col("t").str.contains(r"\p{L}"),
    )
    h = frame["h"].to_numpy()
    length = frame["n"].to_numpy().astype(np.int64)
    alpha = frame["alpha"].to_numpy()
    # Tokens without a letter, mark or digit are symbols (".", "#", "--", "..."): they count
    # in the alpha-fraction denominator but not as words (datatrove does the same).
    is_word = alpha.copy()
    rest = np.flatnonzero(~alpha)
    is_word[rest] = tokens.gather(rest).str.contains(r"[\p{M}\p{N}]").to_numpy()

    out: dict[str, np.ndarray] = {}
    n_words = per_doc(doc, n_docs, is_word)
    out["q_n_words"] = n_words
    out["q_mean_word_len"] = safe_div(per_doc(doc, n_docs, np.where(is_word, length, 0)), n_words)
    out["q_frac_words_alpha"] = safe_div(per_doc(doc, n_docs, alpha), n_tok)
    out["q_n_stop_words"] = _distinct_stop_words(h, doc, n_docs)
    out["_n_tokens"] = n_tok
    out.update(_ngram_signals(h, length, doc, n_tok, n_chars))
    return out


def _distinct_stop_words(h: np.ndarray, doc: np.ndarray, n_docs: int) -> np.ndarray:
    """How many of the stop words occur in each document (each counted once)."""
    seen = np.zeros((n_docs, len(STOP_WORDS)), bool)
    for j, word_hash in enumerate(pl.Series(STOP_WORDS).hash(7).to_numpy()):
        seen[doc[h == word_hash], j] = True
    return seen.sum(axis=1)


def _ngram_signals(
    h: np.ndarray, length: np.ndarray, doc: np.ndarray, n_tok: np.ndarray, n_chars: np.ndarray
) -> dict[str, np.ndarray]:
    """Top 2/3/4-gram and duplicate 5..10-gram character fractions (Gopher, Table A1).

    An n-gram can repeat only where both (n-1)-grams inside it repeat, so each n works on
    the positions left over from n-1: the full pass is for bigrams only.
    """
    n_docs, n = len(n_tok), len(h)
    start = np.cumsum(n_tok) - n_tok
    left = (start + n_tok)[doc] - np.arange(n)  # tokens from here to the end of the doc
    csum = np.concatenate([[0], np.cumsum(length)])
    out: dict[str, np.ndarray] = {}
    key = np.r_[h[:-1] * MIX_MULT + h[1:], np.uint64(0)]  # bigram keys, by slices
    cand = np.flatnonzero(left >= 2)
    for size in range(2, 11):
        if size > 2:
            key[cand] = key[cand] * MIX_MULT + h[cand + size - 1]
        group, is_first, dup, count = group_equal(
            doc[cand], key[cand], n_docs, with_count=size <= 4
        )
        if count is not None:
            out[f"q_top_{size}gram_frac"] = _top_ngram(
                cand, doc, is_first, count, size, start, n_tok, csum, n_chars
            )
        else:
            chars = _dup_ngram_chars(cand[dup], group[dup], doc, size, csum, n_docs)
            out[f"q_dup_{size}gram_frac"] = safe_div(chars, n_chars)
        # (size+1)-gram at i repeats only if the size-grams at i and i+1 both repeat.
        rep = np.zeros(n + 1, bool)
        rep[cand[dup]] = True
        nxt = cand[dup]
        cand = nxt[rep[nxt + 1] & (left[nxt] >= size + 1)]
    return out


def _top_ngram(
    cand: np.ndarray,
    doc: np.ndarray,
    is_first: np.ndarray,
    count: np.ndarray,
    size: int,
    start: np.ndarray,
    n_tok: np.ndarray,
    csum: np.ndarray,
    n_chars: np.ndarray,
) -> np.ndarray:
    """Characters of the most frequent n-gram (joined with spaces) times its count.

    As `Counter.most_common(1)`: ties go to the n-gram seen first. A document with no
    repeated n-gram scores its first n-gram once; one with fewer than n words scores 0.
    """
    n_docs = len(n_tok)
    best = np.ones(n_docs, np.int64)
    np.maximum.at(best, doc[cand], count)
    pick = np.flatnonzero(is_first & (count == best[doc[cand]]))
    pos = cand[pick]
    first_of_doc = np.ones(len(pos), bool)
    first_of_doc[1:] = doc[pos[1:]] != doc[pos[:-1]]
    pos = pos[first_of_doc]
    pos = pos[best[doc[pos]] >= 2]  # no repeat: the document's first n-gram, once
    top_pos = start.copy()
    top_pos[doc[pos]] = pos
    chars = csum[np.minimum(top_pos + size, len(csum) - 1)] - csum[top_pos] + (size - 1)
    chars = np.where(n_tok >= size, chars * best, 0)
    return safe_div(chars, n_chars)


def _dup_ngram_chars(
    pos: np.ndarray, group: np.ndarray, doc: np.ndarray, size: int, csum: np.ndarray, n_docs: int
) -> np.ndarray:
    """Characters of duplicate n-grams per document, as datatrove's `find_all_duplicate`.

    datatrove reads left to right: an n-gram already in its `seen` set counts its
    characters (words joined without spaces) and the reader jumps n words ahead; any other
    n-gram is added to `seen` and the reader steps one word. A jumped-over n-gram is never
    added, so "seen" means "at an earlier position that was read", which depends on the
    jumps. `pos` (sorted) are the positions whose n-gram occurs more than once in the
    document and `group` says which are equal; only they can count. Start from "occurs
    earlier at all", place the jumps, recompute "seen" from the positions that were read,
    and repeat: each pass fixes at least the first position that was wrong, so this ends
    with datatrove's answer, in one or two passes on real text.
    """
    if pos.size == 0:
        return np.zeros(n_docs)
    far = np.iinfo(np.int64).max
    first = np.full(group.max() + 1, far)
    np.minimum.at(first, group, pos)
    marked = pos > first[group]
    while True:
        entry, exit_ = _jumps(pos[marked], doc, size)
        run = np.searchsorted(entry, pos, side="right") - 1
        safe = np.maximum(run, 0)
        skipped = (run >= 0) & (pos < exit_[safe]) & ((pos - entry[safe]) % size != 0)
        first = np.full(first.size, far)
        np.minimum.at(first, group[~skipped], pos[~skipped])
        now = pos > first[group]
        if np.array_equal(now, marked):
            break
        marked = now
    chars = (csum[exit_] - csum[entry]).astype(np.float64)
    return np.bincount(doc[entry], weights=chars, minlength=n_docs)


def _jumps(marked: np.ndarray, doc: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the reader counts: [entry, exit) spans, one per used run of `marked`.

    Consecutive marked positions form runs; inside a run the reader counts at entry,
    entry+n, ... so a run contributes the words from its entry to its exit. A run is
    entered at its start unless the previous run's last jump lands inside it (or beyond),
    which takes one vectorised pass per run in the longest such chain.
    """
    if marked.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new_run = np.ones(marked.size, bool)
    new_run[1:] = (np.diff(marked) != 1) | (doc[marked[1:]] != doc[marked[:-1]])
    first = marked[new_run]
    last = marked[np.r_[np.flatnonzero(new_run)[1:] - 1, marked.size - 1]]
    same_doc = np.r_[False, doc[first[1:]] == doc[first[:-1]]]
    floor = np.full(first.size, -1, np.int64)  # where the previous run's last jump landed
    while True:
        entry = np.maximum(first, floor)
        used = entry <= last
        exit_ = np.where(used, entry + ((last - entry) // size + 1) * size, floor)
        new_floor = np.where(same_doc, np.r_[-1, exit_[:-1]], -1)
        if np.array_equal(new_floor, floor):
            return entry[used], exit_[used]
        floor = new_floor
