"""`primer plan`: a recipe sized before it runs, per stage, and a node too small said so."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.cli import main
from pipeline.recipe import load_recipe
from pipeline.sizing import Node, estimate, load_rates, measured_rates
from tests.conftest import REPO

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_the_quickstart_is_sized_per_stage(capsys):
    assert main(["plan", str(QUICKSTART), "--cpus", "2", "--memory-gb", "16"]) == 0
    out = capsys.readouterr().out
    for stage in ("extract", "dedup", "edu_annotate", "generate", "mixture", "train_smoke"):
        assert f"  {stage} " in out
    assert "total:" in out and "PROBLEMS" not in out


def test_parquet_rows_come_from_the_footers_and_flow_through_keep_rates(tmp_path):
    f = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(5000)], "text": ["x"] * 5000}), f)
    recipe = {"name": "p", "stages": {"quality": {"input": [str(f)]}, "dedup": {}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    rates = load_rates()
    est = estimate(load_recipe(tmp_path / "r.yaml"), rates)
    assert est[0].docs_in == 5000
    assert est[0].docs_out == round(5000 * rates["stages"]["quality"]["keep"])
    assert est[1].docs_in == est[0].docs_out
    assert est[0].cpu_hours == 5000 / rates["stages"]["quality"]["docs_per_core_s"] / 3600


def test_a_finished_run_gives_its_measured_rates(quickstart_run):
    run, _ = quickstart_run
    measured = measured_rates(run)
    quality = json.loads((run / "quality" / "_manifest.json").read_text())
    assert measured["quality"]["keep"] == quality["rows_out"] / quality["rows_in"]
    est = estimate(load_recipe(QUICKSTART), load_rates(), measured)
    q = next(e for e in est if e.stage == "quality")
    assert q.source == "RUN" and q.cpu_hours > 0


def test_nodes_too_small_are_problems_with_exit_1(capsys, tmp_path, monkeypatch):
    assert main(["plan", str(QUICKSTART), "--cpus", "64", "--memory-gb", "4"]) == 1
    err = capsys.readouterr().out
    assert "PROBLEMS" in err and "MB per CPU" in err
    # A vLLM teacher whose tensor parallelism needs more GPUs than a node has.
    monkeypatch.setenv("PRIMER_CC", str(REPO / "data" / "sample"))
    monkeypatch.setenv("PRIMER_RUNS", str(tmp_path))
    code = main(
        ["plan", str(REPO / "configs" / "phi3_mini.yaml"), "--gpus", "2", "--json",
         "--cpus", "8", "--memory-gb", "64"]
    )  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    assert code == 1
    assert any("tensor_parallel_size 4 needs 4 GPUs" in p for p in plan["problems"])
    assert plan["node"] == {"cpus": 8, "memory_gb": 64.0, "gpus": 2, "count": 1}
    assert Node(8, 64.0, 2) == Node(**plan["node"])


def test_extract_is_sized_at_its_backends_rate(tmp_path):
    f = tmp_path / "pages.parquet"
    pq.write_table(pa.table({"id": ["a"] * 1000, "html": ["<p>x</p>"] * 1000}), f)
    rates = load_rates()
    hours = {}
    for backend in ("trafilatura", "cascade"):
        recipe = {"name": "e", "stages": {"extract": {"input": [str(f)], "backend": backend}}}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        hours[backend] = estimate(load_recipe(tmp_path / "r.yaml"), rates)[0].cpu_hours
    by = rates["stages"]["extract"]["by"]["backend"]
    assert hours["cascade"] == 1000 / rates["stages"]["extract"]["docs_per_core_s"] / 3600
    assert hours["trafilatura"] == 1000 / by["trafilatura"]["docs_per_core_s"] / 3600
