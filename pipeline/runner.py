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
threshold and the stage (and everything after it) is recomputed rather than mixed.
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

from pipeline.io import (
    AtomicParquetWriter,
    column_part_metadata,
    iter_parquet,
    read_json,
    stage_schema,
    write_json_atomic,
)
from pipeline.progress import Progress
from pipeline.schema import READ_COLUMNS, schema_for
from pipeline.stage import ArtifactStage, GlobalStage, Stage

log = logging.getLogger("primer")


class GuardrailError(RuntimeError):
    """A stage dropped more of its input than its `max_drop_fraction` allows."""


@dataclass(frozen=True)
class Part:
    name: str
    source: str
    from_stage: bool  # a Primer stage output (Parquet with drop_reason) vs a raw input file


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def part_name(path: str) -> str:
    """A stable, readable part name for a raw input file."""
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
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def is_stage_output(path: str) -> bool:
    """A Parquet file written by a Primer stage (it has `id` and `drop_reason`)."""
    if not path.endswith(".parquet"):
        return False
    names = pq.read_schema(path).names
    return "id" in names and "drop_reason" in names


def plan_parts(files: Sequence[str]) -> list[Part]:
    parts = []
    for f in files:
        if is_stage_output(f) and Path(f).parent.joinpath("_parts").is_dir():
            parts.append(Part(Path(f).stem, f, True))
        else:
            parts.append(Part(part_name(f), f, is_stage_output(f)))
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        # Two inputs from different stage folders with the same part name: disambiguate.
        parts = [Part(part_name(p.source), p.source, p.from_stage) for p in parts]
    return parts


def input_fingerprint(parts: Sequence[Part]) -> str:
    h = hashlib.sha256()
    for p in parts:
        st = os.stat(p.source)
        h.update(f"{p.name}\0{p.source}\0{st.st_size}\n".encode())
    return h.hexdigest()[:16]


def _input_columns(part: Part) -> list[str]:
    if part.from_stage:
        return stage_schema(part.source).names
    return list(READ_COLUMNS)


def _iter_input(
    part: Part, batch_rows: int, columns: Sequence[str] | None = None
) -> Iterator[pa.Table]:
    """The part's rows to process; `columns` (stage outputs only) reads just those."""
    if part.from_stage:
        yield from iter_parquet(part.source, batch_rows=batch_rows, columns=columns)
    else:
        from pipeline.readers import iter_batches

        yield from iter_batches(part.source, batch_rows=batch_rows)


def _fill_columns(table: pa.Table, schema: pa.Schema) -> pa.Table:
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table.select(schema.names).cast(schema)


def process_part(stage: Stage, part: Part, out_dir: Path, fingerprint: str) -> dict[str, Any]:
    """Run `stage` over one part and commit its output; returns the part's counts."""
    t0 = time.monotonic()
    batch_rows = stage.config.batch_rows
    path = out_dir / f"{part.name}.parquet"
    read: list[str] | None = None
    if stage.annotates and part.from_stage:
        # A column part: read only what the stage needs, write only what it adds.
        if stage.unwritten_reasons:
            raise TypeError(f"stage {stage.name!r} annotates, so it must write every row")
        read = ["id", *stage.needs]
        schema = schema_for({"id", *stage.adds, "drop_reason"})
        writer = AtomicParquetWriter(path, metadata=column_part_metadata(path, part.source))
    else:
        schema = schema_for({*_input_columns(part), *stage.adds, "drop_reason"})
        writer = AtomicParquetWriter(path)
    rows_in = 0
    dropped: Counter[str] = Counter()
    try:
        for table in _iter_input(part, batch_rows, read):
            rows_in += len(table)
            if "drop_reason" in table.column_names and table["drop_reason"].null_count < len(table):
                # Rows a reader already rejected (bad records) pass through, counted.
                bad = table.filter(pc.is_valid(table["drop_reason"]))
                table = table.filter(pc.is_null(table["drop_reason"]))
                writer.write(_fill_columns(bad, schema))
                dropped.update(bad["drop_reason"].to_pylist())
            if len(table) == 0:
                continue
            out = stage(table)
            reasons = out["drop_reason"]
            if reasons.null_count < len(out):
                dropped.update(pc.drop_null(reasons).to_pylist())
                if stage.unwritten_reasons:
                    unwritten = [f"{stage.name}:{r}" for r in stage.unwritten_reasons]
                    out = out.filter(
                        pc.invert(pc.fill_null(pc.is_in(reasons, pa.array(unwritten)), False))
                    )
            writer.write(_fill_columns(out, schema))
        nbytes = writer.close(empty_schema=schema)
    except BaseException as e:
        writer.abort()
        raise RuntimeError(
            f"stage {stage.name!r} failed on {part.source}: {type(e).__name__}: {e}"
        ) from e
    n_dropped = sum(dropped.values())
    stats = {
        "part": part.name,
        "source": part.source,
        "fingerprint": fingerprint,
        "rows_in": rows_in,
        "rows_out": rows_in - n_dropped,
        "dropped": dict(sorted(dropped.items())),
        "bytes": nbytes,
        "seconds": round(time.monotonic() - t0, 3),
        "finished": _now(),
    }
    write_json_atomic(out_dir / "_parts" / f"{part.name}.json", stats)
    return stats


class _PartWorker:
    """Ray Data UDF: one per worker, the stage built (and its model loaded) once."""

    def __init__(self, stage: Stage, out_dir: str, fingerprint: str) -> None:
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.fingerprint = fingerprint

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        stats = []
        for name, source, from_stage in zip(
            batch["name"], batch["source"], batch["from_stage"], strict=True
        ):
            part = Part(str(name), str(source), bool(from_stage))
            stats.append(json.dumps(process_part(self.stage, part, self.out_dir, self.fingerprint)))
        return {"stats": stats}


def _run_parts_ray(
    stage: Stage, parts: list[Part], out_dir: Path, fp: str, progress: Progress
) -> None:
    import ray

    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = max(1, min(len(parts), int(total_cpus // max(stage.num_cpus, 0.001))))
    if stage.num_gpus:
        workers = max(1, min(workers, int(ray.cluster_resources().get("GPU", 0) // stage.num_gpus)))
    ds = ray.data.from_items([asdict(p) for p in parts], override_num_blocks=len(parts))
    ds = ds.map_batches(
        _PartWorker,
        fn_constructor_args=(stage, str(out_dir), fp),
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
    rows_in = rows_out = nbytes = 0
    seconds = 0.0
    dropped: Counter[str] = Counter()
    parts = sorted((out_dir / "_parts").glob("*.json"))
    for f in parts:
        s = read_json(f)
        rows_in += s["rows_in"]
        rows_out += s["rows_out"]
        nbytes += s["bytes"]
        seconds += s["seconds"]
        dropped.update(s["dropped"])
    return {
        "parts": len(parts),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "dropped": dict(dropped.most_common()),
        "bytes": nbytes,
        "work_seconds": round(seconds, 3),
    }


def output_files(stage_dir: Path) -> list[str]:
    """The committed Parquet parts of a finished stage, for the next stage to read."""
    manifest = stage_dir / "_manifest.json"
    if not manifest.is_file() or not read_json(manifest).get("complete"):
        raise FileNotFoundError(
            f"{stage_dir} is not a finished stage output (no complete _manifest.json); "
            f"run that stage first"
        )
    return [str(stage_dir / f"{p}.parquet") for p in read_json(manifest)["part_names"]]


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
        "config": stage.config.model_dump(mode="json"),
        "versions": _versions(),
        "inputs": [p.source for p in parts],
        "part_names": stats.get("part_names", []),
        "complete": True,
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


def run_stage(
    stage: Stage,
    files: Sequence[str],
    out_root: Path,
    use_ray: bool,
    upstream_fingerprint: str = "",
    config_fingerprint: str = "",
    name: str | None = None,
) -> dict[str, Any]:
    """Run one stage over `files` into `out_root/<name or stage.name>/`, skipping committed
    parts. `name` is the recipe's name for this use of the stage (a recipe may run `dedup`
    twice, as `dedup` and `synth_dedup`); drop reasons keep the stage's own name."""
    name = name or stage.name
    out_dir = out_root / name
    parts = plan_parts(files)
    fp = hashlib.sha256(
        f"{config_fingerprint}|{upstream_fingerprint or input_fingerprint(parts)}".encode()
    ).hexdigest()[:16]

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
    started, t0 = _now(), time.monotonic()
    if isinstance(stage, ArtifactStage):
        return _run_artifact(stage, name, parts, out_dir, use_ray, fp, previous, started, t0)

    done = {p.stem for p in (out_dir / "_parts").glob("*.json")}
    pending = [p for p in parts if p.name not in done]
    log.info(
        "%s: %d parts, %d already done, %d to run", stage.name, len(parts), len(done), len(pending)
    )

    if isinstance(stage, GlobalStage):
        stage.state_dir = str(out_dir / "_state")
        if pending and not (out_dir / "_state" / "_DONE").is_file():
            stage.prepare([p.source for p in parts], stage.state_dir, use_ray)

    progress = Progress(stage.name, len(parts))
    progress.parts = len(parts) - len(pending)
    if pending:
        if use_ray:
            _run_parts_ray(stage, pending, out_dir, fp, progress)
        else:
            for part in pending:
                s = process_part(stage, part, out_dir, fp)
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
    sampled_out = {f"{stage.name}:{r}" for r in stage.unwritten_reasons}
    lost = sum(n for r, n in summary["dropped"].items() if r not in sampled_out)
    frac = lost / summary["rows_in"] if summary["rows_in"] else 0.0
    guard = {
        "drop_fraction": round(frac, 4),
        "max_drop_fraction": stage.config.max_drop_fraction,
        "exceeded": frac > stage.config.max_drop_fraction,
    }
    manifest = {
        "stage": name,
        "uses": stage.name,
        "version": stage.version,
        "fingerprint": fp,
        "config": stage.config.model_dump(mode="json"),
        "versions": _versions(),
        "inputs": [p.source for p in parts],
        "part_names": [p.name for p in parts],
        "complete": True,
        **summary,
        "wall_seconds": round(sum(a["wall_seconds"] for a in attempts), 3),
        "attempts": attempts,
        "guardrail": guard,
    }
    write_json_atomic(manifest_path, manifest)
    if guard["exceeded"]:
        top = ", ".join(f"{k}: {v:,}" for k, v in list(summary["dropped"].items())[:5])
        msg = (
            f"GUARDRAIL: stage {stage.name!r} dropped {frac:.1%} of its {summary['rows_in']:,} input rows, "
            f"over its max_drop_fraction {stage.config.max_drop_fraction:.0%} (top reasons: {top}). "
            f"Check the input and thresholds; see {out_dir}."
        )
        if stage.config.on_excess_drop == "fail":
            raise GuardrailError(msg)
        log.warning("\n%s\n%s\n%s", "!" * 80, msg, "!" * 80)
    return manifest
