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
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator

import pyarrow as pa

from pipeline.readers.compression import iter_lines, text_chunks
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
    path: str, batch_rows: int = 1000, *, text_column: str = "text", id_column: str = "id"
) -> Iterator[pa.Table]:
    """JSON Lines (plain, .gz or .zst) -> READ_SCHEMA batches, one row per non-blank line.

    `url` and `title` come from top-level fields or, Dolma style, from a `metadata` object;
    `fetch_time` from the first of `timestamp`, `date`, `created` present.
    """
    return batched(_jsonl_rows(path, text_column, id_column), path, batch_rows)


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
