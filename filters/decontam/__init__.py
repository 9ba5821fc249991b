"""Benchmark decontamination: the `decontaminate` stage (`decontaminate.py`).

`benchmarks.py` loads benchmark test items, `index.py` builds their n-gram index and finds
its n-grams in documents.
"""
