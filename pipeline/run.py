"""Run a recipe end to end (or some of its stages) and leave a readable summary.

`run_recipe` plans and checks everything first (pipeline/plan.py), locks the run folder
(pipeline/lock.py), starts or joins Ray (pipeline/executor.py), runs each stage in order
through `run_stage` (pipeline/stage_runner.py), each reading the previous stage's kept
rows, and writes `DIR/run_summary.json` (pipeline/summary.py) and `DIR/report.html`.
A run folder on object storage (`--output s3://...`) is locked and pulled into its staging
folder first, and kept in step with it as parts and stages commit (pipeline/remote.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.executor import LOCAL, Executor, init_ray
from pipeline.lock import RunLock
from pipeline.parts import ReadOptions, utc_now
from pipeline.plan import StagePlan, plan_run, select_stages
from pipeline.recipe import ConfigError, LoadedRecipe
from pipeline.remote import RemoteRun
from pipeline.secrets import scrub
from pipeline.stage_runner import output_files, run_stage
from pipeline.summary import write_run_summary

log = logging.getLogger("primer")


def run_recipe(
    loaded: LoadedRecipe,
    output: str | Path | None = None,
    only: Sequence[str] | None = None,
    ray_address: str | None = None,
    executor: str | None = None,
    retry_failed: bool = False,
    command: str | None = None,
    staging: str | Path | None = None,
) -> dict[str, Any]:
    """Run the selected stages (all by default) of a validated recipe into `output`.

    Everything checkable is checked first (`plan_run`); then the run folder is locked
    (pipeline/lock.py: a second run on it exits at once), Ray is started or joined, and each
    stage runs in order. `retry_failed` asks the failed rows of retryable (teacher) stages
    again; stages after them recompute only if answers were recovered. `output` may be a
    URI on object storage: the run works in `staging` (pipeline/remote.py)."""
    target = str(output) if output else loaded.output_location
    selected = select_stages(loaded, only)
    cfg = loaded.recipe.read
    read = ReadOptions.of(cfg)
    with contextlib.ExitStack() as held:
        remote = None
        if storage.is_remote(target):
            # Locked and pulled before planning: the plan reads stages the bucket holds.
            remote = RemoteRun(target, staging)
            held.enter_context(remote.lock(command or "primer run"))
            remote.pull()
            out_root = remote.staging
        else:
            out_root = Path(storage.local(target))
            if out_root.exists() and not out_root.is_dir():
                raise ConfigError(f"--output: {out_root} is a file, not a run folder")
        plans = plan_run(loaded, selected, out_root)
        out_root.mkdir(parents=True, exist_ok=True)
        with RunLock(out_root, command):
            where: Executor = LOCAL
            if (executor or loaded.recipe.executor) == "ray":
                where = init_ray(
                    ray_address or loaded.recipe.ray.address, loaded.recipe.ray.num_cpus
                )
            t0, started = time.monotonic(), utc_now()
            error = None
            try:
                for plan in plans:
                    _run_planned(plan, out_root, where, read, retry_failed, remote)
            except BaseException as e:
                error = scrub(f"{type(e).__name__}: {e}")
                raise
            finally:
                # A stopped run still leaves a summary of everything committed so far.
                summary = write_run_summary(
                    out_root, loaded, started, time.monotonic() - t0, error, command
                )
                if remote is not None:
                    remote.push_run_files()
        # report.html is a view of files already committed: failing a finished run over it
        # would make a scheduler re-run good work, so an error is logged loudly and the run
        # succeeds.
        try:
            from pipeline.views.report import write_report

            log.info("report: %s", write_report(out_root))
            if remote is not None:
                remote.push_run_files()
                log.info("run folder: %s (staging %s)", remote.uri, remote.staging)
        except Exception:
            log.error(
                "report.html was NOT written for %s (the run's data and run_summary.json are "
                "complete); retry with: python -m pipeline.views.report %s",
                out_root,
                out_root,
                exc_info=True,
            )
    return summary


def _run_planned(
    plan: StagePlan,
    out_root: Path,
    executor: Executor,
    read: ReadOptions,
    retry_failed: bool,
    remote: RemoteRun | None,
) -> None:
    spec = plan.spec
    if plan.files is not None:
        files = plan.files
    else:
        files = [f for r in plan.refs for f in output_files(out_root / r)]
    log.info("stage %s: %d input files", spec.name, len(files))
    run_stage(
        spec.cls(spec.config), files, out_root, executor, name=spec.name, read=read,
        skipped_inputs=plan.skipped, retry_failed=retry_failed, remote=remote,
    )  # fmt: skip
