"""Heuristic quality filtering: Gopher quality and repetition, C4 and FineWeb rules.

`quality.py` holds the `quality` stage and its thresholds; `signals.py` computes the `q_*`
columns they judge, from the word and n-gram kernels in `words.py` and the line, paragraph
and C4 kernels in `lines.py` (numpy helpers in `arrays.py`).
"""
