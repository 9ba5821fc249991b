"""Run one recipe stage for a scheduler: a local `primer` process, or a job on a Ray cluster.

The Airflow DAGs (pipeline/orchestration/dags.py) call `run_task` and nothing else. This
module reads a recipe for its stages, their output folders (RUN/<stage>) and what each
reads (`plan`), builds the command

    primer run RECIPE --stages STAGE --output RUN [--set k=v ...] [--executor local]

and runs it either as a subprocess of the worker (its output streamed to the log; a
failure raises with the exit code and the tail of stderr) or, when a Ray cluster's Jobs
API address is configured, as a Ray job (`JobSubmissionClient`) whose submission id is
fixed per (DAG run, stage), so that a retried task re-attaches to a job that still runs
instead of submitting it twice. There is no pipeline logic here: `primer run` resumes
finished parts and skips finished stages, so a retry is always safe, and a stage is done
when RUN/<stage>/_manifest.json says `complete: true`. Plain Python, no Airflow: it is
unit-tested in the main venv.

Settings come from arguments or the environment (see `Settings.from_env`):

    PRIMER_RECIPE            recipe YAML (default: configs/quickstart.yaml in this checkout)
    PRIMER_RUN_DIR           run folder (default: runs/<recipe file stem>-airflow here)
    PRIMER_BIN               the primer command (default: `primer` beside this Python)
    PRIMER_WORKDIR           its working directory, which recipe config paths such as
                             label_files are relative to (default: this checkout)
    PRIMER_EXECUTOR          ray | local (default: the recipe's)
    PRIMER_OVERRIDES         `--set` overrides, shell-quoted: "stages.quality.min_words=100"
    PRIMER_RAY_JOBS_ADDRESS  Ray Jobs API, e.g. http://head:8265: stages run as Ray jobs
    PRIMER_RAY_WORKING_DIR   runtime_env working_dir uploaded with each job, e.g. this
                             checkout, so the recipe's relative paths resolve on the cluster
                             (default none: the job's paths must be absolute there)
    PRIMER_RAY_PRIMER_BIN    the primer command on the cluster (default `primer`)
    PRIMER_STAGE_TIMEOUT     seconds one stage may run (default 86400)
    PRIMER_RETRIES, PRIMER_RETRY_DELAY   task retries and seconds between them (2, 300)
    PRIMER_WEB_SCHEDULE      a cron for the web DAG instead of "new files in the input folder"

    from pipeline.orchestration.tasks import Settings, run_task
    run_task("quality", Settings.from_env())      # -> the stage's counts
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("primer.orchestrate")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO / "configs" / "quickstart.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_GLOB = re.compile(r"[*?[]")


class StageFailed(RuntimeError):
    """A stage's process or Ray job ended without finishing the stage."""


class StageTimeout(StageFailed):
    """A stage ran past its timeout and was stopped (a retry resumes its finished parts)."""


@dataclass(frozen=True)
class Settings:
    """Where a scheduler finds the recipe, the run folder, primer and (optionally) Ray."""

    recipe: Path = DEFAULT_RECIPE
    run_dir: Path | None = None
    """Absolute run folder; None: runs/<recipe file stem>-airflow in this checkout."""
    primer_bin: tuple[str, ...] = ()
    """The primer command (may be several words); empty: `primer` beside this Python."""
    workdir: Path = REPO
    """Where primer runs: recipe config paths (label_files, benchmarks) are relative to it,
    and a scheduler's worker starts tasks in a folder of its own."""
    executor: str | None = None
    overrides: tuple[str, ...] = ()
    ray_jobs_address: str | None = None
    ray_working_dir: str | None = None
    ray_primer_bin: str = "primer"
    stage_timeout_s: float = 86400.0
    retries: int = 2
    retry_delay_s: float = 300.0
    web_schedule: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            return env.get(name) or None

        recipe = Path(get("PRIMER_RECIPE") or DEFAULT_RECIPE).expanduser().resolve()
        run_dir = get("PRIMER_RUN_DIR")
        return cls(
            recipe=recipe,
            run_dir=Path(run_dir).expanduser().resolve() if run_dir else None,
            primer_bin=tuple(shlex.split(get("PRIMER_BIN") or "")),
            workdir=Path(get("PRIMER_WORKDIR") or REPO).expanduser().resolve(),
            executor=get("PRIMER_EXECUTOR"),
            overrides=tuple(shlex.split(get("PRIMER_OVERRIDES") or "")),
            ray_jobs_address=get("PRIMER_RAY_JOBS_ADDRESS"),
            ray_working_dir=get("PRIMER_RAY_WORKING_DIR"),
            ray_primer_bin=get("PRIMER_RAY_PRIMER_BIN") or "primer",
            stage_timeout_s=float(get("PRIMER_STAGE_TIMEOUT") or 86400),
            retries=int(get("PRIMER_RETRIES") or 2),
            retry_delay_s=float(get("PRIMER_RETRY_DELAY") or 300),
            web_schedule=get("PRIMER_WEB_SCHEDULE"),
        )

    @property
    def run(self) -> Path:
        return self.run_dir or REPO / "runs" / f"{self.recipe.stem}-airflow"

    @property
    def primer(self) -> list[str]:
        if self.primer_bin:
            return list(self.primer_bin)
        beside = Path(sys.executable).with_name("primer")
        return [str(beside)] if beside.is_file() else [sys.executable, "-m", "pipeline.cli"]


@dataclass(frozen=True)
class StagePlan:
    """One recipe stage as a scheduler sees it."""

    name: str
    """The recipe's key: the task id and the output folder's name."""
    kind: str
    """The registered stage it runs (`dedup` for `synth_dedup`)."""
    output: Path
    reads: tuple[str, ...] = ()
    """Earlier stages whose output it reads: `@stage` inputs, config references
    ("@edu_train/model.bin"), or the previous stage when it names no input."""
    files: tuple[str, ...] = ()
    """File inputs (absolute paths or globs) when it reads files, not a stage."""


def plan(recipe: str | Path, run_dir: str | Path, overrides: Sequence[str] = ()) -> list[StagePlan]:
    """The recipe's stages in run order, each with its output folder and what it reads.

    Input files need not exist yet: a DAG is parsed before the crawl it waits for lands."""
    from pipeline.recipe import load_recipe
    from pipeline.stage import stage_refs

    loaded = load_recipe(recipe, list(overrides), check_inputs=False)
    run = Path(run_dir)
    plans: list[StagePlan] = []
    for i, spec in enumerate(loaded.stages):
        refs = [r for r in spec.inputs or [] if r.startswith("@")]
        files = tuple(spec.inputs or []) if spec.inputs is not None and not refs else ()
        if not files and not refs and i > 0:
            refs = [f"@{loaded.stages[i - 1].name}"]
        refs += stage_refs(spec.config.model_dump())
        reads = tuple(dict.fromkeys(r[1:].partition("/")[0] for r in refs))
        plans.append(StagePlan(spec.name, spec.cls.name, run / spec.name, reads, files))
    return plans


def input_folder(stage: StagePlan) -> Path | None:
    """The folder a file-reading stage's inputs live in (where a new crawl lands)."""
    if not stage.files:
        return None
    roots = []
    for pattern in stage.files:
        parts = Path(os.path.normpath(pattern)).parts
        first_glob = next((i for i, p in enumerate(parts) if _GLOB.search(p)), len(parts) - 1)
        roots.append(str(Path(*parts[:first_glob])) if first_glob else os.sep)
    return Path(os.path.commonpath(roots))


def stage_done(run_dir: str | Path, stage: str) -> bool:
    from pipeline.io import read_json

    manifest = Path(run_dir) / stage / "_manifest.json"
    return manifest.is_file() and bool(read_json(manifest).get("complete"))


def stage_result(run_dir: str | Path, stage: str) -> dict[str, Any]:
    """The finished stage's counts (small enough for an XCom or an asset event)."""
    from pipeline.io import read_json

    m = read_json(Path(run_dir) / stage / "_manifest.json")
    keys = ("stage", "fingerprint", "rows_in", "rows_out", "dropped", "wall_seconds")
    return {k: m.get(k) for k in keys} | {"output": str(Path(run_dir) / stage)}


def build_command(
    recipe: str | Path,
    stage: str,
    run_dir: str | Path,
    *,
    primer: Sequence[str] = ("primer",),
    overrides: Sequence[str] = (),
    executor: str | None = None,
    ray_address: str | None = None,
) -> list[str]:
    """`primer run RECIPE --stages STAGE --output RUN`, with overrides and executor."""
    cmd = [*primer, "run", str(recipe), "--stages", stage, "--output", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    if executor:
        cmd += ["--executor", executor]
    if ray_address:
        cmd += ["--ray-address", ray_address]
    return cmd


def submission_id(dag_id: str, run_id: str, stage: str) -> str:
    """A Ray job id fixed per (DAG run, stage): a retried task finds its own job again."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"primer-{dag_id}-{run_id}-{stage}").strip("-")


def _thread_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(os.environ if env is None else env)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        out.setdefault(var, "1")  # Ray / polars size their own pools; BLAS must not oversubscribe
    return out


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group (primer's Ray workers too), SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_local(
    cmd: Sequence[str],
    *,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    tail: int = 40,
    logger: logging.Logger = log,
) -> None:
    """Run `cmd`, streaming its stdout and stderr to `logger`; raise on failure or timeout.

    The child gets its own process group, stopped if the caller is interrupted (an
    Airflow timeout, a SIGTERM): no orphaned primer keeps writing into the run folder."""
    shown = shlex.join(cmd)
    logger.info("running: %s", shown)
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=_thread_env(env),
        cwd=cwd,
        start_new_session=True,
    )
    err_tail: deque[str] = deque(maxlen=tail)

    def pump(stream: Any, keep: deque[str] | None) -> None:
        for line in stream:
            line = line.rstrip("\n")
            logger.info("%s", line)
            if keep is not None:
                keep.append(line)

    pumps = [
        threading.Thread(target=pump, args=(proc.stdout, None), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, err_tail), daemon=True),
    ]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise StageTimeout(
            f"`{shown}` still running after {timeout_s:.0f} s: stopped it "
            f"(a retry resumes its finished parts)"
        ) from None
    finally:
        if proc.poll() is None:
            _stop(proc)
        for t in pumps:
            t.join(timeout=10)
    if rc != 0:
        raise StageFailed(
            f"`{shown}` failed with exit code {rc}; last lines of its stderr:\n  "
            + "\n  ".join(err_tail)
        )


class JobClient(Protocol):
    """The part of ray.job_submission.JobSubmissionClient used here."""

    def submit_job(self, **kwargs: Any) -> str: ...
    def list_jobs(self) -> list[Any]: ...
    def get_job_status(self, job_id: str) -> Any: ...
    def get_job_info(self, job_id: str) -> Any: ...
    def get_job_logs(self, job_id: str) -> str: ...
    def stop_job(self, job_id: str) -> bool: ...


def _status(value: Any) -> str:
    return str(getattr(value, "value", value))


def _attach_or_submit(
    client: JobClient,
    base_id: str,
    entrypoint: str,
    runtime_env: dict[str, Any] | None,
    logger: logging.Logger,
) -> str:
    """Re-attach to this (run, stage)'s live or finished job, else submit the next id.

    Ray refuses a reused submission id, so a try after a FAILED/STOPPED job (or one whose
    command changed) submits `BASE-2`, `BASE-3`, ...; a job still PENDING/RUNNING, or one
    that SUCCEEDED, with the same entrypoint is this stage's job: wait on it."""
    jobs = {
        j.submission_id: j
        for j in client.list_jobs()
        if (getattr(j, "submission_id", None) or "").startswith(base_id)
    }
    for n in count(1):
        sid = base_id if n == 1 else f"{base_id}-{n}"
        job = jobs.get(sid)
        if job is None:
            logger.info("submitting Ray job %s: %s", sid, entrypoint)
            return client.submit_job(
                entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env
            )
        status = _status(job.status)
        if status not in ("FAILED", "STOPPED") and job.entrypoint == entrypoint:
            logger.info("re-attaching to Ray job %s (%s)", sid, status)
            return sid
    raise AssertionError("unreachable")


def run_ray_job(
    entrypoint: str,
    *,
    address: str | None,
    submission_id: str,
    working_dir: str | None = None,
    timeout_s: float | None = None,
    poll_s: float = 10.0,
    tail: int = 40,
    client: JobClient | None = None,
    logger: logging.Logger = log,
) -> str:
    """Run `entrypoint` as a Ray job (or wait on this stage's job if it exists); return
    its id once SUCCEEDED. FAILED/STOPPED raise with the job's last log lines; past
    `timeout_s` the job is stopped. Its logs are streamed to `logger` as they grow."""
    if client is None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
    runtime_env = {"working_dir": working_dir} if working_dir else None
    job_id = _attach_or_submit(client, submission_id, entrypoint, runtime_env, logger)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    shown = 0
    while True:
        status = _status(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id) or ""
        for line in logs[shown:].splitlines():
            logger.info("%s", line)
        shown = len(logs)
        if status == "SUCCEEDED":
            return job_id
        if status in TERMINAL:
            message = getattr(client.get_job_info(job_id), "message", "") or ""
            last = "\n  ".join(logs.splitlines()[-tail:])
            raise StageFailed(
                f"Ray job {job_id} ({entrypoint}) ended {status}: {message}\n"
                f"last lines of its log:\n  {last}"
            )
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(job_id)
            raise StageTimeout(
                f"Ray job {job_id} ({entrypoint}) still {status} after {timeout_s:.0f} s: "
                f"stopped it (a retry resumes its finished parts)"
            )
        time.sleep(poll_s)


def _cluster_recipe(recipe: Path, working_dir: str | None) -> str:
    """The recipe path as the job sees it: relative inside an uploaded working_dir."""
    if working_dir:
        try:
            return str(recipe.resolve().relative_to(Path(working_dir).resolve()))
        except ValueError:
            pass
    return str(recipe)


def run_task(
    stage: str,
    settings: Settings | None = None,
    *,
    dag_id: str = "primer",
    run_id: str = "manual",
    overrides: Sequence[str] | None = None,
    executor: str | None = None,
    ray_jobs_address: str | None = None,
    timeout_s: float | None = None,
    client: JobClient | None = None,
    poll_s: float = 10.0,
    logger: logging.Logger = log,
) -> dict[str, Any]:
    """Run one stage of `settings.recipe` into `settings.run` and return its counts.

    Arguments override the settings (an Airflow run's params). With a Ray Jobs address
    the stage runs as a Ray job (the run folder must be on storage the cluster and this
    worker both see); otherwise as a local subprocess."""
    s = settings or Settings.from_env()
    overrides = list(s.overrides if overrides is None else overrides)
    executor = executor or s.executor
    address = ray_jobs_address or s.ray_jobs_address
    timeout_s = timeout_s or s.stage_timeout_s
    if address:
        cmd = build_command(
            _cluster_recipe(s.recipe, s.ray_working_dir),
            stage,
            s.run,
            primer=shlex.split(s.ray_primer_bin),
            overrides=overrides,
            executor=executor,
        )
        run_ray_job(
            shlex.join(cmd),
            address=address,
            submission_id=submission_id(dag_id, run_id, stage),
            working_dir=s.ray_working_dir,
            timeout_s=timeout_s,
            poll_s=poll_s,
            client=client,
            logger=logger,
        )
        if not (s.run / stage).is_dir():
            logger.warning("%s is not visible from this worker; not checked", s.run / stage)
            return {"stage": stage, "output": str(s.run / stage)}
    else:
        cmd = build_command(
            s.recipe, stage, s.run, primer=s.primer, overrides=overrides, executor=executor
        )
        run_local(cmd, timeout_s=timeout_s, cwd=s.workdir, logger=logger)
    if not stage_done(s.run, stage):
        raise StageFailed(
            f"stage {stage!r} exited cleanly but {s.run / stage}/_manifest.json is not "
            f"complete; see the log above"
        )
    return stage_result(s.run, stage)
