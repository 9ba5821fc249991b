"""Heuristic quality filtering: Gopher quality and repetition, C4 and FineWeb rules.

`quality.py` holds the `quality` stage and its thresholds; `signals.py` computes the `q_*`
columns they judge, from the counts of one compiled pass per document (`kernels.py`). The
signals are defined by the regexes and polars/numpy code of `words.py` (words, n-grams)
and `lines.py` (lines, paragraphs, C4; numpy helpers in `arrays.py`), which
`signals.reference_quality_signals` runs and the tests hold the compiled pass to.
"""
