"""Exact and MinHash-LSH near-duplicate detection: the `dedup` stage (`dedup.py`).

`config.py` holds its settings, `minhash.py` the hashes of normalised text (exact hash,
shingles, signatures, LSH band keys), `keys.py` what identifies a row and the long-form
keys of the inputs, `edges.py` the links between rows that share a key, `clusters.py` the
in-driver union-find that turns them into the cluster table, and `cluster_files.py` that
table's files, one per source. Fanned out (`fanout.py`, every step an executor map with
partition files between steps, `shuffle.py`): dense ranks in keep order (`ranks.py`) and
the connected components by large-star/small-star steps (`components.py`).
"""
