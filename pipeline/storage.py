"""Where input files live: local paths, or URIs on object storage and the Hugging Face Hub.

A path is either a plain local path or a URI: `s3://bucket/key`, `gs://bucket/key`,
`hf://datasets/owner/name/file` or `file:///abs/path`. URIs go through fsspec (s3fs, gcsfs,
huggingface_hub's HfFileSystem: optional extras, named in the error when one is missing);
Parquet on s3:// goes through pyarrow's own S3 filesystem, which reads row groups without
a Python hop. Credentials and endpoints come from the standard variables
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


def _hidden(rel: Path) -> bool:
    return rel.name.startswith((".", "_"))


def arrow_filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for pyarrow.parquet: None and the local path for
    local files; pyarrow's S3FileSystem for s3:// (endpoint from AWS_ENDPOINT_URL); fsspec
    wrapped for pyarrow otherwise."""
    if not is_remote(path):
        return None, local(path)
    if scheme(path) == "s3":
        return _arrow_s3(s3_endpoint(), os.environ.get("AWS_REGION")), path[len("s3://") :]
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


@functools.cache
def _arrow_s3(endpoint: str | None, region: str | None) -> Any:
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {}
    if endpoint:
        m = _URI.match(endpoint)
        kwargs["endpoint_override"] = endpoint[m.end() :] if m else endpoint
        kwargs["scheme"] = m.group(1) if m else "https"
    kwargs["region"] = region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def parquet_file(path: str, **kwargs: Any) -> Any:
    """pyarrow.parquet.ParquetFile of a local or remote file (kwargs passed on)."""
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path)
    if fs is None:
        return pq.ParquetFile(inner, **kwargs)
    return pq.ParquetFile(fs.open_input_file(inner), **kwargs)


def parquet_metadata(path: str) -> Any:
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path)
    return pq.read_metadata(inner, filesystem=fs)


def parquet_schema(path: str) -> Any:
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path)
    return pq.read_schema(inner, filesystem=fs)
