"""Column parts: a stage that only adds columns writes id + its columns + drop_reason, and
every reader sees whole rows, the same as if the stage had copied the text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.executor import RayExecutor
from pipeline.io import StaleColumnPart, iter_documents, read_stage_part, stage_schema
from pipeline.stage import Stage, mark_dropped, set_column
from pipeline.stage_runner import output_files, run_stage
from pipeline.views.runs import open_run
from tests.conftest import fineweb_docs, write_jsonl_parts
from tests.pipeline.test_runner import LengthStage


class Tag(Stage):
    """Scores by length, drops the short: an annotating stage (it writes a column part)."""

    name = "tag"
    needs = ("text",)
    adds = ("edu_score",)
    annotates = True

    def process(self, table: pa.Table) -> pa.Table:
        score = pc.divide(pc.cast(pc.utf8_length(table["text"]), pa.float64()), 1000.0)
        table = set_column(table, "edu_score", score)
        return mark_dropped(table, self.name, [("short", pc.less(score, 3.0))])


class TagCopying(Tag):
    annotates = False


class Upper(Stage):
    """An ordinary stage downstream of the column part."""

    name = "upper"
    needs = ("text", "edu_score")
    adds = ("title",)

    def process(self, table: pa.Table) -> pa.Table:
        return set_column(
            table, "title", pc.utf8_upper(pc.utf8_slice_codeunits(table["text"], 0, 8))
        )


@pytest.fixture
def base_run(tmp_path):
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", fineweb_docs(150), 3)]
    run = tmp_path / "run"
    run_stage(LengthStage(min_chars=1000), files, run)
    return run


def _whole(files, **kw) -> pa.Table:
    return pa.concat_tables(read_stage_part(f, **kw) for f in files)


def test_column_part_reads_like_a_copied_part(base_run):
    run_stage(Tag(), output_files(base_run / "length"), base_run)
    run_stage(TagCopying(), output_files(base_run / "length"), base_run, name="copy")
    cols, copy = output_files(base_run / "tag"), output_files(base_run / "copy")

    on_disk = pq.read_table(cols[0])
    assert set(on_disk.column_names) == {"id", "edu_score", "drop_reason", "error"}  # no text
    assert sum(Path(f).stat().st_size for f in cols) * 5 < sum(Path(f).stat().st_size for f in copy)
    assert stage_schema(cols[0]).names == stage_schema(copy[0]).names
    assert _whole(cols).equals(_whole(copy))
    assert _whole(cols, kept_only=True).equals(_whole(copy, kept_only=True))
    got = [t for f in cols for t in iter_documents([f], 7, columns=("id", "text", "edu_score"))]
    want = _whole(copy, kept_only=True, columns=["id", "text", "edu_score"])
    assert pa.concat_tables(got).equals(want)

    # A downstream stage reads whole kept rows; the inspection view matches too.
    m = run_stage(Upper(), cols, base_run)
    assert m["rows_in"] == len(want) > 0
    assert _whole(output_files(base_run / "upper"))["edu_score"].equals(want["edu_score"])
    run = open_run(base_run)
    assert run.stage("tag").collect().to_arrow().num_rows == len(_whole(copy))
    assert run.stage("tag", kept_only=True, columns=["id", "text"]).collect()["id"].to_list() == (
        want["id"].to_pylist()
    )


def test_moved_run_folder_still_joins_and_a_rewritten_base_is_an_error(base_run, tmp_path):
    run_stage(Tag(), output_files(base_run / "length"), base_run)
    before = _whole(output_files(base_run / "tag"))
    moved = tmp_path / "moved"
    shutil.move(base_run, moved)
    cols = output_files(moved / "tag")
    assert _whole(cols).equals(before)  # found by its relative path

    base = pq.read_table(moved / "length" / Path(cols[0]).name)
    pq.write_table(base.slice(1), moved / "length" / Path(cols[0]).name)
    with pytest.raises(StaleColumnPart, match="changed after"):
        read_stage_part(cols[0])
    (moved / "length" / Path(cols[0]).name).unlink()
    with pytest.raises(StaleColumnPart, match="missing"):
        read_stage_part(cols[0])


def test_misaligned_column_part_is_caught_row_by_row(base_run):
    run_stage(Tag(), output_files(base_run / "length"), base_run)
    part = output_files(base_run / "tag")[0]
    t = pq.read_table(part)
    shuffled = t.take(pa.array(list(range(1, len(t))) + [0]))
    pq.write_table(shuffled.replace_schema_metadata(t.schema.metadata), part)
    with pytest.raises(StaleColumnPart, match="ids differ"):
        read_stage_part(part)
    pq.write_table(t.slice(1).replace_schema_metadata(t.schema.metadata), part)
    with pytest.raises(StaleColumnPart, match="fewer rows"):
        read_stage_part(part)


def test_column_parts_on_ray_match_in_process(base_run, ray_session):
    run_stage(Tag(), output_files(base_run / "length"), base_run)
    run_stage(Tag(), output_files(base_run / "length"), base_run, RayExecutor(), name="tag_ray")
    assert _whole(output_files(base_run / "tag_ray")).equals(_whole(output_files(base_run / "tag")))
    assert set(pq.read_table(output_files(base_run / "tag_ray")[0]).column_names) == {
        "id",
        "edu_score",
        "drop_reason",
        "error",
    }
