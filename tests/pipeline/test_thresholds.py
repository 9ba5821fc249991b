"""Thresholds without re-scoring: a stage's scores are fingerprinted apart from its
thresholds, and a threshold-only change marks the stored scores again instead of scoring.

For every stage with `threshold_keys`: after a threshold-only change the scorer is called
zero times, the manifest says `scores_reused`, and the rows (ids, reasons, every column) equal
those of a fresh run with the new thresholds. Transport settings recompute nothing at all.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.stage import Stage, StageConfig, mark_dropped, set_column
from pipeline.stage_runner import output_files, run_stage
from tests.conftest import fineweb_docs, write_jsonl_parts


class LengthConfig(StageConfig):
    min_chars: int = 2000
    max_chars: int = 10**9
    cap: int = 10**6  # scoring setting: documents longer than this are not scored


class LengthStage(Stage):
    """A scorer (characters, words) and thresholds over it; counts its `score` calls."""

    name = "length"
    Config = LengthConfig
    needs = ("text",)
    adds = ("n_chars", "q_n_words")
    threshold_keys = frozenset({"min_chars", "max_chars"})
    score_reasons = frozenset({"uncapped"})
    calls = 0

    def score(self, table: pa.Table) -> pa.Table:
        type(self).calls += 1
        n = pc.utf8_length(table["text"])
        table = set_column(table, "n_chars", n)
        table = set_column(
            table, "q_n_words", pc.list_value_length(pc.utf8_split_whitespace(table["text"]))
        )
        return mark_dropped(table, self.name, [("uncapped", pc.greater(n, self.config.cap))])

    def mark(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        n = table["n_chars"]
        rules = [
            ("too_short", pc.less(n, cfg.min_chars)),
            ("too_long", pc.greater(n, cfg.max_chars)),
        ]
        return mark_dropped(table, self.name, rules)


@pytest.fixture
def files(tmp_path):
    return [str(p) for p in write_jsonl_parts(tmp_path / "in", fineweb_docs(150), 3)]


def _table(run, stage="length"):
    return pa.concat_tables(pq.read_table(f) for f in output_files(run / stage))


def test_a_threshold_change_marks_stored_scores_again(tmp_path, files):
    run = tmp_path / "run"
    run_stage(LengthStage(min_chars=1000), files, run)
    LengthStage.calls = 0
    m = run_stage(LengthStage(min_chars=3000, max_chars=20_000), files, run)
    assert LengthStage.calls == 0, "a threshold-only change must not score again"
    assert m["scores_reused"] and m["parts_scores_reused"] == 3
    assert m["attempts"][-1] == m["attempts"][-1] | {"parts_run": 0, "parts_marked_again": 3}
    fresh = run_stage(LengthStage(min_chars=3000, max_chars=20_000), files, tmp_path / "fresh")
    assert LengthStage.calls > 0 and not fresh["scores_reused"]
    assert _table(run).equals(_table(tmp_path / "fresh"))
    for key in ("rows_in", "rows_out", "dropped"):
        assert m[key] == fresh[key]
    assert m["fingerprint"] == fresh["fingerprint"]
    assert m["scores_fingerprint"] == fresh["scores_fingerprint"]


def test_marking_again_keeps_score_reasons_and_errors(tmp_path, files):
    run = tmp_path / "run"
    run_stage(LengthStage(cap=3000), files, run)
    m = run_stage(LengthStage(cap=3000, min_chars=10), files, run)
    assert m["scores_reused"] and m["dropped"].get("length:uncapped", 0) > 0
    assert "length:too_short" not in m["dropped"]


def test_a_scoring_setting_change_scores_again(tmp_path, files):
    run = tmp_path / "run"
    run_stage(LengthStage(), files, run)
    LengthStage.calls = 0
    m = run_stage(LengthStage(cap=3000), files, run)
    assert LengthStage.calls > 0 and not m["scores_reused"]
    assert m["attempts"][-1]["parts_run"] == 3 and len(m["attempts"]) == 1


def test_a_transport_setting_change_recomputes_nothing(tmp_path, files):
    run = tmp_path / "run"
    first = run_stage(LengthStage(batch_rows=1000), files, run)
    LengthStage.calls = 0
    m = run_stage(LengthStage(batch_rows=7, max_drop_fraction=0.99), files, run)
    assert LengthStage.calls == 0 and m["attempts"][-1]["parts_run"] == 0
    assert m["fingerprint"] == first["fingerprint"]


def test_a_part_killed_while_being_marked_again_is_marked_again(tmp_path, files):
    run = tmp_path / "run"
    run_stage(LengthStage(), files, run)
    m1 = run_stage(LengthStage(min_chars=3000), files, run)
    # A kill after a part was rewritten but before its commit record was: the record still
    # carries the old fingerprint, so the next attempt marks that part again.
    commit = sorted((run / "length" / "_parts").glob("*.json"))[0]
    record = json.loads(commit.read_text())
    record["fingerprint"] = "0" * 16
    commit.write_text(json.dumps(record))
    m2 = run_stage(LengthStage(min_chars=3000), files, run)
    assert m2["attempts"][-1]["parts_marked_again"] == 1
    assert m2["dropped"] == m1["dropped"] and m2["rows_out"] == m1["rows_out"]


def test_langid_thresholds_need_no_model_call(tmp_path):
    from filters.langid import LangIdStage

    docs = fineweb_docs(60) + [
        {"id": "fr", "text": "Le chat dort sur le canapé pendant que la pluie tombe."},
        {"id": "de", "text": "Der Hund läuft jeden Morgen mit seinem Besitzer durch den Park."},
    ]
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 2)]
    run = tmp_path / "run"
    run_stage(LangIdStage(languages=["en"], min_score=0.5), files, run)

    calls = 0
    real = LangIdStage.score

    def counting(self, table):
        nonlocal calls
        calls += 1
        return real(self, table) if table is not None else real(self)

    LangIdStage.score = counting
    try:
        new = {"languages": ["en", "fr"], "min_score": 0.9}
        m = run_stage(LangIdStage(**new), files, run)
        assert calls == 0 and m["scores_reused"]
        fresh = run_stage(LangIdStage(**new), files, tmp_path / "fresh")
        assert calls > 0
    finally:
        LangIdStage.score = real
    assert _table(run, "langid").equals(_table(tmp_path / "fresh", "langid"))
    assert m["dropped"] == fresh["dropped"] and "langid:low_score" in m["dropped"]


def _count_calls(monkeypatch, cls, method="score"):
    calls = {"n": 0}
    real = getattr(cls, method)

    def counting(self, *args):
        calls["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(cls, method, counting)
    return calls


def test_quality_thresholds_mark_the_stored_signals_again(tmp_path, monkeypatch):
    from filters.quality.quality import QualityStage

    docs = fineweb_docs(200) + [{"id": "huge", "text": "word " * 5000}]
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 3)]
    run_stage(QualityStage(max_chars=20_000), files, tmp_path / "run")
    calls = _count_calls(monkeypatch, QualityStage)
    new = {"max_chars": 20_000, "min_words": 400, "c4": False, "max_dup_line_frac": 0.1}
    m = run_stage(QualityStage(**new), files, tmp_path / "run")
    assert calls["n"] == 0 and m["scores_reused"]
    fresh = run_stage(QualityStage(**new), files, tmp_path / "fresh")
    assert calls["n"] > 0
    assert _table(tmp_path / "run", "quality").equals(_table(tmp_path / "fresh", "quality"))
    assert m["dropped"] == fresh["dropped"]
    assert m["dropped"]["quality:too_long"] >= 1  # a score reason, kept when marking again
    assert "quality:c4_min_sentences" not in m["dropped"]


def test_edu_score_phase_thresholds_need_no_model(tmp_path, monkeypatch):
    """edu_score writes column parts (id + its columns); marking them again needs neither
    the text nor the model."""
    from filters.edu.score import EduScoreStage
    from filters.edu.train import fit_fasttext

    docs = fineweb_docs(150)
    lines = [
        f"__label__{min(len(d['text']) // 1500, 4)} " + d["text"][:2000].lower().replace("\n", " ")
        for d in docs
    ]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    params = {"epoch": 5, "lr": 0.1, "dim": 8, "wordNgrams": 2, "bucket": 20_000,
              "minCount": 1, "thread": 1, "seed": 0}  # fmt: skip
    model = str(tmp_path / "model.bin")
    fit_fasttext(str(tmp_path / "train.txt"), params, model)

    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 2)]
    for run in (tmp_path / "run", tmp_path / "fresh"):
        run_stage(LengthStage(min_chars=0), files, run)
    base = output_files(tmp_path / "run" / "length")
    run_stage(EduScoreStage(model=model, phase1_min_score=0.5), base, tmp_path / "run")
    calls = _count_calls(monkeypatch, EduScoreStage)
    setups = _count_calls(monkeypatch, EduScoreStage, "setup")
    new = {"model": model, "phase1_min_score": 1.5, "phase2_min_score": 2.0}
    m = run_stage(EduScoreStage(**new), base, tmp_path / "run")
    assert calls["n"] == 0 and setups["n"] == 0 and m["scores_reused"]
    fresh_base = output_files(tmp_path / "fresh" / "length")
    fresh = run_stage(EduScoreStage(**new), fresh_base, tmp_path / "fresh")
    assert calls["n"] > 0
    assert _table(tmp_path / "run", "edu_score").equals(_table(tmp_path / "fresh", "edu_score"))
    assert m["dropped"] == fresh["dropped"] and m["rows_out"] == fresh["rows_out"]
