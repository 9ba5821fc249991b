"""Models, tokenizers, templates and benchmarks named by URI: fetched into the run folder.

A stage config value that is an object-storage URI (`s3://`, `gs://`, `hf://...`) naming a
file or a folder, for example `edu_score.model: s3://bucket/models/edu.bin` or
`decontaminate.benchmarks: [gs://bucket/benchmarks/]`, is downloaded once into
`RUN/_assets/<digest>/<name>` when the run is planned, and the value becomes the reference
"@_assets/<digest>/<name>", which the runner turns into that path as it does "@stage/file"
values. The digest covers the URI and the object's version (its ETag, or size and mtime),
so the stage's fingerprint changes when the object does and not when the run folder moves
(a run resumed on another machine keeps its fingerprints). Stage `input:` values are data,
not assets, and are read where they are; http(s) values (a teacher's endpoint) are left
alone. On a cluster the run folder is shared, so every worker finds the file there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline import storage

log = logging.getLogger("primer")

ASSETS = "_assets"
SCHEMES = frozenset({"s3", "gs", "gcs", "hf"})
DATA_KEYS = frozenset({"input", "inputs"})


def is_asset_uri(value: Any) -> bool:
    return isinstance(value, str) and storage.scheme(value) in SCHEMES


def _version(fs: Any, info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "sha256"):
        if info.get(key):
            return str(info[key]).strip('"')
    return f"{info.get('size')}:{info.get('LastModified') or info.get('mtime') or ''}"


def fetch(uri: str, run_dir: str | os.PathLike[str]) -> str:
    """Download the file or folder at `uri` into `run_dir/_assets/` (once per version);
    returns its reference "@_assets/<digest>/<name>"."""
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache()
    if fs.isdir(path):
        found = fs.find(path, detail=True)
        files = {p: info for p, info in sorted(found.items()) if info.get("type") != "directory"}
        if not files:
            raise FileNotFoundError(f"{uri}: an empty folder")
    else:
        files = {path: fs.info(path)}
    h = hashlib.sha256(uri.encode())
    for p, info in files.items():
        h.update(f"\0{p}\0{_version(fs, info)}".encode())
    name = storage.name(uri) or "asset"
    rel = f"{ASSETS}/{h.hexdigest()[:16]}/{name}"
    target = Path(run_dir) / rel
    if not target.exists():
        tmp = target.with_name(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            if len(files) == 1 and path in files:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(path, str(tmp))
            else:
                for p in files:
                    dest = tmp / p[len(path) :].lstrip("/")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(p, str(dest))
            os.replace(tmp, target)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        log.info("fetched %s (%d file(s)) into %s", uri, len(files), target)
    return "@" + rel


def fetch_config_assets(value: Any, run_dir: str | os.PathLike[str], key: str = "") -> Any:
    """`value` (a stage config as plain data) with every asset URI replaced by its fetched
    reference; `input`/`inputs` values are kept as they are."""
    if key in DATA_KEYS:
        return value
    if is_asset_uri(value):
        return fetch(value, run_dir)
    if isinstance(value, dict):
        return {k: fetch_config_assets(v, run_dir, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [fetch_config_assets(v, run_dir, key) for v in value]
    return value
