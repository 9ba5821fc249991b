"""`primer export`: a stage's kept rows, column parts joined with their base, filtered,
selected and sharded, as Parquet, JSON Lines or a `datasets` folder, with a dataset card;
read back with Hugging Face `datasets`; the same on a real S3-compatible server (moto, on
127.0.0.1) as on local disk."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.io import read_stage_part
from pipeline.stage import Stage, StageConfig, mark_dropped, set_column
from pipeline.stage_runner import GuardrailError, output_files, run_stage
from tests.conftest import fineweb_docs, moto_s3, write_jsonl_parts

SECRET = "sk-live-0123456789abcdefABCDEF"


class EduLikeConfig(StageConfig):
    min_score: float = 3.0
    api_key_env: str = ""  # a secret typed where a variable's name goes: never in a card


class EduLike(Stage):
    """Scores by word count and drops the low ones: an annotating stage, so it writes
    column parts (id, edu_score, drop_reason) as edu_score does."""

    name = "edu_like"
    Config = EduLikeConfig
    needs = ("text", "q_n_words")
    adds = ("edu_score",)
    annotates = True
    threshold_keys: ClassVar[frozenset[str]] = frozenset({"min_score"})

    def score(self, table: pa.Table) -> pa.Table:
        words = pc.cast(table["q_n_words"], pa.float64())
        return set_column(table, "edu_score", pc.divide(words, 100.0))

    def mark(self, table: pa.Table) -> pa.Table:
        low = pc.less(table["edu_score"], self.config.min_score)
        return mark_dropped(table, self.name, [("low", low)])


def _quality_run(tmp: Path, docs: list[dict], readme: str | None, licence: tuple[str, str]):
    folder = tmp / "crawl"
    write_jsonl_parts(folder, docs, 3)
    if readme is not None:
        (folder / "README.md").write_text(readme)
    (folder / licence[0]).write_text(licence[1])
    recipe = tmp / "r.yaml"
    recipe.write_text(f"name: web\nexecutor: local\nstages:\n  quality: {{input: ['{folder}']}}\n")
    run = tmp / "run"
    assert main(["run", str(recipe), "--output", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """quality on 150 FineWeb documents (input folder with a README declaring its licence,
    which the run skips and records), then an annotating stage `edu` over its parts, and
    `strict`, the same stage stopped by its guardrail (left incomplete)."""
    tmp = tmp_path_factory.mktemp("export")
    readme = "---\nlicense: odc-by\n---\n# FineWeb sample\n"
    run = _quality_run(tmp, fineweb_docs(150), readme, ("LICENSE", "ODC-By 1.0\n"))
    parts = output_files(run / "quality")
    run_stage(EduLike(min_score=2.0, api_key_env=SECRET), parts, run, name="edu")
    strict = EduLike(min_score=9.0, max_drop_fraction=0.1, on_excess_drop="fail")
    with pytest.raises(GuardrailError):
        run_stage(strict, parts, run, name="strict")
    return run


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    # Nothing here may reach the Hub: every `datasets` load is of local files.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _kept(run: Path, stage: str) -> pa.Table:
    return pa.concat_tables(read_stage_part(f, kept_only=True) for f in output_files(run / stage))


def _export(run: Path, stage: str, to: Path | str, *args: str) -> int:
    return main(["export", str(run), stage, "--to", str(to), *args])


def _parquet_rows(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted((out / "data").glob("*.parquet")))


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "primer:" in line]
    assert len(err) == 1, err
    return err[0]


def test_parquet_export_is_the_kept_rows_with_the_base_text_joined(run_dir, tmp_path):
    import datasets

    # the stage's own parts hold ids and scores only: the text comes from quality's parts
    assert "text" not in pq.read_schema(output_files(run_dir / "edu")[0]).names
    out = tmp_path / "edu"
    assert _export(run_dir, "edu", out) == 0

    kept = _kept(run_dir, "edu")
    got = _parquet_rows(out)
    assert 0 < got.num_rows == kept.num_rows < 150
    assert got["id"].to_pylist() == kept["id"].to_pylist()
    assert got["edu_score"].to_pylist() == kept["edu_score"].to_pylist()
    assert min(got["edu_score"].to_pylist()) >= 2.0
    source = {d["id"]: d["text"] for d in fineweb_docs(150)}
    assert got["text"].to_pylist() == [source[i] for i in got["id"].to_pylist()]
    assert {"drop_reason", "error"}.isdisjoint(got.column_names)
    assert "q_n_words" in got.column_names and "url" in got.column_names

    files = [str(f) for f in sorted((out / "data").glob("*.parquet"))]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    assert ds["id"] == kept["id"].to_pylist() and ds["text"] == got["text"].to_pylist()
    # the card's YAML tells `datasets` (and the Hub) where the data files are
    by_card = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c"))
    assert by_card["id"] == ds["id"]
    done = json.loads((out / "_SUCCESS").read_text())
    assert done["rows"] == kept.num_rows and done["stage_kept"] == kept.num_rows
    assert not list(tmp_path.glob(".edu.*"))  # the hidden build folder was renamed into place


def test_filter_and_columns_and_row_shards_in_json_lines(run_dir, tmp_path):
    import datasets

    out = tmp_path / "jsonl"
    where = "edu_score >= 3 AND url LIKE 'https://%'"
    args = ["--format", "jsonl", "--where", where, "--columns", "id,text,edu_score"]
    assert _export(run_dir, "edu", out, *args, "--shard-rows", "7") == 0

    kept = _kept(run_dir, "edu").to_pylist()
    want = [r for r in kept if r["edu_score"] >= 3 and r["url"].startswith("https://")]
    assert 7 < len(want) < len(kept)
    shards = sorted((out / "data").glob("train-*.jsonl.gz"))
    rows = []
    for f in shards:
        with gzip.open(f, "rt") as fh:
            rows.append([json.loads(line) for line in fh])
    assert [len(r) for r in rows] == [7] * (len(want) // 7) + (
        [len(want) % 7] if len(want) % 7 else []
    )
    flat = [r for shard in rows for r in shard]
    assert [list(r) for r in flat] == [["id", "text", "edu_score"]] * len(want)
    assert [(r["id"], r["text"]) for r in flat] == [(r["id"], r["text"]) for r in want]
    assert [r["edu_score"] for r in flat] == pytest.approx([r["edu_score"] for r in want])

    ds = datasets.load_dataset(
        "json", data_files=[str(f) for f in shards], split="train", cache_dir=str(tmp_path)
    )
    assert ds["id"] == [r["id"] for r in want] and ds.column_names == ["id", "text", "edu_score"]


def test_shards_end_at_the_byte_size_given(run_dir, tmp_path):
    out = tmp_path / "bytes"
    limit = 20_000
    assert _export(run_dir, "edu", out, "--columns", "id,text", "--shard-bytes", str(limit)) == 0
    shards = [pq.read_table(f) for f in sorted((out / "data").glob("*.parquet"))]
    size = [
        [len(i.encode()) + len(t.encode()) for i, t in zip(s["id"].to_pylist(), s["text"].to_pylist(), strict=True)]
        for s in shards
    ]  # fmt: skip
    assert len(shards) > 3
    assert sum(s.num_rows for s in shards) == _kept(run_dir, "edu").num_rows
    for i, rows in enumerate(size):
        assert sum(rows) <= limit or len(rows) == 1  # a row larger than a shard is alone
        if i + 1 < len(size):
            assert sum(rows) + size[i + 1][0] > limit  # and each shard is as full as it can be


def test_hf_format_loads_from_disk_in_the_shards_asked(run_dir, tmp_path):
    import datasets

    out = tmp_path / "hf"
    assert _export(run_dir, "edu", out, "--format", "hf", "--shard-rows", "40") == 0
    kept = _kept(run_dir, "edu")
    ds = datasets.load_from_disk(str(out))
    assert ds["id"] == kept["id"].to_pylist() and ds["text"] == kept["text"].to_pylist()
    assert len(list(out.glob("data-*.arrow"))) == math.ceil(kept.num_rows / 40)
    assert "edu_score" in ds.column_names and "drop_reason" not in ds.column_names
    assert (out / "README.md").is_file()


def test_the_card_says_what_ran_what_it_dropped_and_the_input_licence(run_dir, tmp_path):
    out = tmp_path / "card"
    assert _export(run_dir, "edu", out, "--where", "edu_score >= 2.5") == 0
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "odc-by"  # from the input folder's README front matter
    assert meta["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"

    rows = _parquet_rows(out).num_rows
    assert f"rows: {rows:,}" in body and "`edu_score >= 2.5`" in body
    for stage in ("quality", "edu"):
        m = json.loads((run_dir / stage / "_manifest.json").read_text())
        assert m["dropped"]
        for reason, count in m["dropped"].items():
            assert f"| {stage} | `{reason}` | {count:,} |" in body
        assert (
            f"| {stage} | {m['uses']} | {m['version']} | {m['rows_in']:,} | {m['rows_out']:,} |"
            in body
        )
    assert "`min_words=50`" in body  # quality's thresholds
    assert "min_score: 2.0" in body  # the stage's own config
    assert SECRET not in card and "api_key_env: '***'" in body
    assert "strict" in body and "not upstream" in body  # the failed stage fed nothing here
    assert "`README.md`" in body and "`LICENSE`" in body


def test_an_input_licence_that_is_not_recorded_is_left_to_the_user(tmp_path):
    # a licence file with a suffix covers some files of a folder: listed, never trusted
    run = _quality_run(
        tmp_path, fineweb_docs(30), None, ("LICENSE.apache-2.0", "Apache License, Version 2.0\n")
    )
    out = tmp_path / "out"
    assert _export(run, "quality", out) == 0
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "other"
    assert "`LICENSE.apache-2.0`: names apache-2.0" in card
    assert "set `license:` in this card's header" in card


def test_mistakes_are_one_line_and_exit_2_before_anything_is_written(run_dir, tmp_path, capsys):
    out = tmp_path / "x"
    assert _export(run_dir, "strict", out) == 2  # stopped by its guardrail
    assert "not complete" in _one_error_line(capsys)
    assert _export(run_dir, "dedup", out) == 2
    assert "no stage 'dedup'" in _one_error_line(capsys)
    assert _export(run_dir, "edu", out, "--columns", "id,txet") == 2
    assert "txet" in _one_error_line(capsys)
    assert _export(run_dir, "edu", out, "--where", "edu_scor > 1") == 2
    assert "edu_scor" in _one_error_line(capsys)
    assert _export(run_dir, "edu", out, "--where", "edu_score +") == 2
    assert "not an SQL expression" in _one_error_line(capsys)
    assert _export(run_dir, "edu", out, "--where", "edu_score + 1") == 2
    assert "not true/false" in _one_error_line(capsys)
    assert _export(run_dir, "edu", out, "--shard-bytes", "lots") == 2
    assert "not a size" in _one_error_line(capsys)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_existing_export_is_replaced_only_when_asked(run_dir, tmp_path, capsys):
    out = tmp_path / "e"
    assert _export(run_dir, "edu", out, "--shard-rows", "10") == 0
    assert _export(run_dir, "edu", out) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert _export(run_dir, "edu", out, "--overwrite") == 0
    assert [f.name for f in (out / "data").iterdir()] == ["train-00000.parquet"]
    (out / "data" / "notes.txt").write_text("mine")  # not an export's file
    assert _export(run_dir, "edu", out, "--overwrite") == 2
    assert "data/notes.txt" in _one_error_line(capsys)
    assert (out / "data" / "notes.txt").read_text() == "mine"


def test_push_to_hub_fails_in_one_line_when_the_hub_cannot_be_reached(
    run_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "push"
    # offline: refused before any work
    assert _export(run_dir, "edu", out, "--push-to-hub", "someone/web-edu") == 2
    assert "HF_HUB_OFFLINE" in _one_error_line(capsys) and not out.exists()
    assert _export(run_dir, "edu", out, "--format", "hf", "--push-to-hub", "someone/x") == 2
    assert "--format parquet to push" in _one_error_line(capsys) and not out.exists()
    # a Hub address that answers nothing (a closed port on this machine): the export is
    # complete, the push fails in one line with the command to upload it later
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, when `datasets` came in
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    assert _export(run_dir, "edu", out, "--push-to-hub", "someone/web-edu") == 1
    line = _one_error_line(capsys)
    assert "could not push" in line and "hf upload someone/web-edu" in line
    assert "127.0.0.1:9" in line and "Connect" in line  # it did try that address
    assert "hf_xxx" not in line
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == _kept(run_dir, "edu").num_rows


@pytest.fixture
def bucket(monkeypatch):
    """A moto S3 server on 127.0.0.1 with an empty bucket; the AWS variables point at it."""
    from pipeline import storage

    with moto_s3(monkeypatch):
        fs, _ = storage.filesystem("s3://exports")
        fs.mkdir("exports")
        yield fs


def test_an_export_to_a_bucket_equals_the_local_export(run_dir, tmp_path, bucket, capsys):
    local = tmp_path / "local"
    args = ["--where", "edu_score >= 2.5", "--shard-rows", "25"]
    assert _export(run_dir, "edu", local, *args) == 0
    assert _export(run_dir, "edu", "s3://exports/web/edu", *args) == 0

    names = sorted(
        str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != "_SUCCESS"
    )
    remote = sorted(p[len("exports/web/edu/") :] for p in bucket.find("exports/web/edu"))
    assert remote == sorted([*names, "_SUCCESS"]) and len(names) > 3
    for name in names:
        assert bucket.cat_file(f"exports/web/edu/{name}") == (local / name).read_bytes(), name
    done = json.loads(bucket.cat_file("exports/web/edu/_SUCCESS"))
    assert done["files"] == json.loads((local / "_SUCCESS").read_text())["files"]

    # a bucket prefix that holds an export is not written over unless asked
    assert _export(run_dir, "edu", "s3://exports/web/edu", *args) == 2
    assert "--overwrite" in _one_error_line(capsys)


def test_the_card_follows_input_parts_and_config_references_upstream(tmp_path):
    from pipeline.views.card import lineage, raw_inputs
    from pipeline.views.runs import Run

    run = tmp_path / "quickstart"

    def manifest(stage: str, inputs: list[str], config: dict, kind: str = "rows") -> None:
        (run / stage).mkdir(parents=True)
        m = {"stage": stage, "uses": stage, "version": 1, "kind": kind, "inputs": inputs,
             "config": config, "part_names": [f"{stage}-p0"], "complete": True,
             "attempts": [{"started": f"2026-01-01T00:00:0{len(list(run.iterdir()))}"}]}  # fmt: skip
        (run / stage / "_manifest.json").write_text(json.dumps(m))

    manifest("extract", ["crawl/a.warc.gz", "crawl/b.warc.gz#bytes=0-99"], {})
    manifest("quality", [f"{run}/extract/extract-p0.parquet"], {"min_words": 50})
    manifest("edu_annotate", [f"{run}/quality/quality-p0.parquet"], {})
    manifest("edu_train", [f"{run}/quality/quality-p0.parquet"],
             {"annotations": f"{run}/edu_annotate", "label_files": ["data/x.jsonl"]}, "artifact")  # fmt: skip
    manifest("edu_score", [f"{run}/quality/quality-p0.parquet"],
             {"model": "runs/quickstart/edu_train/model.bin"})  # fmt: skip
    manifest("seeds", [f"{run}/edu_score/edu_score-p0.parquet"], {})
    opened = Run(run)
    assert lineage(opened, "edu_score") == [
        "extract",
        "quality",
        "edu_annotate",
        "edu_train",
        "edu_score",
    ]
    assert lineage(opened, "quality") == ["extract", "quality"]
    assert raw_inputs(opened, lineage(opened, "edu_score")) == [
        "crawl/a.warc.gz",
        "crawl/b.warc.gz",
    ]
