"""The quickstart recipe end to end on a real local Ray, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.io import read_json
from pipeline.recipe import load_recipe
from pipeline.run import run_recipe
from pipeline.summary import format_summary
from tests.conftest import REPO, fineweb_docs, write_jsonl_parts

STAGES = ["extract", "langid", "quality", "dedup"]


def _all_rows(run: Path, stages: list[str] = STAGES) -> dict[str, list[tuple]]:
    out = {}
    for stage in stages:
        files = sorted((run / stage).glob("*.parquet"))
        t = pa.concat_tables(pq.read_table(f, columns=["id", "drop_reason"]) for f in files)
        out[stage] = sorted(
            zip(t["id"].to_pylist(), t["drop_reason"].to_pylist(), strict=True), key=str
        )
    return out


def test_quickstart_on_ray(quickstart_run):
    # The quickstart as shipped, with the teacher's work cut down for the test's time budget
    # (tests/conftest.py: run once per session, shared with the report and notebook tests).
    run, summary = quickstart_run
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == [
        *STAGES, "edu_annotate", "edu_train", "edu_score",
        "seeds", "generate", "validate", "synth_dedup", "decontaminate",
        "mixture", "train_smoke",
    ]  # fmt: skip

    # 500 FineWeb + 20 CCNet + 22 WARC captures + the whirlwind WARC page and its WET twin.
    assert stages["extract"]["rows_in"] >= 540
    for prev, nxt in zip(STAGES, STAGES[1:], strict=False):
        assert stages[nxt]["rows_in"] == stages[prev]["rows_out"]
    for name, s in stages.items():
        assert s["rows_in"] - s["rows_out"] == sum(s["dropped"].values())
        # validate judges 3 tiny generations of a 135M model here: any share may go
        assert name == "validate" or not s["guardrail"]["exceeded"], s
    assert any(r.startswith("quality:") for r in stages["quality"]["dropped"])

    # annotate -> train -> score -> filter: the sample is rated by the local teacher, the
    # model is trained, every deduplicated document is scored.
    assert (
        stages["edu_annotate"]["rows_out"]
        + stages["edu_annotate"]["dropped"].get("edu_annotate:teacher_error", 0)
        == 6
    )
    rated = pa.concat_tables(pq.read_table(f) for f in (run / "edu_annotate").glob("*.parquet"))
    rated = rated.filter(pa.compute.is_valid(rated["edu_label"])).to_pylist()
    assert len(rated) >= 3
    for r in rated:
        assert json.loads(r["teacher_answer"]) == {"score": r["edu_label"]}  # the real teacher
        assert (r["template_id"], r["template_version"]) == ("edu_annotate", 2)
        assert r["teacher_backend"] == "local" and r["prompt_tokens"] > 100
    metrics = json.loads((run / "edu_train/metrics.json").read_text())
    held = metrics["held_out"]  # documents of sources and domains it never saw
    assert held["roc_auc"] > held["baseline_length"]["roc_auc"] and metrics["guardrail"]["passed"]
    assert held["spearman"] > held["baseline_length"]["spearman"]
    assert (run / "edu_train/model.bin").stat().st_size > 0
    assert stages["edu_score"]["rows_in"] == stages["dedup"]["rows_out"]
    scored = pa.concat_tables(pq.read_table(f) for f in (run / "edu_score").glob("*.parquet"))
    assert scored["edu_score"].null_count == 0 and pa.compute.sum(scored["edu_phase2"]).as_py() > 0

    # seeds -> generate -> validate -> synth_dedup, with lineage on every synthetic row.
    assert stages["seeds"]["rows_out"] == stages["generate"]["rows_in"] == 3
    gen = pa.concat_tables(pq.read_table(f) for f in (run / "generate").glob("*.parquet"))
    for r in gen.to_pylist():
        assert r["teacher_model"] and r["template_id"] == "synth" and r["seed_id"] and r["style"]
        assert r["teacher_error"] is None and r["completion_tokens"] <= 48
    assert stages["synth_dedup"]["rows_in"] == stages["validate"]["rows_out"]
    assert stages["decontaminate"]["rows_in"] == stages["synth_dedup"]["rows_out"]

    # the mixture: Phi-3 tokens in Megatron shards, synthetic data in phase 2, a smoke train
    from pipeline.tokens.shards import IndexedDataset

    mix = json.loads((run / "mixture/manifest.json").read_text())
    assert mix["tokenizer"]["name"] == "phi3" and mix["tokenizer"]["eos_id"] == 32000
    phase1, phase2 = mix["phases"]
    assert phase1["tokens"] == 200_000 and {s["name"] for s in phase1["sources"]} == {"web"}
    assert {s["name"] for s in phase2["sources"]} == {"web_edu", "synthetic"}
    for phase in mix["phases"]:
        assert phase["tokens"] == sum(
            IndexedDataset(run / "mixture" / sh["prefix"]).num_tokens for sh in phase["shards"]
        )
        for src in phase["sources"]:
            assert abs(src["tokens"] - src["weight"] * phase["tokens"]) <= 0.01 * phase["tokens"]
    assert summary["artifacts"]["train_smoke"]["loss_fell"]
    assert "tokens per phase and source" in format_summary(summary)

    final = pa.concat_tables(pq.read_table(f) for f in (run / "dedup").glob("*.parquet"))
    kept = final.filter(pa.compute.is_null(final["drop_reason"]))
    assert set(kept["lang"].to_pylist()) == {"en"}
    assert min(kept["lang_score"].to_pylist()) >= 0.65
    assert len(set(kept["id"].to_pylist())) == len(kept)
    assert (run / "run_summary.json").is_file()
    text = format_summary(summary)
    assert "dedup" in text and "rows in" in text


def _kill_mid_stage(cmd: list[str], run: Path, stage: str, env: dict) -> None:
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if list((run / stage / "_parts").glob("*.json")):
            break
        if proc.poll() is not None:
            pytest.fail(
                f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            )
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / stage / "_manifest.json").is_file(), "the kill came too late to test resume"


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, executor):
    inputs = write_jsonl_parts(tmp_path / "in", fineweb_docs(), 25)
    recipe = {
        "name": "resume",
        "executor": executor,
        "ray": {"num_cpus": 2},
        "stages": {
            "extract": {"input": [str(p) for p in inputs]},
            "langid": {},
            "quality": {"batch_rows": 4},
            "dedup": {},
        },
    }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(path), "--output"]

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([*cmd, str(ref)], env=env, cwd=REPO, check=True, capture_output=True)
    _kill_mid_stage([*cmd, str(killed)], killed, "quality", env)
    done = subprocess.run([*cmd, str(killed)], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    assert _all_rows(killed) == _all_rows(ref)  # nothing lost, nothing doubled
    summary = read_json(killed / "run_summary.json")
    assert len(summary["runs"]) == 1  # the killed attempt never finished a summary
    quality = read_json(killed / "quality" / "_manifest.json")
    assert (
        quality["parts"] == 25
        and quality["rows_in"] == read_json(ref / "quality/_manifest.json")["rows_in"]
    )
    assert not list(killed.rglob(".*.tmp-*"))  # the killed attempt's temp files are cleaned up


def _kill_when(cmd: list[str], env: dict, ready) -> None:
    """Start `cmd`, SIGKILL it as soon as `ready()` holds, and wait for it."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            )
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_in_distributed_dedup_and_in_the_mixture_then_resume(tmp_path):
    """dedup fanned out (ray_min_rows 0) and the mixture, each killed mid-way, resume to the
    rows and the shard bytes of an uninterrupted run."""
    inputs = write_jsonl_parts(tmp_path / "in", fineweb_docs(), 8)
    recipe = {
        "name": "resume",
        "executor": "local",
        "stages": {
            "quality": {"input": [str(p) for p in inputs], "max_drop_fraction": 1.0},
            "dedup": {"ray_min_rows": 0, "num_partitions": 4},
            "mixture": {
                "tokenizer": "phi3", "seed": 7, "on_short": "scale", "shard_max_tokens": 20_000,
                "phases": [{"name": "p1", "tokens": "60k",
                            "sources": [{"name": "web", "input": "@dedup", "weight": 1.0}]}],
            },
        },
    }  # fmt: skip
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(path), "--output"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([*cmd, str(ref)], env=env, cwd=REPO, check=True, capture_output=True)

    state = killed / "dedup" / "_state"
    _kill_when(
        [*cmd, str(killed)], env,
        lambda: state.is_dir() and any(state.iterdir()) and not (state / "_DONE").is_file(),
    )  # fmt: skip
    shards = killed / "mixture"
    _kill_when(
        [*cmd, str(killed)], env,
        lambda: any(shards.rglob("*.bin")) and not (shards / "manifest.json").is_file(),
    )  # fmt: skip
    done = subprocess.run([*cmd, str(killed)], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    assert _all_rows(killed, ["quality", "dedup"]) == _all_rows(ref, ["quality", "dedup"])
    assert read_json(state / "_DONE")["fanned_out"]  # the distributed path, not union-find
    bins = sorted(p.relative_to(ref) for p in (ref / "mixture").rglob("*.bin"))
    assert bins and bins == sorted(
        p.relative_to(killed) for p in (killed / "mixture").rglob("*.bin")
    )
    for b in bins:
        assert (ref / b).read_bytes() == (killed / b).read_bytes()
        idx = b.with_suffix(".idx")
        assert (ref / idx).read_bytes() == (killed / idx).read_bytes()


def test_bad_inputs_are_counted_not_fatal(tmp_path, shared_data):
    """Truncated WARC, WARC edge cases, invalid UTF-8, an empty file and a 50 MB document."""
    bad = tmp_path / "bad"
    bad.mkdir()
    warc = (shared_data / "warc/dolma/sample-0000.warc.gz").read_bytes()
    (bad / "truncated.warc.gz").write_bytes(warc[: len(warc) // 2])
    for f in (shared_data / "warc/warcio").glob("*.warc*"):
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "empty.jsonl").write_bytes(b"")
    docs = fineweb_docs(3)
    lines = [
        json.dumps(docs[0]).encode(),
        b'{"id": "latin1", "text": "'
        + "caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50
        + b'"}',
        b'{"id": "broken json", "text": ',
        json.dumps(docs[1]).encode(),
    ]
    (bad / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    big = (docs[2]["text"] + "\n") * (50_000_000 // (len(docs[2]["text"]) + 1))
    (bad / "huge.jsonl").write_text(json.dumps({"id": "huge", "text": big}) + "\n")

    recipe = {
        "name": "bad",
        "executor": "local",
        "stages": {
            "extract": {"input": [str(bad / "*")]},
            "langid": {},
            "quality": {},
            "dedup": {},
        },
    }
    loaded = load_recipe(raw=recipe)
    summary = run_recipe(loaded, output=tmp_path / "run")
    stages = {s["stage"]: s for s in summary["stages"]}
    extract = stages["extract"]
    reasons = extract["dropped"]
    assert reasons.get("read:truncated_gzip", 0) == 1
    assert reasons.get("read:invalid_utf8", 0) == 1
    assert reasons.get("read:invalid_json", 0) == 1
    assert extract["rows_in"] - extract["rows_out"] == sum(reasons.values())
    # The 50 MB document survives reading and extraction and is judged by quality.
    q = pa.concat_tables(
        pq.read_table(f, columns=["id", "drop_reason"])
        for f in (tmp_path / "run/quality").glob("*.parquet")
    )
    huge = q.filter(pa.compute.equal(q["id"], "huge")).to_pylist()
    assert huge and huge[0]["drop_reason"] == "quality:too_long"
    assert stages["dedup"]["rows_in"] == stages["quality"]["rows_out"]
