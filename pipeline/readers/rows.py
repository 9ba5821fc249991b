"""Rows and tables every reader builds: READ_SCHEMA tables, drop rows, ids, text, times.

Why one module: the readers of different formats must agree on what a row is, how an id
is written and when text is too broken to keep, or the same document would get a
different id (and a different dedup and edu sample) depending on its file format.

Ids are strings, by one rule in every reader of keyed records (JSONL, Parquet, HF):

    string                  as it is
    integer                 decimal, so 7 and "7" are the same id "7"
    float                   an integral value as an integer (7.0 -> "7": pandas turns an
                            integer id column with a null into floats); otherwise Python's
                            shortest round-trip form ("0.5", "1e-07")
    bool                    "true" or "false"
    list, object, struct    compact JSON with sorted keys: {"a":1,"b":[2]}
    date, timestamp         Arrow's string form (Parquet/HF only; JSON has no dates)
    null, absent, "", NaN   the fallback "<file name>:<row>": the line number in a JSONL file
                            (blank lines counted), the row number in a Parquet file (from
                            its first row), "<name>:<split>:<row>" in an HF dataset

WARC ids are the WARC-Record-ID without `<urn:uuid:...>`, or "<file name>:<record>".
Duplicate ids within a file are made unique by `UniqueIds`, which `iter_batches` applies.

    from pipeline.readers.rows import batched, drop_row
    yield from batched((drop_row("f.jsonl:3", "invalid_json"),), "f.jsonl", 1000)
"""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipeline.schema import READ_COLUMNS, READ_SCHEMA

TIME_TYPE = READ_SCHEMA.field("fetch_time").type
_TYPES = [READ_SCHEMA.field(c).type for c in READ_COLUMNS]

# A batch is also cut when its payloads pass this size, so 1000 rows of multi-MB pages
# never pile up gigabytes in one table.
_MAX_BATCH_BYTES = 256 << 20

MAX_RECORD_BYTES = 256 << 20
"""One record larger than this (a JSONL line with no newline in sight, an HTML file, a WARC
body) is read:too_large: holding it would take several times its size in memory on a
worker sized for ordinary pages, and no pretraining document is that long. Readers look it
up here at call time (`rows.MAX_RECORD_BYTES`), so a test can lower it in one place."""

MAX_REPLACED_SHARE = 0.01
"""Text payloads are decoded with errors="replace" when at most this share of characters
had to be replaced: a stray broken byte (a multi-byte character cut by some earlier tool)
should not cost the document. Above it the text is most likely in another encoding
(latin-1, cp1252), where every accented letter breaks and the replaced text misleads
language id and the quality filters, so the record is dropped as read:invalid_utf8."""

TIME_FIELDS = ("timestamp", "date", "created")
"""Field names that hold a fetch time in JSONL/Parquet/HF inputs, first present wins
(C4 `timestamp`, FineWeb `date`, Dolma `created`)."""

Row = tuple[Any, ...]  # (id, text, html, url, title, fetch_time, content_type, drop_reason)


class BadInput(Exception):
    """Raised inside a reader where a file stops being readable; becomes a drop row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- batching ------------------------------------------------------------------------------


def rows_table(rows: list[Row], source_path: str) -> pa.Table:
    """A READ_SCHEMA table of `rows`, every row from `source_path`."""
    cols = list(zip(*rows, strict=True))
    cols.append([source_path] * len(rows))
    cols = cols[:7] + [cols[8], cols[7]]  # source_path sits before drop_reason
    arrays = [pa.array(c, t) for c, t in zip(cols, _TYPES, strict=True)]
    return pa.Table.from_arrays(arrays, schema=READ_SCHEMA)


def batched(rows: Iterable[Row], source_path: str, batch_rows: int) -> Iterator[pa.Table]:
    """`rows` as tables of at most `batch_rows` rows (fewer when the payloads grow large)."""
    buf: list[Row] = []
    size = 0
    for row in rows:
        buf.append(row)
        size += len(row[1] or "") + len(row[2] or b"")
        if len(buf) >= batch_rows or size >= _MAX_BATCH_BYTES:
            yield rows_table(buf, source_path)
            buf, size = [], 0
    if buf:
        yield rows_table(buf, source_path)


def rebatch(tables: Iterable[pa.Table], batch_rows: int) -> Iterator[pa.Table]:
    """Tables of exactly `batch_rows` rows (the last one fewer), in order.

    Parquet is read row group by row group, so a file of many small groups would otherwise
    hand the stages after it many small batches.
    """
    buf: list[pa.Table] = []
    held = 0
    for table in tables:
        if not table.num_rows:
            continue
        buf.append(table)
        held += table.num_rows
        while held >= batch_rows:
            whole = buf[0] if len(buf) == 1 else pa.concat_tables(buf)
            yield whole.slice(0, batch_rows).combine_chunks()
            rest = whole.slice(batch_rows)
            buf, held = ([rest] if rest.num_rows else []), rest.num_rows
    if buf:
        yield (buf[0] if len(buf) == 1 else pa.concat_tables(buf)).combine_chunks()


def drop_row(rid: str, reason: str, url: str | None = None, when: datetime | None = None) -> Row:
    """The row of a record that could not be read: `read:<reason>`, no text or html."""
    return (rid, None, None, url, None, when, None, f"read:{reason}")


# --- ids, text and times: one rule for every reader of keyed records -----------------------


def id_str(value: Any) -> str | None:
    """The id string of a JSON (or Arrow to_pylist) value; None: use the fallback id.

    The rule of the module docstring; `pipeline.readers.arrow` computes the same for whole
    columns.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def no_surrogates(value: str) -> str:
    """`value` with each lone UTF-16 surrogate (a JSON escape like \\ud800) as one U+FFFD.

    Arrow cannot store them, so one would fail the whole batch when the table is built.
    """
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def decode_text(data: bytes) -> str | None:
    """UTF-8 text, tolerating a tiny share of broken bytes (see MAX_REPLACED_SHARE)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # Counts replacement characters that were already there too: errs toward dropping.
        if text.count("\ufffd") <= MAX_REPLACED_SHARE * len(text):
            return text
        return None


def parse_time(value: Any) -> datetime | None:
    """A UTC datetime from an ISO 8601 or RFC 2822 string; None when it does not parse."""
    if isinstance(value, datetime):
        when = value
    elif not isinstance(value, str) or not value:
        return None  # numbers are ambiguous (seconds? ms?), so they are not guessed
    else:
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    try:
        # In UTC now, so year 1 at +14:00 fails here and not later as an Arrow year 0
        return when.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


class UniqueIds:
    """Makes the ids of one file unique, in reading order: the second "7" becomes "7#1",
    the third "7#2" (skipping any suffix the file itself holds), and counts them. Every
    reading path applies it (`iter_batches`), so the runner, dedup's global pass and the
    edu sample all see the same ids. State: one 64-bit hash per id of the file, never the
    ids themselves."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self.renamed = 0

    def __call__(self, table: pa.Table) -> pa.Table:
        import xxhash

        ids = table["id"].to_pylist()
        seen, digest = self._seen, xxhash.xxh64_intdigest
        changed = False
        for i, rid in enumerate(ids):
            h = digest(rid.encode("utf-8", "surrogatepass"))
            if h in seen:
                k = 1
                while (h := digest(f"{rid}#{k}".encode("utf-8", "surrogatepass"))) in seen:
                    k += 1
                ids[i] = f"{rid}#{k}"
                self.renamed += 1
                changed = True
            seen.add(h)
        if not changed:
            return table
        idx = table.column_names.index("id")
        return table.set_column(idx, table.schema.field(idx), pa.array(ids, pa.string()))
