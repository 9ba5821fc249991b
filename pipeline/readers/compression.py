"""Decompressed bytes and lines of an input file: gzip, zstd or plain, UTF-16 re-encoded.

Compression is told by magic bytes, not by name, so a .jsonl.gz that is plain text reads as
plain text. zlib and zstandard are driven by hand because `gzip.GzipFile` and zstandard's
`stream_reader` cannot both resume multi-member files and report a cut (stream_reader
returns a clean EOF on a truncated .zst): a cut or corrupt stream raises `BadInput` after
the last good chunk, so the reader can record it as a row.

    from pipeline.readers.compression import iter_lines, text_chunks
    for line in iter_lines(text_chunks("dump.jsonl.zst")):
        ...  # bytes; None for a line over rows.MAX_RECORD_BYTES
"""

from __future__ import annotations

import codecs
import io
import itertools
import zlib
from collections.abc import Iterable, Iterator

from pipeline import storage
from pipeline.readers import rows
from pipeline.readers.rows import BadInput

READ_CHUNK = 1 << 16
"""Bytes read from a compressed file at a time."""

GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def iter_chunks(path: str) -> Iterator[bytes]:
    """Decompressed bytes of `path` (gzip, zstd or plain, told by magic bytes, not name).

    Raises BadInput after the last good chunk when the stream is cut or corrupt.
    """
    with storage.open_input(path) as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(GZIP_MAGIC):
            yield from _gunzip(f)
        elif head == _ZSTD_MAGIC:
            yield from _unzstd(f)
        else:
            while chunk := f.read(1 << 20):
                yield chunk


def range_chunks(path: str, begin: int, stop: int) -> Iterator[bytes]:
    """Bytes begin..stop-1 of an uncompressed file, a megabyte at a time."""
    with storage.open_input(path) as f:
        f.seek(begin)
        left = stop - begin
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            left -= len(chunk)
            yield chunk


def byte_splittable(path: str, fmt: str) -> bool:
    """Whether a raw input of format `fmt` (a READERS key) can be read in byte ranges: a
    gzip WARC/WET (one gzip member per record, as crawlers write them; a file written as one
    member reads whole in its first range) or a plain UTF-8 JSONL file."""
    with storage.open_input(path) as f:
        head = f.read(4)
    if ".warc" in fmt or ".wet" in fmt:
        return head.startswith(GZIP_MAGIC)
    if fmt in (".jsonl", ".ndjson"):
        compressed = head.startswith(GZIP_MAGIC) or head == _ZSTD_MAGIC
        return not compressed and head[:2] not in _UTF16_BOMS
    return False


def _gunzip(f: io.BufferedReader) -> Iterator[bytes]:
    d = zlib.decompressobj(wbits=31)
    in_member = False
    data = b""
    while True:
        if not data:
            data = f.read(READ_CHUNK)
            if not data:
                if in_member:
                    raise BadInput("truncated_gzip")
                return
        in_member = True
        try:
            # Bounded output: a small .gz of repetitive text can expand a thousandfold.
            out = d.decompress(data, 8 << 20)
        except zlib.error:
            raise BadInput("corrupt_gzip") from None
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
            data = f.read(READ_CHUNK)
            if not data:
                if in_frame:
                    raise BadInput("truncated_zstd")
                return
        in_frame = True
        try:
            out = d.decompress(data)
        except zstandard.ZstdError:
            raise BadInput("corrupt_zstd") from None
        data = b""
        if d.eof:
            data = d.unused_data
            d = dctx.decompressobj()
            in_frame = False
        if out:
            yield out


def text_chunks(path: str) -> Iterator[bytes]:
    """Decompressed chunks of `path` as UTF-8 (a UTF-16 file, told by its BOM, re-encoded)."""
    chunks = iter_chunks(path)
    first = next(chunks, b"")
    if first[:2] in _UTF16_BOMS:
        yield from _utf16_as_utf8(itertools.chain([first], chunks))
    else:
        yield first
        yield from chunks


def _utf16_as_utf8(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """UTF-16 text (byte order from its BOM) re-encoded as UTF-8, chunk by chunk."""
    decoder = codecs.getincrementaldecoder("utf-16")(errors="replace")
    for chunk in chunks:
        if out := decoder.decode(chunk):
            yield out.encode("utf-8")
    if out := decoder.decode(b"", final=True):
        yield out.encode("utf-8")


def iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes | None]:
    """Lines split on b"\\n" only; a line spanning many chunks is joined once (no n^2).

    A line longer than rows.MAX_RECORD_BYTES comes out as None, and its bytes are let go as
    they arrive rather than joined: a file with no newline would otherwise be one line
    the size of the file.
    """
    limit = rows.MAX_RECORD_BYTES
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
