"""A run folder on object storage (pipeline/remote.py), on a real S3-compatible server
(moto's server mode) on 127.0.0.1: the same rows and shards as a local run, the commit
protocol on the bucket, and a SIGKILL resumed from the bucket alone on a fresh staging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import storage
from pipeline.cli import main
from pipeline.io import read_json
from pipeline.remote import RemoteRun
from tests.conftest import REPO, fineweb_docs, moto_s3, write_jsonl_parts
from tests.test_end_to_end import _kill_when

BUCKET = "primer-runs"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A moto S3 server with a bucket holding 12 JSONL parts of FineWeb documents; yields
    (local copy of the inputs, their s3:// folder)."""
    mp = pytest.MonkeyPatch()
    try:
        with moto_s3(mp):
            local = tmp_path_factory.mktemp("remote-inputs")
            write_jsonl_parts(local, fineweb_docs(), 12)
            fs, _ = storage.filesystem(f"s3://{BUCKET}")
            fs.mkdir(BUCKET)
            fs.put(f"{local}/", f"{BUCKET}/inputs/", recursive=True)
            yield local, f"s3://{BUCKET}/inputs"
    finally:
        mp.undo()


def _recipe(tmp: Path, inputs: str, quality_batch: int = 1000, mixture: bool = True) -> Path:
    recipe: dict = {
        "name": "remote",
        "executor": "local",
        "stages": {
            "extract": {"input": [inputs]},
            "langid": {},
            "quality": {"batch_rows": quality_batch, "max_drop_fraction": 1.0},
            "dedup": {},
            "mixture": {
                "tokenizer": "phi3", "seed": 7, "on_short": "scale", "shard_max_tokens": 20_000,
                "phases": [{"name": "p1", "tokens": "40k",
                            "sources": [{"name": "web", "input": "@dedup", "weight": 1.0}]}],
            },
        },
    }  # fmt: skip
    if not mixture:
        del recipe["stages"]["mixture"]
    path = tmp / "remote.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _kept(run: Path, stage: str) -> list[tuple]:
    t = pa.concat_tables(
        pq.read_table(run / stage / f"{p}.parquet", columns=["id", "text", "drop_reason"])
        for p in read_json(run / stage / "_manifest.json")["part_names"]
    )
    t = t.filter(pc.is_null(t["drop_reason"]))
    return sorted(zip(t["id"].to_pylist(), t["text"].to_pylist(), strict=True))


def _shards(run: Path) -> dict[str, bytes]:
    folder = run / "mixture"
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.suffix in (".bin", ".idx")
    }


def _same_run(a: Path, b: Path, mixture: bool = True) -> None:
    for stage in ("extract", "langid", "quality", "dedup"):
        assert _kept(a, stage) == _kept(b, stage), stage
    if mixture:
        assert _shards(a) and _shards(a) == _shards(b)


def _check_bucket(uri: str, mixture: bool = True) -> dict[str, int]:
    """The commit protocol on the bucket: every part marker names an object that exists,
    every part object is named by a marker, every stage has its manifest, no lock is left."""
    fs, root = storage.filesystem(uri)
    fs.invalidate_cache()
    objects = {p[len(root) + 1 :] for p in fs.find(root)}
    assert "_lock" not in objects and "run_summary.json" in objects
    parts = 0
    for stage in ("extract", "langid", "quality", "dedup"):
        assert f"{stage}/_manifest.json" in objects and f"{stage}/_fingerprint" in objects
        markers = sorted(o for o in objects if o.startswith(f"{stage}/_parts/"))
        named = {f"{stage}/{json.loads(fs.cat_file(f'{root}/{m}'))['object']}" for m in markers}
        data = {o for o in objects if o.startswith(f"{stage}/") and o.count("/") == 1}
        data = {o for o in data if o.endswith(".parquet")}
        assert named == data and len(markers) == 12, stage
        parts += len(markers)
    if mixture:
        assert any(o.startswith("mixture/p1/") and o.endswith(".bin") for o in objects)
        assert "mixture/_manifest.json" in objects
    return {"parts": parts}


def test_run_on_a_bucket_equals_the_local_run(bucket, tmp_path):
    """Input local, output on the bucket, against input and output local (input on the
    bucket, output local: tests/test_object_storage.py)."""
    local_inputs, _ = bucket
    recipe = _recipe(tmp_path, str(local_inputs))
    ref = tmp_path / "ref"
    assert main(["run", str(recipe), "--output", str(ref)]) == 0
    uri = f"s3://{BUCKET}/runs/equal"
    staging = tmp_path / "staging"
    assert main(["run", str(recipe), "--output", uri, "--staging", str(staging)]) == 0
    _same_run(ref, staging)
    assert _check_bucket(uri)["parts"] == 48

    # Pulled into a fresh staging (another machine), the bucket alone holds the same run.
    pulled = tmp_path / "pulled"
    assert main(["pull", uri, "--staging", str(pulled)]) == 0
    _same_run(ref, pulled)
    again = RemoteRun(uri, pulled).pull()
    assert again == {"downloaded": 0, "cleaned": 0}  # in step: nothing moves
    # Run again from there: every stage is up to date, nothing is pushed but the summary.
    assert main(["run", str(recipe), "--output", uri, "--staging", str(pulled)]) == 0
    assert read_json(pulled / "quality/_manifest.json")["attempts"][-1]["parts_run"] == 0


@pytest.mark.slow
def test_a_threshold_change_replaces_objects_and_a_config_change_clears_the_stage(bucket, tmp_path):
    _, remote_inputs = bucket
    uri = f"s3://{BUCKET}/runs/changes"
    recipe = _recipe(tmp_path, remote_inputs, mixture=False)
    staging = tmp_path / "staging"
    run = ["run", str(recipe), "--output", uri, "--staging", str(staging)]
    assert main(run) == 0
    # Only a threshold: every quality part is marked again and pushed as a new object, the
    # old objects go.
    assert main([*run, "--set", "stages.quality.min_words=120"]) == 0
    assert read_json(staging / "quality/_manifest.json")["scores_reused"]
    _check_bucket(uri, mixture=False)
    # A config change: dedup (and the mixture after it) computed again, on the bucket too.
    fs, root = storage.filesystem(uri)
    before = fs.cat_file(f"{root}/dedup/_fingerprint")
    changed = ["--set", "stages.quality.min_words=120", "--set", "stages.dedup.ngram=4"]
    assert main([*run, *changed]) == 0
    assert fs.cat_file(f"{root}/dedup/_fingerprint") != before
    _check_bucket(uri, mixture=False)
    ref = tmp_path / "ref"
    assert main(["run", str(recipe), "--output", str(ref), *changed]) == 0
    _same_run(ref, staging, mixture=False)


# ~45 s: slow. The default run keeps the local SIGKILL tests (test_end_to_end.py) and the
# bucket's pull/resume from an empty staging (test_run_on_a_bucket_equals_the_local_run).
@pytest.mark.slow
def test_sigkill_then_resume_from_the_bucket_on_a_fresh_staging(bucket, tmp_path):
    _, remote_inputs = bucket
    recipe = _recipe(tmp_path, remote_inputs, quality_batch=2, mixture=False)
    uri = f"s3://{BUCKET}/runs/killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--output", uri]
    first = tmp_path / "first"
    markers = first / "quality" / "_parts"
    _kill_when(
        [*cmd, "--staging", str(first)], env,
        lambda: markers.is_dir() and len(list(markers.glob("*.json"))) >= 3,
    )  # fmt: skip
    fs, root = storage.filesystem(uri)
    fs.invalidate_cache()
    pushed = len(fs.ls(f"{root}/quality/_parts"))
    assert 0 < pushed < 12 and not fs.exists(f"{root}/quality/_manifest.json")
    # An object a killed worker uploaded but never committed.
    fs.pipe_file(f"{root}/quality/docs-000-00000000.0123456789ab.parquet", b"PAR1 half")

    # Resumed on another machine (only the bucket is there), on Ray: its workers push parts.
    second = tmp_path / "second"
    done = subprocess.run(
        [*cmd, "--staging", str(second), "--executor", "ray"],
        env=env, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    quality = read_json(second / "quality" / "_manifest.json")
    assert quality["parts"] == 12 and quality["attempts"][-1]["parts_run"] <= 12 - pushed
    assert "uncommitted objects deleted" in done.stderr
    _check_bucket(uri, mixture=False)  # the stray object is gone; every object is committed

    ref = tmp_path / "ref"
    assert main(["run", str(_recipe(tmp_path, remote_inputs, mixture=False)), "--output",
                 str(ref)]) == 0  # fmt: skip
    _same_run(ref, second, mixture=False)


def test_a_model_and_benchmarks_named_by_uri_are_fetched_into_the_run(bucket, tmp_path):
    """langid's model and decontaminate's benchmark folder on the bucket: fetched once into
    RUN/_assets, the same rows as with the local files, and the fingerprints stay put."""
    from pipeline.assets import fetch_lid176

    local_inputs, _ = bucket
    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    fs.put_file(str(fetch_lid176()), f"{BUCKET}/assets/lid.176.ftz")
    fs.put(f"{REPO / 'data/benchmarks'}/", f"{BUCKET}/assets/benchmarks/", recursive=True)

    def recipe(model: str, benchmarks: str) -> Path:
        path = tmp_path / f"assets-{storage.scheme(model) or 'local'}.yaml"
        stages = {
            "extract": {"input": [str(local_inputs / "docs-000.jsonl.gz")]},
            "langid": {"model_path": model},
            "decontaminate": {"benchmarks": [benchmarks], "max_drop_fraction": 1.0},
        }
        recipe = {"name": "a", "executor": "local", "stages": stages}
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    uri = recipe(f"s3://{BUCKET}/assets/lid.176.ftz", f"s3://{BUCKET}/assets/benchmarks")
    run = tmp_path / "run"
    assert main(["run", str(uri), "--output", str(run)]) == 0
    ref = tmp_path / "ref"
    assert main(["run", str(recipe(str(fetch_lid176()), str(REPO / "data/benchmarks"))),
                 "--output", str(ref)]) == 0  # fmt: skip
    for stage in ("langid", "decontaminate"):
        assert _kept(run, stage) == _kept(ref, stage)
    model = Path(read_json(run / "langid/_manifest.json")["config"]["model_path"])
    assert model.parent.parent == run / "_assets" and model.is_file()
    benchmarks = read_json(run / "decontaminate/_manifest.json")["config"]["benchmarks"]
    assert (Path(benchmarks[0]) / "gsm8k").is_dir()
    fingerprint = (run / "langid/_fingerprint").read_text()
    assert main(["run", str(uri), "--output", str(run)]) == 0
    assert (run / "langid/_fingerprint").read_text() == fingerprint
    assert read_json(run / "langid/_manifest.json")["attempts"][-1]["parts_run"] == 0


def test_a_live_holder_on_another_host_refuses_a_second_run(bucket, tmp_path, capsys):
    import time

    _, remote_inputs = bucket
    uri = f"s3://{BUCKET}/runs/locked"
    fs, root = storage.filesystem(uri)
    holder = {"host": "another-host", "pid": 4242, "command": "primer run x"}
    fs.pipe_file(f"{root}/_lock", json.dumps(holder | {"heartbeat": time.time()}).encode())
    recipe = _recipe(tmp_path, remote_inputs, mixture=False)
    run = ["run", str(recipe), "--output", uri, "--staging", str(tmp_path / "s")]
    assert main([*run, "--stages", "extract"]) == 1
    assert "in use by another primer run (host another-host" in capsys.readouterr().err
    assert not fs.exists(f"{root}/extract")  # nothing was touched
    # A holder silent for longer than the stale limit is taken over.
    fs.pipe_file(f"{root}/_lock", json.dumps(holder | {"heartbeat": time.time() - 3600}).encode())
    assert main([*run, "--stages", "extract"]) == 0
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/_lock") and fs.exists(f"{root}/extract/_manifest.json")
