"""Polars helpers the run views share: stable sample picks and histogram counts.

Samples (`Run.samples_per_edu_bucket`, `Run.synthetic_samples`, the report's) are picked
by the xxh64 of the id with a fixed seed, not by polars' hash (stable only within one
polars version): a run shows the same documents on every machine and version.
`histogram` counts a column in equal-width bins in polars, for the report's charts
(pipeline/views/svg.py draws them).

    from pipeline.views.frames import histogram, pick
    pick(frame, "edu_int", 2)                          # 2 ids per edu_int, always the same
    histogram(lf, "edu_score", bins=30, by="kept")     # bin, lo, hi, kept, count
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import xxhash

SAMPLE_SEED = 17


def sample_key(ids: pl.Series, seed: int = SAMPLE_SEED) -> pl.Series:
    """xxh64 of each id's UTF-8 bytes with `seed` (null for a null id): the order samples
    are picked in, the same on every polars version and machine."""
    arr = pa.array(ids.cast(pl.String).to_arrow()).cast(pa.large_string())
    _, offsets, data = arr.buffers()
    off = np.frombuffer(offsets, np.int64)[arr.offset : arr.offset + len(arr) + 1].tolist()
    mv = memoryview(data if data is not None else b"")
    digest = xxhash.xxh64_intdigest
    # one call per id, over the Arrow buffer (no vectorised xxh64 in polars or pyarrow);
    # a pick hashes the ids of at most `max_parts` parts, once
    keys = np.fromiter(
        (digest(mv[a:b], seed) for a, b in zip(off[:-1], off[1:], strict=True)),
        np.uint64,
        len(arr),
    )
    return pl.Series(ids.name, keys, dtype=pl.UInt64).set(ids.is_null(), None)


def pick(frame: pl.DataFrame, by: str, n: int, seed: int = SAMPLE_SEED) -> pl.DataFrame:
    """The rows of up to `n` ids per value of `by`: those with the smallest `sample_key`
    (ties by id), in that order; the same picks whatever order the rows come in."""
    frame = frame.drop_nulls("id")
    return (
        frame.with_columns(_key=sample_key(frame["id"], seed))
        .sort(["_key", "id"])
        .filter(pl.int_range(pl.len()).over(by) < n)
        .drop("_key")
    )


def spread(items: list[Path], k: int | None) -> list[Path]:
    """At most k items, evenly spread (first and last included), in order."""
    if k is None or len(items) <= k:
        return items
    if k <= 1:
        return items[:k]
    step = (len(items) - 1) / (k - 1)
    return [items[round(i * step)] for i in range(k)]


def histogram(
    lf: pl.LazyFrame | pl.DataFrame,
    column: str,
    bins: int = 30,
    by: str | None = None,
    range: tuple[float, float] | None = None,  # noqa: A002 (numpy's name for it)
    clip_quantile: float | None = None,
) -> pl.DataFrame:
    """Counts of `column` in `bins` equal-width bins (bin, lo, hi, [by], count), computed by
    polars (two passes over that one column, never collected whole). Values outside the
    range (or above the `clip_quantile` quantile) go into the edge bins; nulls and NaNs are
    left out. Every bin (x every `by` value) is present, with 0 where empty."""
    lf = lf.lazy()
    x = pl.col(column).cast(pl.Float64)
    lf = lf.filter(x.is_not_null() & x.is_finite())
    if range is None:
        hi = x.quantile(clip_quantile) if clip_quantile is not None else x.max()
        lo_v, hi_v = lf.select(x.min(), hi.alias("_hi")).collect().row(0)
    else:
        lo_v, hi_v = range
    if lo_v is None:  # no values at all
        schema = {"bin": pl.Int32, "lo": pl.Float64, "hi": pl.Float64}
        schema |= {by: pl.Boolean} if by else {}
        return pl.DataFrame(schema=schema | {"count": pl.UInt32})
    if hi_v is None or hi_v <= lo_v:
        hi_v = lo_v + 1.0
    width = (hi_v - lo_v) / bins
    idx = ((x - lo_v) / width).floor().clip(0, bins - 1).cast(pl.Int32).alias("bin")
    keys = [idx] + ([pl.col(by)] if by else [])
    counts = lf.group_by(keys).agg(pl.len().alias("count")).collect()
    grid = pl.DataFrame({"bin": pl.int_range(0, bins, eager=True).cast(pl.Int32)})
    if by is not None:
        grid = grid.join(counts.select(by).unique().sort(by), how="cross")
    on = ["bin", by] if by else ["bin"]
    return (
        grid.join(counts, on=on, how="left")
        .with_columns(
            pl.col("count").fill_null(0).cast(pl.UInt32),
            lo=lo_v + pl.col("bin") * width,
            hi=lo_v + (pl.col("bin") + 1) * width,
        )
        .select("bin", "lo", "hi", *([by] if by else []), "count")
        .sort(on)
    )
