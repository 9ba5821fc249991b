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

Not documents, skipped without a row: WARC request, metadata, warcinfo and revisit
records, non-HTTP responses (`dns:`), resource records that are not web pages (wget's
`metadata://` log), and blank JSONL lines. An empty file yields no rows, except an empty
.parquet: a Parquet file always has a footer, so 0 bytes is a failed write.

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
Duplicate ids within a file are the runner's to resolve, not the reader's.

Text must be a string. Parquet/HF `string`, `large_string`, `string_view` and
dictionary-encoded strings are read as they are; `binary` columns are decoded as UTF-8
(the read:invalid_utf8 rule above, also applied to string columns whose bytes are not
valid UTF-8); any other type is read:text_not_string, and `check_input` names such a
column at plan time. Only the mapped columns of a Parquet file are read, row group by row
group, so one broken row group costs its own rows and no others.

Tolerated without a row: a UTF-8 byte order mark at the start of a JSONL line, CRLF line
ends, raw control characters inside JSON strings, UTF-16 JSONL files (with a BOM), lone
UTF-16 surrogates in JSON escapes (replaced, under the invalid_utf8 rule). Compression is
told by magic bytes, not by name, so a .jsonl.gz that is plain text reads as plain text.

Before a run, `classify_inputs(files)` splits a listing into the files a reader handles
and (file, why) for the rest (a LICENSE, a README, WAT metadata, a .json manifest), and
`check_input(path)` reads a Parquet footer to report a user error (no text column, a text
column of numbers) before any work starts. Neither reads data: unreadable files are the
readers' to record as rows.

Usage:

    from pipeline.readers import iter_batches, iter_hf_dataset
    for table in iter_batches("../shared/data/warc/dolma/sample-0000.warc.gz"):
        ...  # pa.Table with READ_SCHEMA, <= 1000 rows

    python -m pipeline.readers FILE [FILE ...]   # rows per drop reason, and the time taken

WARC parsing is FastWARC (Rust); it runs with `auto_decode="none"` so a body cut short can
be told from a whole one by its length, and HTTP transfer and content encodings are undone
here afterwards with FastWARC's own decoders (or zlib).
"""

from __future__ import annotations

import codecs
import email.utils
import io
import itertools
import json
import math
import os
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import READ_COLUMNS, READ_SCHEMA

__all__ = [
    "READERS",
    "SUPPORTED_EXTENSIONS",
    "check_input",
    "classify_inputs",
    "detect_format",
    "iter_batches",
    "iter_hf_dataset",
    "read_html",
    "read_jsonl",
    "read_parquet",
    "read_warc",
]

_TS = READ_SCHEMA.field("fetch_time").type
_TYPES = [READ_SCHEMA.field(c).type for c in READ_COLUMNS]

# A batch is also cut when its payloads pass this size, so 1000 rows of multi-MB pages
# never pile up gigabytes in one table.
_MAX_BATCH_BYTES = 256 << 20

# One record larger than this (a JSONL line with no newline in sight, an HTML file, a WARC
# body) is read:too_large: holding it would take several times its size in memory on a
# worker sized for ordinary pages, and no pretraining document is that long.
_MAX_RECORD_BYTES = 256 << 20

# Text payloads are decoded with errors="replace" when at most this share of characters
# had to be replaced: a stray broken byte (a multi-byte character cut by some earlier tool)
# should not cost the document. Above it the text is most likely in another encoding
# (latin-1, cp1252), where every accented letter breaks and the replaced text misleads
# language id and the quality filters, so the record is dropped as read:invalid_utf8.
_MAX_REPLACED_SHARE = 0.01

# Field names that hold a fetch time in JSONL/Parquet/HF inputs, first present wins
# (C4 `timestamp`, FineWeb `date`, Dolma `created`).
_TIME_FIELDS = ("timestamp", "date", "created")

_CHUNK = 1 << 16
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)

# strict=False: raw tabs and control characters inside strings are common in hand-rolled
# dumps and cost nothing to accept. One decoder: json.loads with options builds one a call.
_JSON = json.JSONDecoder(strict=False)

Row = tuple[Any, ...]  # (id, text, html, url, title, fetch_time, content_type, drop_reason)


class _BadInput(Exception):
    """Raised inside a reader where a file stops being readable; becomes a drop row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- batching ------------------------------------------------------------------------------


def _table(rows: list[Row], source_path: str) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    cols.append([source_path] * len(rows))
    cols = cols[:7] + [cols[8], cols[7]]  # source_path sits before drop_reason
    arrays = [pa.array(c, t) for c, t in zip(cols, _TYPES, strict=True)]
    return pa.Table.from_arrays(arrays, schema=READ_SCHEMA)


def _batched(rows: Iterable[Row], source_path: str, batch_rows: int) -> Iterator[pa.Table]:
    buf: list[Row] = []
    size = 0
    for row in rows:
        buf.append(row)
        size += len(row[1] or "") + len(row[2] or b"")
        if len(buf) >= batch_rows or size >= _MAX_BATCH_BYTES:
            yield _table(buf, source_path)
            buf, size = [], 0
    if buf:
        yield _table(buf, source_path)


def _rebatch(tables: Iterable[pa.Table], batch_rows: int) -> Iterator[pa.Table]:
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


def _drop(rid: str, reason: str, url: str | None = None, when: datetime | None = None) -> Row:
    return (rid, None, None, url, None, when, None, f"read:{reason}")


# --- ids and text: one rule for every reader of keyed records ------------------------------


def _id_str(value: Any) -> str | None:
    """The id string of a JSON (or Arrow to_pylist) value; None: use the fallback id.

    The rule of the module docstring; `_arrow_ids` computes the same for whole columns.
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


def _no_surrogates(value: str) -> str:
    """`value` with each lone UTF-16 surrogate (a JSON escape like \\ud800) as one U+FFFD.

    Arrow cannot store them, so one would fail the whole batch when the table is built.
    """
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# --- small helpers ---------------------------------------------------------------------------


def _decode_text(data: bytes) -> str | None:
    """UTF-8 text, tolerating a tiny share of broken bytes (see _MAX_REPLACED_SHARE)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # Counts replacement characters that were already there too: errs toward dropping.
        if text.count("\ufffd") <= _MAX_REPLACED_SHARE * len(text):
            return text
        return None


def _parse_time(value: Any) -> datetime | None:
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


def _mime(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _clean_record_id(record_id: str) -> str:
    rid = record_id.strip().strip("<>")
    return rid[9:] if rid.startswith("urn:uuid:") else rid


# --- decompression ---------------------------------------------------------------------------


def _iter_chunks(path: str) -> Iterator[bytes]:
    """Decompressed bytes of `path` (gzip, zstd or plain, told by magic bytes, not name).

    Raises _BadInput after the last good chunk when the stream is cut or corrupt. zlib and
    zstandard are driven by hand because `gzip.GzipFile` and zstandard's `stream_reader`
    cannot both resume multi-member files and report a cut: stream_reader returns a clean
    EOF on a truncated .zst.
    """
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(_GZIP_MAGIC):
            yield from _gunzip(f)
        elif head == _ZSTD_MAGIC:
            yield from _unzstd(f)
        else:
            while chunk := f.read(1 << 20):
                yield chunk


def _gunzip(f: io.BufferedReader) -> Iterator[bytes]:
    d = zlib.decompressobj(wbits=31)
    in_member = False
    data = b""
    while True:
        if not data:
            data = f.read(_CHUNK)
            if not data:
                if in_member:
                    raise _BadInput("truncated_gzip")
                return
        in_member = True
        try:
            # Bounded output: a small .gz of repetitive text can expand a thousandfold.
            out = d.decompress(data, 8 << 20)
        except zlib.error:
            raise _BadInput("corrupt_gzip") from None
        if d.eof:
            data = d.unused_data
            d = zlib.decompressobj(wbits=31)
            in_member = False
        else:
            data = d.unconsumed_tail
        if out:
            yield out


def _unzstd(f: io.BufferedReader) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    d = dctx.decompressobj()
    in_frame = False
    data = b""
    while True:
        if not data:
            data = f.read(_CHUNK)
            if not data:
                if in_frame:
                    raise _BadInput("truncated_zstd")
                return
        in_frame = True
        try:
            out = d.decompress(data)
        except zstandard.ZstdError:
            raise _BadInput("corrupt_zstd") from None
        data = b""
        if d.eof:
            data = d.unused_data
            d = dctx.decompressobj()
            in_frame = False
        if out:
            yield out


def _utf16_as_utf8(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """UTF-16 text (byte order from its BOM) re-encoded as UTF-8, chunk by chunk."""
    decoder = codecs.getincrementaldecoder("utf-16")(errors="replace")
    for chunk in chunks:
        if out := decoder.decode(chunk):
            yield out.encode("utf-8")
    if out := decoder.decode(b"", final=True):
        yield out.encode("utf-8")


def _iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes | None]:
    """Lines split on b"\\n" only; a line spanning many chunks is joined once (no n^2).

    A line longer than _MAX_RECORD_BYTES comes out as None, and its bytes are let go as
    they arrive rather than joined: a file with no newline would otherwise be one line
    the size of the file.
    """
    limit = _MAX_RECORD_BYTES
    pending: list[bytes] = []
    size = 0
    skipping = False  # inside a line already known to be too long
    for chunk in chunks:
        lines = chunk.split(b"\n")
        tail = lines.pop()  # what follows the last newline: the start of the next line
        if lines:
            if skipping:
                yield None  # lines[0] is the end of the long line
            else:
                first = b"".join([*pending, lines[0]]) if pending else lines[0]
                yield None if len(first) > limit else first
            for line in lines[1:]:
                yield None if len(line) > limit else line
            pending, size, skipping = [], 0, False
        if not skipping and tail:
            pending.append(tail)
            size += len(tail)
            if size > limit:
                pending, size, skipping = [], 0, True
    if skipping:
        yield None
    elif pending:
        line = b"".join(pending)
        yield None if len(line) > limit else line


# --- WARC and WET ----------------------------------------------------------------------------

# FastWARC's WarcRecordType bit flags (fastwarc/warc.pyi); plain ints keep the per-record
# type test cheap and `import pipeline.readers` free of the Rust extension.
_RESPONSE, _RESOURCE, _CONVERSION = 4, 8, 128
_DOC_TYPES = _RESPONSE | _RESOURCE | _CONVERSION
_CUT_REASONS = ("read:truncated_gzip", "read:truncated_record")


def read_warc(
    path: str, batch_rows: int = 1000, *, text_column: str = "text", id_column: str = "id"
) -> Iterator[pa.Table]:
    """WARC/WET file -> READ_SCHEMA batches.

    HTTP `response` and web `resource` records give `html` (the HTTP body, de-chunked and
    content-decoded); WET `conversion` records give `text`. Either kind is read from either
    file name, so a WET file named .warc.gz still works. `text_column` and `id_column` do
    not apply to WARC; they are accepted so every reader has one signature.
    """
    return _batched(_warc_rows(path), path, batch_rows)


def _warc_rows(path: str) -> Iterator[Row]:
    from fastwarc.stream_io import GzipReader
    from fastwarc.warc import ArchiveIterator

    name = os.path.basename(path)
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    # Where to pick up again after a broken record: the next gzip member or WARC header.
    marker = b"\x1f\x8b\x08" if gz else b"WARC/1."
    index = 0  # ordinal of document records, for ids of records without WARC-Record-ID
    start = 0  # byte offset the current ArchiveIterator started at (moves on resync)
    seen_since_error = True
    # The newest row is held back one step: when the file turns out to end inside that
    # very record, its "malformed" verdict becomes "truncated" instead of a second row.
    held: Row | None = None
    held_at = -1
    while True:
        last = start  # offset of the last record seen, any type (gzip: its member)
        stream: Any = None
        raw = open(path, "rb")  # noqa: SIM115 - a generator spans it; closed in finally
        try:
            raw.seek(start)
            stream = GzipReader(raw) if gz else raw
            # parse_http=False: request records would be parsed for nothing; responses
            # parse their HTTP headers in _warc_row.
            for rec in ArchiveIterator(stream, parse_http=False, stream_detect=False):
                last = stream.frame_start_position() if gz else rec.stream_pos
                seen_since_error = True
                if int(rec.record_type) & _DOC_TYPES:
                    row = _warc_row(rec, name, index, gz)
                    index += 1
                    if row is not None:
                        if held is not None:
                            yield held
                        held, held_at = row, last
                        if row[7] in _CUT_REASONS:
                            break
            if gz:
                last = stream.frame_start_position() or last
        except OSError:
            # A record that does not parse, or gzip data that does not inflate. FastWARC
            # cannot go on past it, so one row records the loss and reading resumes at
            # the next gzip member (or WARC header) after the broken one.
            if held is not None:
                yield held
                held = None
            frame = stream.frame_start_position() if gz and stream is not None else None
            frame = last if frame is None else frame
            nxt = _find(path, marker, max(start, last, frame) + 1)
            if seen_since_error:
                reason = gz and _member_problem(path, frame)
                if not reason and nxt is None:  # the file ends inside the broken record
                    reason = _tail_problem(path, last, gz)
                yield _drop(f"{name}:{index}", reason or "malformed_record")
                index += 1
            seen_since_error = False
            if nxt is None:
                return
            start = nxt
            continue
        finally:
            raw.close()
        # A cut inside WARC headers ends FastWARC's iteration silently, so the end of the
        # file is checked on its own, from the start of the last record seen.
        cut = held is not None and held[7] in _CUT_REASONS
        reason = None if cut else _tail_problem(path, last, gz)
        if reason and held is not None and held_at == last and held[7] == "read:malformed_record":
            held, reason = (*held[:7], f"read:{reason}"), None
        if held is not None:
            yield held
        if reason:
            yield _drop(f"{name}:{index}", reason)
        return


def _warc_row(rec: Any, name: str, index: int, gz: bool) -> Row | None:
    """One response/resource/conversion record -> row; None when it is not a document."""
    rtype = int(rec.record_type)
    headers = rec.headers
    url = headers.get("WARC-Target-URI")
    if url and url[0] == "<":  # wget writes <uri> (the WARC 1.0 grammar)
        url = url.strip("<>")
    if rtype == _RESPONSE:
        if not rec.is_http:
            return None  # dns: lookups and other non-HTTP captures
    elif rtype == _RESOURCE and not (url and url.startswith("http")):
        return None  # crawler logs and arguments (wget's metadata://...)
    rid = rec.record_id
    rid = _clean_record_id(rid) if rid else f"{name}:{index}"
    when = rec.record_date  # None when WARC-Date is missing or invalid
    if headers.get("Content-Length") is None:
        return _drop(rid, "malformed_record", url, when)  # also: cut inside the header
    if rec.content_length > _MAX_RECORD_BYTES:
        return _drop(rid, "too_large", url, when)  # its body is skipped, never read

    http = None
    if rtype == _RESPONSE:
        try:
            rec.parse_http()
        except OSError:
            return _drop(rid, "malformed_record", url, when)
        http = rec.http_headers
        status = http.status_code
        if status is None:
            return _drop(rid, "malformed_record", url, when)
        if not 200 <= status < 300:
            return _drop(rid, "http_status", url, when)
        ctype = rec.http_content_type
        ctype = ctype.lower() if ctype else None
    else:
        ctype = _mime(headers.get("Content-Type"))

    body = rec.reader.read()
    if len(body) < rec.content_length:  # FastWARC hands out a cut body without complaint
        return _drop(rid, "truncated_gzip" if gz else "truncated_record", url, when)
    if http is not None:
        te = http.get("Transfer-Encoding")
        ce = http.get("Content-Encoding")
        if te or ce:  # Common Crawl stores decoded bodies; wget and warcio keep them raw
            body = _decode_http_body(body, te, ce)
            if body is None:
                return _drop(rid, "bad_encoding", url, when)
    if not body:
        return _drop(rid, "empty_payload", url, when)

    if rtype == _CONVERSION:
        text = _decode_text(body)
        if text is None:
            return _drop(rid, "invalid_utf8", url, when)
        return (rid, text, None, url, None, when, ctype or "text/plain", None)
    return (rid, None, body, url, None, when, ctype, None)


def _decode_http_body(body: bytes, te: str | None, ce: str | None) -> bytes | None:
    """Undo chunked transfer and gzip/deflate/br/zstd content encoding; None if broken."""
    from fastwarc.stream_io import BrotliReader, ChunkedReader

    try:
        if te and "chunked" in te.lower():
            body = ChunkedReader(io.BytesIO(body)).read()
        ce = (ce or "").strip().lower()
        if ce in ("gzip", "x-gzip", "deflate"):
            try:
                body = zlib.decompressobj(wbits=47).decompress(body)  # gzip or zlib
            except zlib.error:
                if body[:2] == _GZIP_MAGIC:
                    raise
                # Raw deflate from some servers; or a crawler stored the decoded body and
                # kept the header, and the bytes are the page as they are.
                try:
                    body = zlib.decompressobj(wbits=-15).decompress(body)
                except zlib.error:
                    if body[:1] == b"\x78":  # a zlib header: really compressed, really broken
                        raise
        elif ce == "br":
            body = BrotliReader(io.BytesIO(body)).read()
        elif ce == "zstd":
            import zstandard

            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    except (OSError, zlib.error, ValueError, ImportError):
        return None
    return body


def _find(path: str, marker: bytes, start: int) -> int | None:
    """Offset of the first `marker` at or after `start`, or None."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, tail = start, b""
        while chunk := f.read(1 << 20):
            buf = tail + chunk
            i = buf.find(marker)
            if i >= 0:
                return pos - len(tail) + i
            tail = buf[-(len(marker) - 1) :]
            pos += len(chunk)
    return None


def _member_problem(path: str, start: int, members: int | None = 1) -> str | None:
    """Why the gzip member(s) at `start` do not inflate to their end marker, or None.

    `members=None` checks every member to the end of the file.
    """
    with open(path, "rb") as f:
        f.seek(start)
        d = zlib.decompressobj(wbits=31)
        data = b""
        while True:
            if not data:
                data = f.read(_CHUNK)
                if not data:
                    return "truncated_gzip"
            try:
                d.decompress(data, 1 << 20)  # output dropped: only the end marker matters
            except zlib.error:
                return "corrupt_gzip"
            data = d.unconsumed_tail
            if d.eof:
                if members is not None:
                    members -= 1
                    if members == 0:
                        return None
                data = d.unused_data
                if not data and not f.peek(1):
                    return None
                d = zlib.decompressobj(wbits=31)


def _tail_problem(path: str, last: int, gz: bool) -> str | None:
    """Why the file does not end with whole records from offset `last` on, or None.

    gzip: `last` is the member FastWARC was in at the end; it and any after it must reach
    their end markers (one member per file, or a second pass over a file written as one
    member). Plain WARC: the last record's Content-Length must fit in the file, with only
    whitespace after it.
    """
    size = os.path.getsize(path)
    if last >= size:
        return None
    if gz:
        return _member_problem(path, last, members=None)
    with open(path, "rb") as f:
        f.seek(last)
        head = f.read(64 << 10)
        if not head.strip():
            return None
        end = head.find(b"\r\n\r\n")
        length = None
        for line in head[: max(end, 0)].split(b"\r\n"):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value)
        if end < 0 or length is None:
            return "truncated_record"
        body_end = last + end + 4 + length
        if body_end > size:
            return "truncated_record"
        f.seek(body_end)
        rest = f.read(1 << 16)
    return "truncated_record" if rest.strip() else None


# --- JSONL -----------------------------------------------------------------------------------


def read_jsonl(
    path: str, batch_rows: int = 1000, *, text_column: str = "text", id_column: str = "id"
) -> Iterator[pa.Table]:
    """JSON Lines (plain, .gz or .zst) -> READ_SCHEMA batches, one row per non-blank line.

    `url` and `title` come from top-level fields or, Dolma style, from a `metadata` object;
    `fetch_time` from the first of `timestamp`, `date`, `created` present.
    """
    return _batched(_jsonl_rows(path, text_column, id_column), path, batch_rows)


def _jsonl_rows(path: str, text_column: str, id_column: str) -> Iterator[Row]:
    name = os.path.basename(path)
    lineno = -1
    try:
        for lineno, line in enumerate(_iter_lines(_text_chunks(path))):
            if line is None:
                yield _drop(f"{name}:{lineno}", "too_large")
            elif line and not line.isspace():
                yield _json_row(line, f"{name}:{lineno}", text_column, id_column)
    except _BadInput as e:
        yield _drop(f"{name}:{lineno + 1}", e.reason)


def _text_chunks(path: str) -> Iterator[bytes]:
    """Decompressed chunks of `path` as UTF-8 (a UTF-16 file, told by its BOM, re-encoded)."""
    chunks = _iter_chunks(path)
    first = next(chunks, b"")
    if first[:2] in _UTF16_BOMS:
        yield from _utf16_as_utf8(itertools.chain([first], chunks))
    else:
        yield first
        yield from chunks


def _json_row(line: bytes, fallback_id: str, text_column: str, id_column: str) -> Row:
    if line.startswith(_UTF8_BOM):  # files concatenated with their BOMs, Windows editors
        line = line[len(_UTF8_BOM) :]
    s = _decode_text(line)
    bad_utf8 = s is None
    if bad_utf8:
        s = line.decode("utf-8", errors="replace")  # only to recover id and url below
    try:
        obj = _JSON.decode(s)
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]] nested too deep
        return _drop(fallback_id, "invalid_utf8" if bad_utf8 else "invalid_json")
    if not isinstance(obj, dict):
        return _drop(fallback_id, "invalid_json")
    # Only a \ud800-\udfff escape makes a lone surrogate, which Arrow cannot store.
    surrogates = "\\ud" in s or "\\uD" in s
    rid = _id_str(obj.get(id_column))
    rid = fallback_id if rid is None else _no_surrogates(rid) if surrogates else rid
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    url = obj.get("url") or meta.get("url")
    url = (_no_surrogates(url) if surrogates else url) if isinstance(url, str) else None
    when = None
    for key in _TIME_FIELDS:
        if key in obj:
            when = _parse_time(obj[key])
            break
    if bad_utf8:
        return _drop(rid, "invalid_utf8", url, when)
    text = obj.get(text_column)
    if text is None or text == "":
        return _drop(rid, "missing_text", url, when)
    if not isinstance(text, str):
        return _drop(rid, "text_not_string", url, when)
    if surrogates:
        text = _no_surrogates(text)
        if text.count("\ufffd") > _MAX_REPLACED_SHARE * len(text):  # as _decode_text
            return _drop(rid, "invalid_utf8", url, when)
    title = obj.get("title") or meta.get("title")
    title = title if isinstance(title, str) else None
    if title is not None and surrogates:
        title = _no_surrogates(title)
    return (rid, text, None, url, title, when, "text/plain", None)


# --- Parquet and Hugging Face datasets (Arrow in, Arrow out, no per-row Python) --------------


def read_parquet(
    path: str, batch_rows: int = 1000, *, text_column: str = "text", id_column: str = "id"
) -> Iterator[pa.Table]:
    """Parquet -> READ_SCHEMA batches of `batch_rows` rows (the last one fewer).

    Reads only the columns it maps, row group by row group and batch by batch inside a
    group, so a row group that does not decode costs only the rows it did not yield: they
    become read:corrupt_parquet rows, as many as the footer says the group holds, with the
    ids a clean read would give them. A file whose footer does not decode is one such row.
    """
    return _rebatch(_parquet_tables(path, batch_rows, text_column, id_column), batch_rows)


# What pyarrow raises for Parquet bytes that do not decode (thrift, snappy, page checksum,
# short reads). FileNotFoundError is an OSError too, but a file deleted under the reader is
# not corrupt data: it propagates.
_PARQUET_ERRORS = (pa.ArrowException, OSError)


def _parquet_tables(
    path: str, batch_rows: int, text_column: str, id_column: str
) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    try:
        # Page checksums, where the writer stored them, turn silent bit rot into an error.
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except FileNotFoundError:
        raise
    except _PARQUET_ERRORS:
        yield _lost_rows(path, name, 0, 1)  # 0 bytes, cut short, not Parquet at all
        return
    try:
        meta = pf.metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        names = pf.schema_arrow.names
        if min(groups, default=0) < 0 or sum(groups) != meta.num_rows:
            # The footer decodes but contradicts itself (a flipped bit): its counts cannot
            # be trusted to say how many documents a broken group held.
            raise pa.ArrowInvalid(f"{path}: row group counts do not add up to num_rows")
    except _PARQUET_ERRORS:
        pf.close()
        yield _lost_rows(path, name, 0, 1)
        return
    try:
        columns = _input_columns(names, path, text_column, id_column)
        offset = 0
        for group, n in enumerate(groups):
            done = 0
            batches = pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)
            while True:
                try:
                    batch = next(batches)
                    _check_decoded(batch)
                    table = pa.Table.from_batches([batch])
                    table = _to_read_table(table, path, name, offset + done, text_column, id_column)
                except StopIteration:
                    break
                except FileNotFoundError:
                    raise
                except _PARQUET_ERRORS:
                    break  # the rest of this group is lost; the next group may be fine
                yield table
                done += batch.num_rows
            for start in range(offset + done, offset + n, batch_rows):
                yield _lost_rows(path, name, start, min(start + batch_rows, offset + n))
            offset += max(n, done)
    finally:
        pf.close()


def _check_decoded(batch: pa.RecordBatch) -> None:
    """Raise ArrowInvalid where pyarrow decoded garbage without noticing.

    A broken page can decode into dictionary indices past the dictionary's end, which
    would fail later, in some stage. String columns get the cheap check only: their UTF-8
    is the text and id rules' to judge, row by row.
    """
    for col in batch.columns:
        col.validate(full=not _is_stringlike(col.type))


def _lost_rows(path: str, name: str, start: int, stop: int) -> pa.Table:
    """read:corrupt_parquet rows for rows start..stop-1 of a Parquet file."""
    n = stop - start
    return pa.Table.from_arrays(
        [
            _fallback_ids(name, start, n),
            pa.nulls(n, pa.large_string()),
            pa.nulls(n, pa.large_binary()),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()),
            pa.nulls(n, _TS),
            pa.nulls(n, pa.string()),
            _repeat(path, n),
            _repeat("read:corrupt_parquet", n),
        ],
        schema=READ_SCHEMA,
    )


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """A folder written by `datasets` `save_to_disk` (a Dataset or a DatasetDict)."""
    p = Path(path)
    return p.is_dir() and any(
        (p / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")
    )


def iter_hf_dataset(
    name_or_path: str,
    split: str = "train",
    text_column: str = "text",
    id_column: str = "id",
    batch_rows: int = 1000,
) -> Iterator[pa.Table]:
    """A Hugging Face dataset -> READ_SCHEMA batches.

    A directory written by `save_to_disk` is opened with `datasets.load_from_disk` (a
    DatasetDict is indexed by `split`); anything else (a hub name, a local folder of data
    files) is streamed with `load_dataset(..., streaming=True)`, so nothing is downloaded
    in full first. Fallback ids are "<name>:<split>:<row>"; ids and text follow the rules
    of the module docstring, as in Parquet.
    """
    import datasets

    p = Path(name_or_path)
    if is_saved_dataset(p):
        ds: Any = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(
                    f"{name_or_path}: no split {split!r}; it has {sorted(ds)} (pass split=)"
                )
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name_or_path, split=split, streaming=True)
    if ds.column_names is not None:  # None for some streamed sources until read
        ds = ds.select_columns(
            _input_columns(ds.column_names, name_or_path, text_column, id_column)
        )
    name = f"{p.name or name_or_path}:{split}"
    offset = 0
    for table in ds.with_format("arrow").iter(batch_size=batch_rows):
        yield _to_read_table(table, name_or_path, name, offset, text_column, id_column)
        offset += table.num_rows


def _input_columns(names: list[str], where: str, text_column: str, id_column: str) -> list[str]:
    """Columns to read; a clear error when the text column is absent (a config mistake)."""
    if text_column not in names:
        raise ValueError(
            f"{where}: no text column {text_column!r}; columns are {_names(names)}. "
            "Pass text_column= naming the column that holds the document text."
        )
    wanted = [text_column, id_column, "url", "title"]
    wanted += [next((c for c in _TIME_FIELDS if c in names), "")]
    return [c for c in dict.fromkeys(wanted) if c in names]


def _names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}, ... {len(names) - limit} more]" if len(names) > limit else f"[{shown}]"


def _to_read_table(
    table: pa.Table, source: str, name: str, offset: int, text_column: str, id_column: str
) -> pa.Table:
    n = table.num_rows
    names = table.column_names
    _input_columns(names, source, text_column, id_column)  # streamed sources check here
    text, reason = _arrow_text(_column(table, text_column))
    ids = _arrow_ids(_column(table, id_column)) if id_column in names else None
    if ids is None or ids.null_count:
        fallback = _fallback_ids(name, offset, n)
        ids = fallback if ids is None else pc.coalesce(ids, fallback)
    time_col = next((c for c in _TIME_FIELDS if c in names), None)
    return pa.Table.from_arrays(
        [
            ids,
            text,
            pa.nulls(n, pa.large_binary()),
            _as_string(table, "url"),
            _as_string(table, "title"),
            _arrow_time(_column(table, time_col)) if time_col else pa.nulls(n, _TS),
            _repeat("text/plain", n),
            _repeat(source, n),
            reason,
        ],
        schema=READ_SCHEMA,
    )


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    """The first column called `name` (`table[name]` refuses a name that appears twice)."""
    return table.column(table.column_names.index(name))


def _repeat(value: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, pa.string()), n)


def _fallback_ids(name: str, start: int, n: int) -> Any:
    """ "<name>:<row>" for rows start..start+n-1, built in Arrow."""
    rows = pc.cast(pa.array(np.arange(start, start + n, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(f"{name}:", rows, "")


def _decoded(col: Any) -> Any:
    """A dictionary-encoded column as plain values (Parquet keeps Arrow's dictionaries)."""
    t = col.type
    return pc.cast(col, t.value_type) if pa.types.is_dictionary(t) else col


def _is_stringlike(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binarylike(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    )


def _can_hold_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return _is_stringlike(t) or _is_binarylike(t) or pa.types.is_null(t)


def _as_utf8(col: Any, decode: Callable[[bytes], str | None]) -> tuple[Any, Any]:
    """A string or binary column as valid large_string, and which rows `decode` refused.

    Parquet does not check that a string column holds UTF-8 (a later `to_pylist` would
    fail on it), so strings are validated too. Only a batch that holds invalid bytes is
    decoded row by row in Python; the mask is None when there was none.
    """
    if _is_stringlike(col.type):
        text = pc.cast(col, pa.large_string())
        try:
            text.validate(full=True)
            return text, None
        except pa.ArrowInvalid:
            raw = pc.cast(col, pa.large_binary())
    else:
        if pa.types.is_fixed_size_binary(col.type):
            col = pc.cast(col, pa.large_binary())
        try:
            return pc.cast(col, pa.large_string()), None  # the cast checks the UTF-8
        except pa.ArrowInvalid:
            raw = pc.cast(col, pa.large_binary())
    values = raw.to_pylist()
    decoded = [None if b is None else decode(b) for b in values]
    refused = [b is not None and d is None for b, d in zip(values, decoded, strict=True)]
    return pa.array(decoded, pa.large_string()), pa.array(refused, pa.bool_())


def _arrow_text(col: Any) -> tuple[Any, Any]:
    """The text column as large_string (null when dropped) and each row's drop reason."""
    n = len(col)
    col = _decoded(col)
    none = pa.scalar(None, pa.string())
    if not _can_hold_text(col.type) or pa.types.is_null(col.type):
        reason = pc.if_else(pc.is_valid(col), "read:text_not_string", "read:missing_text")
        return pa.nulls(n, pa.large_string()), reason
    text, refused = _as_utf8(col, _decode_text)
    missing = pc.fill_null(pc.equal(pc.binary_length(text), 0), True)
    reason = pc.if_else(missing, pa.scalar("read:missing_text"), none)
    if refused is not None:
        reason = pc.if_else(refused, pa.scalar("read:invalid_utf8"), reason)
    return pc.if_else(missing, pa.scalar(None, pa.large_string()), text), reason


def _arrow_ids(col: Any) -> Any:
    """Ids by the rule of the module docstring, as strings; null where the fallback applies.

    Computed in Arrow for every common type; the rare ones (fractional floats, nested
    values) go through `_id_str`, the JSONL rule itself, so the readers cannot drift apart.
    """
    col = _decoded(col)
    t = col.type
    try:
        if pa.types.is_null(t):
            return pa.nulls(len(col), pa.string())
        if _is_stringlike(t) or _is_binarylike(t):
            ids = pc.cast(_as_utf8(col, lambda b: b.decode("utf-8", "replace"))[0], pa.string())
        elif pa.types.is_integer(t):
            ids = pc.cast(col, pa.string())
        elif pa.types.is_boolean(t):
            ids = pc.if_else(col, "true", "false")
        elif pa.types.is_floating(t) or (pa.types.is_decimal(t) and t.scale > 0):
            ids = _float_ids(pc.cast(col, pa.float64()))
        elif pa.types.is_decimal(t) or pa.types.is_temporal(t):
            ids = pc.cast(col, pa.string())
        else:
            ids = pa.array([_id_str(v) for v in col.to_pylist()], pa.string())
    except (pa.ArrowException, ValueError, TypeError):
        # A type with no string form in this pyarrow: every row gets its fallback id,
        # which loses the input's ids but not its documents.
        return pa.nulls(len(col), pa.string())
    return pc.if_else(pc.equal(ids, ""), pa.scalar(None, pa.string()), ids)


def _float_ids(f: Any) -> Any:
    """Float ids as `_id_str` writes them: integral values (below 2**53, exact) as integers."""
    exact = pc.and_(pc.equal(pc.floor(f), f), pc.less(pc.abs(f), 2.0**53))
    if pc.any(pc.and_(pc.invert(exact), pc.is_finite(f))).as_py():
        return pa.array([_id_str(v) for v in f.to_pylist()], pa.string())
    ints = pc.cast(pc.cast(pc.if_else(exact, f, 0.0), pa.int64()), pa.string())
    return pc.if_else(exact, ints, pa.scalar(None, pa.string()))


def _as_string(table: pa.Table, column: str) -> Any:
    """A url/title column as valid strings; all null when it is not text at all."""
    n = table.num_rows
    if column not in table.column_names:
        return pa.nulls(n, pa.string())
    col = _decoded(_column(table, column))
    try:
        if _is_stringlike(col.type) or _is_binarylike(col.type):
            return pc.cast(_as_utf8(col, lambda b: b.decode("utf-8", "replace"))[0], pa.string())
        return pc.cast(col, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.nulls(n, pa.string())  # e.g. a struct column named "title": not ours


def _arrow_time(col: Any) -> Any:
    """Any timestamp/date/string column -> timestamp[us, UTC]; unparseable values -> null."""
    col = _decoded(col)
    t = col.type
    try:
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            if pa.types.is_timestamp(t) and t.tz is None:
                col = pc.cast(col, pa.timestamp("us"), safe=False)  # naive: taken as UTC
            return pc.cast(col, _TS, safe=False)
        if _is_stringlike(t) or _is_binarylike(t):
            col = pc.cast(_as_utf8(col, lambda b: b.decode("utf-8", "replace"))[0], pa.string())
            for target in (_TS, pa.timestamp("us")):  # with a zone, then naive (as UTC)
                try:
                    return pc.cast(pc.cast(col, target), _TS)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    pass
            return pa.array([_parse_time(v) for v in col.to_pylist()], _TS)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        pass  # a time nobody can read costs the time, not the document
    return pa.nulls(len(col), _TS)


# --- HTML files ------------------------------------------------------------------------------


def read_html(
    path: str, batch_rows: int = 1000, *, text_column: str = "text", id_column: str = "id"
) -> Iterator[pa.Table]:
    """One .html/.htm(.gz) file -> one row with the raw bytes in `html` (id "<name>:0")."""
    name = os.path.basename(path)
    parts: list[bytes] = []
    size = 0
    try:
        for chunk in _iter_chunks(path):
            parts.append(chunk)
            size += len(chunk)
            if size > _MAX_RECORD_BYTES:
                yield _table([_drop(f"{name}:0", "too_large")], path)
                return
    except _BadInput as e:
        yield _table([_drop(f"{name}:0", e.reason)], path)
        return
    if size:
        body = b"".join(parts)
        yield _table([(f"{name}:0", None, body, None, None, None, "text/html", None)], path)


# --- dispatch --------------------------------------------------------------------------------

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

SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(sorted(READERS, key=len, reverse=True))

# Files met in crawl and dataset folders that hold no documents, by how their name ends.
_NOT_INPUTS: tuple[tuple[str, str], ...] = (
    (".wat.gz", "a WAT file: crawl metadata (links, headers), not documents"),
    (".wat", "a WAT file: crawl metadata (links, headers), not documents"),
    (".paths.gz", "a list of crawl file paths, not documents"),
    (".cdx.gz", "a CDX index of a crawl, not documents"),
    (".cdx", "a CDX index of a crawl, not documents"),
    (".json", "a .json file (one JSON value, most often a manifest); JSON Lines are .jsonl"),
    (".crc", "a checksum file"),
)
_COMPRESSIONS = (".bz2", ".xz", ".lz4", ".zip", ".tar", ".tgz", ".7z", ".br", ".lzma")


def _unsupported(path: str) -> str | None:
    """Why no reader handles `path`, in a few words; None when one does."""
    if os.path.isdir(path):
        if is_saved_dataset(path):
            return "a directory holding a saved Hugging Face dataset (read it with iter_hf_dataset)"
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


def detect_format(path: str | os.PathLike[str]) -> str:
    """The READERS key (extension) of `path`; ValueError naming what is supported."""
    p = os.fspath(path)
    why = _unsupported(p)
    if why is None:
        lower = os.path.basename(p).lower()
        # longest first, so .warc.wet.gz beats .warc.gz
        return next(ext for ext in SUPPORTED_EXTENSIONS if lower.endswith(ext))
    if why == "a directory":
        raise ValueError(f"{p} is a directory; pass its files (expand the glob first)")
    raise ValueError(
        f"cannot read {p}: {why}. Supported extensions: {', '.join(sorted(READERS))}; "
        "Hugging Face datasets go through iter_hf_dataset()."
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
    a rule (module docstring), so the id column never makes an error.
    """
    p = os.fspath(path)
    why = _unsupported(p)
    if why is not None:
        return f"{p}: {why}"
    if not os.path.exists(p):
        return f"{p}: no such file"
    if detect_format(p) != ".parquet":
        return None
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(p)
    except _PARQUET_ERRORS:
        return None
    names = schema.names
    if {"id", "drop_reason"} <= set(names):
        return None  # a stage output: pipeline.io reads it, not this module
    textual = [f.name for f in schema if _can_hold_text(f.type)]
    if text_column not in names:
        return (
            f"{p}: no text column {text_column!r}; its columns are {_names(names)}. "
            f"Set text_column to the one that holds the document text"
            + (f" (string columns: {_names(textual)})." if textual else ".")
        )
    t = schema.field(names.index(text_column)).type
    if not _can_hold_text(t):
        return (
            f"{p}: text column {text_column!r} is {t}, which cannot hold text. "
            f"Set text_column to a string column"
            + (f" (it has {_names(textual)})." if textual else " (it has none).")
        )
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


def iter_batches(
    path: str | os.PathLike[str],
    batch_rows: int = 1000,
    *,
    text_column: str = "text",
    id_column: str = "id",
    unique_ids: UniqueIds | None = None,
) -> Iterator[pa.Table]:
    """Stream `path` as READ_SCHEMA tables of at most `batch_rows` rows, with ids unique
    within the file (`UniqueIds`; pass one to read its count).

    The reader is chosen by extension (see READERS). Unreadable records come back as rows
    with a `read:` drop reason, never as an exception; a missing file, a directory, an
    unknown extension or a Parquet file without the text column raise, since those are
    mistakes in the call, not in the data (`classify_inputs` and `check_input` find them
    before a run).
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    p = os.fspath(path)
    reader = READERS[detect_format(p)]
    if not os.path.exists(p):
        raise FileNotFoundError(f"no such input file: {p}")
    unique = unique_ids if unique_ids is not None else UniqueIds()
    for table in reader(p, batch_rows, text_column=text_column, id_column=id_column):
        yield unique(table)


def _main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m pipeline.readers FILE [FILE ...]", file=sys.stderr)
        return 2
    rc = 0
    for path in argv:
        problem = check_input(path)
        if problem:
            print(problem, file=sys.stderr)
            rc = 1
            continue
        reasons: Counter[str | None] = Counter()
        t0 = time.perf_counter()
        for table in iter_batches(path):
            for item in table["drop_reason"].value_counts().to_pylist():
                reasons[item["values"]] += item["counts"]
        dt = time.perf_counter() - t0
        n = sum(reasons.values())
        print(f"{path}: {n} rows in {dt:.3f} s")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {reason or 'kept'}: {count}")
    return rc


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
