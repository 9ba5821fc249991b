"""The vllm backend's one-job-per-stage-run path, on real Ray with Ray Data LLM's real
Processor around a stand-in engine (tests/generators/standin_engine.py; vLLM needs a GPU).

What is counted: engine constructions (one file per load, across actors) and the ids each
engine was asked. A stage run loads each replica once whatever the number of requests and
of request batches, plus once per retry round when rows failed; answers land in the store
a request batch at a time, so a killed run re-sends only what was not committed. The same
for edu_annotate, with failed rows, is in tests/filters/test_edu.py. Each Ray Data job
starts its actor pool (seconds here), so the tests of more than one job are `slow`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from generators.generate import GenerateStage
from generators.seeds import SeedsStage
from generators.teacher import vllm
from generators.teacher.base import ChatRequest
from generators.teacher.checkpoint import answered_ids, run_checkpointed
from generators.teacher.config import TeacherConfig, VLLMConfig
from pipeline.stage_runner import run_stage
from tests.conftest import REPO
from tests.generators.standin_engine import answer, asked, loads, standin_builder

SCORE = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0,
         "maximum": 5}}, "required": ["score"], "additionalProperties": False}  # fmt: skip
REPLICAS = 2


def ask(i: int) -> ChatRequest:
    """A rating request, as edu_annotate sends them (a JSON schema to answer)."""
    return ChatRequest(f"r{i:02d}", [{"role": "user", "content": f"document {i}"}],
                       json_schema=SCORE)  # fmt: skip


def vllm_teacher(**kw) -> TeacherConfig:
    engine = VLLMConfig(concurrency=REPLICAS, batch_size=4)
    return TeacherConfig(backend="vllm", model="org/teacher-70b", vllm=engine, **kw)


@pytest.fixture
def engine(ray_session, monkeypatch, tmp_path):
    """Put a stand-in engine behind the vllm backend; returns its log folder."""

    def use(**kw) -> Path:
        log = tmp_path / "engine"
        monkeypatch.setattr(vllm, "BUILD_PROCESSOR", standin_builder(log, **kw))
        return log

    return use


def seed_parts(folder: Path, **per_style: int) -> list[str]:
    names = SeedsStage(per_style=per_style).build([], str(folder))["part_names"]
    return [str(folder / f"{n}.parquet") for n in names]


def test_generate_loads_each_replica_once_for_all_its_request_batches(engine, tmp_path):
    log = engine()
    parts = seed_parts(tmp_path / "seeds", textbook=9, story=8)
    m = run_stage(GenerateStage(teacher=vllm_teacher(), request_batch=3), parts, tmp_path / "run")
    assert m["rows_in"] == 17 and m["dropped"] == {}
    assert 1 <= len(loads(log)) <= REPLICAS  # 17 prompts in six request batches, one job
    assert sum(asked(log).values()) == 17
    store = tmp_path / "run/generate/_state/completions"
    # One seeds part, so one part folder: its answers committed (at most) three at a time.
    sizes = [len(pq.read_table(f)) for f in sorted(store.glob("*/*.parquet"))]
    assert sum(sizes) == 17 and max(sizes) == 3 and len(sizes) >= 6
    rows = pa.concat_tables(pq.read_table(p) for p in (tmp_path / "run/generate").glob("*.parquet"))
    assert set(rows["teacher_backend"].to_pylist()) == {"vllm"}
    assert all(t.startswith("An answer to: ") for t in rows["text"].to_pylist())


@pytest.mark.slow
def test_failed_rows_cost_one_more_job_and_a_lost_batch_is_asked_again(engine, tmp_path):
    log = engine(fail_once={"r03", "r17"}, garbage_once={"r09"})
    reqs = [ask(i) for i in range(30)]
    ckpt = tmp_path / "store"
    table, stats = run_checkpointed(reqs, ckpt, vllm_teacher(), batch_size=4, retry_rounds=1)
    # Two jobs (every request, then the three failed ones): at most one load per replica
    # each, though the answers came back in eight request batches plus one of retries.
    assert 2 <= len(loads(log)) <= 2 * REPLICAS
    assert len(set(loads(log))) == len(loads(log))  # no actor loaded twice
    files = sorted(p.name for p in ckpt.glob("*.parquet"))
    assert files == [f"g000001-{b:06d}.parquet" for b in range(9)]
    assert [len(pq.read_table(ckpt / f)) for f in files] == [4] * 7 + [2, 3]
    assert asked(log) == {r.id: 1 for r in reqs} | {"r03": 2, "r17": 2, "r09": 2}
    assert (stats["ok"], stats["failed"], stats["asked_this_attempt"]) == (30, 0, 30)
    assert table["id"].to_pylist() == [r.id for r in reqs]  # request order
    assert table["text"].to_pylist() == [answer(r.id, "", structured=True) for r in reqs]
    retried = table.filter(pa.compute.is_in(table["id"], pa.array(["r03", "r09", "r17"])))
    assert retried["attempts"].to_pylist() == [2, 2, 2]

    # Two batches lost (never committed): the resume sends exactly the requests left
    # without an answer, in one more job, and ends with the same answers.
    for f in ["g000001-000002.parquet", "g000001-000005.parquet"]:
        (ckpt / f).unlink()
    kept = answered_ids(ckpt)[0].to_pylist()
    missing = sorted({r.id for r in reqs} - set(kept))
    before, loaded = asked(log), len(loads(log))
    again, stats = run_checkpointed(reqs, ckpt, vllm_teacher(), batch_size=5)
    assert sorted((asked(log) - before).elements()) == missing
    assert (stats["reused"], stats["asked_this_attempt"]) == (len(kept), len(missing))
    assert 1 <= len(loads(log)) - loaded <= REPLICAS
    assert again.drop_columns(["latency_s"]).equals(table.drop_columns(["latency_s"]))


@pytest.mark.slow
def test_requests_with_and_without_a_schema_are_one_job_each(engine, tmp_path):
    """Ray Data cannot merge all-null structured_outputs with a struct (ray#61656): a mixed
    list is two jobs, each loading each replica once, and every answer comes back."""
    log = engine()
    plain = [ChatRequest(f"p{i}", [{"role": "user", "content": f"hi {i}"}]) for i in range(9)]
    reqs = [r for pair in zip([ask(i) for i in range(9)], plain, strict=True) for r in pair]
    table, stats = run_checkpointed(reqs, tmp_path / "store", vllm_teacher(), batch_size=4)
    assert stats["ok"] == 18 and 2 <= len(loads(log)) <= 2 * REPLICAS
    assert table["text"].to_pylist() == [
        answer(r.id, r.messages[-1]["content"], r.json_schema is not None) for r in reqs
    ]


_KILLED = """
import sys
from pathlib import Path
import ray
from generators.generate import GenerateStage
from generators.teacher import vllm
from pipeline.stage_runner import run_stage
from tests.generators.standin_engine import standin_builder
from tests.generators.test_vllm_stream import vllm_teacher
address, parts, run, log, hang = sys.argv[1], sys.argv[2].split(","), *sys.argv[3:]
ray.init(address=address)
vllm.BUILD_PROCESSOR = standin_builder(Path(log), hang=[hang])
run_stage(GenerateStage(teacher=vllm_teacher(), request_batch=3), parts, Path(run))
"""


@pytest.mark.slow
def test_a_killed_generate_keeps_its_committed_batches_and_the_resume_asks_the_rest(
    engine, ray_session, tmp_path
):
    """SIGKILL of the driver (a `primer run` of generate) while one prompt hangs in the
    engine: the batches already committed are whole, and the resume, another run and
    another job, asks only the rest and writes every row."""
    parts = seed_parts(tmp_path / "seeds", textbook=9, story=8)
    ids = sorted(pa.concat_tables(pq.read_table(p) for p in parts)["id"].to_pylist())
    run, log = tmp_path / "run", tmp_path / "engine"
    store = run / "generate/_state/completions"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    address = ray_session.get_runtime_context().gcs_address
    argv = [address, ",".join(parts), str(run), str(log), ids[-1]]
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, *argv], env=env, cwd=REPO,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(store.glob("*/g*.parquet"))) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    committed = [i for p in store.glob("*/g*.parquet") for i in pq.read_table(p)["id"].to_pylist()]
    assert 9 <= len(committed) < 17 and ids[-1] not in committed
    assert not (run / "generate/_manifest.json").exists()
    before, loaded = asked(log), len(loads(log))
    engine()  # the same log folder, nothing hangs
    m = run_stage(GenerateStage(teacher=vllm_teacher(), request_batch=3), parts, run)
    assert sorted((asked(log) - before).elements()) == sorted(set(ids) - set(committed))
    assert m["rows_in"] == 17 and m["dropped"] == {}
    assert 1 <= len(loads(log)) - loaded <= REPLICAS
