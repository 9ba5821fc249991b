"""Exact and MinHash-LSH near-duplicate detection: the `dedup` stage (`dedup.py`).

`config.py` holds its settings, `minhash.py` the hashes of normalised text (exact hash,
shingles, signatures, LSH band keys), `keys.py` what identifies a row and the long-form
keys of the inputs, `edges.py` the links between rows that share a key (in the driver, or
fanned out over an executor), and `clusters.py` the union-find that turns them into the
cluster table.
"""
