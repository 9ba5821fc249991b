"""What a run does with the inputs a user points it at, through the real CLI: files no
reader handles are listed before any work and skipped (or stop the run), a Parquet input
without its text column stops the run before any stage, duplicate ids never let identical
texts through dedup, and a guardrail stop exits 1 with one line."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cli import main
from tests.conftest import fineweb_docs


def _recipe(tmp_path: Path, stages: str, extra: str = "") -> str:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nexecutor: local\n{extra}stages:\n{stages}")
    return str(path)


def _crawl_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "crawl"
    folder.mkdir()
    with gzip.open(folder / "docs.jsonl.gz", "wt") as f:
        for d in fineweb_docs(30):
            f.write(json.dumps(d) + "\n")
    (folder / "LICENSE").write_text("Apache License 2.0\n")
    (folder / "README.md").write_text("# a crawl\n")
    (folder / "CC-MAIN-x.warc.wat.gz").write_bytes(gzip.compress(b"WARC/1.0\r\n"))
    (folder / "manifest.json").write_text('{"files": 1}')
    return folder


def test_unknown_files_are_listed_before_work_and_skipped(tmp_path, caplog, capsys):
    folder = _crawl_folder(tmp_path)
    recipe = _recipe(tmp_path, f"  quality: {{input: [{folder}]}}\n")
    with caplog.at_level(logging.INFO, logger="primer"):
        assert main(["run", recipe, "--output", str(tmp_path / "run")]) == 0
    warning = next(
        r.getMessage() for r in caplog.records if "skipping 4 input file" in r.getMessage()
    )
    for name in ("LICENSE", "README.md", "CC-MAIN-x.warc.wat.gz", "manifest.json"):
        assert name in warning
    first_work = next(i for i, r in enumerate(caplog.records) if "parts," in r.getMessage())
    assert (
        caplog.records.index(next(r for r in caplog.records if "skipping" in r.getMessage()))
        < first_work
    )
    manifest = json.loads((tmp_path / "run/quality/_manifest.json").read_text())
    assert len(manifest["skipped_inputs"]) == 4 and manifest["rows_in"] == 30
    assert "4 input file(s) skipped" in capsys.readouterr().out  # the printed summary


def test_on_unknown_input_fail_stops_before_any_work(tmp_path, capsys):
    folder = _crawl_folder(tmp_path)
    recipe = _recipe(
        tmp_path, f"  quality: {{input: [{folder}]}}\n", "read: {on_unknown_input: fail}\n"
    )
    assert main(["run", recipe, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "4 file(s) no reader handles" in err and "LICENSE" in err
    assert not (tmp_path / "run" / "quality").exists()


def test_a_parquet_without_its_text_column_stops_the_run_before_any_stage(tmp_path, capsys):
    good = tmp_path / "in" / "good.jsonl.gz"
    good.parent.mkdir()
    with gzip.open(good, "wt") as f:
        f.write(json.dumps({"id": "a", "text": "hello " * 50}) + "\n")
    pq.write_table(pa.table({"id": ["1"], "content": ["a document"]}), tmp_path / "in/bad.parquet")
    recipe = _recipe(tmp_path, f"  quality: {{input: ['{tmp_path}/in/*']}}\n  dedup: {{}}\n")
    assert main(["run", recipe, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "bad.parquet" in err and "content" in err and "text_column" in err
    assert not (tmp_path / "run" / "quality").exists()
    # Naming the column in the recipe's read section is the fix.
    recipe = _recipe(
        tmp_path,
        f"  quality: {{input: ['{tmp_path}/in/bad.parquet'], max_drop_fraction: 1.0}}\n",
        "read: {text_column: content}\n",
    )
    assert main(["run", recipe, "--output", str(tmp_path / "run2")]) == 0


def test_duplicate_ids_never_let_identical_texts_through_dedup(tmp_path):
    text = fineweb_docs(1)[0]["text"]
    rows = [
        {"id": 7, "text": text},  # the same document under the same id, as int and string
        {"id": "7", "text": text},
        {"id": "7", "text": text + " A different ending makes this another document."},
    ]
    shard = tmp_path / "in" / "a.jsonl.gz"
    shard.parent.mkdir()
    with gzip.open(shard, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt") as f:  # a second shard, same ids
        f.write(json.dumps({"id": "7", "text": text}) + "\n")
    recipe = _recipe(tmp_path, f"  dedup: {{input: ['{tmp_path}/in/*.jsonl.gz'], near: false}}\n")
    assert main(["run", recipe, "--output", str(tmp_path / "run")]) == 0
    t = pa.concat_tables(
        pq.read_table(p) for p in sorted((tmp_path / "run/dedup").glob("*.parquet"))
    )
    kept = t.filter(pc.is_null(t["drop_reason"]))
    assert sorted(kept["id"].to_pylist()) == ["7", "7#2"]  # one copy of the text, one other
    assert pc.sum(pc.equal(t["drop_reason"], "dedup:exact_duplicate")).as_py() == 2
    manifest = json.loads((tmp_path / "run/dedup/_manifest.json").read_text())
    assert manifest["ids_renamed"] == 2


def test_a_guardrail_stop_exits_1_with_one_line(tmp_path, capsys):
    shard = tmp_path / "a.jsonl.gz"
    with gzip.open(shard, "wt") as f:
        f.writelines(json.dumps({"id": str(i), "text": "tiny"}) + "\n" for i in range(20))
    recipe = _recipe(
        tmp_path,
        f"  quality: {{input: [{shard}], on_excess_drop: fail}}\n  dedup: {{}}\n",
    )
    assert main(["run", recipe, "--output", str(tmp_path / "run")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("primer:")]
    assert len(err) == 1 and "GUARDRAIL" in err[0] and "max_drop_fraction" in err[0]
    assert not (tmp_path / "run/dedup").exists()
    # downstream alone refuses the incomplete stage, before any work
    assert main(["run", recipe, "--output", str(tmp_path / "run"), "--stages", "dedup"]) == 2
    assert "not complete" in capsys.readouterr().err
    summary = json.loads((tmp_path / "run/run_summary.json").read_text())
    assert summary["runs"][0]["status"] == "failed"
