"""Hugging Face datasets as recipe inputs: a save_to_disk folder (a DatasetDict as one
input per split), `hf:NAME[:CONFIG]:SPLIT` streamed from a local data folder, and a hub
name offline with nothing cached: a one-line error before any stage runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import main
from pipeline.io import expand_inputs
from pipeline.readers import iter_batches
from pipeline.stage_runner import output_files
from tests.conftest import fineweb_docs

ROOT = Path(__file__).resolve().parents[2]


def _docs(n: int = 60) -> list[dict]:
    return [{"id": d["id"], "text": d["text"], "url": d.get("url")} for d in fineweb_docs(n)]


def _kept(run: Path, stage: str = "quality") -> pa.Table:
    t = pa.concat_tables(pq.read_table(f) for f in output_files(run / stage))
    return t.sort_by("id")


def _run(tmp_path: Path, name: str, inputs: list[str]) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(
        f"name: {name}\nexecutor: local\nstages:\n  quality: {{input: {json.dumps(inputs)}}}\n"
    )
    out = tmp_path / f"run-{name}"
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    return out


def test_saved_datasets_and_specs_read_like_the_same_jsonl(tmp_path):
    import datasets

    docs = _docs()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(docs).save_to_disk(str(saved))
    folder = tmp_path / "data-folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text(jsonl.read_text())

    # A spec's NAME that is a local path is relative to the recipe file, like file inputs.
    runs = {
        "jsonl": _run(tmp_path, "jsonl", ["docs.jsonl"]),
        "saved": _run(tmp_path, "saved", ["saved"]),
        "spec": _run(tmp_path, "spec", ["hf:./data-folder:train"]),
    }
    base = _kept(runs["jsonl"])
    for name in ("saved", "spec"):
        t = _kept(runs[name])
        assert t["id"].to_pylist() == base["id"].to_pylist(), name
        assert t["text"].to_pylist() == base["text"].to_pylist(), name
        assert t["drop_reason"].to_pylist() == base["drop_reason"].to_pylist(), name
    assert set(_kept(runs["spec"])["source_path"].to_pylist()) == {
        f"hf:{tmp_path}/data-folder:train"
    }
    # A second run of the same recipe recomputes nothing; a changed dataset does.
    again = tmp_path / "saved.yaml"
    assert main(["run", str(again), "--output", str(runs["saved"])]) == 0
    manifest = json.loads((runs["saved"] / "quality/_manifest.json").read_text())
    assert manifest["attempts"][-1]["parts_run"] == 0
    datasets.Dataset.from_list(docs[:30]).save_to_disk(str(saved))
    assert main(["run", str(again), "--output", str(runs["saved"])]) == 0
    assert json.loads((runs["saved"] / "quality/_manifest.json").read_text())["rows_in"] == 30


def test_a_dataset_dict_folder_is_one_input_per_split(tmp_path):
    import datasets

    docs = _docs(40)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(docs[:25]),
            "test": datasets.Dataset.from_list(docs[25:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    inputs = expand_inputs([str(tmp_path / "dd")])
    assert sorted(Path(p).name for p in inputs) == ["test", "train"]
    rows = {Path(p).name: sum(len(t) for t in iter_batches(p)) for p in inputs}
    assert rows == {"train": 25, "test": 15}
    run = _run(tmp_path, "dd", [str(tmp_path / "dd")])
    manifest = json.loads((run / "quality/_manifest.json").read_text())
    assert manifest["parts"] == 2 and manifest["rows_in"] == 40


def test_a_spec_without_the_text_column_stops_before_any_stage(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"id": "a", "body": "words"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nexecutor: local\nstages:\n  quality: {{input: ['hf:{folder}']}}\n")
    assert main(["run", str(recipe), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no text column 'text'" in err and "'body'" in err
    assert not (tmp_path / "run" / "quality").exists()


def test_a_hub_dataset_offline_and_not_cached_says_what_to_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nexecutor: local\nstages:\n"
        "  quality: {input: ['hf:HuggingFaceFW/fineweb-edu:sample-10BT:train']}\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--output", str(tmp_path / "o")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "HF_HOME" in done.stderr and "save_to_disk" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_dataset_of_several_files_or_many_rows_is_split_into_parts(tmp_path):
    """A streamed dataset reads as one part per data file, a saved one by row ranges
    (read.max_rows_per_part): the same rows as one part, ids unique and independent of the
    grouping, each part its own commit."""
    import datasets

    from pipeline.parts import ReadOptions, plan_parts
    from pipeline.readers.hf import dataset_spans

    docs = _docs(90)
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(3):
        chunk = docs[i * 30 : (i + 1) * 30]
        (folder / f"train-{i}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chunk))
    spec = f"hf:{folder}:train"
    assert dataset_spans(spec, None) == [(0, 1), (1, 2), (2, 3)]
    whole = pa.concat_tables(iter_batches(spec, batch_rows=7))
    parts = [pa.concat_tables(iter_batches(spec, shards=(i, i + 1))) for i in range(3)]
    assert pa.concat_tables(parts)["text"].to_pylist() == whole["text"].to_pylist()
    assert sorted(whole["text"].to_pylist()) == sorted(d["text"] for d in docs)

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": d["text"]} for d in docs]).save_to_disk(str(saved))
    read = ReadOptions(max_rows_per_part=40)
    planned = plan_parts([str(saved)], read=read)
    assert [p.shards for p in planned] == [(0, 40), (40, 80), (80, 90)]
    assert len({p.name for p in planned}) == 3 and planned[1].label.endswith("#shards=40-79")
    split = pa.concat_tables(t for p in planned for t in iter_batches(str(saved), shards=p.shards))
    one = pa.concat_tables(iter_batches(str(saved)))
    assert split["id"].to_pylist() == one["id"].to_pylist()  # "<name>:train:<row>" either way
    assert split["text"].to_pylist() == one["text"].to_pylist()

    recipe = tmp_path / "split.yaml"
    recipe.write_text(
        "name: split\nexecutor: local\nread: {max_rows_per_part: 40}\nstages:\n"
        f"  quality: {{input: [{json.dumps(str(saved))}, {json.dumps(spec)}]}}\n"
    )
    out = tmp_path / "run-split"
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    manifest = json.loads((out / "quality/_manifest.json").read_text())
    assert manifest["parts"] == 6 and manifest["rows_in"] == 180
    ids = pa.concat_tables(pq.read_table(f) for f in output_files(out / "quality"))["id"]
    assert len(set(ids.to_pylist())) == len(ids)
