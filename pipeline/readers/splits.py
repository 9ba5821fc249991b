"""How a large raw input file is split into sub-parts, each its own task and commit.

Parquet by ranges of its row groups (read from the footer); a gzip WARC/WET or a plain JSONL
file by byte ranges, inside which the readers find the record boundaries (see
pipeline/readers/warc.py and jsonl.py: a range holds the records that start in it); a
Hugging Face dataset by data files or row ranges (pipeline/readers/hf.py `dataset_spans`).
Other files are read whole.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline import storage
from pipeline.readers import detect_format
from pipeline.readers.compression import byte_splittable


def row_group_spans(path: str, max_rows: int | None) -> list[tuple[int, int]] | None:
    """Consecutive row-group ranges [a, b) of a raw Parquet file holding at most `max_rows`
    rows each (a larger single group is a range of its own); None when the file is not
    split: small enough, one row group, not Parquet, or a footer that does not read (the
    reader records that file as a bad input)."""
    if max_rows is None or not path.lower().endswith(".parquet"):
        return None
    try:
        meta = storage.parquet_metadata(path)
    except (pa.ArrowException, OSError):
        return None
    if meta.num_rows <= max_rows or meta.num_row_groups < 2:
        return None
    spans, start, rows = [], 0, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if rows and rows + n > max_rows:
            spans.append((start, g))
            start, rows = g, 0
        rows += n
    spans.append((start, meta.num_row_groups))
    return spans if len(spans) > 1 else None


def byte_spans(path: str, max_bytes: int | None) -> list[tuple[int, int]] | None:
    """Consecutive byte ranges [a, b) of at most `max_bytes` covering a raw gzip WARC or
    plain JSONL file (the reader finds the record boundaries inside them); None when the
    file is not split: small enough, or a format that cannot be entered mid-file."""
    try:
        size = storage.size(path)
        if max_bytes is None or size <= max_bytes:
            return None
        if not byte_splittable(path, detect_format(path)):
            return None
    except (OSError, ValueError):
        return None  # unreadable or unknown: the reader or the plan records it
    return [(a, min(a + max_bytes, size)) for a in range(0, size, max_bytes)]
