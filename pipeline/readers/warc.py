"""WARC and WET files -> READ_SCHEMA rows, tolerant of cut and corrupt crawl files.

HTTP `response` and web `resource` records give `html` (the HTTP body, de-chunked and
content-decoded); WET `conversion` records give `text`. Either kind is read from either
file name, so a WET file named .warc.gz still works. Not documents, skipped without a row:
request, metadata, warcinfo and revisit records, non-HTTP responses (`dns:`) and resource
records that are not web pages (wget's `metadata://` log).

Parsing is FastWARC (Rust); it runs with `auto_decode="none"` so a body cut short can be
told from a whole one by its length, and HTTP transfer and content encodings are undone
here afterwards with FastWARC's own decoders (or zlib). A record FastWARC cannot parse
becomes one drop row, and reading resumes at the next gzip member (or WARC header).

    from pipeline.readers.warc import read_warc
    for table in read_warc("crawl.warc.gz"):
        ...

A gzip file can be read in byte ranges (`byte_range`, a sub-part): a range holds the
records whose gzip member starts inside it. Where a range starts and stops is found by one
rule, `member_start` (the first gzip header at or after the offset that inflates to
"WARC/"), applied by both neighbours, so consecutive ranges read every record once. Ids of
records without a WARC-Record-ID then name the range ("<file>@<start>:<n>").
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.readers import rows
from pipeline.readers.compression import GZIP_MAGIC, READ_CHUNK
from pipeline.readers.rows import Row, batched, decode_text, drop_row

# FastWARC's WarcRecordType bit flags (fastwarc/warc.pyi); plain ints keep the per-record
# type test cheap and `import pipeline.readers` free of the Rust extension.
_RESPONSE, _RESOURCE, _CONVERSION = 4, 8, 128
_DOC_TYPES = _RESPONSE | _RESOURCE | _CONVERSION
_CUT_REASONS = ("read:truncated_gzip", "read:truncated_record")


def read_warc(
    path: str,
    batch_rows: int = 1000,
    *,
    text_column: str = "text",
    id_column: str = "id",
    byte_range: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """WARC/WET file -> READ_SCHEMA batches.

    HTTP `response` and web `resource` records give `html` (the HTTP body, de-chunked and
    content-decoded); WET `conversion` records give `text`. Either kind is read from either
    file name, so a WET file named .warc.gz still works. `text_column` and `id_column` do
    not apply to WARC; they are accepted so every reader has one signature. `byte_range`
    (a, b) of a gzip file reads the records whose member starts at offsets a..b-1.
    """
    return batched(_warc_rows(path, byte_range), path, batch_rows)


_MEMBER = b"\x1f\x8b\x08"


def member_start(path: str, offset: int) -> int | None:
    """The first offset >= `offset` where a gzip member holding a WARC record starts, or
    None. A candidate header must inflate to b"WARC/": deflate data can hold the three
    magic bytes by chance, but not that."""
    pos = offset
    while (c := _find(path, _MEMBER, pos)) is not None:
        with storage.open_input(path) as f:
            f.seek(c)
            data = f.read(READ_CHUNK)
        try:
            head = zlib.decompressobj(wbits=31).decompress(data, 8)
        except zlib.error:
            head = b""
        if head.startswith(b"WARC/"):
            return c
        pos = c + 1
    return None


def _warc_rows(path: str, byte_range: tuple[int, int] | None = None) -> Iterator[Row]:
    from fastwarc.stream_io import GzipReader
    from fastwarc.warc import ArchiveIterator

    name = os.path.basename(path)
    with storage.open_input(path) as f:
        gz = f.read(2) == GZIP_MAGIC
    # Where to pick up again after a broken record: the next gzip member or WARC header.
    marker = _MEMBER if gz else b"WARC/1."
    index = 0  # ordinal of document records, for ids of records without WARC-Record-ID
    start = 0  # byte offset the current ArchiveIterator started at (moves on resync)
    stop = None  # a range: records whose member starts at or after this are the next's
    if byte_range is not None:
        if not gz:
            raise ValueError(f"byte ranges are for gzip WARC files only, not {path}")
        first = member_start(path, byte_range[0]) if byte_range[0] > 0 else 0
        stop = member_start(path, byte_range[1])
        if first is None or (stop is not None and first >= stop):
            return  # no record starts in this range
        start = first
        if byte_range[0] > 0:
            name = f"{name}@{byte_range[0]}"
    seen_since_error = True
    # The newest row is held back one step: when the file turns out to end inside that
    # very record, its "malformed" verdict becomes "truncated" instead of a second row.
    held: Row | None = None
    held_at = -1
    while True:
        last = start  # offset of the last record seen, any type (gzip: its member)
        stream: Any = None
        raw = storage.open_input(path)  # noqa: SIM115 - a generator spans it; closed in finally
        try:
            raw.seek(start)
            stream = GzipReader(raw) if gz else raw
            # parse_http=False: request records would be parsed for nothing; responses
            # parse their HTTP headers in _warc_row.
            for rec in ArchiveIterator(stream, parse_http=False, stream_detect=False):
                last = stream.frame_start_position() if gz else rec.stream_pos
                if stop is not None and last >= stop:
                    break  # the next range's first record
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
            if stop is not None and frame >= stop:
                return  # the broken record is the next range's to record
            nxt = _find(path, marker, max(start, last, frame) + 1)
            if seen_since_error:
                reason = gz and _member_problem(path, frame)
                if not reason and nxt is None:  # the file ends inside the broken record
                    reason = _tail_problem(path, last, gz)
                yield drop_row(f"{name}:{index}", reason or "malformed_record")
                index += 1
            seen_since_error = False
            if nxt is None or (stop is not None and nxt >= stop):
                return
            start = nxt
            continue
        finally:
            raw.close()
        # A cut inside WARC headers ends FastWARC's iteration silently, so the end of the
        # file is checked on its own, from the start of the last record seen (a range that
        # stops before the end leaves that to the last range).
        cut = held is not None and held[7] in _CUT_REASONS
        ended = stop is not None and last >= stop
        reason = None if cut or ended else _tail_problem(path, last, gz)
        if reason and held is not None and held_at == last and held[7] == "read:malformed_record":
            held, reason = (*held[:7], f"read:{reason}"), None
        if held is not None:
            yield held
        if reason:
            yield drop_row(f"{name}:{index}", reason)
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
        return drop_row(rid, "malformed_record", url, when)  # also: cut inside the header
    if rec.content_length > rows.MAX_RECORD_BYTES:
        return drop_row(rid, "too_large", url, when)  # its body is skipped, never read

    http = None
    if rtype == _RESPONSE:
        try:
            rec.parse_http()
        except OSError:
            return drop_row(rid, "malformed_record", url, when)
        http = rec.http_headers
        status = http.status_code
        if status is None:
            return drop_row(rid, "malformed_record", url, when)
        if not 200 <= status < 300:
            return drop_row(rid, "http_status", url, when)
        ctype = rec.http_content_type
        ctype = ctype.lower() if ctype else None
    else:
        ctype = _mime(headers.get("Content-Type"))

    body = rec.reader.read()
    if len(body) < rec.content_length:  # FastWARC hands out a cut body without complaint
        return drop_row(rid, "truncated_gzip" if gz else "truncated_record", url, when)
    if http is not None:
        te = http.get("Transfer-Encoding")
        ce = http.get("Content-Encoding")
        if te or ce:  # Common Crawl stores decoded bodies; wget and warcio keep them raw
            body = _decode_http_body(body, te, ce)
            if body is None:
                return drop_row(rid, "bad_encoding", url, when)
    if not body:
        return drop_row(rid, "empty_payload", url, when)

    if rtype == _CONVERSION:
        text = decode_text(body)
        if text is None:
            return drop_row(rid, "invalid_utf8", url, when)
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
                if body[:2] == GZIP_MAGIC:
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
    with storage.open_input(path) as f:
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
    with storage.open_input(path) as f:
        f.seek(start)
        d = zlib.decompressobj(wbits=31)
        data = b""
        while True:
            if not data:
                data = f.read(READ_CHUNK)
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
                if not data:
                    data = f.read(READ_CHUNK)  # object-store files have no peek()
                    if not data:
                        return None
                d = zlib.decompressobj(wbits=31)


def _tail_problem(path: str, last: int, gz: bool) -> str | None:
    """Why the file does not end with whole records from offset `last` on, or None.

    gzip: `last` is the member FastWARC was in at the end; it and any after it must reach
    their end markers (one member per file, or a second pass over a file written as one
    member). Plain WARC: the last record's Content-Length must fit in the file, with only
    whitespace after it.
    """
    size = storage.size(path)
    if last >= size:
        return None
    if gz:
        return _member_problem(path, last, members=None)
    with storage.open_input(path) as f:
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


def _mime(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _clean_record_id(record_id: str) -> str:
    rid = record_id.strip().strip("<>")
    return rid[9:] if rid.startswith("urn:uuid:") else rid
