"""A large raw Parquet input is read as several parts (ranges of its row groups), each its
own task and commit, with the same rows as one whole read."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.parts import ReadOptions, plan_parts
from pipeline.stage_runner import output_files, run_stage
from tests.conftest import fineweb_docs
from tests.pipeline.test_thresholds import LengthStage


def _big_parquet(path, groups=10, rows=30):
    docs = fineweb_docs(groups * rows)
    ids = [d["id"] for d in docs]
    ids[rows * 6] = ids[0]  # the same id in groups 0 and 6
    ids[5] = None  # no id: "<file>:<row>" with the file's row number
    table = pa.table({"id": ids, "text": [d["text"] for d in docs]})
    pq.write_table(table, path, row_group_size=rows)
    return str(path)


def _rows(run):
    t = pa.concat_tables(pq.read_table(f) for f in output_files(run / "length"))
    return t.sort_by([("source_path", "ascending"), ("id", "ascending")])


def test_a_large_parquet_is_split_at_row_groups(tmp_path):
    f = _big_parquet(tmp_path / "big.parquet")
    parts = plan_parts([f], read=ReadOptions(max_rows_per_part=70))
    assert [p.row_groups for p in parts] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert len({p.name for p in parts}) == 5
    assert plan_parts([f], read=ReadOptions(max_rows_per_part=300))[0].row_groups is None

    split = run_stage(
        LengthStage(), [f], tmp_path / "split", read=ReadOptions(max_rows_per_part=70)
    )
    whole = run_stage(LengthStage(), [f], tmp_path / "whole")
    assert split["parts"] == 5 and whole["parts"] == 1
    assert split["rows_in"] == whole["rows_in"] == 300
    assert split["dropped"] == whole["dropped"]
    a, b = _rows(tmp_path / "split"), _rows(tmp_path / "whole")
    # The same documents and decisions; only the repeated id is not renamed, since its two
    # rows are in two parts, told apart by their source_path.
    assert sorted(a["text"].to_pylist()) == sorted(b["text"].to_pylist())
    assert whole["ids_renamed"] == 1 and split["ids_renamed"] == 0
    spans = ["0-1", "2-3", "4-5", "6-7", "8-9"]
    assert set(a["source_path"].to_pylist()) == {f"{f}#row_groups={s}" for s in spans}
    assert "big.parquet:5" in a["id"].to_pylist() and "big.parquet:5" in b["id"].to_pylist()


def test_a_killed_sub_part_is_redone_alone(tmp_path):
    f = _big_parquet(tmp_path / "big.parquet")
    read = ReadOptions(max_rows_per_part=70)
    first = run_stage(LengthStage(), [f], tmp_path / "run", read=read)
    sorted((tmp_path / "run/length/_parts").glob("*.json"))[2].unlink()
    again = run_stage(LengthStage(), [f], tmp_path / "run", read=read)
    assert again["attempts"][-1]["parts_run"] == 1
    assert again["rows_out"] == first["rows_out"]


def test_dedup_keeps_one_of_two_identical_rows_in_two_sub_parts(tmp_path):
    from filters.dedup.dedup import DedupStage

    docs = fineweb_docs(60)
    texts = [d["text"] for d in docs]
    texts[45] = texts[3]  # identical text, same id, in row groups 0 and 3
    ids = [d["id"] for d in docs]
    ids[45] = ids[3]
    f = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), f, row_group_size=15)
    read = ReadOptions(max_rows_per_part=20)
    run = tmp_path / "run"
    run_stage(LengthStage(min_chars=0), [str(f)], run, read=read)
    m = run_stage(DedupStage(), output_files(run / "length"), run)
    assert m["dropped"].get("dedup:exact_duplicate", 0) == 1
