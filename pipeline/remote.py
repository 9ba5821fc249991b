"""A run folder on object storage: the durable copy on a bucket, worked on in a staging folder.

`primer run RECIPE --output s3://bucket/runs/x` (or `gs://`, any fsspec URI) keeps the run's
durable copy on the bucket. Stages work in a local *staging* folder laid out exactly like a
local run folder (`--staging DIR`, `$PRIMER_STAGING`, default `~/.cache/primer/staging/`), so
every stage, view and loader is unchanged, and this module keeps the bucket in step with it.

Object stores have no atomic rename, so the commit protocol on the bucket is:
- a part: its Parquet file is uploaded under a unique name (`<part>.<token>.parquet`, a PUT
  is visible whole or not at all), *then* its commit marker `_parts/<part>.json`, which
  names that object. A reader trusts only objects a marker names; an object an attempt
  uploaded but never committed (a killed worker, a zombie retry) is never read, and the
  next run deletes it. The worker that wrote the part pushes it (`push_part`), so uploads
  run in parallel on every worker;
- a stage's other files (a global stage's `_state/`, an artifact stage's model or shards)
  are uploaded when its state is ready and when it ends, with `_manifest.json` last: the
  stage's commit marker, as it is locally;
- `_fingerprint` is uploaded when the stage opens. When it differs from the bucket's (the
  config or the input changed), the stage's objects on the bucket are deleted first, as
  the local runner deletes the folder.

A run starts with `pull`: it deletes uncommitted objects, then downloads what is committed
on the bucket and missing (or older) in staging. A killed run resumed on the same machine
downloads nothing; resumed on another machine (an empty staging), it continues from what
the bucket holds. Where the two disagree on a stage's fingerprint, the bucket wins.

A second run on the same URI is refused while the first one's `_lock` object has a fresh
heartbeat (`RemoteLock`; object stores have no exclusive create, so two runs started within
the same second could both pass: start one scheduler per run). Credentials come from the
standard variables (pipeline/storage.py) and are never logged.

On a multi-node Ray cluster the staging folder must be on storage every node sees (NFS, as
a local run folder must be): workers read earlier stages' parts, global state (dedup's
clusters, teacher answers) and token caches there. The bucket is then the durable copy the
run resumes from anywhere, and staging a working copy that can be deleted between runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.io import write_json_atomic
from pipeline.lock import RemoteLock

log = logging.getLogger("primer")

LEDGER = ".primer-remote.json"
"""In the staging folder: the bucket it mirrors and what each file was when last synced."""

_TMP = re.compile(r"(^|/)\.[^/]*\.tmp-[^/]*$")
_NOT_SYNCED = {"_lock", LEDGER}


def default_staging(uri: str) -> Path:
    """`$PRIMER_STAGING/<readable name>-<digest of the URI>` (default root
    ~/.cache/primer/staging): one staging folder per run URI, reused when it resumes."""
    root = Path(os.environ.get("PRIMER_STAGING") or Path.home() / ".cache/primer/staging")
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri.split("://", 1)[-1]).strip("_")[-60:]
    return root.expanduser() / f"{readable}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"


def _tag(info: dict[str, Any]) -> str:
    """What identifies one version of an object: its ETag (S3, GCS) or size and mtime."""
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    return f"{info.get('size')}:{info.get('LastModified') or info.get('mtime') or ''}"


def _local_tag(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _download(fs: Any, remote: str, target: Path) -> None:
    """`remote` to `target` through a temporary name (a killed pull leaves no half file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fs.get_file(remote, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _committed_parts(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """Local commit markers of a stage: {part name: marker}."""
    out = {}
    for f in sorted((stage_dir / "_parts").glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            out[f.stem] = json.loads(f.read_text())
    return out


def _without_object(marker: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in marker.items() if k != "object"}


def push_part(
    remote_stage: str, stage_dir: str | Path, name: str, old: dict[str, Any] | None = None
) -> str | None:
    """Upload one committed part of `stage_dir` to `remote_stage`: the Parquet file under a
    unique name, then its commit marker naming it; the object an older marker (`old`, read
    here when not given) named goes last. Returns the new object's name, None when the
    bucket already holds this commit."""
    stage_dir = Path(stage_dir)
    marker = _without_object(json.loads((stage_dir / "_parts" / f"{name}.json").read_text()))
    fs, root = storage.filesystem(remote_stage)
    marker_path = f"{root}/_parts/{name}.json"
    if old is None:
        old = _read_json(fs, marker_path)
    if old is not None and _without_object(old) == marker:
        return None
    obj = f"{name}.{uuid.uuid4().hex[:12]}.parquet"
    fs.put_file(str(stage_dir / f"{name}.parquet"), f"{root}/{obj}")
    fs.pipe_file(marker_path, json.dumps(marker | {"object": obj}, indent=1).encode())
    if old is not None and old.get("object") not in (None, obj):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{root}/{old['object']}")
    return obj


def local_run(run: str, staging: str | Path | None = None) -> str:
    """A run folder to read: `run` itself, or for a URI its staging folder, pulled first."""
    if not storage.is_remote(run):
        return run
    remote = RemoteRun(run, staging)
    remote.pull()
    return str(remote.staging)


class RemoteRun:
    """The bucket copy of a run folder and its local staging folder (see the module)."""

    def __init__(self, uri: str, staging: str | Path | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = storage.filesystem(self.uri)
        self.staging = Path(staging).expanduser() if staging else default_staging(self.uri)
        self.staging.mkdir(parents=True, exist_ok=True)
        self._ledger_path = self.staging / LEDGER
        self._ledger = self._load_ledger()

    # ------------------------------------------------------------------ ledger
    def _load_ledger(self) -> dict[str, Any]:
        try:
            ledger = json.loads(self._ledger_path.read_text())
        except (OSError, ValueError):
            ledger = {}
        if ledger.get("uri") != self.uri:
            ledger = {"uri": self.uri, "files": {}}
        return ledger

    def _save_ledger(self) -> None:
        tmp = self._ledger_path.with_name(f".{LEDGER}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(self._ledger))
        os.replace(tmp, self._ledger_path)

    def _synced(self, rel: str, local: Path, remote_tag: str) -> None:
        self._ledger["files"][rel] = {"local": _local_tag(local), "remote": remote_tag}

    def _remote(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def stage_uri(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def _listing(self, rel: str = "") -> dict[str, dict[str, Any]]:
        """Every object under `rel` on the bucket: {path relative to `rel`: info}."""
        base = self._remote(rel)
        # All of it: s3fs drops a path's parents from its listing cache but not its children.
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            out[path[len(base) :].lstrip("/")] = info
        return out

    # ------------------------------------------------------------------ pull
    def pull(self) -> dict[str, int]:
        """Delete uncommitted objects, then bring staging up to the bucket's committed
        state. Returns counts (files downloaded, objects cleaned)."""
        counts = {"downloaded": 0, "cleaned": 0}
        listing = self._listing()
        stages: dict[str, dict[str, dict[str, Any]]] = {}
        for rel, info in listing.items():
            if "/" in rel:
                top, rest = rel.split("/", 1)
                stages.setdefault(top, {})[rest] = info
            elif rel not in _NOT_SYNCED:
                counts["downloaded"] += self._pull_file(rel, info)
        for name, objects in sorted(stages.items()):
            if "_fingerprint" in objects:
                self._pull_stage(name, objects, counts)
            else:  # a folder of the run's own (the token cache)
                for rel, info in sorted(objects.items()):
                    counts["downloaded"] += self._pull_file(f"{name}/{rel}", info)
        self._save_ledger()
        if any(counts.values()):
            log.info(
                "%s: %d files downloaded to %s, %d uncommitted objects deleted",
                self.uri, counts["downloaded"], self.staging, counts["cleaned"],
            )  # fmt: skip
        return counts

    def _pull_file(self, rel: str, info: dict[str, Any]) -> int:
        local = self.staging / rel
        seen = self._ledger["files"].get(rel)
        tag = _tag(info)
        if local.is_file() and seen is not None:
            if seen["local"] != _local_tag(local):
                return 0  # changed here since the last sync: pushed, not overwritten
            if seen["remote"] == tag:
                return 0
        elif local.is_file():
            return 0  # written here and never pushed: the stage pushes it when it runs
        _download(self.fs, self._remote(rel), local)
        self._synced(rel, local, tag)
        return 1

    def _markers(self, name: str, objects: dict[str, dict[str, Any]]) -> dict[str, dict]:
        """The commit markers of stage `name` on the bucket, {part: marker}, read
        concurrently (one request each, in flight together)."""
        base = self._remote(name)
        paths = {
            rel[len("_parts/") : -len(".json")]: f"{base}/{rel}"
            for rel in objects
            if rel.startswith("_parts/") and rel.endswith(".json") and "/" not in rel[7:]
        }
        if not paths:
            return {}
        raw = self.fs.cat(list(paths.values()), on_error="return")
        committed = {}
        for part, path in paths.items():
            got = raw[path]
            if isinstance(got, FileNotFoundError):
                continue  # deleted since the listing
            if isinstance(got, BaseException):
                raise got  # never judge objects uncommitted on a failed read
            committed[part] = json.loads(got)
        return committed

    def _clean(self, name: str, objects: dict[str, dict[str, Any]], named: set) -> list[str]:
        """Delete a stage's uncommitted objects: temporary files, and part objects that no
        marker names (uploaded by a killed or duplicate attempt). Returns what went."""
        has_parts = any(rel.startswith("_parts/") for rel in objects) or (
            "_manifest.json" not in objects
        )
        if "_manifest.json" in objects and not has_parts:
            manifest = _read_json(self.fs, f"{self._remote(name)}/_manifest.json") or {}
            has_parts = manifest.get("kind") != "artifact"
        stale = [
            rel
            for rel in objects
            if _TMP.search(rel)
            or (has_parts and "/" not in rel and rel.endswith(".parquet") and rel not in named)
        ]
        for rel in stale:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f"{self._remote(name)}/{rel}")
            self._ledger["files"].pop(f"{name}/{rel}", None)  # pushed again if still here
        return stale

    def _pull_stage(
        self, name: str, objects: dict[str, dict[str, Any]], counts: dict[str, int]
    ) -> None:
        base = self._remote(name)
        committed = self._markers(name, objects)
        named = {m.get("object") for m in committed.values()}
        stale = self._clean(name, objects, named)
        counts["cleaned"] += len(stale)

        local_dir = self.staging / name
        remote_fp = objects.get("_fingerprint") and self.fs.cat_file(f"{base}/_fingerprint")
        local_fp = local_dir / "_fingerprint"
        if remote_fp and local_fp.is_file() and local_fp.read_bytes() != remote_fp:
            log.warning("%s: staging differs from %s; taking the bucket's", local_dir, base)
            shutil.rmtree(local_dir)
            self._forget(name)

        here = _committed_parts(local_dir)
        for part, marker in committed.items():
            obj = marker.pop("object", None)
            if obj is None or here.get(part) == marker:
                continue
            if part in here:
                continue  # committed here too (same fingerprint): pushed when the stage runs
            _download(self.fs, f"{base}/{obj}", local_dir / f"{part}.parquet")
            write_json_atomic(local_dir / "_parts" / f"{part}.json", marker)  # the commit
            counts["downloaded"] += 1
        ordinary = [
            rel
            for rel in objects
            if rel not in stale
            and not rel.startswith("_parts/")
            and rel not in named
            and rel != "_manifest.json"
        ]
        manifest = ["_manifest.json"] if "_manifest.json" in objects else []
        for rel in [*sorted(ordinary), *manifest]:
            counts["downloaded"] += self._pull_file(f"{name}/{rel}", objects[rel])

    def _forget(self, prefix: str) -> None:
        files = self._ledger["files"]
        for rel in [r for r in files if r == prefix or r.startswith(prefix + "/")]:
            del files[rel]

    # ------------------------------------------------------------------ push
    def open_stage(self, name: str) -> None:
        """Before a stage runs: a new fingerprint clears the stage on the bucket; committed
        parts the bucket lacks (a worker killed before its push) are pushed."""
        local_dir = self.staging / name
        fp = (local_dir / "_fingerprint").read_bytes()
        base = self._remote(name)
        try:
            remote_fp = self.fs.cat_file(f"{base}/_fingerprint")
        except FileNotFoundError:
            remote_fp = None
        if remote_fp != fp:
            if remote_fp is not None:
                log.warning("%s: config or input changed; clearing it on the bucket", base)
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(base, recursive=True)
                self._forget(name)
            self.fs.pipe_file(f"{base}/_fingerprint", fp)
        self.push_stage(name, final=False)

    def push_parts(self, name: str) -> dict[str, dict[str, Any]]:
        """Push every committed part of stage `name` that the bucket lacks, drop markers on
        the bucket for parts no longer committed here, and delete part objects no marker
        names (a killed attempt's upload that landed late). Returns the stage's listing as
        it was before (its other files are unchanged by this)."""
        local_dir = self.staging / name
        here = _committed_parts(local_dir)
        objects = self._listing(name)
        remote = self._markers(name, objects)
        named = set()
        for part in here:
            obj = push_part(self.stage_uri(name), local_dir, part, remote.get(part))
            named.add(obj or remote[part].get("object"))
        base = self._remote(name)
        for part, old in remote.items():
            if part not in here:
                self.fs.rm_file(f"{base}/_parts/{part}.json")
                if old.get("object"):
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(f"{base}/{old['object']}")
        self._clean(name, objects, named)
        return objects

    def push_stage(self, name: str, final: bool = True) -> int:
        """Upload the stage's files other than parts (state, artifacts) that changed since
        the last sync and delete those removed here; with `final`, `_manifest.json` last."""
        local_dir = self.staging / name
        if not local_dir.is_dir():
            return 0
        remote = self.push_parts(name)
        has_parts = (local_dir / "_parts").is_dir()
        files = {}
        for path in sorted(local_dir.rglob("*")):
            rel = path.relative_to(local_dir).as_posix()
            if not path.is_file() or _TMP.search(rel) or rel.startswith("_parts/"):
                continue
            if has_parts and "/" not in rel and rel.endswith(".parquet"):
                continue  # a part: committed through its marker, or not committed
            if rel == "_manifest.json" and not final:
                continue
            files[rel] = path
        manifest = files.pop("_manifest.json", None)
        n = self._push_files(name, files)
        for rel in remote:
            if (
                rel not in files
                and rel not in ("_fingerprint", "_manifest.json")
                and not rel.startswith("_parts/")
                and not (has_parts and "/" not in rel and rel.endswith(".parquet"))
            ):
                with contextlib.suppress(FileNotFoundError):  # a temp file _clean took
                    self.fs.rm_file(f"{self._remote(name)}/{rel}")
                self._ledger["files"].pop(f"{name}/{rel}", None)
        if manifest is not None:
            n += self._push_files(name, {"_manifest.json": manifest})
        self._save_ledger()
        return n

    def _push_files(self, prefix: str, files: dict[str, Path]) -> int:
        n = 0
        for rel, path in files.items():
            key = f"{prefix}/{rel}" if prefix else rel
            seen = self._ledger["files"].get(key)
            if seen is not None and seen["local"] == _local_tag(path):
                continue
            remote = self._remote(key)
            self.fs.put_file(str(path), remote)
            self._synced(key, path, _tag(self.fs.info(remote)))
            n += 1
        return n

    def reset_parts(self, name: str) -> None:
        """The bucket side of forgetting a stage's parts (`--retry-failed`)."""
        base = self._remote(name)
        for rel in self._listing(name):
            if (
                rel.startswith("_parts/")
                or rel == "_manifest.json"
                or ("/" not in rel and rel.endswith(".parquet"))
            ):
                self.fs.rm_file(f"{base}/{rel}")

    def push_run_files(self) -> int:
        """The run's own files (run_summary.json, report.html, `_runs.json`, `_cache/`)."""
        files = {}
        stages = {p.name for p in self.staging.iterdir() if (p / "_fingerprint").is_file()}
        for path in sorted(self.staging.rglob("*")):
            rel = path.relative_to(self.staging).as_posix()
            if (
                path.is_file()
                and rel.split("/", 1)[0] not in stages
                and rel not in _NOT_SYNCED
                and not _TMP.search(rel)
            ):
                files[rel] = path
        n = self._push_files("", files)
        self._save_ledger()
        return n

    # ------------------------------------------------------------------ lock
    def lock(self, command: str) -> RemoteLock:
        """`URI/_lock` for the run's length (pipeline/lock.py)."""
        return RemoteLock(self.fs, self._remote("_lock"), self.uri, command)
