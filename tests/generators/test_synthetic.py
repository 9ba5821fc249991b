"""Synthetic data: seeds (deterministic, diverse), generate (resumable, lineage, recorded
failures) against the real local teacher and scripted fake servers, validate."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from generators.generate import DryRun, GenerateStage, ValidateStage
from generators.seeds import STYLES, SeedsStage, draw, load_taxonomy
from generators.teacher import LocalServerConfig, TeacherConfig
from pipeline.runner import run_stage
from tests.conftest import fineweb_docs
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
    stats = stage.build([], str(tmp_path), False)
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
        stage.prepare(parts, str(tmp_path / "state"), False)
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
        m = run_stage(GenerateStage(teacher=teacher, **cfg), parts, tmp_path / "run", use_ray=False)
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
        GenerateStage(teacher=teacher, **cfg).prepare(parts, str(state), False)
        assert len(seen) == failed


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
    m = run_stage(stage, parts, tmp_path / "run", use_ray=False)
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
