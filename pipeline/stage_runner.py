"""Run one stage over its parts, resumably, and write its manifest.

`run_stage` is the whole life of one stage in a run folder `DIR/<stage>/`:
- invalidation: the runner computes the stage's fingerprint itself, from the stage's config
  less what cannot change its output (guardrail bounds, the stage's `transport_keys`),
  chained with its input's fingerprint. A folder written under another fingerprint is
  recomputed; when only the stage's `threshold_keys` changed, its stored scores are kept
  and only `drop_reason` is marked again (`scores_reused` in the manifest);
- dispatch: pending parts go through an `Executor` (pipeline/executor.py): in this process,
  or on Ray, in an actor pool for stages that load a model and as tasks for the rest;
- global stages (`prepare` once over all inputs) and artifact stages (`build`) get the same
  executor for their own fan-out;
- counts: the manifest sums every committed part, whichever attempt wrote it, and the
  guardrails (`max_drop_fraction`, `max_error_fraction`) judge the whole stage.

The unit of work and its commit protocol are in pipeline/parts.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.executor import LOCAL, Executor
from pipeline.io import read_json, write_json_atomic
from pipeline.parts import (
    Part,
    PartTask,
    ReadOptions,
    RemarkTask,
    input_fingerprint,
    plan_parts,
    utc_now,
)
from pipeline.progress import Progress
from pipeline.remote import RemoteRun
from pipeline.secrets import mask
from pipeline.stage import ArtifactStage, GlobalStage, Stage

log = logging.getLogger("primer")


class GuardrailError(RuntimeError):
    """A stage dropped (or failed on) more of its input than its guardrail allows; its
    manifest says `complete: false`, so nothing downstream reads it until it passes."""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("primer", "pyarrow", "ray", "polars", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def stage_summary(out_dir: Path) -> dict[str, Any]:
    """Counts of a stage over *all* committed parts, whichever attempt wrote them."""
    rows_in = rows_out = nbytes = renamed = reused = 0
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
        reused += bool(s.get("scores_reused"))
        dropped.update(s["dropped"])
    return {
        "parts": len(parts),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "dropped": dict(dropped.most_common()),
        "ids_renamed": renamed,
        # Parts marked again from their stored scores (only thresholds changed since).
        "scores_reused": reused > 0,
        "parts_scores_reused": reused,
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
    executor: Executor,
    fp: str,
    previous: dict[str, Any],
    started: str,
    t0: float,
) -> dict[str, Any]:
    if previous.get("complete") and previous.get("fingerprint") == fp:
        log.info("%s: artifact up to date, skipping", stage.name)
        return previous
    log.info("%s: building from %d input files", stage.name, len(parts))
    stats = stage.build([p.source for p in parts], str(out_dir), executor)
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
            {"started": started, "finished": utc_now(), "parts_run": 0, "wall_seconds": wall}
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


def upstream_fingerprint(parts: Sequence[Part], read: ReadOptions) -> str:
    """What a stage's input is: for parts of an earlier stage's folder, that stage's output
    fingerprint (it chains everything before it) and the part names; for other files, their
    stable paths, sizes and contents (`input_fingerprint`)."""
    chained: dict[str, list[str]] = {}
    loose = []
    for p in parts:
        folder = Path(p.source).parent
        if p.from_stage and (folder / "_manifest.json").is_file():
            chained.setdefault(str(folder), []).append(p.name)
        else:
            loose.append(p)
    h = hashlib.sha256()
    for folder, names in sorted(chained.items()):
        h.update(f"{output_fingerprint(Path(folder))}\0{chr(1).join(sorted(names))}\n".encode())
    if loose:
        h.update(input_fingerprint(loose, read.fingerprint()).encode())
    return h.hexdigest()[:16]


def _chain(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def run_stage(
    stage: Stage,
    files: Sequence[str],
    out_root: Path,
    executor: Executor = LOCAL,
    *,
    name: str | None = None,
    read: ReadOptions | None = None,
    skipped_inputs: Sequence[tuple[str, str]] = (),
    retry_failed: bool = False,
    anchor: str | Path | None = None,
    remote: RemoteRun | None = None,
) -> dict[str, Any]:
    """Run one stage over `files` into `out_root/<name or stage.name>/`, skipping committed
    parts. `name` is the recipe's name for this use of the stage (a recipe may run `dedup`
    twice, as `dedup` and `synth_dedup`); drop reasons keep the stage's own name. "@stage/
    file" values in the stage's config name files in `out_root`. `skipped_inputs` ((file,
    why) the planner left out) are recorded in the manifest; `retry_failed` asks a
    `retryable` stage's failed rows again (`reopen_failed`). With `remote`, `out_root` is
    the staging folder of a run on object storage, kept in step with it (pipeline/remote.py)."""
    if not isinstance(executor, Executor):
        raise TypeError(f"run_stage: executor must be an Executor, not {executor!r}")
    name = name or stage.name
    out_dir = out_root / name
    read = read or ReadOptions()
    parts = plan_parts(files, anchor, read, run_root=out_root)
    # The fingerprint is taken before "@stage" values become paths, so a run folder that
    # moves keeps its fingerprints; the stages they name chain in through their outputs.
    upstream = "+".join(
        [upstream_fingerprint(parts, read)]
        + [output_fingerprint(out_root / ref) for ref in stage.config_refs()]
    )
    fp = _chain(stage.fingerprint(name), upstream)
    scores_fp = _chain(stage.fingerprint(name, scores_only=True), upstream)
    stage = stage.with_refs_resolved(out_root)

    # `_fingerprint` holds what decided the stored scores (and any `_state/`): when it
    # changes the whole folder goes; when only thresholds changed, parts are marked again.
    fp_file = out_dir / "_fingerprint"
    if fp_file.is_file() and fp_file.read_text().strip() != scores_fp:
        log.warning(
            "%s: config or input changed since the last run; recomputing the stage", out_dir
        )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(".*.tmp-*"), *out_dir.glob("_parts/.*.tmp-*")]:
        stale.unlink(missing_ok=True)  # left by a killed attempt; never a committed file
    if not fp_file.is_file():
        tmp = out_dir / "._fingerprint.tmp"
        tmp.write_text(scores_fp + "\n")
        os.replace(tmp, fp_file)
    if remote is not None:
        remote.open_stage(name)

    manifest_path = out_dir / "_manifest.json"
    previous = read_json(manifest_path) if manifest_path.is_file() else {}
    attempts = previous.get("attempts", [])
    retries = previous.get("retries", [])
    started, t0 = utc_now(), time.monotonic()
    if isinstance(stage, ArtifactStage):
        manifest = _run_artifact(stage, name, parts, out_dir, executor, fp, previous, started, t0)
        if remote is not None:
            remote.push_stage(name)
        return manifest

    retry: dict[str, Any] | None = None
    if retry_failed and isinstance(stage, GlobalStage) and stage.retryable:
        state_dir = out_dir / "_state"
        failed = stage.reopen_failed(str(state_dir)) if state_dir.is_dir() else 0
        if failed:
            log.info("%s: --retry-failed: asking %d failed rows again", name, failed)
            _reset_parts(out_dir)
            if remote is not None:
                remote.reset_parts(name)
            previous = {}
            retry = {"started": started, "failed_before": failed}
        else:
            log.info("%s: --retry-failed: no failed rows recorded", name)

    committed = {p.stem: read_json(p)["fingerprint"] for p in (out_dir / "_parts").glob("*.json")}
    remark = [p.name for p in parts if committed.get(p.name, fp) != fp]
    if not stage.threshold_keys:
        remark = []  # nothing to mark again from: such parts are computed again
    pending = [p for p in parts if committed.get(p.name) != fp and p.name not in remark]
    log.info(
        "%s: %d parts, %d already done, %d to run%s", stage.name, len(parts),
        len(parts) - len(pending) - len(remark), len(pending),
        f", {len(remark)} to mark again (only thresholds changed)" if remark else "",
    )  # fmt: skip

    if isinstance(stage, GlobalStage):
        stage.state_dir = str(out_dir / "_state")
        if pending and not (out_dir / "_state" / "_DONE").is_file():
            stage.prepare([p.source for p in parts], stage.state_dir, executor)
            if remote is not None:
                remote.push_stage(name, final=False)  # the state, before any part uses it

    # Parts finished by earlier attempts are counted as done, not as this attempt's speed.
    progress = Progress(stage.name, len(parts), done=len(parts) - len(pending) - len(remark))
    remote_stage = remote.stage_uri(name) if remote is not None else None
    if remark:
        for s in executor.map(RemarkTask(stage, str(out_dir), fp, remote_stage), remark):
            progress.update(parts=1, rows=s["rows_in"])
    if pending:
        task = PartTask(stage, str(out_dir), fp, read, remote_stage)
        for s in executor.map(
            task, pending, uses_model=stage.uses_model, num_cpus=stage.num_cpus,
            num_gpus=stage.num_gpus,
        ):  # fmt: skip
            progress.update(parts=1, rows=s["rows_in"])
    if remark or pending:
        progress.close()

    summary = stage_summary(out_dir)
    attempts.append(
        {
            "started": started,
            "finished": utc_now(),
            "parts_run": len(pending),
            "parts_marked_again": len(remark),
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
        "scores_fingerprint": scores_fp,
        "output_fingerprint": _chain(fp, revision) if revision else fp,
        "config": mask(stage.config.model_dump(mode="json")),
        "versions": _versions(),
        "executor": executor.name,
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
    if remote is not None:
        remote.push_stage(name)
    if message:
        if stop:
            raise GuardrailError(message)
        log.warning("\n%s\n%s\n%s", "!" * 80, message, "!" * 80)
    return manifest
