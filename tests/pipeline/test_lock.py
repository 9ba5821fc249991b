"""The run-folder lock: a second run exits at once naming the holder; a dead holder's lock
is taken over; a holder on another host counts while its heartbeat is fresh."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.cli import main
from pipeline.lock import LOCK_FILE, STALE_S, RunLock, RunLocked
from tests.conftest import REPO

HOLD = """
import sys, time
from pipeline.lock import RunLock
lock = RunLock(sys.argv[1], "primer run holder.yaml").acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_exits_at_once_naming_the_holder(tmp_path, capsys):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunLocked, match=rf"pid {proc.pid}.*primer run holder.yaml"):
            RunLock(tmp_path / "run", "second").acquire()
        # the CLI: exit 1 with one line, before any work (a recipe on the same folder)
        recipe = tmp_path / "r.yaml"
        data = REPO / "data/sample/fineweb-1.jsonl.gz"
        recipe.write_text(f"name: r\nexecutor: local\nstages:\n  quality: {{input: [{data}]}}\n")
        t0 = time.monotonic()
        code = main(["run", str(recipe), "--output", str(tmp_path / "run")])
        assert code == 1 and time.monotonic() - t0 < 10
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another primer run" in err[0]
        assert not (tmp_path / "run/quality").exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="primer"):
        lock = RunLock(tmp_path / "run", "mine").acquire()
    try:
        assert "taking over" in caplog.text and str(proc.pid) in caplog.text
        info = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["command"] == "mine"
    finally:
        lock.release()
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""  # released: free for the next


def test_a_holder_on_another_host_counts_while_its_heartbeat_is_fresh(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = {"host": "node-7", "pid": 4242, "started": "2026-12-01T00:00:00+00:00",
             "command": "primer run big.yaml", "heartbeat": time.time()}  # fmt: skip
    (run / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(RunLocked, match="host node-7, pid 4242"):
        RunLock(run).acquire()
    (run / LOCK_FILE).write_text(json.dumps(other | {"heartbeat": time.time() - STALE_S - 1}))
    with RunLock(run, "mine") as lock:
        assert lock.info["command"] == "mine"
