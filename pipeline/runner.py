"""Run stages over parts, in-process or on Ray Data, resumably.

The unit of work is a *part*: one input file (a WARC, a JSONL, a previous stage's Parquet
part). A part is read in batches of `batch_rows`, each batch goes through the stage, and
kept and dropped rows stream into `DIR/<stage>/<part>.parquet`, which is renamed into place
when complete; then `DIR/<stage>/_parts/<part>.json` (its counts) commits it. A re-run
skips committed parts, so a run killed with SIGKILL and started again ends with the same
rows as an uninterrupted one, none lost and none doubled. Downstream parts keep their
upstream part's name, so a document's path through the stages is easy to follow.

On Ray, pending parts become a Ray Data dataset and `map_batches` sends them to a pool of
workers; each worker builds the stage once (`setup()` loads models once per worker) and
feeds it pyarrow batches. Only per-part counts come back to the driver.

A stage's output fingerprint chains its config with its input's fingerprint: change a
threshold and the stage (and everything after it) is recomputed rather than mixed. Raw
inputs are fingerprinted by their *stable path* (relative to the working directory when
inside it, so the working dir a `ray job submit --working-dir` uploads to a new temporary
path resumes the same run), size and a hash of their first and last 64 KiB.

One document never stops a part: when `stage(table)` raises, the batch is split in halves
until the rows that fail are found, and each is written with `drop_reason =
"<stage>:error"` and the exception in `error`; the part goes on. More than
`max_error_fraction` of a stage's rows failing is a broken stage, not bad data: the stage is
left incomplete and the run stops (`GuardrailError`), as with `on_excess_drop: fail`.
Duplicate ids inside one raw input file are made unique (the second "7" becomes "7#1") and
counted (`ids_renamed`), so no two rows of a part share an id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from pipeline.io import (
    AtomicParquetWriter,
    column_part_metadata,
    iter_parquet,
    read_json,
    stage_schema,
    write_json_atomic,
)
from pipeline.progress import Progress, configure_ray_data_logging
from pipeline.schema import READ_COLUMNS, schema_for
from pipeline.secrets import mask
from pipeline.stage import ArtifactStage, GlobalStage, MissingColumns, Stage, StageFatal

log = logging.getLogger("primer")
configure_ray_data_logging()


class GuardrailError(RuntimeError):
    """A stage dropped (or failed on) more of its input than its guardrail allows; its
    manifest says `complete: false`, so nothing downstream reads it until it passes."""


# Failures that are not one row's fault: bisecting a batch over them would only turn the
# whole corpus into error rows. They stop the part (and the run) with a clear message.
_FATAL = (MemoryError, OSError, MissingColumns, StageFatal)

_SAMPLE_BYTES = 64 << 10


@dataclass(frozen=True)
class Part:
    name: str
    source: str  # where to open it
    from_stage: bool  # a Primer stage output (Parquet with drop_reason) vs a raw input file
    stable: str = ""  # the path recorded in fingerprints and lineage (see stable_path)

    @property
    def label(self) -> str:
        return self.stable or self.source


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def stable_path(path: str, anchor: str | Path | None = None) -> str:
    """`path` as fingerprints and lineage record it: relative to `anchor` (default: the
    working directory) when inside it, else absolute. A Ray job's working dir is unpacked to
    a new temporary folder on every submission; its files keep their relative paths."""
    absolute = os.path.abspath(path)
    root = os.path.abspath(anchor if anchor is not None else os.getcwd())
    try:
        rel = os.path.relpath(absolute, root)
    except ValueError:  # another drive (Windows)
        return absolute
    return absolute if rel == ".." or rel.startswith(".." + os.sep) else rel


def part_name(path: str, stable: str | None = None) -> str:
    """A stable, readable part name for a raw input file (its name and a digest of its
    stable path)."""
    stem = Path(path).name
    for ext in (
        ".gz",
        ".zst",
        ".warc",
        ".wet",
        ".jsonl",
        ".json",
        ".ndjson",
        ".parquet",
        ".html",
        ".htm",
    ):
        stem = stem.removesuffix(ext)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:48] or "part"
    key = stable if stable is not None else stable_path(path)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def is_stage_output(path: str) -> bool:
    """A Parquet file written by a Primer stage (it has `id` and `drop_reason`). A file
    whose footer does not read is not one: the reader records it as a bad input."""
    if not path.lower().endswith(".parquet"):
        return False
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return False
    return "id" in names and "drop_reason" in names


def plan_parts(files: Sequence[str], anchor: str | Path | None = None) -> list[Part]:
    parts = []
    for f in files:
        stable = stable_path(f, anchor)
        if is_stage_output(f) and Path(f).parent.joinpath("_parts").is_dir():
            parts.append(Part(Path(f).stem, f, True, stable))
        else:
            parts.append(Part(part_name(f, stable), f, is_stage_output(f), stable))
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        # Two inputs from different stage folders with the same part name: disambiguate.
        parts = [
            Part(part_name(p.source, p.stable), p.source, p.from_stage, p.stable) for p in parts
        ]
    return parts


def _content_sample(path: str, size: int) -> str:
    """xxh64 of the first and last 64 KiB: content, not mtime, which copies and Ray's
    working-dir unpacking do not keep. Two small reads per file, even on object storage."""
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE_BYTES))
        if size > 2 * _SAMPLE_BYTES:
            f.seek(size - _SAMPLE_BYTES)
            h.update(f.read(_SAMPLE_BYTES))
        elif size > _SAMPLE_BYTES:
            h.update(f.read())
    return h.hexdigest()


def input_fingerprint(parts: Sequence[Part], read: str = "") -> str:
    """What the raw inputs are: stable path, size and content sample of each (and `read`,
    the reader settings that change what is read from them)."""
    h = hashlib.sha256(read.encode())
    for p in parts:
        size = os.stat(p.source).st_size
        h.update(f"{p.name}\0{p.label}\0{size}\0{_content_sample(p.source, size)}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ReadOptions:
    """How raw input files are read (the recipe's `read:` section)."""

    text_column: str = "text"
    id_column: str = "id"

    def fingerprint(self) -> str:
        return f"text={self.text_column}\0id={self.id_column}"


def _input_columns(part: Part) -> list[str]:
    if part.from_stage:
        return stage_schema(part.source).names
    return list(READ_COLUMNS)


def _iter_input(
    part: Part,
    batch_rows: int,
    columns: Sequence[str] | None = None,
    read: ReadOptions | None = None,
    unique: Any = None,
) -> Iterator[pa.Table]:
    """The part's rows to process; `columns` (stage outputs only) reads just those;
    `unique` (a readers.UniqueIds) counts the ids a raw file repeats."""
    if part.from_stage:
        yield from iter_parquet(part.source, batch_rows=batch_rows, columns=columns)
        return
    from pipeline.readers import iter_batches

    read = read or ReadOptions()
    lineage = pa.scalar(part.label, pa.string())
    for table in iter_batches(
        part.source,
        batch_rows=batch_rows,
        text_column=read.text_column,
        id_column=read.id_column,
        unique_ids=unique,
    ):
        # Lineage names the stable path, not wherever this worker found the file.
        idx = table.column_names.index("source_path")
        yield table.set_column(idx, "source_path", pa.repeat(lineage, len(table)))


def _fill_columns(table: pa.Table, schema: pa.Schema) -> pa.Table:
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table.select(schema.names).cast(schema)


def _error_text(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:500]}" if msg else type(e).__name__


def _guarded(stage: Stage, table: pa.Table) -> Iterator[pa.Table]:
    """`stage(table)`, or, when it raises, the same batch split in halves until the rows
    that fail are alone; each of those comes back as an error row (`<stage>:error`, the
    exception in `error`) and the rest as the stage made them."""
    try:
        yield stage(table)
        return
    except _FATAL:
        raise
    except Exception as e:
        if len(table) > 1:
            mid = len(table) // 2
            yield from _guarded(stage, table.slice(0, mid))
            yield from _guarded(stage, table.slice(mid))
            return
        log.warning(
            "%s: row %r could not be processed (%s); recorded as %s:error",
            stage.name, table["id"][0].as_py() if "id" in table.column_names else "?",
            _error_text(e), stage.name,
        )  # fmt: skip
        reason = pa.array([f"{stage.name}:error"], pa.string())
        out = table.set_column(table.column_names.index("drop_reason"), "drop_reason", reason)
        error = pa.array([_error_text(e)], pa.string())
        if "error" in out.column_names:
            yield out.set_column(out.column_names.index("error"), "error", error)
        else:
            yield out.append_column("error", error)


def process_part(
    stage: Stage, part: Part, out_dir: Path, fingerprint: str, read: ReadOptions | None = None
) -> dict[str, Any]:
    """Run `stage` over one part and commit its output; returns the part's counts."""
    t0 = time.monotonic()
    batch_rows = stage.config.batch_rows
    path = out_dir / f"{part.name}.parquet"
    columns: list[str] | None = None
    if stage.annotates and part.from_stage:
        # A column part: read only what the stage needs, write only what it adds.
        if stage.unwritten_reasons:
            raise TypeError(f"stage {stage.name!r} annotates, so it must write every row")
        columns = ["id", *stage.needs]
        schema = schema_for({"id", *stage.adds, "drop_reason", "error"})
        writer = AtomicParquetWriter(path, metadata=column_part_metadata(path, part.source))
    else:
        schema = schema_for({*_input_columns(part), *stage.adds, "drop_reason", "error"})
        writer = AtomicParquetWriter(path)
    from pipeline.readers import UniqueIds

    unique = None if part.from_stage else UniqueIds()
    unwritten = pa.array([f"{stage.name}:{r}" for r in stage.unwritten_reasons], pa.string())
    rows_in = 0
    dropped: Counter[str] = Counter()
    try:
        stage.ensure_setup()
        for table in _iter_input(part, batch_rows, columns, read, unique):
            rows_in += len(table)
            if "drop_reason" in table.column_names and table["drop_reason"].null_count < len(table):
                # Rows a reader already rejected (bad records) pass through, counted.
                bad = table.filter(pc.is_valid(table["drop_reason"]))
                table = table.filter(pc.is_null(table["drop_reason"]))
                writer.write(_fill_columns(bad, schema))
                dropped.update(bad["drop_reason"].to_pylist())
            if len(table) == 0:
                continue
            for out in _guarded(stage, table):
                reasons = out["drop_reason"]
                if reasons.null_count < len(out):
                    dropped.update(pc.drop_null(reasons).to_pylist())
                    if len(unwritten):
                        out = out.filter(
                            pc.invert(pc.fill_null(pc.is_in(reasons, unwritten), False))
                        )
                writer.write(_fill_columns(out, schema))
        nbytes = writer.close(empty_schema=schema)
    except BaseException as e:
        writer.abort()
        raise PartError(stage.name, part.label, e, str(path)) from e
    n_dropped = sum(dropped.values())
    stats = {
        "part": part.name,
        "source": part.label,
        "fingerprint": fingerprint,
        "rows_in": rows_in,
        "rows_out": rows_in - n_dropped,
        "dropped": dict(sorted(dropped.items())),
        "ids_renamed": unique.renamed if unique is not None else 0,
        "bytes": nbytes,
        "seconds": round(time.monotonic() - t0, 3),
        "finished": _now(),
    }
    write_json_atomic(out_dir / "_parts" / f"{part.name}.json", stats)
    return stats


class PartError(RuntimeError):
    """A part that could not be processed at all (its file vanished, the disk is full, the
    stage's model did not load); `cause` is the original exception."""

    def __init__(
        self, stage: str, source: str, cause: BaseException, path: str | None = None
    ) -> None:
        super().__init__(f"stage {stage!r} failed on {source}: {_error_text(cause)}")
        self.cause = cause
        self.path = path  # the part file it was writing


class _PartWorker:
    """Ray Data UDF: one per worker, the stage built (and its model loaded) once."""

    def __init__(
        self, stage: Stage, out_dir: str, fingerprint: str, read: ReadOptions | None = None
    ) -> None:
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.fingerprint = fingerprint
        self.read = read

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        stats = []
        for name, source, from_stage, stable in zip(
            batch["name"], batch["source"], batch["from_stage"], batch["stable"], strict=True
        ):
            part = Part(str(name), str(source), bool(from_stage), str(stable))
            s = process_part(self.stage, part, self.out_dir, self.fingerprint, self.read)
            stats.append(json.dumps(s))
        return {"stats": stats}


def _run_parts_ray(
    stage: Stage,
    parts: list[Part],
    out_dir: Path,
    fp: str,
    progress: Progress,
    read: ReadOptions | None = None,
) -> None:
    import ray

    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = max(1, min(len(parts), int(total_cpus // max(stage.num_cpus, 0.001))))
    if stage.num_gpus:
        workers = max(1, min(workers, int(ray.cluster_resources().get("GPU", 0) // stage.num_gpus)))
    ds = ray.data.from_items([asdict(p) for p in parts], override_num_blocks=len(parts))
    ds = ds.map_batches(
        _PartWorker,
        fn_constructor_args=(stage, str(out_dir), fp, read),
        batch_size=1,
        # One call at a time per actor, run on the actor's own thread: a part is one whole
        # task, so Ray Data's default single-thread wrapper (the UDF on a helper thread while
        # the actor thread batches) only cost time, about a fifth per part here.
        compute=ray.data.ActorPoolStrategy(
            size=workers, max_concurrent_calls_per_actor=1, enable_true_multi_threading=True
        ),
        num_cpus=stage.num_cpus,
        num_gpus=stage.num_gpus or None,
    )
    for row in ds.iter_rows():
        s = json.loads(row["stats"])
        progress.update(parts=1, rows=s["rows_in"])


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("primer", "pyarrow", "ray", "polars", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def stage_summary(out_dir: Path) -> dict[str, Any]:
    """Counts of a stage over *all* committed parts, whichever attempt wrote them."""
    rows_in = rows_out = nbytes = renamed = 0
    seconds = 0.0
    dropped: Counter[str] = Counter()
    parts = sorted((out_dir / "_parts").glob("*.json"))
    for f in parts:
        s = read_json(f)
        rows_in += s["rows_in"]
        rows_out += s["rows_out"]
        nbytes += s["bytes"]
        seconds += s["seconds"]
        renamed += s.get("ids_renamed", 0)
        dropped.update(s["dropped"])
    return {
        "parts": len(parts),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "dropped": dict(dropped.most_common()),
        "ids_renamed": renamed,
        "bytes": nbytes,
        "work_seconds": round(seconds, 3),
    }


class IncompleteStage(FileNotFoundError):
    """A stage output that a later stage wants to read is missing or did not finish."""


def output_files(stage_dir: Path) -> list[str]:
    """The committed Parquet parts of a finished stage, for the next stage to read."""
    manifest = stage_dir / "_manifest.json"
    if not manifest.is_file():
        raise IncompleteStage(
            f"{stage_dir} is not a finished stage output (no _manifest.json); run stage "
            f"{stage_dir.name!r} first"
        )
    m = read_json(manifest)
    if not m.get("complete"):
        why = m.get("failed") or "it did not finish"
        raise IncompleteStage(
            f"stage {stage_dir.name!r} in {stage_dir.parent} is not complete ({why}); fix "
            f"that and run stage {stage_dir.name!r} again before the stages after it"
        )
    return [str(stage_dir / f"{p}.parquet") for p in m["part_names"]]


def output_fingerprint(stage_dir: Path) -> str:
    """What stages downstream chain into their own fingerprints: the stage's fingerprint
    and its state's revision (a retry that recovered answers changes it)."""
    m = read_json(stage_dir / "_manifest.json")
    return m.get("output_fingerprint") or m["fingerprint"]


def _guardrail(stage: Stage, summary: dict[str, Any]) -> dict[str, Any]:
    sampled_out = {f"{stage.name}:{r}" for r in stage.unwritten_reasons}
    lost = sum(n for r, n in summary["dropped"].items() if r not in sampled_out)
    errors = summary["dropped"].get(f"{stage.name}:error", 0)
    rows = summary["rows_in"]
    frac = lost / rows if rows else 0.0
    err_frac = errors / rows if rows else 0.0
    cfg = stage.config
    return {
        "drop_fraction": round(frac, 4),
        "max_drop_fraction": cfg.max_drop_fraction,
        "exceeded": frac > cfg.max_drop_fraction,
        "error_rows": errors,
        "error_fraction": round(err_frac, 4),
        "max_error_fraction": cfg.max_error_fraction,
        "errors_exceeded": err_frac > cfg.max_error_fraction,
    }


def _guardrail_message(stage: Stage, name: str, summary: dict, guard: dict, out_dir: Path) -> str:
    top = ", ".join(f"{k}: {v:,}" for k, v in list(summary["dropped"].items())[:5])
    if guard["errors_exceeded"]:
        return (
            f"GUARDRAIL: stage {name!r} could not process {guard['error_rows']:,} of its "
            f"{summary['rows_in']:,} input rows ({guard['error_fraction']:.1%}, over its "
            f"max_error_fraction {guard['max_error_fraction']:.1%}): a broken stage or model, "
            f"not bad data. The exceptions are in the `error` column of the "
            f"'{stage.name}:error' rows under {out_dir} (`primer why RUN ID`); fix the cause, "
            f"or raise stages.{name}.max_error_fraction, and run again."
        )
    return (
        f"GUARDRAIL: stage {name!r} dropped {guard['drop_fraction']:.1%} of its "
        f"{summary['rows_in']:,} input rows, over its max_drop_fraction "
        f"{guard['max_drop_fraction']:.0%} (top reasons: {top}). Check the input and "
        f"thresholds in {out_dir}; raise stages.{name}.max_drop_fraction (or set "
        f"on_excess_drop: warn) to accept it, then run again."
    )


def _run_artifact(
    stage: ArtifactStage,
    name: str,
    parts: list[Part],
    out_dir: Path,
    use_ray: bool,
    fp: str,
    previous: dict[str, Any],
    started: str,
    t0: float,
) -> dict[str, Any]:
    if previous.get("complete") and previous.get("fingerprint") == fp:
        log.info("%s: artifact up to date, skipping", stage.name)
        return previous
    log.info("%s: building from %d input files", stage.name, len(parts))
    stats = stage.build([p.source for p in parts], str(out_dir), use_ray)
    wall = round(time.monotonic() - t0, 3)
    manifest = {
        "stage": name,
        "uses": stage.name,
        "version": stage.version,
        "kind": "artifact",
        "fingerprint": fp,
        "config": mask(stage.config.model_dump(mode="json")),
        "versions": _versions(),
        "inputs": [p.label for p in parts],
        "part_names": stats.get("part_names", []),
        "complete": True,
        "failed": None,
        "parts": 0,
        "rows_in": stats.get("rows_in", 0),
        "rows_out": stats.get("rows_out", stats.get("rows_in", 0)),
        "dropped": stats.get("dropped", {}),
        "bytes": sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()),
        "work_seconds": wall,
        "wall_seconds": wall,
        "attempts": [
            {"started": started, "finished": _now(), "parts_run": 0, "wall_seconds": wall}
        ],
        "guardrail": {
            "drop_fraction": 0.0,
            "max_drop_fraction": stage.config.max_drop_fraction,
            "exceeded": False,
        },
        "artifact": stats,
    }
    write_json_atomic(out_dir / "_manifest.json", manifest)
    return manifest


def _reset_parts(out_dir: Path) -> None:
    """Forget a stage's committed parts (and its manifest), keeping `_state/`: a retry
    re-processes every part with the state's new answers."""
    shutil.rmtree(out_dir / "_parts", ignore_errors=True)
    for f in out_dir.glob("*.parquet"):
        f.unlink()
    (out_dir / "_manifest.json").unlink(missing_ok=True)


def run_stage(
    stage: Stage,
    files: Sequence[str],
    out_root: Path,
    use_ray: bool,
    upstream_fingerprint: str = "",
    config_fingerprint: str = "",
    name: str | None = None,
    *,
    read: ReadOptions | None = None,
    skipped_inputs: Sequence[tuple[str, str]] = (),
    retry_failed: bool = False,
    anchor: str | Path | None = None,
) -> dict[str, Any]:
    """Run one stage over `files` into `out_root/<name or stage.name>/`, skipping committed
    parts. `name` is the recipe's name for this use of the stage (a recipe may run `dedup`
    twice, as `dedup` and `synth_dedup`); drop reasons keep the stage's own name.
    `config_fingerprint` defaults to the stage's own (`Stage.fingerprint`);
    `skipped_inputs` ((file, why) the planner left out) are recorded in the manifest;
    `retry_failed` asks a `retryable` stage's failed rows again (`reopen_failed`)."""
    name = name or stage.name
    out_dir = out_root / name
    parts = plan_parts(files, anchor)
    read = read or ReadOptions()
    config_fingerprint = config_fingerprint or stage.fingerprint(name)
    upstream = upstream_fingerprint or input_fingerprint(parts, read.fingerprint())
    fp = hashlib.sha256(f"{config_fingerprint}|{upstream}".encode()).hexdigest()[:16]

    fp_file = out_dir / "_fingerprint"
    if fp_file.is_file() and fp_file.read_text().strip() != fp:
        log.warning(
            "%s: config or input changed since the last run; recomputing the stage", out_dir
        )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(".*.tmp-*"), *out_dir.glob("_parts/.*.tmp-*")]:
        stale.unlink(missing_ok=True)  # left by a killed attempt; never a committed file
    if not fp_file.is_file():
        tmp = out_dir / "._fingerprint.tmp"
        tmp.write_text(fp + "\n")
        os.replace(tmp, fp_file)

    manifest_path = out_dir / "_manifest.json"
    previous = read_json(manifest_path) if manifest_path.is_file() else {}
    attempts = previous.get("attempts", [])
    retries = previous.get("retries", [])
    started, t0 = _now(), time.monotonic()
    if isinstance(stage, ArtifactStage):
        return _run_artifact(stage, name, parts, out_dir, use_ray, fp, previous, started, t0)

    retry: dict[str, Any] | None = None
    if retry_failed and isinstance(stage, GlobalStage) and stage.retryable:
        state_dir = out_dir / "_state"
        failed = stage.reopen_failed(str(state_dir)) if state_dir.is_dir() else 0
        if failed:
            log.info("%s: --retry-failed: asking %d failed rows again", name, failed)
            _reset_parts(out_dir)
            previous = {}
            retry = {"started": started, "failed_before": failed}
        else:
            log.info("%s: --retry-failed: no failed rows recorded", name)

    done = {p.stem for p in (out_dir / "_parts").glob("*.json")}
    pending = [p for p in parts if p.name not in done]
    log.info(
        "%s: %d parts, %d already done, %d to run", stage.name, len(parts), len(done), len(pending)
    )

    if isinstance(stage, GlobalStage):
        stage.state_dir = str(out_dir / "_state")
        if pending and not (out_dir / "_state" / "_DONE").is_file():
            stage.prepare([p.source for p in parts], stage.state_dir, use_ray)

    # Parts finished by earlier attempts are counted as done, not as this attempt's speed.
    progress = Progress(stage.name, len(parts), done=len(parts) - len(pending))
    if pending:
        if use_ray:
            _run_parts_ray(stage, pending, out_dir, fp, progress, read)
        else:
            for part in pending:
                s = process_part(stage, part, out_dir, fp, read)
                progress.update(parts=1, rows=s["rows_in"])
        progress.close()

    summary = stage_summary(out_dir)
    attempts.append(
        {
            "started": started,
            "finished": _now(),
            "parts_run": len(pending),
            "wall_seconds": round(time.monotonic() - t0, 3),
        }
    )
    if retry is not None:
        after = summary["dropped"].get(f"{stage.name}:teacher_error", 0)
        retry |= {"failed_after": after, "recovered": retry["failed_before"] - after}
        retries.append(retry)
        log.info(
            "%s: retry recovered %d of %d failed rows", name, retry["recovered"],
            retry["failed_before"],
        )  # fmt: skip
    guard = _guardrail(stage, summary)
    stop = guard["errors_exceeded"] or (guard["exceeded"] and stage.config.on_excess_drop == "fail")
    message = _guardrail_message(stage, name, summary, guard, out_dir) if (
        guard["exceeded"] or guard["errors_exceeded"]
    ) else None  # fmt: skip
    revision = stage.output_revision() if isinstance(stage, GlobalStage) else ""
    manifest = {
        "stage": name,
        "uses": stage.name,
        "version": stage.version,
        "fingerprint": fp,
        "output_fingerprint": (
            hashlib.sha256(f"{fp}|{revision}".encode()).hexdigest()[:16] if revision else fp
        ),
        "config": mask(stage.config.model_dump(mode="json")),
        "versions": _versions(),
        "inputs": [p.label for p in parts],
        "skipped_inputs": [{"path": f, "why": why} for f, why in skipped_inputs],
        "part_names": [p.name for p in parts],
        # A stage stopped by its guardrail is left incomplete: nothing downstream reads it.
        "complete": not stop,
        "failed": message if stop else None,
        **summary,
        "wall_seconds": round(sum(a["wall_seconds"] for a in attempts), 3),
        "attempts": attempts,
        "retries": retries,
        "guardrail": guard,
    }
    write_json_atomic(manifest_path, manifest)
    if message:
        if stop:
            raise GuardrailError(message)
        log.warning("\n%s\n%s\n%s", "!" * 80, message, "!" * 80)
    return manifest
