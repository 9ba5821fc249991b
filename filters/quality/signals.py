"""The `q_*` columns of `pipeline.schema` for a batch of texts: `compute_quality_signals`.

How: the whole batch is scored at once. Texts are split into words and lines with polars
string kernels and the pieces are exploded into flat arrays; per-document counts are
`np.bincount`s over the document index; repeated lines, paragraphs and n-grams are found
with one open-addressing hash table for the batch, built with numpy scatters, in which each
document owns a small slice (`arrays.group_equal`). There is no Python loop over documents.
Word and n-gram signals are in `words.py`, line, paragraph and C4 signals in `lines.py`.
Speed against datatrove's four filters: `benchmarks/web_stages.py --stages quality`.

    from filters.quality.signals import compute_quality_signals
    signals = compute_quality_signals(table["text"])   # a pyarrow Table of q_* columns
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from filters.quality.arrays import safe_div
from filters.quality.lines import line_signals
from filters.quality.words import word_signals
from pipeline.schema import FIELDS

QUALITY_COLUMNS: tuple[str, ...] = tuple(name for name in FIELDS if name.startswith("q_"))


def compute_quality_signals(text: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The `q_*` columns for a batch of texts, in schema order and with schema types.

    Null text scores as the empty string: zero words, no lines, every fraction 0.
    """
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
    return pa.table(
        {c: pa.array(sig[c]).cast(FIELDS[c].type) for c in QUALITY_COLUMNS},
        schema=pa.schema([FIELDS[c] for c in QUALITY_COLUMNS]),
    )
