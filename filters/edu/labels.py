"""Where edu_train's labels come from, and how they are kept apart for honest evaluation.

What:
- `read_text_rows(path, ...)`: the (id, text, group[, extra]) rows of one file, JSONL(.gz)
  and Parquet read whole (so a `format` or `book` column survives), any other format through
  pipeline.readers;
- `group_of(...)`: the unit a held-out split keeps whole: the web domain (the URL's host,
  `www.` dropped) where a row has a URL, else the first of `group_columns` it has (an
  OpenStax book, a Dolly source file), else the file it came from;
- `format_rows(...)`: weak labels from document-type annotations, each format mapped to a
  0-5 rating (`WEBORGANIZER_FORMATS` by default); formats not in the mapping are left out;
  `caps` lower the rating of rows by another column (`{"topic": {"Adult": 0}}`: adult
  pages rate 0 whatever their format: the rubric rates teaching value for school);
- `decontaminate_rows(...)`: rows that share a word n-gram with a benchmark test item,
  found with the `decontaminate` stage itself (filters/decontam), dropped before training.

Why: a classifier evaluated on documents from the same site or the same book as its
training documents learns the site's template and the book's vocabulary, and looks far
better than it is on a crawl. Splitting by group makes the held-out score the score on
documents from sources the model never saw.

    rows = read_text_rows("weborganizer.jsonl.gz", "text", "id", extra=("format",))
    labelled, skipped = format_rows(rows, WEBORGANIZER_FORMATS)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

log = logging.getLogger("primer.edu")

WEBORGANIZER_FORMATS: dict[str, int] = {
    # educational genres (WebOrganizer's format taxonomy, Wettig et al. 2025)
    "Academic Writing": 5,
    "Knowledge Article": 5,
    "Tutorial": 5,
    "Documentation": 4,
    "Nonfiction Writing": 3,
    # informative but rarely teaching material
    "News Article": 2,
    "Q&A Forum": 2,
    "FAQ": 2,
    "Audio Transcript": 2,
    "Listicle": 1,
    "Personal Blog": 1,
    "Creative Writing": 1,
    "News (Organization)": 1,
    # no educational value
    "Spam / Ads": 0,
    "Product Page": 0,
    "Content Listing": 0,
    "Structured Data": 0,
    "Customer Support": 0,
    "About Page (Organization)": 0,
    "About Page (Personal)": 0,
    "Legal Notices": 0,
    "Truncated": 0,
    "Comment Section": 0,
    "User Review": 0,
}
"""WebOrganizer format -> rating. Graded, not two-valued: the middle formats carry real
signal (held-out AUC on unseen web domains and on human-judged web excerpts improved over a
high/low mapping that left them out; README.md has the numbers)."""

_TABLE_FORMAT = re.compile(r"\.(?:parquet|jsonl?(?:\.gz)?)$")
_WWW = re.compile(r"^www\d*\.")


def text_id(text: str) -> str:
    return "text:" + xxhash.xxh64_hexdigest(text.encode())


def url_hosts(urls: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """Lower-cased host of each URL without a leading `www.`; null where there is none."""
    host = pc.extract_regex(
        pc.utf8_lower(pc.cast(urls, pa.string())),
        r"^[a-z][a-z0-9+.-]*://(?:[^/@]*@)?(?P<h>[^/:?#]+)",
    )
    host = pc.struct_field(host, "h")
    host = pc.replace_substring_regex(host, _WWW.pattern, "")
    return pc.if_else(pc.equal(host, ""), pa.scalar(None, pa.string()), host)


def group_of(
    table: pa.Table, group_columns: Sequence[str], fallback: str
) -> pa.ChunkedArray | pa.Array:
    """One group per row: "host:<domain>" from `url`, else "<col>:<value>" of the first
    `group_columns` entry the row has, else `fallback`."""
    n = len(table)
    group = pa.nulls(n, pa.string())
    for col in group_columns:
        if col not in table.column_names:
            continue
        if col == "url":
            value = url_hosts(table[col])
            prefix = "host:"
        else:
            value = pc.cast(table[col], pa.string())
            prefix = f"{col}:"
        value = pc.binary_join_element_wise(pa.scalar(prefix), value, "")
        group = pc.coalesce(group, value)
    return pc.fill_null(group, fallback)


def read_text_rows(
    path: str,
    text_column: str,
    id_column: str,
    group_columns: Sequence[str],
    extra: Sequence[str] = (),
    batch_rows: int = 10_000,
    optional: Sequence[str] = (),
) -> pa.Table:
    """(id, text, group, *extra, *optional) of a file's non-empty documents. JSONL/Parquet
    are read whole, so any column is there; other formats go through pipeline.readers (no
    extra columns: a missing `extra` column is an error naming the file; a missing
    `optional` column is left out)."""
    if _TABLE_FORMAT.search(path):
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import polars as pl

            table = pl.read_ndjson(path, infer_schema_length=None).to_arrow()
    else:
        from pipeline.io import iter_documents

        parts = list(iter_documents([path], batch_rows, columns=("id", "text", "url")))
        table = pa.concat_tables(parts) if parts else pa.table({"id": [], "text": []})
    names = table.column_names
    if text_column not in names:
        raise ValueError(f"edu_train: {path} has no {text_column!r} column (it has {names})")
    missing = [c for c in extra if c not in names]
    if missing:
        raise ValueError(f"edu_train: {path} has no {missing[0]!r} column (it has {names})")
    text = pc.cast(table[text_column], pa.large_string())
    keep = pc.fill_null(pc.greater(pc.utf8_length(text), 0), False)
    table, text = table.filter(keep), text.filter(keep)
    if id_column in table.column_names:
        ids = pc.cast(table[id_column], pa.string())
        if ids.null_count:
            fill = pa.array([text_id(t) for t in text.to_pylist()], pa.string())
            ids = pc.coalesce(ids, fill)
    else:
        ids = pa.array([text_id(t) for t in text.to_pylist()], pa.string())
    out = {
        "id": ids,
        "text": text,
        "group": group_of(table, group_columns, f"file:{Path(path).name}"),
    }
    for c in [*extra, *(c for c in optional if c in table.column_names and c not in extra)]:
        out[c] = table[c]
    return pa.table(out)


def format_rows(
    table: pa.Table,
    mapping: dict[str, int],
    column: str,
    caps: dict[str, dict[str, int]] | None = None,
) -> tuple[pa.Table, int]:
    """(id, text, group, label, capped) of rows whose `column` value is in `mapping`, and
    how many rows had a value the mapping leaves out. `caps` {other column: {value: max
    rating}} lowers the rating of rows with that value (`capped` marks the rows whose
    rating it lowered); a column the table lacks caps nothing."""
    fmt = pc.cast(table[column], pa.string())
    keys = pa.array(list(mapping), pa.string())
    known = pc.fill_null(pc.is_in(fmt, value_set=keys), False)
    kept = table.filter(known)
    idx = pc.index_in(kept[column], value_set=keys).to_numpy(zero_copy_only=False)
    labels = np.asarray(list(mapping.values()), np.int8)[idx]
    capped = np.zeros(len(kept), bool)
    for cap_column, limits in (caps or {}).items():
        if cap_column not in kept.column_names or not limits:
            continue
        values = pc.cast(kept[cap_column], pa.string())
        at = pc.index_in(values, value_set=pa.array(list(limits), pa.string()))
        at = pc.fill_null(at, -1).to_numpy(zero_copy_only=False)
        limit = np.where(at >= 0, np.asarray(list(limits.values()), np.int8)[at], 5)
        capped |= labels > limit
        labels = np.minimum(labels, limit).astype(np.int8)
    out = kept.select(["id", "text", "group"]).append_column("label", pa.array(labels, pa.int8()))
    return out.append_column("capped", pa.array(capped)), len(table) - len(kept)


def decontaminate_rows(
    table: pa.Table, benchmarks: list[str], ngram: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """A mask of rows that share a word `ngram` with a benchmark test item (the
    `decontaminate` stage's rule, its index and its normalisation), and a report."""
    from filters.decontam.decontaminate import DecontamConfig, DecontaminateStage

    stage = DecontaminateStage(DecontamConfig(benchmarks=benchmarks, ngram=ngram))
    hit = np.zeros(len(table), bool)
    benches: dict[str, int] = {}
    step = 2_000
    for lo in range(0, len(table), step):
        batch = pa.table({"id": table["id"][lo : lo + step], "text": table["text"][lo : lo + step]})
        out = stage(batch)
        mask = pc.is_valid(out["drop_reason"]).to_numpy(zero_copy_only=False)
        hit[lo : lo + len(batch)] = mask
        for b in out["contam_benchmarks"].filter(pa.array(mask)).to_pylist():
            for name in b.split(","):
                benches[name] = benches.get(name, 0) + 1
    return hit, {"ngram": ngram, "rows": int(hit.sum()), "benchmarks": benches}
