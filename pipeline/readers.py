"""Readers: every supported input file becomes a stream of `READ_SCHEMA` tables.

Primer ingests web crawls (WARC, WET), text dumps (JSONL, Parquet, Hugging Face datasets)
and loose HTML files. Each reader streams its file in batches of at most `batch_rows` rows,
every batch with exactly the columns and types of `pipeline.schema.READ_SCHEMA`, so the
stages after it never care where a document came from. Why a reader of our own: a crawl
file is never clean (downloads cut short, broken gzip members, invalid UTF-8, bad JSON),
and a record that cannot be read must be counted, not lost and not fatal. Such a record
becomes a row with `drop_reason = "read:<reason>"` and null `text`/`html`, keeping
whatever id and url were known, so the run manifest counts it with the other drops:

    read:truncated_gzip     the .gz ends (or a record inside it ends) before its end marker
    read:truncated_zstd     the same for a .zst file
    read:truncated_record   an uncompressed WARC ends inside a record
    read:corrupt_gzip       gzip data that does not decompress; reading resumes after it
    read:corrupt_zstd       zstd data that does not decompress
    read:malformed_record   a WARC record or HTTP header that does not parse
    read:bad_encoding       an HTTP body whose chunked/gzip/deflate/br encoding is broken
    read:http_status        an HTTP response that is not 2xx (redirect, error page)
    read:empty_payload      a WARC document record with an empty body
    read:invalid_utf8       a text payload with more than 1% undecodable bytes
    read:invalid_json       a JSONL line that is not a JSON object
    read:missing_text       a JSONL/Parquet/HF record whose text is absent, null or empty
    read:corrupt_parquet    a Parquet file (or row group) that cannot be decoded

Not documents, skipped without a row: WARC request, metadata, warcinfo and revisit
records, non-HTTP responses (`dns:`), resource records that are not web pages (wget's
`metadata://` log), and blank JSONL lines. An empty file yields no rows.

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

import email.utils
import io
import json
import os
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import READ_COLUMNS, READ_SCHEMA

__all__ = [
    "READERS",
    "SUPPORTED_EXTENSIONS",
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


def _drop(rid: str, reason: str, url: str | None = None, when: datetime | None = None) -> Row:
    return (rid, None, None, url, None, when, None, f"read:{reason}")


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
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None  # numbers are ambiguous (seconds? ms?), so they are not guessed
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


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


def _iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines split on b"\\n" only; a line spanning many chunks is joined once (no n^2)."""
    pending: list[bytes] = []
    for chunk in chunks:
        lines = chunk.split(b"\n")
        if len(lines) == 1:
            pending.append(chunk)
            continue
        if pending:
            pending.append(lines[0])
            lines[0] = b"".join(pending)
        pending = [lines.pop()] if lines[-1] else []
        yield from lines
    if pending:
        yield b"".join(pending)


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
        for lineno, line in enumerate(_iter_lines(_iter_chunks(path))):
            if not line or line.isspace():
                continue
            yield _json_row(line, f"{name}:{lineno}", text_column, id_column)
    except _BadInput as e:
        yield _drop(f"{name}:{lineno + 1}", e.reason)


def _json_row(line: bytes, fallback_id: str, text_column: str, id_column: str) -> Row:
    s = _decode_text(line)
    bad_utf8 = s is None
    if bad_utf8:
        s = line.decode("utf-8", errors="replace")  # only to recover id and url below
    try:
        obj = json.loads(s)
    except ValueError:
        return _drop(fallback_id, "invalid_utf8" if bad_utf8 else "invalid_json")
    if not isinstance(obj, dict):
        return _drop(fallback_id, "invalid_json")
    rid = obj.get(id_column)
    rid = fallback_id if rid is None else rid if isinstance(rid, str) else str(rid)
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    url = obj.get("url") or meta.get("url")
    url = url if isinstance(url, str) else None
    when = None
    for key in _TIME_FIELDS:
        if key in obj:
            when = _parse_time(obj[key])
            break
    if bad_utf8:
        return _drop(rid, "invalid_utf8", url, when)
    text = obj.get(text_column)
    if not isinstance(text, str) or not text:
        return _drop(rid, "missing_text", url, when)
    title = obj.get("title") or meta.get("title")
    title = title if isinstance(title, str) else None
    return (rid, text, None, url, title, when, "text/plain", None)


# --- Parquet and Hugging Face datasets (Arrow in, Arrow out, no per-row Python) --------------


def read_parquet(
    path: str, batch_rows: int = 1000, *, text_column: str = "text", id_column: str = "id"
) -> Iterator[pa.Table]:
    """Parquet -> READ_SCHEMA batches; reads only the columns it maps, row group by group."""
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    if os.path.getsize(path) == 0:
        return
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError):
        yield _table([_drop(f"{name}:0", "corrupt_parquet")], path)
        return
    columns = _input_columns(pf.schema_arrow.names, path, text_column, id_column)
    offset = 0
    batches = pf.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError):
            yield _table([_drop(f"{name}:{offset}", "corrupt_parquet")], path)
            return
        yield _to_read_table(
            pa.Table.from_batches([batch]), path, name, offset, text_column, id_column
        )
        offset += batch.num_rows


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
    in full first. Fallback ids are "<name>:<split>:<row>".
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
            f"{where}: no text column {text_column!r}; columns are {names}. "
            "Pass text_column= naming the column that holds the document text."
        )
    wanted = [text_column, id_column, "url", "title"]
    wanted += [next((c for c in _TIME_FIELDS if c in names), "")]
    return [c for c in dict.fromkeys(wanted) if c in names]


def _to_read_table(
    table: pa.Table, source: str, name: str, offset: int, text_column: str, id_column: str
) -> pa.Table:
    n = table.num_rows
    names = table.column_names
    _input_columns(names, source, text_column, id_column)  # streamed sources check here
    nulls = pa.nulls(n, pa.string())

    text = table[text_column]
    if not pa.types.is_large_string(text.type):
        text = pc.cast(text, pa.large_string())
    missing = pc.fill_null(pc.equal(pc.utf8_length(text), 0), True)
    text = pc.if_else(missing, pa.scalar(None, pa.large_string()), text)

    fallback = pa.array([f"{name}:{i}" for i in range(offset, offset + n)], pa.string())
    if id_column in names:
        ids = pc.coalesce(pc.cast(table[id_column], pa.string()), fallback)
    else:
        ids = fallback

    time_col = next((c for c in _TIME_FIELDS if c in names), None)
    return pa.Table.from_arrays(
        [
            ids,
            text,
            pa.nulls(n, pa.large_binary()),
            _as_string(table, "url", nulls),
            _as_string(table, "title", nulls),
            _arrow_time(table[time_col]) if time_col else pa.nulls(n, _TS),
            pa.array(["text/plain"] * n, pa.string()),
            pa.array([source] * n, pa.string()),
            pc.if_else(missing, pa.scalar("read:missing_text"), nulls),
        ],
        schema=READ_SCHEMA,
    )


def _as_string(table: pa.Table, column: str, nulls: pa.Array) -> Any:
    if column not in table.column_names:
        return nulls
    try:
        return pc.cast(table[column], pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return nulls  # e.g. a struct column named "title": not ours to interpret


def _arrow_time(col: Any) -> Any:
    """Any timestamp/date/string column -> timestamp[us, UTC]; unparseable values -> null."""
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        if pa.types.is_timestamp(t) and t.tz is None:
            col = pc.cast(col, pa.timestamp("us"), safe=False)  # naive: taken as UTC
        return pc.cast(col, _TS, safe=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        for target in (_TS, pa.timestamp("us")):  # with a zone, then naive (taken as UTC)
            try:
                return pc.cast(pc.cast(col, target), _TS)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
        return pa.array([_parse_time(v) for v in col.to_pylist()], _TS)
    return pa.nulls(len(col), _TS)


# --- HTML files ------------------------------------------------------------------------------


def read_html(
    path: str, batch_rows: int = 1000, *, text_column: str = "text", id_column: str = "id"
) -> Iterator[pa.Table]:
    """One .html/.htm(.gz) file -> one row with the raw bytes in `html` (id "<name>:0")."""
    name = os.path.basename(path)
    try:
        body = b"".join(_iter_chunks(path))
    except _BadInput as e:
        yield _table([_drop(f"{name}:0", e.reason)], path)
        return
    if body:
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


def detect_format(path: str | os.PathLike[str]) -> str:
    """The READERS key (extension) of `path`; ValueError naming what is supported."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise ValueError(f"{p} is a directory; pass its files (expand the glob first)")
    lower = os.path.basename(p).lower()
    for ext in SUPPORTED_EXTENSIONS:  # longest first, so .warc.wet.gz beats .warc.gz
        if lower.endswith(ext):
            return ext
    hint = " (WAT files hold crawl metadata, not documents)" if ".wat" in lower else ""
    raise ValueError(
        f"cannot read {p}: unknown file type{hint}. Supported extensions: "
        f"{', '.join(sorted(READERS))}; Hugging Face datasets go through iter_hf_dataset()."
    )


def iter_batches(
    path: str | os.PathLike[str],
    batch_rows: int = 1000,
    *,
    text_column: str = "text",
    id_column: str = "id",
) -> Iterator[pa.Table]:
    """Stream `path` as READ_SCHEMA tables of at most `batch_rows` rows.

    The reader is chosen by extension (see READERS). Unreadable records come back as rows
    with a `read:` drop reason, never as an exception; a missing file, a directory or an
    unknown extension raise, since those are mistakes in the call, not in the data.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    p = os.fspath(path)
    reader = READERS[detect_format(p)]
    if not os.path.exists(p):
        raise FileNotFoundError(f"no such input file: {p}")
    yield from reader(p, batch_rows, text_column=text_column, id_column=id_column)


def _main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m pipeline.readers FILE [FILE ...]", file=sys.stderr)
        return 2
    for path in argv:
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
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
