"""Submitting a recipe to a Ray cluster as a Ray job, exactly as the README documents it.

A Ray head is started in the test on 127.0.0.1 (`ray start --head --block`, in its own
process group so that stopping it touches no other Ray on the machine), the recipe goes in
with `ray job submit --working-dir .`, and the head is stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster on 127.0.0.1 with its job server and token authentication;
    yields the dashboard URL and the environment a client needs (the token)."""
    if not (BIN / "ray").is_file():
        pytest.skip("the ray CLI is not installed in this environment")
    port, dash = _free_port(), _free_port()
    # Every port of its own: the test session's local Ray already holds Ray's defaults
    # (the dashboard agent's 52365 among them), and a head whose agent cannot bind never
    # accepts jobs ("No available agent to submit job").
    agent_ports = [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Token auth, as the README sets it up: the same token on every node and client
        # (here in the environment, so no ~/.ray/auth_token is written).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={port}",
            "--num-cpus=2", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            "--disable-usage-stats", *agent_ports,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:
            break  # up, and asking for Ray's auth token (on by default since Ray 2.59)
        except OSError:
            pass
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail(f"ray head did not start: {head.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    try:
        yield url, env
    finally:
        # Ray's daemons run in the head's process group: stopping the group touches no other
        # Ray on this machine (`ray stop` would stop them all, the test session's included).
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _submit(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    for _ in range(60):  # the job agent comes up a few seconds after the dashboard
        done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in done.stderr:
            return done
        time.sleep(1)
    return done


def test_ray_job_submit_runs_a_recipe_on_the_cluster(ray_head, tmp_path):
    url, env = ray_head
    recipe = {
        "name": "cluster",
        "executor": "ray",
        "stages": {
            "quality": {
                "input": [str(REPO / "data/sample/ccnet-*.jsonl.gz")],
                "max_drop_fraction": 1.0,
            },
        },
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "run"  # on one machine, every node sees it; on a cluster: shared storage
    # The README's command, verbatim but for the paths.
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"env_vars": {"OMP_NUM_THREADS": "1"}}),
        "--", "python", "-m", "pipeline.cli", "run", str(path), "--output", str(out),
    ]  # fmt: skip
    done = _submit(cmd, env, REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout.lower()
    summary = json.loads((out / "run_summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["quality"]
    assert stages["quality"]["rows_in"] == 20  # the 20 CCNet documents of the sample
    assert stages["quality"]["rows_out"] + sum(stages["quality"]["dropped"].values()) == 20
    # the driver ran on the cluster and joined it rather than starting a Ray of its own
    assert "Primer run 'cluster'" in done.stdout
    # Ray Data's INFO lines (plans, "Starting execution") stay in its log file, off the console
    assert "streaming_executor" not in done.stdout + done.stderr


@pytest.mark.slow  # ~40 s: two job submissions; the plain submission above runs by default
def test_a_resubmitted_job_resumes_after_the_working_dir_changed(ray_head, tmp_path):
    """Ray unpacks `--working-dir` to a new temporary path (named by its content hash) on
    every submission: inputs inside it are fingerprinted by their path relative to it, and
    by content, so editing any other file and submitting again re-runs nothing."""
    url, env = ray_head
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    (work / "data").mkdir()
    for f in sorted((REPO / "data/sample").glob("ccnet-*.jsonl.gz")):
        (work / "data" / f.name).write_bytes(f.read_bytes())
    recipe = {
        "name": "resub",
        "executor": "ray",
        "stages": {
            "quality": {"input": ["../data/*.jsonl.gz"], "max_drop_fraction": 1.0},
            "dedup": {},
        },
    }
    (work / "configs/resub.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (work / "NOTES.md").write_text("first\n")
    out = tmp_path / "run"
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(work),
        "--", "python", "-m", "pipeline.cli", "run", "configs/resub.yaml", "--output", str(out),
    ]  # fmt: skip
    first = _submit(cmd, env, work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    manifest = json.loads((out / "quality/_manifest.json").read_text())
    assert manifest["inputs"] == [f"data/{f.name}" for f in sorted((work / "data").iterdir())]

    (work / "NOTES.md").write_text("edited: a new content hash, a new unpacked path\n")
    again = _submit(cmd, env, work)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in ("quality", "dedup"):
        m = json.loads((out / stage / "_manifest.json").read_text())
        assert len(m["attempts"]) == 2, stage  # the same folder, resumed, not recomputed
        assert m["attempts"][-1]["parts_run"] == 0, stage
