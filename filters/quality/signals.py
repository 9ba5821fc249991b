"""The `q_*` columns of `pipeline.schema` for a batch of texts: `compute_quality_signals`.

How: one compiled pass per document (`kernels.document_counts`, numba over the UTF-8
bytes of the Arrow column) counts words, n-grams, lines, paragraphs and C4 sentences; the
signals are ratios of those counts. Speed against datatrove's four filters:
`benchmarks/web_stages.py --stages quality`.

The definitions are the regexes and polars/numpy code of `words.py` (words and n-grams)
and `lines.py` (lines, paragraphs, C4): `reference_quality_signals` computes the same
columns from them, batch-wide with polars string kernels and numpy, and the tests hold the
compiled pass to it, value for value.

    from filters.quality.signals import compute_quality_signals
    signals = compute_quality_signals(table["text"])   # a pyarrow Table of q_* columns
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from filters.quality.arrays import safe_div
from filters.quality.lines import line_signals
from filters.quality.words import word_signals
from pipeline.schema import FIELDS

QUALITY_COLUMNS: tuple[str, ...] = tuple(name for name in FIELDS if name.startswith("q_"))


def compute_quality_signals(text: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The `q_*` columns for a batch of texts, in schema order and with schema types.

    Null text scores as the empty string: zero words, no lines, every fraction 0.
    """
    from filters.quality.kernels import COUNTS, document_counts  # lazy: imports numba

    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks() if text.num_chunks else pa.array([], pa.large_string())
    text = text.cast(pa.large_string())
    if text.null_count:
        text = pc.fill_null(text, "")
    counts = document_counts(text)
    c = {name: counts[:, i] for i, name in enumerate(COUNTS)}
    chars, tokens, words = c["chars"], c["tokens"], c["words"]
    sig = {
        "q_n_words": words,
        "q_mean_word_len": safe_div(c["word_chars"], words),
        "q_frac_words_alpha": safe_div(c["alpha_tokens"], tokens),
        "q_n_stop_words": c["stop_words"],
        "q_symbol_word_ratio": safe_div(np.maximum(c["hashes"], c["ellipses"]), tokens),
        "q_fw_newline_word_ratio": safe_div(c["newlines"], tokens),
        "q_frac_lines_bullet": safe_div(c["bullet_lines"], c["lines"]),
        "q_frac_lines_ellipsis": safe_div(c["ellipsis_lines"], c["lines"]),
        "q_dup_line_frac": safe_div(c["dup_lines"], c["rep_lines"]),
        "q_dup_line_char_frac": safe_div(c["dup_line_chars"], chars),
        "q_dup_para_frac": safe_div(c["dup_paragraphs"], np.maximum(c["paragraphs"], 1)),
        "q_dup_para_char_frac": safe_div(c["dup_paragraph_chars"], chars),
        "q_fw_line_punct_frac": safe_div(c["punct_lines"], c["nonblank_lines"]),
        "q_fw_short_line_frac": safe_div(c["short_lines"], c["nonblank_lines"]),
        "q_fw_dup_line_char_frac": safe_div(c["dup_nonblank_chars"], chars - c["newlines"]),
        "q_c4_n_sentences": c["c4_sentences"],
        "q_c4_has_lorem": c["c4_lorem"] > 0,
        "q_c4_has_curly": c["c4_curly"] > 0,
    }
    for n in (2, 3, 4):
        sig[f"q_top_{n}gram_frac"] = safe_div(c[f"top_{n}gram_chars"], chars)
    for n in range(5, 11):
        sig[f"q_dup_{n}gram_frac"] = safe_div(c[f"dup_{n}gram_chars"], chars)
    return _table(sig)


def reference_quality_signals(text: pa.Array | pa.ChunkedArray) -> pa.Table:
    """`compute_quality_signals` from the definitions in words.py and lines.py: polars
    string kernels over the whole batch, exploded into numpy arrays. Several times slower;
    kept as the specification the compiled pass is tested against."""
    series = pl.Series("text", text, dtype=pl.String).fill_null("")
    n_chars = series.str.len_chars().to_numpy().astype(np.int64)
    counts = pl.DataFrame({"t": series}).select(
        hashes=pl.col("t").str.count_matches("#", literal=True),
        ellipses=pl.col("t").str.count_matches("...", literal=True)
        + pl.col("t").str.count_matches("…", literal=True),
    )
    sig = word_signals(series, n_chars)
    sig.update(line_signals(series, n_chars))
    n_tokens = sig.pop("_n_tokens")
    n_newlines = sig.pop("_n_newlines")
    sig["q_symbol_word_ratio"] = safe_div(
        np.maximum(counts["hashes"].to_numpy(), counts["ellipses"].to_numpy()), n_tokens
    )
    sig["q_fw_newline_word_ratio"] = safe_div(n_newlines, n_tokens)
    return _table(sig)


def _table(sig: dict[str, np.ndarray]) -> pa.Table:
    return pa.table(
        {c: pa.array(sig[c]).cast(FIELDS[c].type) for c in QUALITY_COLUMNS},
        schema=pa.schema([FIELDS[c] for c in QUALITY_COLUMNS]),
    )
