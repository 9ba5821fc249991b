"""The teacher store of generators/teacher/checkpoint.py against real HTTP servers on 127.0.0.1: answers
kept by request id across batch sizes, attempts and a killed process, never asked twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from generators.teacher.base import ChatRequest, Completion, StreamingTeacher, derive_seed
from generators.teacher.checkpoint import (
    answers_revision,
    completions_table,
    load_checkpoints,
    reopen_failed,
    run_checkpointed,
)
from generators.teacher.config import TeacherConfig
from tests.conftest import REPO
from tests.fake_llm import chat, fake_server


def ask(i: int) -> ChatRequest:
    return ChatRequest(f"r{i:02d}", [{"role": "user", "content": f"question {i}"}])


def cfg(url: str, **kw) -> TeacherConfig:
    base = dict(backend="openai", base_url=url, max_retries=0, max_concurrency=2, timeout_s=10)
    return TeacherConfig(**(base | kw))


def asked_ids(seen: list[dict], ids: list[str]) -> list[str]:
    """Which requests reached the server, told apart by their derived sampling seeds."""
    by_seed = {derive_seed(0, i): i for i in ids}
    return sorted(by_seed[s["body"]["seed"]] for s in seen)


def echo(n, body, headers):
    return 200, {}, chat(body["messages"][0]["content"])


def test_answers_are_reused_by_id_whatever_the_batch_size(tmp_path):
    reqs = [ask(i) for i in range(10)]
    ids = [r.id for r in reqs]
    ckpt = tmp_path / "store"
    with fake_server(echo) as (url, seen):
        run_checkpointed(reqs[:7], ckpt, cfg(url), batch_size=4)
        assert len(seen) == 7
        # More requests, another batch size: only the three new ids are sent.
        table, stats = run_checkpointed(reqs, ckpt, cfg(url), batch_size=3)
        assert asked_ids(seen[7:], ids) == ids[7:]
        assert (stats["reused"], stats["asked_this_attempt"], stats["ok"]) == (7, 3, 10)
        # And with yet another, nothing at all.
        again, stats = run_checkpointed(reqs, ckpt, cfg(url), batch_size=5)
        assert len(seen) == 10 and stats["asked_this_attempt"] == 0
    assert table["id"].to_pylist() == ids  # request order, not store order
    assert table["text"].to_pylist() == [f"question {i}" for i in range(10)]
    assert again.equals(table)
    # Each attempt writes a new generation of files: nothing earlier is overwritten.
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "g000001-000000.parquet", "g000001-000001.parquet", "g000002-000000.parquet",
    ]  # fmt: skip


def test_failed_ids_and_only_those_are_sent_again_and_attempts_add_up(tmp_path):
    reqs = [ask(i) for i in range(6)]
    ids = [r.id for r in reqs]

    def first_three_fail(n, body, headers):
        return (503, {}, b"overloaded") if n <= 3 else (200, {}, chat("fine"))

    ckpt = tmp_path / "store"
    with fake_server(first_three_fail) as (url, seen):
        table, stats = run_checkpointed(reqs, ckpt, cfg(url, max_concurrency=1), retry_rounds=0)
        assert stats["failed"] == 3 and stats["failed_before"] == 0
        failed = sorted(i for i, e in zip(ids, table["error"].to_pylist(), strict=True) if e)
        assert failed == ids[:3]
        before = answers_revision(ckpt)
        assert reopen_failed(tmp_path, ckpt) == 3
        table, stats = run_checkpointed(reqs, ckpt, cfg(url), retry_rounds=0)
        assert asked_ids(seen[6:], ids) == failed
    assert (stats["failed_before"], stats["recovered"], stats["failed"]) == (3, 3, 0)
    assert table["attempts"].to_pylist() == [2, 2, 2, 1, 1, 1]
    assert answers_revision(ckpt) != before
    assert reopen_failed(tmp_path, ckpt) == 0
    # A stored answer is never replaced by a later failure of the same id.
    pq.write_table(
        completions_table(
            [Completion("r00", None, None, None, None, "timeout: late", None, 1.0, "m", "openai")]
        ),
        ckpt / "g000009-000000.parquet",
    )
    assert load_checkpoints(ckpt).to_pylist()[0]["text"] == "fine"


def test_a_legacy_position_keyed_store_is_read_by_id(tmp_path):
    """Checkpoints named by batch position (the layout before ids) keep their answers."""
    reqs = [ask(i) for i in range(5)]
    ckpt = tmp_path / "store"
    ckpt.mkdir()
    old = [
        Completion(r.id, f"old {r.id}", 5, 2, "stop", None, None, 0.1, "m", "openai")
        for r in reqs[:3]
    ]
    old[1] = Completion("r01", None, None, None, None, "http_503: busy", "busy", 0.1, "m", "x")
    pq.write_table(completions_table(old), ckpt / "000000.parquet")
    with fake_server(echo) as (url, seen):
        table, _ = run_checkpointed(reqs, ckpt, cfg(url), batch_size=2)
    assert asked_ids(seen, [r.id for r in reqs]) == ["r01", "r03", "r04"]
    assert table["text"].to_pylist() == ["old r00", "question 1", "old r02", "question 3",
                                         "question 4"]  # fmt: skip


def test_a_damaged_checkpoint_costs_its_rows_not_the_run(tmp_path, caplog):
    reqs = [ask(i) for i in range(4)]
    ckpt = tmp_path / "store"
    with fake_server(echo) as (url, seen):
        run_checkpointed(reqs, ckpt, cfg(url), batch_size=2)
        (ckpt / "g000001-000001.parquet").write_bytes(b"PAR1 not really")
        table, stats = run_checkpointed(reqs, ckpt, cfg(url), batch_size=2)
    assert asked_ids(seen[4:], [r.id for r in reqs]) == ["r02", "r03"]
    assert stats["ok"] == 4 and "cannot read" in caplog.text


def test_repeated_ids_are_asked_once(tmp_path):
    reqs = [ask(1), ask(2), ask(1)]
    with fake_server(echo) as (url, seen):
        table, stats = run_checkpointed(reqs, tmp_path / "store", cfg(url))
    assert len(seen) == 2 and table["id"].to_pylist() == ["r01", "r02", "r01"]
    assert stats["ok"] == 3


_KILLED_RUN = """
import sys
from pathlib import Path
from generators.teacher.base import ChatRequest
from generators.teacher.checkpoint import run_checkpointed
from generators.teacher.config import TeacherConfig
reqs = [ChatRequest(f"r{i:02d}", [{"role": "user", "content": f"question {i}"}]) for i in range(10)]
cfg = TeacherConfig(backend="openai", base_url=sys.argv[1], max_retries=0, max_concurrency=1)
run_checkpointed(reqs, Path(sys.argv[2]), cfg, batch_size=4)
"""


def test_a_killed_run_leaves_whole_checkpoints_and_the_resume_asks_only_the_rest(tmp_path):
    """SIGKILL while the second batch is in flight: the first batch's file is whole, the
    second has none, and a resume with another batch size asks only what is missing."""
    reqs = [ask(i) for i in range(10)]
    ids = [r.id for r in reqs]
    ckpt = tmp_path / "store"
    hang = threading.Event()

    def stalls_on_the_fifth(n, body, headers):
        if n >= 5:
            hang.wait(30)
        return 200, {}, chat(body["messages"][0]["content"])

    with fake_server(stalls_on_the_fifth) as (url, seen):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, url, str(ckpt)], env=env,
                                cwd=REPO, stderr=subprocess.PIPE)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(seen) < 5 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert len(seen) == 5, proc.stderr.read().decode() if proc.poll() is not None else ""
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            hang.set()
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()
        # A temp file a killed writer left behind is never read as a checkpoint.
        (ckpt / ".g000001-000001.parquet.tmp-99999").write_bytes(b"half a file")
        assert [p.name for p in ckpt.glob("*.parquet")] == ["g000001-000000.parquet"]

    with fake_server(echo) as (url, seen):
        table, stats = run_checkpointed(reqs, ckpt, cfg(url), batch_size=3)
    assert asked_ids(seen, ids) == ids[4:]
    assert stats["reused"] == 4 and stats["ok"] == 10
    assert table["text"].to_pylist() == [f"question {i}" for i in range(10)]
    assert not list(ckpt.glob(".*"))


class OneUnitAtATime:
    """A StreamingTeacher in this process that builds each unit's requests only after the
    answers of the units before it were committed (a job's tasks run in any order)."""

    backend = "fake"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def stream(self, units, requests, batch_rows, carry=()):
        for unit in units:
            table = requests(unit)
            self.asked += table["id"].to_pylist()
            answers = completions_table(
                [Completion(i, f"answer {i}", 3, 2, "stop", None, None, 0.0, "m", "fake")
                 for i in table["id"].to_pylist()]
            )  # fmt: skip
            yield pa.Table.from_arrays(
                [*answers.columns, *(table[c] for c in carry)], [*answers.column_names, *carry]
            )

    def complete(self, requests):
        raise AssertionError("a streaming teacher is asked through stream()")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def test_a_streamed_unit_cut_in_blocks_asks_each_request_once(tmp_path):
    """A job's blocks of one unit are built at different times, some after answers of the
    others are stored: every request is in exactly one block all the same."""
    reqs = [ask(i) for i in range(9)]
    teacher = OneUnitAtATime()
    assert isinstance(teacher, StreamingTeacher)
    table, stats = run_checkpointed(reqs, tmp_path / "store", cfg("http://127.0.0.1:9/v1"),
                                    batch_size=2, teacher=teacher)  # fmt: skip
    assert sorted(teacher.asked) == [r.id for r in reqs]
    assert stats["ok"] == 9 and table["text"].to_pylist() == [f"answer {r.id}" for r in reqs]
