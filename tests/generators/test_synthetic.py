"""Synthetic data: seeds (deterministic, diverse), generate (resumable, lineage, recorded
failures) against the real local teacher and scripted fake servers, validate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from generators.generate import GenerateStage
from generators.prompts import load_template
from generators.seeds import STYLES, SeedsStage, draw, load_taxonomy
from generators.teacher.base import Completion, completions_table, derive_seed
from generators.teacher.config import LocalServerConfig, TeacherConfig
from generators.teacher.store import part_key
from generators.validate import ValidateStage
from pipeline import registry
from pipeline.stage import DryRun, PreflightError
from pipeline.stage_runner import run_stage
from tests.conftest import REPO, fineweb_docs
from tests.fake_llm import chat, fake_server

GOOD = (
    "Fractions describe parts of a whole. When we cut a pizza into eight equal slices, each "
    "slice is one eighth of the pizza. Two slices are two eighths, which is the same amount as "
    "one quarter, because we can divide the top and bottom of a fraction by the same number. "
    "Equivalent fractions name the same amount in different ways. To check, multiply across: "
    "two times four equals eight, and one times eight equals eight, so the fractions match. "
    "Try it with three sixths and one half, and you will see they are equal too."
)


def seeds_parts(tmp_path: Path, **cfg) -> list[str]:
    stage = SeedsStage(**cfg)
    stats = stage.build([], str(tmp_path))
    return [str(tmp_path / f"{n}.parquet") for n in stats["part_names"]]


def test_taxonomy_and_draws_are_deterministic_and_diverse(tmp_path):
    topics = load_taxonomy(Path(__file__).resolve().parents[2] / "configs/seeds/taxonomy_v1.yaml")
    assert len(topics) >= 80 and len({s for s, _ in topics}) >= 15
    web = [(f"web:d{i}", f"extract {i}") for i in range(30)]
    cfg = SeedsStage(per_style=dict.fromkeys(STYLES, 12)).config
    a, b = draw(cfg, topics, web), draw(cfg, topics, web)
    assert a == b and len(a) == 72
    assert {r["style"] for r in a} == set(STYLES)
    assert sum(r["seed_kind"] == "web" for r in a) == 36  # web_share 0.5 of each style
    assert len({r["audience"] for r in a}) == 5 and any(r["persona"] for r in a)
    other = draw(SeedsStage(per_style=dict.fromkeys(STYLES, 12), seed=1).config, topics, web)
    assert other != a


def test_seed_rows_carry_lineage_and_no_prompt_twice(tmp_path):
    docs = fineweb_docs(40)
    src = tmp_path / "docs.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [d["id"] for d in docs],
                "text": pa.array([d["text"] for d in docs], pa.large_string()),
                "drop_reason": pa.nulls(len(docs), pa.string()),
                "edu_score": pa.array(
                    [3.0 if i % 2 else 1.0 for i in range(len(docs))], pa.float32()
                ),
            }
        ),
        src,
    )
    stage = SeedsStage(per_style={"textbook": 20, "worked_examples": 20}, web_max_seeds=5)
    table = stage.rows([str(src)])
    assert len(table) == 40 and len(set(table["prompt"].to_pylist())) == 40
    web = [r for r in table.to_pylist() if r["seed_source"].startswith("web:")]
    assert web and {r["seed_source"][4:] for r in web} <= {d["id"] for d in docs[1::2]}
    r = table.to_pylist()[0]
    assert r["id"] == f"synth-{r['seed_id']}" and r["template_id"] == "synth"
    assert r["template_version"] == 1 and r["seed_text"] and r["prompt"]


def test_dry_run_estimates_before_spending(tmp_path):
    parts = seeds_parts(tmp_path / "seeds", per_style={"story": 5, "howto": 5})
    stage = GenerateStage(dry_run=True, dry_run_tokens_per_s=100)
    with pytest.raises(DryRun, match='"prompts": 10') as e:
        stage.prepare(parts, str(tmp_path / "state"))
    est = json.loads(str(e.value).split(": ", 1)[1])
    assert est["completion_tokens_max"] == 5 * 512 + 5 * 512
    assert est["hours_at_that_rate"] == pytest.approx(5120 / 100 / 3600, abs=1e-3)


def test_generate_resumes_and_records_failures(tmp_path):
    parts = seeds_parts(tmp_path / "seeds", per_style={"textbook": 6, "exercises": 4})
    answers = iter([GOOD, "", GOOD, GOOD] * 10)

    def flaky(n, body, headers):
        return 200, {}, chat(next(answers))

    cfg = dict(request_batch=4, retry_rounds=0)
    with fake_server(flaky) as (url, seen):
        teacher = TeacherConfig(backend="openai", base_url=url, max_retries=0, max_concurrency=1)
        m = run_stage(GenerateStage(teacher=teacher, **cfg), parts, tmp_path / "run")
    assert m["rows_in"] == 10 and len(seen) == 10
    failed = m["dropped"]["generate:teacher_error"]
    assert failed >= 2
    rows = pa.concat_tables(
        pq.read_table(p) for p in (tmp_path / "run/generate").glob("*.parquet")
    ).to_pylist()
    ok = [r for r in rows if r["drop_reason"] is None]
    for r in ok:
        assert (
            r["text"] == GOOD and r["teacher_model"] == "fake" and r["teacher_backend"] == "openai"
        )
        assert r["temperature"] == pytest.approx(0.7) and r["max_tokens"] in (768, 640)
        assert r["prompt_tokens"] == 7 and r["completion_tokens"] == 3 and r["sample_seed"] > 0
        assert (
            r["seed_id"] and r["template_id"] == "synth" and r["style"] in ("textbook", "exercises")
        )
    bad = [r for r in rows if r["drop_reason"] == "generate:teacher_error"]
    assert all(r["teacher_error"].startswith("empty") and r["text"] is None for r in bad)

    # Killed before it finished: finished batches are kept, only the failed rows are asked again.
    state = tmp_path / "run/generate/_state"
    (state / "_DONE").unlink()
    with fake_server(lambda n, b, h: (200, {}, chat(GOOD))) as (url, seen):
        teacher = TeacherConfig(backend="openai", base_url=url, max_retries=0)
        GenerateStage(teacher=teacher, **cfg).prepare(parts, str(state))
        assert len(seen) == failed


def writer(url: str, **kw) -> TeacherConfig:
    return TeacherConfig(**(dict(backend="openai", base_url=url, max_retries=0) | kw))


def good(n, body, headers):
    return 200, {}, chat(GOOD)


def generated_ids(seen: list[dict], ids: list[str]) -> list[str]:
    by_seed = {derive_seed(0, i): i for i in ids}
    return sorted(by_seed[s["body"]["seed"]] for s in seen)


def test_generate_retry_failed_asks_exactly_the_failed_prompts_again(tmp_path):
    parts = seeds_parts(tmp_path / "seeds", per_style={"textbook": 5, "story": 4})
    ids = pa.concat_tables(pq.read_table(p) for p in parts)["id"].to_pylist()
    cfg = dict(request_batch=4, retry_rounds=0)

    def first_two_fail(n, body, headers):
        return (500, {}, b"kaboom") if n <= 2 else good(n, body, headers)

    with fake_server(first_two_fail) as (url, _):
        m = run_stage(GenerateStage(teacher=writer(url), **cfg), parts, tmp_path / "run",
                      )  # fmt: skip
    assert m["dropped"] == {"generate:teacher_error": 2}
    state = tmp_path / "run/generate/_state"
    rows = pa.concat_tables(pq.read_table(p) for p in (tmp_path / "run/generate").glob("*.parquet"))
    failed = sorted(r["id"] for r in rows.to_pylist() if r["teacher_error"])

    with fake_server(good) as (url, seen):
        stage = GenerateStage(teacher=writer(url, timeout_s=30), **cfg)
        stage.state_dir = str(state)
        revision = stage.output_revision()
        assert stage.reopen_failed(str(state)) == 2
        stage.prepare(parts, str(state))
        assert generated_ids(seen, ids) == failed
        assert stage.output_revision() != revision
        # Done: a plain re-run, and a prepare with other transport settings, send nothing.
        assert stage.reopen_failed(str(state)) == 0
        (state / "_DONE").unlink()
        moved = GenerateStage(teacher=writer(url, max_concurrency=1), request_batch=7)
        assert moved.fingerprint() == stage.fingerprint()
        moved.prepare(parts, str(state))
        assert len(seen) == 2 and moved.output_revision() == stage.output_revision()
        # A new sampling temperature is a real change: the runner discards the stored
        # answers with the stage folder, and every prompt is generated again.
        hotter = GenerateStage(teacher=writer(url), temperature=0.9, **cfg)
        assert hotter.fingerprint() != stage.fingerprint()
        m = run_stage(hotter, parts, tmp_path / "run")
        assert len(seen) == 2 + 9 and m["dropped"] == {}
    assert m["config"]["temperature"] == 0.9
    assert sorted(p.name for p in state.iterdir()) == ["_DONE", "completions"]  # no stamp
    # One folder per seeds part (9 prompts, one part), holding this attempt's files only.
    assert [p.name[:7] for p in (state / "completions").iterdir()] == [part_key(
        f"seeds/{Path(parts[0]).name}")[:7]]  # fmt: skip
    assert {p.name[:7] for p in (state / "completions").glob("*/*")} == {"g000001"}


def test_the_seeds_template_and_taxonomy_chain_into_what_generate_reads(tmp_path):
    """generate asks with the template its seed rows name: the seeds stage fingerprints the
    template's and the taxonomy's contents, and generate's input chains that in."""
    taxonomy = tmp_path / "topics.yaml"
    taxonomy.write_text("subjects: {algebra: [fractions, ratios]}\n")
    stage = SeedsStage(taxonomy=str(taxonomy), per_style={"story": 2})
    fp = stage.content_fingerprint()
    assert fp["template.synth_v1"] == load_template("synth_v1").sha256
    before = stage.fingerprint()
    taxonomy.write_text("subjects: {algebra: [fractions, percentages]}\n")
    assert stage.fingerprint() != before
    assert "taxonomy" not in SeedsStage(taxonomy="").content_fingerprint()


def test_validate_fingerprints_an_edu_model_given_as_a_file_path(tmp_path):
    model = tmp_path / "model.bin"
    model.write_bytes(b"a model")
    fp = ValidateStage(edu_model=str(model)).content_fingerprint()
    assert fp == {f"edu_model.{k}": v for k, v in registry.get("edu_score")(
        model=str(model)).content_fingerprint().items()} and fp  # fmt: skip
    assert ValidateStage(edu_model="@edu_train/model.bin").content_fingerprint() == {}
    assert ValidateStage().content_fingerprint() == {}


def test_the_runner_retry_reprocesses_the_parts_with_the_recovered_answers(tmp_path):
    """`primer run --retry-failed` through the runner: the recovered rows reach the output,
    and a second retry with nothing failed sends nothing and keeps the output revision."""
    parts = seeds_parts(tmp_path / "seeds", per_style={"textbook": 5, "story": 4})

    def first_two_fail(n, body, headers):
        return (500, {}, b"kaboom") if n <= 2 else good(n, body, headers)

    with fake_server(first_two_fail) as (url, _):
        run_stage(GenerateStage(teacher=writer(url), retry_rounds=0), parts, tmp_path / "run",
                  )  # fmt: skip
    with fake_server(good) as (url, seen):
        stage = GenerateStage(teacher=writer(url), retry_rounds=0, request_batch=3)
        m = run_stage(stage, parts, tmp_path / "run", retry_failed=True)
        assert len(seen) == 2 and m["dropped"] == {}
        again = run_stage(stage, parts, tmp_path / "run", retry_failed=True)
        assert len(seen) == 2
    assert m["retries"][-1] | {"started": None} == {
        "started": None, "failed_before": 2, "failed_after": 0, "recovered": 2,
    }  # fmt: skip
    assert again["output_fingerprint"] == m["output_fingerprint"] != m["fingerprint"]


def test_a_seed_row_that_cannot_be_asked_is_recorded_not_fatal(tmp_path):
    parts = seeds_parts(tmp_path / "seeds", per_style={"story": 4})
    table = pq.read_table(parts[0])
    version = pa.array([9, 1, 1, 1], pa.int32())
    prompt = pa.array([table["prompt"][0].as_py(), "  ", *table["prompt"].to_pylist()[2:]])
    table = table.set_column(table.column_names.index("template_version"), "template_version",
                             version)  # fmt: skip
    table = table.set_column(table.column_names.index("prompt"), "prompt", prompt)
    pq.write_table(table, parts[0])
    with fake_server(good) as (url, seen):
        m = run_stage(GenerateStage(teacher=writer(url)), parts, tmp_path / "run")
        assert len(seen) == 2
    assert m["dropped"] == {"generate:no_template": 1, "generate:empty_prompt": 1}
    rows = {r["id"]: r for r in pq.read_table(tmp_path / f"run/generate/{m['part_names'][0]}"
                                              ".parquet").to_pylist()}  # fmt: skip
    ids = table["id"].to_pylist()
    assert "no prompt template" in rows[ids[0]]["teacher_error"]
    assert "synth_v9" in rows[ids[0]]["teacher_error"]
    assert rows[ids[1]]["teacher_error"].startswith("prompt:")
    assert rows[ids[2]]["text"] == GOOD


def test_preflight_of_seeds_generate_and_validate(tmp_path):
    with pytest.raises(PreflightError, match="synth_v1") as e:
        SeedsStage(template="synth_v2").preflight()
    assert e.value.key == "template"
    with pytest.raises(PreflightError, match="no such file") as e:
        SeedsStage(taxonomy=str(tmp_path / "topics.yaml")).preflight()
    assert e.value.key == "taxonomy"
    (tmp_path / "topics.yaml").write_text("subjects: [algebra, geometry]\n")
    with pytest.raises(PreflightError, match="expected `subjects") as e:
        SeedsStage(taxonomy=str(tmp_path / "topics.yaml")).preflight()
    SeedsStage().preflight()
    SeedsStage(taxonomy="").preflight()  # no curated topics: nothing to check

    missing = TeacherConfig(local=LocalServerConfig(model_path=str(tmp_path / "m.gguf")))
    with pytest.raises(PreflightError) as e:
        GenerateStage(teacher=missing).preflight()
    assert e.value.key == "teacher.local.model_path"
    GenerateStage().preflight()

    with pytest.raises(PreflightError) as e:
        ValidateStage(edu_model=str(tmp_path / "model.bin")).preflight()
    assert e.value.key == "edu_model"
    ValidateStage(edu_model="@edu_train/model.bin").preflight()
    ValidateStage().preflight()


def test_validate_rejects_refusals_stock_openings_repetition_and_short_text():
    texts = {
        "good": GOOD,
        "refusal": "As an AI language model, I cannot write this. " + GOOD,
        "stock": "Certainly! Here is a textbook section. " + GOOD,
        "short": "Fractions are parts of a whole.",
        "repeat": "\n".join(["Fractions are parts of a whole and we love them a lot."] * 30),
        "truncated": GOOD,
        "french": "Les fractions décrivent des parties d'un tout. " * 12,
    }
    table = pa.table(
        {
            "id": list(texts),
            "text": pa.array(list(texts.values()), pa.large_string()),
            "finish_reason": ["stop", "stop", "stop", "stop", "stop", "length", "stop"],
        }
    )
    out = ValidateStage(min_words=40)(table)
    got = dict(zip(out["id"].to_pylist(), out["drop_reason"].to_pylist(), strict=True))
    assert got["good"] is None
    assert got["refusal"] == "validate:refusal" and got["stock"] == "validate:stock_opening"
    assert got["short"] == "validate:too_short" and got["truncated"] == "validate:truncated"
    assert got["repeat"].startswith("quality:gopher_")
    assert got["french"] == "langid:lang_not_allowed"


def test_generate_with_the_real_local_teacher(tmp_path):
    parts = seeds_parts(tmp_path / "seeds", per_style={"story": 2, "howto": 1}, web_max_seeds=0)
    teacher = TeacherConfig(local=LocalServerConfig(n_threads=2))
    stage = GenerateStage(teacher=teacher, max_tokens=48, style_max_tokens={}, request_batch=3)
    m = run_stage(stage, parts, tmp_path / "run")
    rows = pa.concat_tables(
        pq.read_table(p) for p in (tmp_path / "run/generate").glob("*.parquet")
    ).to_pylist()
    assert m["rows_in"] == 3 and len(rows) == 3
    for r in rows:
        assert r["teacher_error"] is None and r["text"], r
        assert r["teacher_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert 1 <= r["completion_tokens"] <= 48 and r["prompt_tokens"] > 20
    done = json.loads((tmp_path / "run/generate/_state/_DONE").read_text())
    assert done["ok"] == 3 and done["completion_tokens_per_s"] > 0


# --- the answer store, part by part -------------------------------------------------------


def two_parts(tmp_path: Path) -> tuple[list[str], list[list[str]]]:
    """Seeds in two parts (6 and 5 prompts) and the ids of each."""
    parts = seeds_parts(tmp_path / "seeds", per_style={"textbook": 6, "story": 5}, part_rows=6)
    return parts, [pq.read_table(p)["id"].to_pylist() for p in parts]


def test_each_part_reads_only_its_own_answers_and_a_retry_asks_only_the_failed(tmp_path):
    parts, ids = two_parts(tmp_path)
    everyone = [i for p in ids for i in p]

    def first_two_fail(n, body, headers):
        return (500, {}, b"kaboom") if n <= 2 else good(n, body, headers)

    cfg = dict(request_batch=4, retry_rounds=0)  # batches of 4 across the two parts
    with fake_server(first_two_fail) as (url, _):
        m = run_stage(GenerateStage(teacher=writer(url, max_concurrency=1), **cfg), parts,
                      tmp_path / "run")  # fmt: skip
    assert m["dropped"] == {"generate:teacher_error": 2}
    state = tmp_path / "run/generate/_state"
    store = state / "completions"
    held = {d.name: sorted(pa.concat_tables(pq.read_table(f) for f in d.iterdir())["id"].to_pylist())
            for d in store.iterdir()}  # fmt: skip
    assert held == {part_key(f"seeds/{Path(p).name}"): sorted(i) for p, i in zip(parts, ids,
                    strict=True)}  # fmt: skip

    # A worker reads nothing in setup() and, per part, that part's answers only.
    stage = GenerateStage()
    stage.state_dir = str(state)
    stage.setup()
    assert stage.answers.rows_loaded == 0
    for part, mine in zip(parts, ids, strict=True):
        before = stage.answers.rows_loaded
        out = stage(pq.read_table(part))
        assert stage.answers.rows_loaded - before == len(mine)
        assert out["id"].to_pylist() == mine and out["text"].null_count <= 2

    with fake_server(good) as (url, seen):
        stage = GenerateStage(teacher=writer(url), **cfg)
        m = run_stage(stage, parts, tmp_path / "run", retry_failed=True)
        assert len(seen) == 2 and m["dropped"] == {}
    rows = pa.concat_tables(pq.read_table(tmp_path / f"run/generate/{n}.parquet")
                            for n in m["part_names"])  # fmt: skip
    assert rows["id"].to_pylist() == everyone and set(rows["text"].to_pylist()) == {GOOD}


_KILLED_GENERATE = """
import sys
from pathlib import Path
from generators.generate import GenerateStage
from generators.teacher.config import TeacherConfig
from pipeline.stage_runner import run_stage
url, run, *parts = sys.argv[1:]
teacher = TeacherConfig(backend="openai", base_url=url, max_retries=0, max_concurrency=1)
run_stage(GenerateStage(teacher=teacher, request_batch=3, retry_rounds=0), parts, Path(run))
"""


def test_a_killed_generate_resumes_with_exactly_the_prompts_left(tmp_path):
    """SIGKILL while the second request batch is in flight: the first batch is whole in the
    store, and the resume asks exactly the other prompts of both parts."""
    parts, ids = two_parts(tmp_path)
    everyone = [i for p in ids for i in p]
    hang = threading.Event()

    def stalls_on_the_fifth(n, body, headers):
        if n >= 5:
            hang.wait(30)
        return good(n, body, headers)

    run = tmp_path / "run"
    store = run / "generate/_state/completions"
    with fake_server(stalls_on_the_fifth) as (url, seen):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_GENERATE, url, str(run), *parts],
                                env=env, cwd=REPO, stderr=subprocess.PIPE)  # fmt: skip
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
    committed = sorted(
        i for f in store.glob("*/*.parquet") for i in pq.read_table(f)["id"].to_pylist()
    )
    assert committed == sorted(everyone[:3])

    with fake_server(good) as (url, seen):
        m = run_stage(GenerateStage(teacher=writer(url), request_batch=3), parts, run)
        assert generated_ids(seen, everyone) == sorted(everyone[3:])
    assert m["rows_in"] == 11 and m["dropped"] == {}
    assert not list(store.glob("**/.*"))


def test_a_store_from_before_the_part_folders_is_moved_into_them(tmp_path):
    """Answers stored by id directly in completions/, and seeds parts without source_path
    (both as the code before part folders wrote them): the answers move into part folders,
    only what has no usable answer is asked, and process() finds every row's answer."""
    parts, ids = two_parts(tmp_path)
    everyone = [i for p in ids for i in p]
    for p in parts:
        pq.write_table(pq.read_table(p).drop_columns(["source_path"]), p)
    store = tmp_path / "state/completions"
    store.mkdir(parents=True)
    old = [Completion(i, f"old {i}", 5, 2, "stop", None, None, 0.1, "m", "openai")
           for i in everyone[1:]]  # fmt: skip
    old[0] = Completion(everyone[1], None, None, None, None, "http_503: busy", "busy", 0.1, "m",
                        "openai")  # fmt: skip
    pq.write_table(completions_table(old), store / "g000001-000000.parquet")
    with fake_server(good) as (url, seen):
        stage = GenerateStage(teacher=writer(url))
        stage.prepare(parts, str(tmp_path / "state"))
        assert generated_ids(seen, everyone) == sorted(everyone[:2])
    assert not list(store.glob("*.parquet")) and not (store / "_MIGRATED").exists()
    assert sorted(d.name for d in store.iterdir()) == sorted(
        part_key(f"seeds/{Path(p).name}") for p in parts
    )
    stage.setup()
    out = pa.concat_tables(stage(pq.read_table(p)) for p in parts)
    assert out["text"].to_pylist() == [GOOD, GOOD, *(f"old {i}" for i in everyone[2:])]
