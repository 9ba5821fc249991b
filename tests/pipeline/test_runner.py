"""The runner: parts, counts per reason, resume, recompute on change, guardrails, Ray."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.executor import RayExecutor
from pipeline.stage import ArtifactStage, Stage, StageConfig, mark_dropped, set_column
from pipeline.stage_runner import GuardrailError, output_files, run_stage
from tests.conftest import fineweb_docs, write_jsonl_parts


class LengthConfig(StageConfig):
    min_chars: int = 2000


class LengthStage(Stage):
    """Counts characters and drops short documents: the smallest real scorer + filter."""

    name = "length"
    Config = LengthConfig
    needs = ("text",)
    adds = ("n_chars",)

    def process(self, table: pa.Table) -> pa.Table:
        n = pc.utf8_length(table["text"])
        table = set_column(table, "n_chars", n)
        return mark_dropped(table, self.name, [("too_short", pc.less(n, self.config.min_chars))])


@pytest.fixture
def docs():
    return fineweb_docs(120)


def _rows(out_root, stage="length"):
    files = output_files(out_root / stage)
    t = pa.concat_tables(pq.read_table(f) for f in files)
    return sorted(zip(t["id"].to_pylist(), t["drop_reason"].to_pylist(), strict=True))


def test_counts_reasons_and_keeps_dropped_rows(tmp_path, docs):
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 4)]
    m = run_stage(LengthStage(), files, tmp_path / "out")

    expect_short = sum(len(d["text"]) < 2000 for d in docs)
    assert m["rows_in"] == len(docs)
    assert m["dropped"] == {"length:too_short": expect_short}
    assert m["rows_out"] == len(docs) - expect_short
    rows = _rows(tmp_path / "out")
    assert len(rows) == len(docs)  # dropped rows stay on disk, with their reason
    assert {r for _, r in rows} == {None, "length:too_short"}
    assert m["parts"] == 4 and m["complete"]


def test_rerun_skips_finished_parts_and_change_recomputes(tmp_path, docs):
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 3)]
    first = run_stage(LengthStage(), files, tmp_path / "out")
    again = run_stage(LengthStage(), files, tmp_path / "out")
    assert again["attempts"][-1]["parts_run"] == 0
    assert again["rows_in"] == first["rows_in"] and len(again["attempts"]) == 2

    changed = run_stage(LengthStage(min_chars=4000), files, tmp_path / "out")
    assert changed["attempts"][-1]["parts_run"] == 3 and len(changed["attempts"]) == 1
    expect = sum(len(d["text"]) < 4000 for d in docs)
    assert expect != first["rows_in"] - first["rows_out"]
    assert changed["dropped"]["length:too_short"] == expect


def test_partial_part_is_redone_not_doubled(tmp_path, docs):
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 3)]
    run_stage(LengthStage(), files, tmp_path / "out")
    clean = _rows(tmp_path / "out")
    # Simulate a kill after a part's Parquet landed but before its commit marker did.
    marker = sorted((tmp_path / "out/length/_parts").glob("*.json"))[1]
    marker.unlink()
    m = run_stage(LengthStage(), files, tmp_path / "out")
    assert m["attempts"][-1]["parts_run"] == 1
    assert _rows(tmp_path / "out") == clean


def test_guardrail_warns_or_stops(tmp_path, docs, caplog):
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 2)]
    with caplog.at_level(logging.WARNING, logger="primer"):
        m = run_stage(LengthStage(min_chars=10**9, max_drop_fraction=0.5), files, tmp_path / "w")
    assert m["guardrail"]["exceeded"] and "GUARDRAIL" in caplog.text
    with pytest.raises(GuardrailError, match="dropped 100.0%"):
        run_stage(
            LengthStage(min_chars=10**9, max_drop_fraction=0.5, on_excess_drop="fail"),
            files,
            tmp_path / "f",
        )


def test_a_stage_broken_on_every_row_stops_and_is_left_incomplete(tmp_path, docs):
    class Broken(LengthStage):
        def process(self, table):
            raise ValueError("boom")

    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 1)]
    with pytest.raises(GuardrailError, match=r"could not process 120 of its 120 input rows"):
        run_stage(Broken(), files, tmp_path / "out")
    manifest = json.loads((tmp_path / "out/length/_manifest.json").read_text())
    assert not manifest["complete"] and "max_error_fraction" in manifest["failed"]
    assert manifest["dropped"] == {"length:error": 120}
    with pytest.raises(FileNotFoundError, match="not complete"):
        output_files(tmp_path / "out/length")  # nothing downstream reads it
    rows = pq.read_table(next((tmp_path / "out/length").glob("*.parquet")))
    assert set(rows["error"].to_pylist()) == {"ValueError: boom"}


def test_a_setup_failure_is_not_a_row_error(tmp_path, docs):
    class NoModel(LengthStage):
        def setup(self):
            raise OSError("model.bin: no such file")

    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 1)]
    with pytest.raises(
        RuntimeError, match=r"stage 'length' failed on .*docs-000.jsonl.gz: OSError: model.bin"
    ):
        run_stage(NoModel(), files, tmp_path / "out")
    assert not list((tmp_path / "out/length").glob("*.parquet"))  # nothing half-written


def test_ray_gives_the_same_rows_as_in_process(tmp_path, docs, ray_session):
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 4)]
    local = run_stage(LengthStage(), files, tmp_path / "local")
    on_ray = run_stage(LengthStage(), files, tmp_path / "ray", RayExecutor())
    assert _rows(tmp_path / "local") == _rows(tmp_path / "ray")
    assert local["dropped"] == on_ray["dropped"]


def test_next_stage_reads_only_kept_rows(tmp_path, docs):
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 2)]
    first = run_stage(LengthStage(), files, tmp_path / "out")
    kept_files = output_files(tmp_path / "out" / "length")

    class Longer(LengthStage):
        name = "longer"

    second = run_stage(Longer(min_chars=4000), kept_files, tmp_path / "out")
    assert second["rows_in"] == first["rows_out"]
    # Part names follow the document through the stages.
    assert second["part_names"] == first["part_names"]


class SampleStage(LengthStage):
    """Keeps every other document; the rest are counted as not sampled and not written."""

    name = "sample"
    unwritten_reasons = frozenset({"not_sampled"})

    def process(self, table):
        table = super().process(table)
        odd = pc.equal(pc.bit_wise_and(pc.cast(pc.utf8_length(table["id"]), pa.int64()), 1), 1)
        return mark_dropped(table, self.name, [("not_sampled", odd)])


def test_unwritten_reasons_are_counted_but_not_written(tmp_path, docs):
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 2)]
    m = run_stage(SampleStage(), files, tmp_path / "out")
    written = _rows(tmp_path / "out", "sample")
    assert m["dropped"].get("sample:not_sampled", 0) > 0
    assert len(written) == m["rows_in"] - m["dropped"]["sample:not_sampled"]
    assert all(r != "sample:not_sampled" for _, r in written)


class CountArtifact(ArtifactStage):
    """Writes the number of kept rows of its inputs: the smallest artifact stage."""

    name = "count"

    def build(self, inputs, out_dir, executor=None):
        n = sum(pq.read_metadata(f).num_rows for f in inputs)
        (Path(out_dir) / "count.txt").write_text(str(n))
        return {"rows_in": n}


def test_artifact_stage_builds_once_and_recipes_reference_it(tmp_path, docs, monkeypatch):
    from pipeline import registry
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    monkeypatch.setitem(registry._STAGES, "length", f"{__name__}:LengthStage")
    monkeypatch.setitem(registry._STAGES, "count", f"{__name__}:CountArtifact")
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", docs, 2)]
    raw = {
        "name": "refs",
        "executor": "local",
        "stages": {"length": {"input": files}, "count": {"input": "@length"}},
    }
    run_recipe(load_recipe(raw=raw), output=tmp_path / "run")
    assert (tmp_path / "run/count/count.txt").read_text() == str(len(docs))
    again = run_recipe(load_recipe(raw=raw), output=tmp_path / "run")
    count = next(s for s in again["stages"] if s["stage"] == "count")
    assert count["attempts"] == 1  # up to date: not rebuilt

    bad = {**raw, "stages": {"length": {"input": files}, "count": {"input": "@nope"}}}
    with pytest.raises(Exception, match="refers to no earlier stage"):
        load_recipe(raw=bad)
