"""`DedupConfig`: the settings of the `dedup` stage, read by every module of filters/dedup/.

Kept apart from the stage (dedup.py) so that the hashing, key and edge modules the stage
builds on can take the config without importing the stage.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.stage import StageConfig


class DedupConfig(StageConfig):
    """Dedup settings. Defaults are FineWeb's (datatrove `MinhashConfig`): word 5-grams,
    14 bands of 8 rows, seed 1. With b bands of r rows, a pair with Jaccard similarity s
    becomes a candidate with probability 1 - (1 - s^r)^b: 0.92 at s = 0.8, 0.5 near 0.72."""

    exact: bool = True
    """Cluster documents whose normalised text is identical (reason `exact_duplicate`).
    Off, identical texts are still found by `near`, as near duplicates."""

    near: bool = True
    """Cluster near duplicates found by MinHash LSH (reason `near_duplicate`)."""

    ngram: int = Field(5, ge=1)
    """Words per shingle (FineWeb: 5). Documents shorter than this get one shingle."""

    bands: int = Field(14, ge=1, le=255)
    """LSH bands (FineWeb: 14). More bands find less similar pairs."""

    rows_per_band: int = Field(8, ge=1)
    """MinHash values per band (FineWeb: 8). More rows demand more similarity per band."""

    seed: int = Field(1, ge=0)
    """Seed of the MinHash permutations (FineWeb: 1). Changing it changes every signature."""

    lowercase: bool = True
    """Compare text case-insensitively."""

    strip_punct: bool = True
    """Drop Unicode punctuation and symbols before comparing (as FineWeb's simplify_text)."""

    strip_accents: bool = True
    """Decompose (NFKD) and drop combining marks, so "café" matches "cafe" (as FineWeb)."""

    num_partitions: int = Field(32, ge=1)
    """Fan-out: every map step after reading the inputs runs over this many partitions
    (key buckets, rank ranges, node partitions, source buckets), each one task; raise it
    with the corpus so that a partition fits a worker. Fixed by config, never by the worker
    count, and it never changes the clusters."""

    ray_min_rows: int = Field(50_000, ge=0)
    """Fan-out: inputs with at least this many rows (Parquet stage outputs, counted from
    their footers) are clustered fanned out over the executor, Ray's or any other, so the
    driver's memory does not grow with the corpus; smaller ones in the driver (union-find,
    identical clusters, tested), where the fan-out's fixed cost (tasks, partition files)
    would be more than the whole work. Raw inputs, whose rows are unknown until read, fan
    out on Ray. 0: always fan out."""

    @model_validator(mode="after")
    def _something_to_do(self) -> DedupConfig:
        if not (self.exact or self.near):
            raise ValueError("dedup: `exact` and `near` are both false; enable at least one")
        return self

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows_per_band

    @property
    def norm_flags(self) -> dict[str, bool]:
        """The keyword flags of `filters.normalise.normalise` this config asks for."""
        return {
            "lowercase": self.lowercase,
            "strip_punct": self.strip_punct,
            "strip_accents": self.strip_accents,
        }
