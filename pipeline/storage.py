"""Where input files live: local paths, or URIs on object storage and the Hugging Face Hub.

A path is either a plain local path or a URI: `s3://bucket/key`, `gs://bucket/key`,
`hf://datasets/owner/name/file` or `file:///abs/path`. URIs go through fsspec (s3fs, gcsfs,
huggingface_hub's HfFileSystem: optional extras, named in the error when one is missing);
a remote Parquet file is read in a few large ranged requests ahead of the decoder
(`SpanFile`; on s3:// with botocore's blocking client). Credentials and endpoints come from
the standard variables (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN /
AWS_PROFILE, AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_REGION;
GOOGLE_APPLICATION_CREDENTIALS; HF_TOKEN) and are never logged: only URIs are.

    from pipeline import storage
    with storage.open_input("s3://commoncrawl/crawl-data/.../x.warc.gz") as f:
        head = f.read(4)
"""

from __future__ import annotations

import collections
import functools
import glob as _glob
import io
import os
import re
import time
from pathlib import Path
from typing import IO, Any

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")

EXTRAS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}
"""URI scheme -> the package fsspec needs for it (Primer's extras: s3, gcs)."""

_BLOCK = 8 << 20  # object-store reads: 8 MiB blocks, read ahead

# Remote Parquet (SpanFile): planned spans less than 1 MiB apart (the columns a reader skips
# between row groups) joined up to 24 MiB a request (glibc maps buffers over 32 MiB fresh,
# page-faulting and zeroing them on every request), at most 64 MiB fetched ahead of the
# reader, on 4 connections.
_GAP = 1 << 20
_COALESCE = 24 << 20
_AHEAD = 64 << 20
_THREADS = 4


def scheme(path: str | os.PathLike[str]) -> str | None:
    """The URI scheme of `path` ("s3", "gs", "hf", "file", ...), None for a local path."""
    m = _URI.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_remote(path: str | os.PathLike[str]) -> bool:
    """A URI other than file://: opened through fsspec, never with open()."""
    s = scheme(path)
    return s is not None and s != "file"


def local(path: str | os.PathLike[str]) -> str:
    """A local path as a plain path (file:// stripped); a remote URI unchanged."""
    p = os.fspath(path)
    if scheme(p) == "file":
        return p[len("file://") :]
    return p


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard variables (a MinIO or other S3-compatible store)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.cache
def _filesystem(protocol: str, endpoint: str | None) -> Any:
    try:
        import fsspec

        kwargs: dict[str, Any] = {}
        if protocol == "s3" and endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        return fsspec.filesystem(protocol, **kwargs)
    except ImportError as e:
        extra = EXTRAS.get(protocol, protocol)
        raise ImportError(
            f"reading {protocol}:// needs the {extra} package: pip install {extra} "
            f"(or primer's extra: pip install 'primer[{'gcs' if extra == 'gcsfs' else 's3'}]')"
        ) from e


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a remote URI. One filesystem per protocol
    and endpoint per process (fsspec caches its clients too)."""
    protocol = scheme(uri)
    if protocol is None or protocol == "file":
        raise ValueError(f"{uri} is a local path, not a remote URI")
    protocol = "gs" if protocol == "gcs" else protocol
    fs = _filesystem(protocol, s3_endpoint() if protocol == "s3" else None)
    return fs, fs._strip_protocol(uri)


@functools.cache
def _s3_client(endpoint: str | None) -> Any:
    """botocore's blocking S3 client (s3fs runs botocore under asyncio; it comes with it).

    SpanFile fetches s3:// ranges with it: the body read straight into one bytes object costs
    the reader far less CPU than s3fs's aiohttp chunks (benchmarks/object_storage.py).
    Credentials, region and retries come from the standard configuration, as for s3fs."""
    import botocore.session

    return botocore.session.get_session().create_client("s3", endpoint_url=endpoint)


def _s3_range(client: Any, path: str, start: int, stop: int) -> bytes:
    """Bytes start..stop-1 of s3 `path` ("bucket/key"), errors as s3fs gives them: a client
    error as an OSError (FileNotFoundError, PermissionError, ...), a body cut short retried."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from s3fs.errors import translate_boto_error

    bucket, key = path.split("/", 1)
    attempt = 0
    while True:
        try:
            resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
            with resp["Body"] as body:
                return body.read()
        except ClientError as e:
            raise translate_boto_error(e) from e
        except (HTTPClientError, IncompleteReadError):
            attempt += 1
            if attempt == 5:
                raise
            time.sleep(0.1 * 2**attempt)


def open_input(path: str | os.PathLike[str]) -> IO[bytes]:
    """`path` opened for binary reading, seekable; remote files read ahead in 8 MiB blocks."""
    p = os.fspath(path)
    if not is_remote(p):
        return open(local(p), "rb")  # noqa: SIM115 - the caller closes it
    fs, inner = filesystem(p)
    return _StoreFile(fs.open(inner, "rb", block_size=_BLOCK, cache_type="readahead"), p)


class _StoreFile(io.RawIOBase):
    """A remote file whose transport failures are `RemoteReadError`s: readers take an
    OSError for a broken record and record the loss, which is right for the file's bytes
    and wrong for the network's."""

    def __init__(self, f: Any, uri: str) -> None:
        self._f, self._uri = f, uri

    def _guard(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise RemoteReadError(f"reading {self._uri} failed: {type(e).__name__}: {e}") from e

    def read(self, n: int = -1) -> bytes:
        return self._guard(self._f.read, n)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._guard(self._f.seek, offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    @property
    def size(self) -> int:
        return self._f.size

    def close(self) -> None:
        self._f.close()
        super().close()


def size(path: str | os.PathLike[str]) -> int:
    p = os.fspath(path)
    if not is_remote(p):
        return os.path.getsize(local(p))
    fs, inner = filesystem(p)
    return int(fs.size(inner))


def exists(path: str | os.PathLike[str]) -> bool:
    p = os.fspath(path)
    if not is_remote(p):
        return os.path.exists(local(p))
    fs, inner = filesystem(p)
    return bool(fs.exists(inner))


def is_dir(path: str | os.PathLike[str]) -> bool:
    p = os.fspath(path)
    if not is_remote(p):
        return os.path.isdir(local(p))
    fs, inner = filesystem(p)
    return bool(fs.isdir(inner))


def join(base: str, *names: str) -> str:
    """`base`/`names`, for a local path or a URI alike."""
    if not is_remote(base):
        return str(Path(local(base)).joinpath(*names))
    return "/".join([base.rstrip("/"), *names])


def parent(path: str) -> str:
    if not is_remote(path):
        return str(Path(local(path)).parent)
    return path.rstrip("/").rsplit("/", 1)[0]


def name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else Path(path).name


def expand(pattern: str) -> list[str]:
    """Files a pattern names: a folder (recursively, hidden and `_` names left out), a glob
    (`**` recursive) or one file. Remote results are URIs with the pattern's scheme."""
    if not is_remote(pattern):
        p = Path(local(pattern)).expanduser()
        if p.is_dir():
            return sorted(
                str(f) for f in p.rglob("*") if f.is_file() and not _hidden(f.relative_to(p))
            )
        if any(ch in pattern for ch in "*?["):
            return sorted(f for f in _glob.glob(str(p), recursive=True) if Path(f).is_file())
        return [str(p)] if p.is_file() else []
    fs, inner = filesystem(pattern)
    prefix = f"{scheme(pattern)}://"
    if any(ch in inner for ch in "*?["):
        found = [f for f, info in fs.glob(inner, detail=True).items() if info["type"] == "file"]
        return sorted(prefix + f for f in found)
    if fs.isdir(inner):
        root = inner.rstrip("/")
        found = [
            f
            for f, info in fs.find(root, detail=True).items()
            if info["type"] == "file" and not _hidden(Path(f[len(root) + 1 :]))
        ]
        return sorted(prefix + f for f in found)
    return [pattern] if fs.isfile(inner) else []


_PATHS_FILE = re.compile(r"^(?P<file>.+\.paths(?:\.gz)?)(?:#(?P<first>\d+)-(?P<last>\d+))?$")


def is_paths_file(pattern: str) -> bool:
    """A crawl's paths listing named as an input: `warc.paths.gz` (or `.paths`), optionally
    with `#FIRST-LAST` to take lines FIRST..LAST (0-based, inclusive)."""
    return _PATHS_FILE.match(pattern) is not None


def paths_listing(pattern: str) -> list[str]:
    """The files a paths listing names, as Common Crawl publishes them
    (`s3://commoncrawl/crawl-data/CC-MAIN-2024-10/warc.paths.gz`: one path per line, relative
    to the bucket). A line that is a URI or an absolute path is taken as it is; a relative
    one is joined to the listing's bucket or host root (s3://commoncrawl/,
    https://data.commoncrawl.org/) when the listing is remote, else to its folder."""
    import gzip

    m = _PATHS_FILE.match(pattern)
    if m is None:
        raise ValueError(f"{pattern}: not a paths listing (*.paths or *.paths.gz)")
    listing = m.group("file")
    with open_input(listing) as f:
        raw = f.read()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if m.group("first") is not None:
        lines = lines[int(m.group("first")) : int(m.group("last")) + 1]
    if is_remote(listing):
        root = _URI.match(listing).group(0) + listing[_URI.match(listing).end() :].split("/")[0]
    else:
        root = str(Path(local(listing)).parent)
    return [
        line if scheme(line) is not None or line.startswith("/") else f"{root}/{line}"
        for line in lines
    ]


def _hidden(rel: Path) -> bool:
    return rel.name.startswith((".", "_"))


class RemoteReadError(RuntimeError):
    """A ranged read from object storage that failed after its retries (a network or server
    error, a permission): not an OSError, so a Parquet reader does not take it for a corrupt
    file and record its rows as lost. The part fails instead, and a rerun reads it again."""


class SpanFile(io.RawIOBase):
    """A remote file for pyarrow that fetches planned byte spans ahead of the reader.

    `plan(spans)` names the spans about to be read, in order (a Parquet reader: each row
    group's needed column chunks). Nearby spans are fetched together, up to `_COALESCE`
    bytes a request, on background threads: the range being read, the next one, and more
    while less than `_AHEAD` bytes are held, so the network and the decoding overlap.
    pyarrow reads through `read_buffer`: zero-copy slices of the fetched bytes. Reads
    outside the plan (the footer) are one ranged request each."""

    def __init__(self, path: str) -> None:
        self._fs, self._path = filesystem(path)
        self._uri = path
        self._size = int(self._fs.size(self._path))
        self._s3 = _s3_client(s3_endpoint()) if scheme(path) == "s3" else None
        self._pos = 0
        self._todo: collections.deque[tuple[int, int]] = collections.deque()
        self._fetched: collections.deque[tuple[int, int, Any]] = collections.deque()
        self._pool: Any = None

    def plan(self, spans: list[tuple[int, int]]) -> None:
        """Fetch `spans` ((start, stop) in reading order) ahead of the reads, nearby ones in
        one request."""
        self._todo.clear()
        self._fetched.clear()
        for a, b in spans:
            a, b = max(0, a), min(self._size, b)
            last = self._todo[-1] if self._todo else None
            if b <= a:
                continue
            if last and 0 <= a - last[1] < _GAP and b - last[0] <= _COALESCE:
                self._todo[-1] = (last[0], b)
            else:
                self._todo.append((a, b))
        self._fetch_ahead()

    def _fetch_ahead(self) -> None:
        held = sum(b - a for a, b, _ in self._fetched)
        while self._todo and (len(self._fetched) < 2 or held < _AHEAD):
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="primer-read-ahead")
            a, b = self._todo.popleft()
            self._fetched.append((a, b, self._pool.submit(self._fetch, a, b)))
            held += b - a

    def _fetch(self, start: int, stop: int) -> Any:
        """Bytes start..stop-1 as a pyarrow Buffer, in one ranged request. A failure other
        than a missing object is a `RemoteReadError`: the store's fault, not the file's."""
        import pyarrow as pa

        try:
            if self._s3 is not None:
                return pa.py_buffer(_s3_range(self._s3, self._path, start, stop))
            return pa.py_buffer(self._fs.cat_file(self._path, start=start, end=stop))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise RemoteReadError(
                f"reading bytes {start}-{stop - 1} of {self._uri} failed: {type(e).__name__}: {e}"
            ) from e

    def _planned(self, pos: int, stop: int) -> Any:
        """pos..stop-1 from a fetched range, or None; the ranges before it are let go."""
        for i, (a, b, future) in enumerate(self._fetched):
            if a <= pos and stop <= b:
                if i:
                    for _ in range(i):
                        self._fetched.popleft()
                    self._fetch_ahead()
                return future.result().slice(pos - a, stop - pos)
        return None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def size(self) -> int:
        return self._size

    def read_buffer(self, n: int = -1) -> Any:
        """The next `n` bytes (all that are left for n < 0) as a pyarrow Buffer."""
        import pyarrow as pa

        stop = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if stop <= self._pos:
            return pa.py_buffer(b"")
        out = self._planned(self._pos, stop)
        if out is None:
            out = self._fetch(self._pos, stop)
        self._pos += out.size
        return out

    def read(self, n: int = -1) -> bytes:
        return self.read_buffer(n).to_pybytes()

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._todo.clear()
        self._fetched.clear()
        super().close()


def parquet_source(path: str) -> Any:
    """What pyarrow.parquet opens: the local path, or a `SpanFile` for a remote file."""
    return SpanFile(path) if is_remote(path) else local(path)


def parquet_file(path: str, **kwargs: Any) -> Any:
    """pyarrow.parquet.ParquetFile of a local or remote file (kwargs passed on)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(parquet_source(path), **kwargs)


def plan_row_groups(pf: Any, groups: Any, source: Any, columns: Any = None) -> None:
    """Tell a remote `source` (a SpanFile) which row groups of `pf` will be read, in order,
    and which `columns`: their bytes are then fetched ahead, nearby groups in one
    request. A no-op for a local file."""
    if not isinstance(source, SpanFile):
        return
    wanted = set(columns) if columns is not None else None
    spans = []
    for g in groups:
        rg = pf.metadata.row_group(g)
        start, stop = None, 0
        for c in range(rg.num_columns):
            col = rg.column(c)
            if wanted is not None and col.path_in_schema.split(".")[0] not in wanted:
                continue
            first = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset:
                first = min(first, col.dictionary_page_offset)
            start = first if start is None else min(start, first)
            stop = max(stop, first + col.total_compressed_size)
        if start is not None:
            spans.append((start, stop))
    source.plan(spans)


def parquet_metadata(path: str) -> Any:
    import pyarrow.parquet as pq

    return pq.read_metadata(parquet_source(path))


def parquet_schema(path: str) -> Any:
    import pyarrow.parquet as pq

    return pq.read_schema(parquet_source(path))
