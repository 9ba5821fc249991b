"""JSON Lines (plain, .gz or .zst) -> READ_SCHEMA rows, one per non-blank line.

`url` and `title` come from top-level fields or, Dolma style, from a `metadata` object;
`fetch_time` from the first of `timestamp`, `date`, `created` present; ids by the rule in
pipeline/readers/rows.py. Tolerated without a drop row: a UTF-8 byte order mark at the
start of a line, CRLF line ends, raw control characters inside JSON strings, UTF-16 files
(with a BOM), lone UTF-16 surrogates in JSON escapes (replaced, under the invalid_utf8
rule). Blank lines are skipped without a row, but counted in fallback ids.

    from pipeline.readers.jsonl import read_jsonl
    for table in read_jsonl("dump.jsonl.zst", text_column="content"):
        ...

A plain (uncompressed, UTF-8) file can be read in byte ranges (`byte_range`, a sub-part):
a range holds the lines that start inside it, so consecutive ranges read every line once.
Fallback ids in a range name the line's byte offset ("<file>:@<offset>") instead of its
number, which would need every earlier byte counted.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator

import pyarrow as pa

from pipeline import storage
from pipeline.readers.compression import iter_lines, range_chunks, text_chunks
from pipeline.readers.rows import (
    MAX_REPLACED_SHARE,
    TIME_FIELDS,
    BadInput,
    Row,
    batched,
    decode_text,
    drop_row,
    id_str,
    no_surrogates,
    parse_time,
)

_UTF8_BOM = codecs.BOM_UTF8

# strict=False: raw tabs and control characters inside strings are common in hand-rolled
# dumps and cost nothing to accept. One decoder: json.loads with options builds one a call.
_JSON = json.JSONDecoder(strict=False)


def read_jsonl(
    path: str,
    batch_rows: int = 1000,
    *,
    text_column: str = "text",
    id_column: str = "id",
    byte_range: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """JSON Lines (plain, .gz or .zst) -> READ_SCHEMA batches, one row per non-blank line.

    `url` and `title` come from top-level fields or, Dolma style, from a `metadata` object;
    `fetch_time` from the first of `timestamp`, `date`, `created` present. `byte_range`
    (a, b) of a plain file reads the lines that start at offsets a..b-1.
    """
    if byte_range is not None:
        rows = _jsonl_range_rows(path, byte_range, text_column, id_column)
        return batched(rows, path, batch_rows)
    return batched(_jsonl_rows(path, text_column, id_column), path, batch_rows)


def line_start(path: str, offset: int) -> int:
    """The first offset >= `offset` at which a line starts (the file's size if none)."""
    if offset <= 0:
        return 0
    with storage.open_input(path) as f:
        f.seek(offset - 1)
        if f.read(1) == b"\n":
            return offset
        pos = offset
        while chunk := f.read(1 << 20):
            i = chunk.find(b"\n")
            if i >= 0:
                return pos + i + 1
            pos += len(chunk)
        return pos


def _jsonl_range_rows(
    path: str, byte_range: tuple[int, int], text_column: str, id_column: str
) -> Iterator[Row]:
    name = os.path.basename(path)
    begin, stop = line_start(path, byte_range[0]), line_start(path, byte_range[1])
    offset = begin
    for line in iter_lines(range_chunks(path, begin, stop)):
        fallback = f"{name}:@{offset}"
        if line is None:
            yield drop_row(fallback, "too_large")
            # the line's length is not kept; its end is the next newline
            offset = line_start(path, offset + 1)
            continue
        if line and not line.isspace():
            yield _json_row(line, fallback, text_column, id_column)
        offset += len(line) + 1


def _jsonl_rows(path: str, text_column: str, id_column: str) -> Iterator[Row]:
    name = os.path.basename(path)
    lineno = -1
    try:
        for lineno, line in enumerate(iter_lines(text_chunks(path))):
            if line is None:
                yield drop_row(f"{name}:{lineno}", "too_large")
            elif line and not line.isspace():
                yield _json_row(line, f"{name}:{lineno}", text_column, id_column)
    except BadInput as e:
        yield drop_row(f"{name}:{lineno + 1}", e.reason)


def _json_row(line: bytes, fallback_id: str, text_column: str, id_column: str) -> Row:
    if line.startswith(_UTF8_BOM):  # files concatenated with their BOMs, Windows editors
        line = line[len(_UTF8_BOM) :]
    s = decode_text(line)
    bad_utf8 = s is None
    if bad_utf8:
        s = line.decode("utf-8", errors="replace")  # only to recover id and url below
    try:
        obj = _JSON.decode(s)
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]] nested too deep
        return drop_row(fallback_id, "invalid_utf8" if bad_utf8 else "invalid_json")
    if not isinstance(obj, dict):
        return drop_row(fallback_id, "invalid_json")
    # Only a \ud800-\udfff escape makes a lone surrogate, which Arrow cannot store.
    surrogates = "\\ud" in s or "\\uD" in s
    rid = id_str(obj.get(id_column))
    rid = fallback_id if rid is None else no_surrogates(rid) if surrogates else rid
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    url = obj.get("url") or meta.get("url")
    url = (no_surrogates(url) if surrogates else url) if isinstance(url, str) else None
    when = None
    for key in TIME_FIELDS:
        if key in obj:
            when = parse_time(obj[key])
            break
    if bad_utf8:
        return drop_row(rid, "invalid_utf8", url, when)
    text = obj.get(text_column)
    if text is None or text == "":
        return drop_row(rid, "missing_text", url, when)
    if not isinstance(text, str):
        return drop_row(rid, "text_not_string", url, when)
    if surrogates:
        text = no_surrogates(text)
        if text.count("\ufffd") > MAX_REPLACED_SHARE * len(text):  # as decode_text
            return drop_row(rid, "invalid_utf8", url, when)
    title = obj.get("title") or meta.get("title")
    title = title if isinstance(title, str) else None
    if title is not None and surrogates:
        title = no_surrogates(title)
    return (rid, text, None, url, title, when, "text/plain", None)
