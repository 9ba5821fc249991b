"""Where input files live: local paths, or URIs on object storage and the Hugging Face Hub.

A path is either a plain local path or a URI: `s3://bucket/key`, `gs://bucket/key`,
`hf://datasets/owner/name/file` or `file:///abs/path`. URIs go through fsspec (s3fs, gcsfs,
huggingface_hub's HfFileSystem: optional extras, named in the error when one is missing);
a remote Parquet file is read a row group per request (`SpanFile`). Credentials and endpoints come from the standard variables
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE,
AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_REGION; GOOGLE_APPLICATION_CREDENTIALS; HF_TOKEN)
and are never logged: only URIs are.

    from pipeline import storage
    with storage.open_input("s3://commoncrawl/crawl-data/.../x.warc.gz") as f:
        head = f.read(4)
"""

from __future__ import annotations

import functools
import glob as _glob
import io
import os
import re
from pathlib import Path
from typing import IO, Any

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")

EXTRAS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}
"""URI scheme -> the package fsspec needs for it (Primer's extras: s3, gcs)."""

_BLOCK = 8 << 20  # object-store reads: 8 MiB blocks, read ahead


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


def open_input(path: str | os.PathLike[str]) -> IO[bytes]:
    """`path` opened for binary reading, seekable; remote files read ahead in 8 MiB blocks."""
    p = os.fspath(path)
    if not is_remote(p):
        return open(local(p), "rb")  # noqa: SIM115 - the caller closes it
    fs, inner = filesystem(p)
    return fs.open(inner, "rb", block_size=_BLOCK, cache_type="readahead")


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


class SpanFile(io.RawIOBase):
    """A remote file for pyarrow that reads planned byte spans ahead of the reader.

    `plan(spans)` names the spans about to be read, in order (a Parquet reader: each row
    group's needed column chunks); each is fetched in one request, the next one on a
    background thread while the reader decodes the current one, so the network and the
    decoding overlap and memory holds at most two spans. Reads outside the plan are one
    ranged request each (the footer)."""

    def __init__(self, path: str) -> None:
        self._fs, self._path = filesystem(path)
        self._size = int(self._fs.size(self._path))
        self._pos = 0
        self._spans: list[tuple[int, int]] = []
        self._next = 0  # index of the next span to fetch
        self._current: tuple[int, bytes] = (0, b"")
        self._ahead: Any = None  # (start, future) of the span being fetched
        self._pool: Any = None

    def plan(self, spans: list[tuple[int, int]]) -> None:
        self._spans = [(max(0, a), min(self._size, b)) for a, b in spans if b > a]
        self._next = 0
        self._current, self._ahead = (0, b""), None
        self._fetch_next()

    def _fetch_next(self) -> None:
        if self._next >= len(self._spans):
            self._ahead = None
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="primer-read-ahead")
        a, b = self._spans[self._next]
        self._next += 1
        self._ahead = (a, b, self._pool.submit(self._fs.cat_file, self._path, start=a, end=b))

    def _cached(self, pos: int, stop: int) -> bytes | None:
        start, data = self._current
        if start <= pos and stop <= start + len(data):
            return data[pos - start : stop - start]
        if self._ahead is not None and self._ahead[0] <= pos and stop <= self._ahead[1]:
            a, _, future = self._ahead
            self._current = (a, future.result())
            self._fetch_next()
            return self._cached(pos, stop)
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

    def read(self, n: int = -1) -> bytes:
        stop = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if stop <= self._pos:
            return b""
        out = self._cached(self._pos, stop)
        if out is None:
            out = self._fs.cat_file(self._path, start=self._pos, end=stop)
        self._pos += len(out)
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._current, self._ahead = (0, b""), None
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
    and which `columns`: each group's bytes are then fetched in one request, read ahead. A
    no-op for a local file."""
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
