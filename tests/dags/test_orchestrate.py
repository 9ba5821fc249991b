"""pipeline.orchestration.tasks, what the DAG tasks call: the plan read from a recipe, the command
for one stage, a local `primer` process (its failure says why), and a Ray job through a
fake JobSubmissionClient (no Ray dashboard here: the Jobs API needs `ray[default]`)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.orchestration import tasks
from pipeline.orchestration.tasks import (
    Settings,
    StageFailed,
    StageTimeout,
    build_command,
    input_folder,
    plan,
    run_local,
    run_ray_job,
    run_task,
    submission_id,
)

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "quickstart.yaml"


def test_build_command_is_primer_run_for_one_stage():
    cmd = build_command(
        RECIPE,
        "quality",
        "/runs/x",
        primer=["/venv/bin/primer"],
        overrides=["stages.quality.min_words=100", "stages.langid.languages=[en, fr]"],
        executor="local",
    )
    assert cmd == [
        "/venv/bin/primer", "run", str(RECIPE), "--stages", "quality", "--output", "/runs/x",
        "--set", "stages.quality.min_words=100", "--set", "stages.langid.languages=[en, fr]",
        "--executor", "local",
    ]  # fmt: skip
    assert build_command("r.yaml", "dedup", "out", ray_address="ray://head:10001")[-2:] == [
        "--ray-address",
        "ray://head:10001",
    ]


def test_settings_from_env_and_defaults(tmp_path):
    s = Settings.from_env({})
    assert s.recipe == RECIPE
    assert s.run == REPO / "runs" / "quickstart-airflow"
    assert s.primer[0] == str(Path(sys.executable).with_name("primer"))
    assert s.workdir == REPO  # quickstart's label_files and benchmarks are relative to it
    assert (s.executor, s.overrides, s.ray_jobs_address) == (None, (), None)
    s = Settings.from_env(
        {
            "PRIMER_RECIPE": str(RECIPE),
            "PRIMER_RUN_DIR": str(tmp_path / "run"),
            "PRIMER_BIN": "python -m pipeline.cli",
            "PRIMER_EXECUTOR": "local",
            "PRIMER_OVERRIDES": "stages.quality.min_words=100 'stages.langid.languages=[en, fr]'",
            "PRIMER_RAY_JOBS_ADDRESS": "http://head:8265",
            "PRIMER_STAGE_TIMEOUT": "60",
            "PRIMER_RETRIES": "0",
        }
    )
    assert s.run == tmp_path / "run"
    assert s.primer == ["python", "-m", "pipeline.cli"]
    assert s.overrides == ("stages.quality.min_words=100", "stages.langid.languages=[en, fr]")
    assert (s.executor, s.ray_jobs_address, s.stage_timeout_s, s.retries) == (
        "local",
        "http://head:8265",
        60.0,
        0,
    )


def test_plan_follows_the_recipe(tmp_path):
    stages = plan(RECIPE, tmp_path)
    assert [s.name for s in stages] == [
        "extract", "langid", "quality", "dedup", "edu_annotate", "edu_train", "edu_score",
        "seeds", "generate", "validate", "synth_dedup", "decontaminate", "mixture", "train_smoke",
    ]  # fmt: skip
    by = {s.name: s for s in stages}
    assert by["synth_dedup"].kind == "dedup"
    assert all(s.output == tmp_path / s.name for s in stages)
    assert by["extract"].reads == () and len(by["extract"].files) == 3
    assert input_folder(by["extract"]) == REPO / "data" / "sample"
    assert input_folder(by["langid"]) is None
    assert by["langid"].reads == ("extract",)  # no input: the previous stage
    assert by["edu_annotate"].reads == ("dedup",)
    assert by["edu_train"].reads == ("dedup", "edu_annotate")  # input + annotations ref
    assert by["validate"].reads == ("generate", "edu_train")  # edu_model: "@edu_train/model.bin"
    assert set(by["mixture"].reads) == {"decontaminate", "edu_score"}
    # a recipe's overrides change the plan like they change the run
    moved = plan(RECIPE, tmp_path, ['stages.edu_score.input=["@edu_annotate"]'])
    assert {s.name: s for s in moved}["edu_score"].reads == ("edu_annotate", "edu_train")


def test_input_folder_stops_at_the_first_glob():
    stage = tasks.StagePlan(
        "extract", "extract", Path("/r/extract"), (), ("/cc/2024/**/*.warc.gz", "/cc/a.wet")
    )
    assert input_folder(stage) == Path("/cc")


def test_submission_id_is_fixed_per_run_and_stage():
    a = submission_id("primer_web", "manual__2026-01-02T03:04:05+00:00", "dedup")
    assert a == submission_id("primer_web", "manual__2026-01-02T03:04:05+00:00", "dedup")
    assert a == "primer-primer_web-manual__2026-01-02T03-04-05-00-00-dedup"
    assert a != submission_id("primer_web", "manual__2026-01-02T03:04:05+00:00", "quality")


# --- the local subprocess path ------------------------------------------------------------


def test_run_local_streams_output_to_the_logger(caplog):
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"
    with caplog.at_level(logging.INFO, logger="primer.orchestrate"):
        run_local([sys.executable, "-c", code])
    lines = [r.getMessage() for r in caplog.records]
    assert "to stdout" in lines and "to stderr" in lines


def test_run_local_failure_names_the_exit_code_and_the_tail_of_stderr():
    code = "import sys\nfor i in range(100): print(f'line {i}', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(StageFailed) as e:
        run_local([sys.executable, "-c", code], tail=5)
    msg = str(e.value)
    assert "exit code 3" in msg
    assert "line 99" in msg and "line 95" in msg and "line 94" not in msg


def test_run_local_timeout_stops_the_process():
    t0 = time.monotonic()
    with pytest.raises(StageTimeout, match="still running after 1 s"):
        run_local([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1)
    assert time.monotonic() - t0 < 15


def test_run_stage_reports_primer_errors(tmp_path):
    """The real CLI, asked for a stage the recipe lacks: the task fails with its message."""
    s = Settings(recipe=RECIPE, run_dir=tmp_path)
    with pytest.raises(StageFailed) as e:
        run_task("nosuch", s)
    msg = str(e.value)
    assert "exit code 2" in msg
    assert "--stages: ['nosuch'] not in this recipe" in msg


def test_run_stage_runs_in_the_workdir_and_checks_the_manifest(tmp_path):
    """primer runs where the recipe's config paths are relative to, wherever the worker is;
    a command that exits 0 without finishing the stage is a failure, not a success."""
    fake = "import os, pathlib; pathlib.Path('ran_in').write_text(os.getcwd())"
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    s = Settings(
        recipe=RECIPE, run_dir=tmp_path, primer_bin=(sys.executable, "-c", fake), workdir=workdir
    )
    with pytest.raises(StageFailed, match="_manifest.json is not complete"):
        run_task("langid", s)
    assert (workdir / "ran_in").read_text() == str(workdir)
    (tmp_path / "langid").mkdir()
    manifest = {"stage": "langid", "complete": True, "rows_in": 5, "rows_out": 4}
    (tmp_path / "langid" / "_manifest.json").write_text(json.dumps(manifest))
    result = run_task("langid", s)
    assert result["rows_out"] == 4 and result["output"] == str(tmp_path / "langid")


# --- the Ray Jobs path, against a fake JobSubmissionClient --------------------------------


@dataclass
class Job:
    submission_id: str
    entrypoint: str
    status: str
    message: str = ""


@dataclass
class FakeJobs:
    """The JobSubmissionClient calls run_ray_job makes; each submitted job walks
    `statuses`, one per get_job_status call, and its logs grow one line per call."""

    statuses: list[str]
    existing: list[Job] = field(default_factory=list)
    submitted: list[dict] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    polls: int = 0

    def list_jobs(self):
        return list(self.existing)

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        sid = kwargs["submission_id"]
        self.existing.append(Job(sid, kwargs["entrypoint"], "PENDING"))
        return sid

    def _job(self, job_id):
        return next(j for j in self.existing if j.submission_id == job_id)

    def get_job_status(self, job_id):
        job = self._job(job_id)
        if job.status not in tasks.TERMINAL:
            job.status = self.statuses[min(self.polls, len(self.statuses) - 1)]
        self.polls += 1
        return job.status

    def get_job_logs(self, job_id):
        return "".join(f"log line {i}\n" for i in range(self.polls))

    def get_job_info(self, job_id):
        job = self._job(job_id)
        return Job(job.submission_id, job.entrypoint, job.status, "Job entrypoint failed")

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        self._job(job_id).status = "STOPPED"
        return True


def test_ray_job_pending_running_succeeded(caplog):
    jobs = FakeJobs(["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"])
    with caplog.at_level(logging.INFO, logger="primer.orchestrate"):
        job_id = run_ray_job(
            "primer run r.yaml --stages dedup --output /shared/run",
            address="http://head:8265",
            submission_id="primer-web-run1-dedup",
            working_dir="/repo",
            client=jobs,
            poll_s=0,
        )
    assert job_id == "primer-web-run1-dedup"
    assert jobs.submitted == [
        {
            "entrypoint": "primer run r.yaml --stages dedup --output /shared/run",
            "submission_id": "primer-web-run1-dedup",
            "runtime_env": {"working_dir": "/repo"},
        }
    ]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("log line")]
    assert logged == [f"log line {i}" for i in range(4)]  # each line once, as the log grows


def test_ray_job_failure_raises_with_its_logs():
    jobs = FakeJobs(["RUNNING", "FAILED"])
    with pytest.raises(StageFailed) as e:
        run_ray_job("primer run r.yaml", address=None, submission_id="s", client=jobs, poll_s=0)
    msg = str(e.value)
    assert "ended FAILED: Job entrypoint failed" in msg and "log line 1" in msg
    assert jobs.submitted[0]["runtime_env"] is None


def test_a_retry_reattaches_to_its_running_job():
    entry = "primer run r.yaml --stages dedup --output /shared/run"
    jobs = FakeJobs(["RUNNING", "SUCCEEDED"], existing=[Job("sid", entry, "RUNNING")])
    assert run_ray_job(entry, address=None, submission_id="sid", client=jobs, poll_s=0) == "sid"
    assert jobs.submitted == []  # waited on the job the first try started


def test_a_retry_after_a_failed_job_submits_the_next_id():
    entry = "primer run r.yaml --stages dedup --output /shared/run"
    earlier = [Job("sid", entry, "FAILED"), Job("sid-2", entry, "STOPPED")]
    jobs = FakeJobs(["SUCCEEDED"], existing=earlier)
    assert run_ray_job(entry, address=None, submission_id="sid", client=jobs, poll_s=0) == "sid-3"
    assert [s["submission_id"] for s in jobs.submitted] == ["sid-3"]
    # a finished job with another command (the recipe changed) is not this stage's job
    jobs = FakeJobs(["SUCCEEDED"], existing=[Job("sid", "primer run old.yaml", "SUCCEEDED")])
    assert run_ray_job(entry, address=None, submission_id="sid", client=jobs, poll_s=0) == "sid-2"


def test_ray_job_timeout_stops_the_job():
    jobs = FakeJobs(["RUNNING"])
    with pytest.raises(StageTimeout, match="stopped it"):
        run_ray_job(
            "primer run r.yaml", address=None, submission_id="s", timeout_s=0.2, client=jobs,
            poll_s=0.05,
        )  # fmt: skip
    assert jobs.stopped == ["s"]


def test_run_stage_submits_a_ray_job_when_an_address_is_set(tmp_path):
    s = Settings(
        recipe=RECIPE,
        run_dir=tmp_path / "run",
        ray_jobs_address="http://head:8265",
        ray_working_dir=str(REPO),
        overrides=("stages.dedup.bands=10",),
    )
    (tmp_path / "run" / "dedup").mkdir(parents=True)
    manifest = {"stage": "dedup", "complete": True, "rows_in": 9, "rows_out": 7}
    (tmp_path / "run" / "dedup" / "_manifest.json").write_text(json.dumps(manifest))
    jobs = FakeJobs(["RUNNING", "SUCCEEDED"])
    result = run_task("dedup", s, dag_id="primer_web", run_id="r1", client=jobs, poll_s=0)
    assert result["rows_out"] == 7
    [sub] = jobs.submitted
    assert sub["submission_id"] == "primer-primer_web-r1-dedup"
    assert sub["runtime_env"] == {"working_dir": str(REPO)}
    # the cluster's primer, the recipe relative to the uploaded working_dir
    assert shlex.split(sub["entrypoint"]) == [
        "primer", "run", "configs/quickstart.yaml", "--stages", "dedup",
        "--output", str(tmp_path / "run"), "--set", "stages.dedup.bands=10",
    ]  # fmt: skip


# --- the Ray Jobs path against a real Ray head with its Jobs API (slow: ~30 s) ------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_a_stage_runs_as_a_real_ray_job(tmp_path):
    from ray.job_submission import JobSubmissionClient

    gcs, dashboard, agent, client_port = _free_ports(4)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    ray_bin = Path(sys.executable).with_name("ray")
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Unix socket paths: < 108 bytes
    log = open(tmp_path / "ray_head.log", "w")  # noqa: SIM115 (closed in finally)
    head = subprocess.Popen(
        [
            str(ray_bin), "start", "--head", "--block", "--num-cpus=1", "--disable-usage-stats",
            f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={client_port}", f"--temp-dir={ray_tmp}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the Jobs API answers before its agent can run a job: wait for both
            try:
                client = JobSubmissionClient(address)
                run_ray_job(
                    "true", address=address, submission_id="ready", client=client, poll_s=0.5
                )
                break
            except Exception:
                if time.monotonic() > deadline or head.poll() is not None:
                    print((tmp_path / "ray_head.log").read_text()[-3000:])
                    raise
                time.sleep(1)
        s = Settings(
            recipe=RECIPE,
            run_dir=tmp_path / "run",
            executor="local",
            ray_jobs_address=address,
            ray_primer_bin=str(Path(sys.executable).with_name("primer")),
        )
        result = run_task("extract", s, dag_id="d", run_id="r", client=client, poll_s=0.5)
        assert result["rows_in"] == result["rows_out"] > 0
        # the task's retry finds the finished job instead of running the stage again
        run_task("extract", s, dag_id="d", run_id="r", client=client, poll_s=0.5)
        ours = [j for j in client.list_jobs() if j.submission_id.startswith("primer-d-r-")]
        assert [j.submission_id for j in ours] == ["primer-d-r-extract"]
        with pytest.raises(StageFailed, match=r"--stages: \['nosuch'\] not in this recipe"):
            run_task("nosuch", s, dag_id="d", run_id="r", client=client, poll_s=0.5)
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_importing_orchestration_does_not_import_airflow():
    """The DAG factory's module imports Airflow only inside `primer_dag`: the core install
    (no `dags` extra) imports it and tasks.py, and so does every `primer run` it starts."""
    code = "import sys, pipeline.orchestration.dags; print('airflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
