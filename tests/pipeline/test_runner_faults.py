"""The runner's fault rules: one bad row, a duplicate id, a guardrail stop, a resume's ETA,
stable fingerprints and masked secrets; each through the real runner on real files."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import Field

from pipeline.parts import plan_parts
from pipeline.progress import Progress
from pipeline.stage import Stage, StageConfig, mark_dropped, set_column
from pipeline.stage_runner import GuardrailError, output_files, run_stage
from tests.conftest import fineweb_docs, write_jsonl_parts


class PickyConfig(StageConfig):
    poison: str = "POISON"
    api_key: str | None = None
    max_tokens: int = Field(7, ge=1)


class Picky(Stage):
    """Counts characters, and raises (as a real signal bug would) on any text with the
    poison word: one bad document among good ones."""

    name = "picky"
    Config = PickyConfig
    needs = ("text",)
    adds = ("n_chars",)

    def process(self, table: pa.Table) -> pa.Table:
        if pc.any(pc.match_substring(table["text"], self.config.poison)).as_py():
            raise pa.ArrowInvalid("Float value 4294967295.000000 was truncated converting to int32")
        table = set_column(table, "n_chars", pc.utf8_length(table["text"]))
        return mark_dropped(table, self.name, [("short", pc.less(table["n_chars"], 200))])


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _table(out_root: Path, stage: str = "picky") -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted((out_root / stage).glob("*.parquet")))


def test_one_bad_row_is_recorded_and_the_part_goes_on(tmp_path):
    docs = fineweb_docs(300)
    docs[137] = {**docs[137], "text": docs[137]["text"] + " POISON"}
    docs[211] = {**docs[211], "text": "POISON " + docs[211]["text"]}
    f = _jsonl(tmp_path / "in/a.jsonl.gz", docs)
    m = run_stage(Picky(batch_rows=64), [f], tmp_path / "out")

    assert m["complete"] and m["rows_in"] == 300
    assert m["dropped"]["picky:error"] == 2
    t = _table(tmp_path / "out")
    assert len(t) == 300  # every row accounted for
    bad = t.filter(pc.equal(t["drop_reason"], "picky:error"))
    assert sorted(bad["id"].to_pylist()) == sorted([docs[137]["id"], docs[211]["id"]])
    assert (
        bad["error"].to_pylist()
        == ["ArrowInvalid: Float value 4294967295.000000 was truncated converting to int32"] * 2
    )
    good = t.filter(pc.invert(pc.fill_null(pc.equal(t["drop_reason"], "picky:error"), False)))
    assert good["n_chars"].null_count == 0 and good["error"].null_count == len(good)
    # the bad rows keep their input: they can be looked at and replayed
    assert bad["text"].null_count == 0


def test_error_rows_over_the_bound_stop_the_stage(tmp_path):
    docs = [{"id": str(i), "text": ("POISON " if i % 10 == 0 else "") + "word " * 60}
            for i in range(200)]  # fmt: skip
    f = _jsonl(tmp_path / "in/a.jsonl.gz", docs)
    with pytest.raises(GuardrailError, match=r"could not process 20 of its 200 input rows"):
        run_stage(Picky(), [f], tmp_path / "out")
    # Raising the bound is a guardrail change, not a config change: no recompute, it passes.
    m = run_stage(Picky(max_error_fraction=0.2), [f], tmp_path / "out")
    assert m["complete"] and m["attempts"][-1]["parts_run"] == 0 and m["failed"] is None


def test_a_guardrail_stop_leaves_the_stage_incomplete(tmp_path):
    docs = [{"id": str(i), "text": "short"} for i in range(50)]
    f = _jsonl(tmp_path / "in/a.jsonl.gz", docs)
    with pytest.raises(GuardrailError, match="dropped 100.0%"):
        run_stage(Picky(max_drop_fraction=0.5, on_excess_drop="fail"), [f], tmp_path / "o")
    m = json.loads((tmp_path / "o/picky/_manifest.json").read_text())
    assert m["complete"] is False and m["failed"].startswith("GUARDRAIL")
    with pytest.raises(FileNotFoundError, match="GUARDRAIL"):
        output_files(tmp_path / "o/picky")


def test_duplicate_ids_in_one_file_are_made_unique_and_counted(tmp_path):
    rows = [
        {"id": 7, "text": "seven " * 50},
        {"id": "7", "text": "seven " * 50},
        {"id": "7", "text": "another seven " * 40},
        {"id": "7#1", "text": "already suffixed " * 30},
        {"id": "8", "text": "eight " * 50},
    ]
    f = _jsonl(tmp_path / "in/a.jsonl.gz", rows)
    m = run_stage(Picky(), [f], tmp_path / "out")
    ids = _table(tmp_path / "out")["id"].to_pylist()
    assert ids == ["7", "7#1", "7#2", "7#1#1", "8"]  # deterministic, in reading order
    assert len(set(ids)) == len(ids)
    assert m["ids_renamed"] == 3


def test_resumed_progress_counts_only_this_attempt():
    out = io.StringIO()
    p = Progress("x", total_parts=10, done=8, stream=out)
    p.start -= 10.0  # ten seconds into this attempt
    p.update(parts=1, rows=100)
    line = p.line()
    assert "parts 9/10" in line
    assert "ETA 0:00:10" in line  # one part took 10 s, one is left: not 10 * 1 / 9


def test_inputs_are_fingerprinted_by_stable_path_and_content(tmp_path, monkeypatch):
    docs = fineweb_docs(40)
    a = tmp_path / "a" / "work"
    files = [str(p) for p in write_jsonl_parts(a / "data", docs, 2)]
    monkeypatch.chdir(a)
    first = run_stage(Picky(), files, tmp_path / "out")
    # The same working dir unpacked somewhere else (a new `ray job submit`): same parts.
    b = tmp_path / "b" / "work"
    shutil.copytree(a, b)
    monkeypatch.chdir(b)
    moved = [f.replace(str(a), str(b)) for f in files]
    again = run_stage(Picky(), moved, tmp_path / "out")
    assert again["fingerprint"] == first["fingerprint"]
    assert again["attempts"][-1]["parts_run"] == 0
    assert again["inputs"] == ["data/docs-000.jsonl.gz", "data/docs-001.jsonl.gz"]
    assert set(_table(tmp_path / "out")["source_path"].to_pylist()) == set(again["inputs"])
    assert [p.name for p in plan_parts(moved)] == first["part_names"]
    # Different content under the same name is a different input.
    _jsonl(b / "data/docs-001.jsonl.gz", docs[:5])
    changed = run_stage(Picky(), moved, tmp_path / "out")
    assert changed["fingerprint"] != first["fingerprint"]


class SecretConfig(PickyConfig):
    hf_token: str | None = None


class Secretive(Picky):
    name = "secretive"
    Config = SecretConfig


def test_secret_named_config_values_never_reach_the_manifest(tmp_path):
    f = _jsonl(tmp_path / "in/a.jsonl.gz", [{"id": "1", "text": "x " * 300}])
    stage = Secretive(api_key="sk-live-abcdef0123456789", hf_token="hf_AbCdEf0123456789xyz")
    run_stage(stage, [f], tmp_path / "out")
    text = (tmp_path / "out/secretive/_manifest.json").read_text()
    assert "sk-live" not in text and "hf_AbCd" not in text
    config = json.loads(text)["config"]
    assert config["api_key"] == "***" and config["hf_token"] == "***"
    assert config["max_tokens"] == 7  # a count, not a secret
