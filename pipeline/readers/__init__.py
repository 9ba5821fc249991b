"""Readers: every supported input file becomes a stream of `READ_SCHEMA` tables.

Primer ingests web crawls (WARC, WET), text dumps (JSONL, Parquet, Hugging Face datasets)
and loose HTML files. Each reader streams its file in batches of at most `batch_rows` rows,
every batch with exactly the columns and types of `pipeline.schema.READ_SCHEMA`, so the
stages after it never care where a document came from. Why a reader of our own: a crawl
file is never clean (downloads cut short, broken gzip members, invalid UTF-8, bad JSON,
Parquet row groups that do not decode), and a record that cannot be read must be counted,
not lost and not fatal. Such a record becomes a row with `drop_reason = "read:<reason>"`
and null `text`/`html`, keeping whatever id and url were known, so the run manifest counts
it with the other drops:

    read:truncated_gzip     the .gz ends (or a record inside it ends) before its end marker
    read:truncated_zstd     the same for a .zst file
    read:truncated_record   an uncompressed WARC ends inside a record
    read:corrupt_gzip       gzip data that does not decompress; reading resumes after it
    read:corrupt_zstd       zstd data that does not decompress
    read:malformed_record   a WARC record or HTTP header that does not parse
    read:bad_encoding       an HTTP body whose chunked/gzip/deflate/br encoding is broken
    read:http_status        an HTTP response that is not 2xx (redirect, error page)
    read:empty_payload      a WARC document record with an empty body
    read:invalid_utf8       a text payload with more than 1% undecodable bytes (a WET
                            record, a JSONL line, a Parquet/HF text value)
    read:invalid_json       a JSONL line that is not a JSON object
    read:missing_text       a JSONL/Parquet/HF record whose text is absent, null or empty
    read:text_not_string    a JSONL/Parquet/HF record whose text is a number, bool, list or
                            object (any non-string, non-binary Arrow type)
    read:too_large          a JSONL line, HTML file or WARC record over 256 MiB; skipped
                            without being held in memory
    read:corrupt_parquet    a Parquet file whose footer does not decode (0 bytes, cut short,
                            not Parquet at all): one row, id "<name>:0". Or a row group that
                            does not decode: one row per document it did not yield, as many
                            as the footer counts, with the fallback ids a clean read gives

An empty file yields no rows, except an empty .parquet: a Parquet file always has a footer,
so 0 bytes is a failed write. One module per format (warc, jsonl, parquet, hf, html); ids,
text and row building are shared in `rows` (the id rule is there), decompression in
`compression`, the Arrow column rules of Parquet and HF in `arrow`. This package holds the
dispatch by file extension and the checks a planner runs before any work:
`classify_inputs(files)` splits a listing into the files a reader handles and (file, why)
for the rest (a LICENSE, a README, WAT metadata, a .json manifest), and `check_input(path)`
reads a Parquet footer to report a user error (no text column, a text column of numbers).
Neither reads data: unreadable files are the readers' to record as rows.

Usage:

    from pipeline.readers import iter_batches, iter_hf_dataset
    for table in iter_batches("../shared/data/warc/dolma/sample-0000.warc.gz"):
        ...  # pa.Table with READ_SCHEMA, <= 1000 rows

    python -m pipeline.readers FILE [FILE ...]   # rows per drop reason, and the time taken
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa

from pipeline import storage
from pipeline.readers.arrow import can_hold_text, list_names
from pipeline.readers.hf import (
    check_hf_input,
    dataset_digest,
    is_hf_spec,
    is_saved_dataset,
    iter_hf_dataset,
    read_hf_input,
)
from pipeline.readers.html import read_html
from pipeline.readers.jsonl import read_jsonl
from pipeline.readers.parquet import PARQUET_ERRORS, read_parquet
from pipeline.readers.rows import UniqueIds
from pipeline.readers.warc import read_warc

__all__ = [
    "READERS",
    "SUPPORTED_EXTENSIONS",
    "UniqueIds",
    "check_input",
    "classify_inputs",
    "dataset_digest",
    "detect_format",
    "is_dataset_input",
    "is_saved_dataset",
    "iter_batches",
    "iter_hf_dataset",
]

Reader = Callable[..., Iterator[pa.Table]]

READERS: dict[str, Reader] = {
    ".warc.wet.gz": read_warc,
    ".wet.gz": read_warc,
    ".wet": read_warc,
    ".warc.gz": read_warc,
    ".warc": read_warc,
    ".jsonl": read_jsonl,
    ".jsonl.gz": read_jsonl,
    ".jsonl.zst": read_jsonl,
    ".ndjson": read_jsonl,
    ".ndjson.gz": read_jsonl,
    ".ndjson.zst": read_jsonl,
    # Dolma and others write JSON Lines as .json.gz; a plain .json is too often one array.
    ".json.gz": read_jsonl,
    ".json.zst": read_jsonl,
    ".parquet": read_parquet,
    ".html": read_html,
    ".htm": read_html,
    ".html.gz": read_html,
    ".htm.gz": read_html,
}
"""File extension (lower case) -> reader; every reader takes (path, batch_rows, *,
text_column, id_column) and yields READ_SCHEMA tables."""

HF_DATASET = "hf"
"""detect_format's answer for a Hugging Face dataset input (a spec or a save_to_disk
folder), which has no extension."""

SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(sorted(READERS, key=len, reverse=True))

# Files met in crawl and dataset folders that hold no documents, by how their name ends.
_NOT_INPUTS: tuple[tuple[str, str], ...] = (
    (".wat.gz", "a WAT file: crawl metadata (links, headers), not documents"),
    (".wat", "a WAT file: crawl metadata (links, headers), not documents"),
    (".paths.gz", "a list of crawl file paths, not documents (name it as an input to read them)"),
    (".cdx.gz", "a CDX index of a crawl, not documents"),
    (".cdx", "a CDX index of a crawl, not documents"),
    (".json", "a .json file (one JSON value, most often a manifest); JSON Lines are .jsonl"),
    (".crc", "a checksum file"),
)
_COMPRESSIONS = (".bz2", ".xz", ".lz4", ".zip", ".tar", ".tgz", ".7z", ".br", ".lzma")


def _unsupported(path: str) -> str | None:
    """Why no reader handles `path`, in a few words; None when one does."""
    if is_hf_spec(path):
        return None
    if not storage.is_remote(path) and os.path.isdir(path):
        if is_saved_dataset(path):
            return None
        return "a directory"
    lower = os.path.basename(path).lower()
    if any(lower.endswith(ext) for ext in SUPPORTED_EXTENSIONS):
        return None
    for end, why in _NOT_INPUTS:
        if lower.endswith(end):
            return why
    ext = os.path.splitext(lower)[1]
    if ext in _COMPRESSIONS:
        return f"compressed as {ext}, which no reader decompresses (use .gz or .zst)"
    if not ext:
        return "no file extension (a LICENSE, README or marker file?)"
    return f"unknown file type {ext}"


def is_dataset_input(path: str | os.PathLike[str]) -> bool:
    """A Hugging Face dataset input: `hf:NAME[:CONFIG]:SPLIT` or a save_to_disk folder."""
    p = os.fspath(path)
    return is_hf_spec(p) or (not storage.is_remote(p) and is_saved_dataset(p))


def detect_format(path: str | os.PathLike[str]) -> str:
    """The READERS key (extension) of `path`; ValueError naming what is supported."""
    p = os.fspath(path)
    why = _unsupported(p)
    if why is None and is_dataset_input(p):
        return HF_DATASET
    if why is None:
        lower = os.path.basename(p).lower()
        # longest first, so .warc.wet.gz beats .warc.gz
        return next(ext for ext in SUPPORTED_EXTENSIONS if lower.endswith(ext))
    if why == "a directory":
        raise ValueError(f"{p} is a directory; pass its files (expand the glob first)")
    raise ValueError(
        f"cannot read {p}: {why}. Supported extensions: {', '.join(sorted(READERS))}; "
        "Hugging Face datasets: hf:NAME[:CONFIG]:SPLIT or a save_to_disk folder."
    )


def classify_inputs(
    files: Iterable[str | os.PathLike[str]],
) -> tuple[list[str], list[tuple[str, str]]]:
    """Split `files` into those a reader handles and (file, why) for the rest.

    By name only (and whether it is a directory), so a planner can list what it will skip
    before any work and decide, by its config, to warn or to fail. A missing file is not
    reported here: reading it raises FileNotFoundError, and `check_input` says so.
    """
    readable: list[str] = []
    rejected: list[tuple[str, str]] = []
    for f in files:
        p = os.fspath(f)
        why = _unsupported(p)
        if why is None:
            readable.append(p)
        else:
            rejected.append((p, why))
    return readable, rejected


def check_input(
    path: str | os.PathLike[str], text_column: str = "text", id_column: str = "id"
) -> str | None:
    """A one-line description of a user error that would fail `path` at run time, or None.

    Cheap enough for a planner over every input: it reads a Parquet footer, nothing else.
    It reports a file that is missing or of a kind no reader handles, and a Parquet file
    (other than a Primer stage output, one with `id` and `drop_reason`) without the text
    column or whose text column cannot hold text (numbers, lists...). A file that does not
    decode (0 bytes, a corrupt footer) is a data problem, recorded as rows when it is read,
    so it returns None. `id_column` is accepted to mirror the readers: every id type has
    a rule (pipeline/readers/rows.py), so the id column never makes an error.
    """
    p = os.fspath(path)
    why = _unsupported(p)
    if why is not None:
        return f"{p}: {why}"
    if is_dataset_input(p):
        return check_hf_input(p, text_column)
    if not storage.exists(p):
        return f"{p}: no such file"
    if detect_format(p) != ".parquet":
        return None
    try:
        schema = storage.parquet_schema(p)
    except PARQUET_ERRORS:
        return None
    names = schema.names
    if {"id", "drop_reason"} <= set(names):
        return None  # a stage output: pipeline.io reads it, not this module
    textual = [f.name for f in schema if can_hold_text(f.type)]
    if text_column not in names:
        return (
            f"{p}: no text column {text_column!r}; its columns are {list_names(names)}. "
            f"Set text_column to the one that holds the document text"
            + (f" (string columns: {list_names(textual)})." if textual else ".")
        )
    t = schema.field(names.index(text_column)).type
    if not can_hold_text(t):
        return (
            f"{p}: text column {text_column!r} is {t}, which cannot hold text. "
            f"Set text_column to a string column"
            + (f" (it has {list_names(textual)})." if textual else " (it has none).")
        )
    return None


def iter_batches(
    path: str | os.PathLike[str],
    batch_rows: int = 1000,
    *,
    text_column: str = "text",
    id_column: str = "id",
    unique_ids: UniqueIds | None = None,
    row_groups: tuple[int, int] | None = None,
    byte_range: tuple[int, int] | None = None,
    shards: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """Stream `path` as READ_SCHEMA tables of at most `batch_rows` rows, with ids unique
    within the file (`UniqueIds`; pass one to read its count). `row_groups` (a, b) reads
    only those row groups of a Parquet file (a sub-part; row numbers stay the file's);
    `byte_range` (a, b) the records that start at offsets a..b-1 of a gzip WARC or a plain
    JSONL file (`byte_splittable`); `shards` (a, b) the units a..b-1 of a dataset input
    (pipeline/readers/hf.py `dataset_spans`).

    The reader is chosen by extension (see READERS). Unreadable records come back as rows
    with a `read:` drop reason, never as an exception; a missing file, a directory, an
    unknown extension or a Parquet file without the text column raise, since those are
    mistakes in the call, not in the data (`classify_inputs` and `check_input` find them
    before a run).
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    p = os.fspath(path)
    fmt = detect_format(p)
    reader = read_hf_input if fmt == HF_DATASET else READERS[fmt]
    if fmt != HF_DATASET and not storage.exists(p):
        raise FileNotFoundError(f"no such input file: {p}")
    unique = unique_ids if unique_ids is not None else UniqueIds()
    kwargs: dict = {"text_column": text_column, "id_column": id_column}
    if row_groups is not None:
        if reader is not read_parquet:
            raise ValueError(f"row_groups is for Parquet files only, not {p}")
        kwargs["row_groups"] = row_groups
    if byte_range is not None:
        if reader not in (read_warc, read_jsonl):
            raise ValueError(f"byte_range is for WARC and JSONL files only, not {p}")
        kwargs["byte_range"] = byte_range
    if shards is not None:
        if fmt != HF_DATASET:
            raise ValueError(f"shards is for dataset inputs only, not {p}")
        kwargs["shards"] = shards
    for table in reader(p, batch_rows, **kwargs):
        yield unique(table)
