"""The Airflow DAGs in dags/: they import cleanly (in a DagBag and through the `airflow` CLI,
neither with the DAGs folder on sys.path), have the recipe's stages in order with an outlet
Asset each, are wired to each other through Assets, and the web DAG runs end to end with
`dag.test()` on the quickstart recipe, giving the rows a direct `primer run` gives.

Airflow runs in a subprocess (tests/dags/airflow_driver.py) with a throwaway AIRFLOW_HOME
and SQLite database: importing it configures logging and a database engine process-wide,
which the rest of the suite must not inherit. It uses this venv's Python (Airflow is the
`dags` extra, which `make setup` installs) or $PRIMER_AIRFLOW_PYTHON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from pipeline.orchestration.tasks import stage_done
from pipeline.recipe import load_recipe
from pipeline.run import run_recipe

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
RECIPE = REPO / "configs" / "quickstart.yaml"
DRIVER = Path(__file__).with_name("airflow_driver.py")
WEB = ["extract", "langid", "quality", "dedup"]
EXPECTED_TASKS = {
    "primer_web": WEB,
    "primer_edu": ["edu_annotate", "edu_train", "edu_score"],
    "primer_synthetic": ["seeds", "generate", "validate", "synth_dedup", "decontaminate"],
    "primer_mixture": ["mixture", "train_smoke"],
}


def _airflow_python() -> str:
    python = os.environ.get("PRIMER_AIRFLOW_PYTHON")
    if python:
        return python
    if importlib.util.find_spec("airflow") is None:
        pytest.skip(
            "Airflow is not installed in this venv: `.venv/bin/pip install -e '.[dags]'` "
            "(make setup installs it)"
        )
    return sys.executable


def _airflow_env(home: Path, run_dir: Path) -> dict[str, str]:
    """A throwaway Airflow home with SQLite, the DAGs folder, and the quickstart settings;
    nothing from the caller's AIRFLOW_* / PRIMER_* variables."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PRIMER_"))}
    return env | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # only an unpaused DAG is queued by its Assets' events
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "PRIMER_RECIPE": str(RECIPE),
        "PRIMER_RUN_DIR": str(run_dir),
        "PRIMER_EXECUTOR": "local",  # in-process stages: no Ray start-up per task
        "PRIMER_BIN": str(Path(sys.executable).with_name("primer")),  # this venv's primer
        "PRIMER_RETRY_DELAY": "1",  # dag.test() sleeps through retry delays
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "POLARS_MAX_THREADS": "1",
    }


@pytest.fixture(scope="module")
def airflow(tmp_path_factory) -> dict:
    """One Airflow process: inspect the DagBag, then `dag.test()` the web DAG into a fresh
    run folder; meanwhile the same stages run directly (in this process) for comparison."""
    python = _airflow_python()
    tmp = tmp_path_factory.mktemp("airflow")
    run_dir, direct_dir = tmp / "run", tmp / "direct"
    env = _airflow_env(tmp / "home", run_dir)
    out = tmp / "result.json"
    log_path = tmp / "airflow.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [python, str(DRIVER), str(out), "primer_web"],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            run_recipe(load_recipe(RECIPE), direct_dir, WEB, executor="local")
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    tail = "\n".join(log_path.read_text().splitlines()[-40:])
    assert proc.returncode == 0 and out.is_file(), f"airflow driver failed:\n{tail}"
    result = json.loads(out.read_text())
    return result | {"run_dir": run_dir, "direct_dir": direct_dir, "log_tail": tail}


def _cli(airflow_bin: Path, args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run `airflow ARGS`; its stdout (Airflow logs warnings there too, before the JSON)."""
    proc = subprocess.run(
        [str(airflow_bin), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, (
        f"`airflow {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _json_list(stdout: str) -> list[dict]:
    """The JSON list `airflow ... -o json` prints after its log lines."""
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert lines, f"no JSON list in the output:\n{stdout[-3000:]}"
    return json.loads(lines[-1])


# ~20 s: slow. Every DAG's DagBag import stays in the default run
# (test_every_dag_imports_without_errors).
@pytest.mark.slow
def test_the_airflow_cli_lists_every_dag_with_no_import_errors(tmp_path):
    """`airflow dags list --local` and `list-import-errors --local` parse dags/ in a plain
    process: only installed modules are importable there (no DAGs folder on sys.path)."""
    airflow_bin = Path(_airflow_python()).with_name("airflow")
    assert airflow_bin.is_file(), f"no airflow command beside {_airflow_python()}"
    env = _airflow_env(tmp_path / "home", tmp_path / "run")
    _cli(airflow_bin, ["db", "migrate"], env, tmp_path)  # both commands refuse an empty db
    listed = _json_list(_cli(airflow_bin, ["dags", "list", "--local", "-o", "json"], env, tmp_path))
    assert sorted(d["dag_id"] for d in listed) == sorted(EXPECTED_TASKS)
    assert {Path(d["fileloc"]) for d in listed} == {DAGS / f"{d}.py" for d in EXPECTED_TASKS}
    errors = _cli(
        airflow_bin, ["dags", "list-import-errors", "--local", "-o", "json"], env, tmp_path
    )
    assert _json_list(errors) == []


def test_every_dag_imports_without_errors(airflow):
    inspect = airflow["inspect"]
    assert inspect["import_errors"] == {}
    assert sorted(inspect["dags"]) == sorted(EXPECTED_TASKS)
    assert {d["file"] for d in inspect["dags"].values()} == {
        f"{dag_id}.py" for dag_id in EXPECTED_TASKS
    }


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_TASKS))
def test_one_task_per_stage_in_recipe_order_with_an_outlet_asset(airflow, dag_id):
    dag = airflow["inspect"]["dags"][dag_id]
    tasks = dag["tasks"]
    names = EXPECTED_TASKS[dag_id]
    assert [t["task_id"] for t in tasks] == names
    for i, t in enumerate(tasks):
        assert t["upstream"] == names[i - 1 : i]
        assert t["downstream"] == names[i + 1 : i + 2]
        assert t["outlets"] == [(airflow["run_dir"] / t["task_id"]).as_uri()]
        assert t["retries"] == 2
        assert t["execution_timeout_s"] == 86400 + 120  # run_task's own timeout fires first
    assert dag["max_active_runs"] == 1  # runs of one DAG share the run folder
    assert dag["params"] == ["executor", "overrides", "ray_jobs_address"]
    assert dag["tags"] == ["primer"]


def test_dags_are_scheduled_on_the_assets_they_read(airflow):
    run = airflow["run_dir"]
    dags = airflow["inspect"]["dags"]
    schedules = {dag_id: d["schedule_assets"] for dag_id, d in dags.items()}
    assert schedules == {
        # a new crawl in the recipe's input folder starts the web path
        "primer_web": [(REPO / "data" / "sample").as_uri()],
        "primer_edu": [(run / "dedup").as_uri()],
        # seeds read edu_score; validate scores with edu_train's model
        "primer_synthetic": [(run / "edu_score").as_uri(), (run / "edu_train").as_uri()],
        "primer_mixture": [(run / "decontaminate").as_uri(), (run / "edu_score").as_uri()],
    }
    assert {d["timetable"] for d in dags.values()} == {"AssetTriggeredTimetable"}
    # every Asset a DAG waits on (but the crawl) is some task's outlet
    outlets = {o for d in dags.values() for t in d["tasks"] for o in t["outlets"]}
    waited_on = {
        a for dag_id, assets in schedules.items() if dag_id != "primer_web" for a in assets
    }
    assert waited_on <= outlets
    assert airflow["web_cron"] == {"timetable": "CronTriggerTimetable", "cron": "0 3 * * *"}


def test_web_dag_runs_end_to_end_like_a_direct_run_and_queues_the_edu_dag(airflow):
    test = airflow["test"]
    assert "error" not in test, f"{test.get('error')}\n{airflow['log_tail']}"
    assert test["state"] == "success"
    assert test["tasks"] == dict.fromkeys(WEB, "success")
    run, direct = airflow["run_dir"], airflow["direct_dir"]
    for stage in WEB:
        assert stage_done(run, stage), stage
        ours = json.loads((run / stage / "_manifest.json").read_text())
        theirs = json.loads((direct / stage / "_manifest.json").read_text())
        for key in ("fingerprint", "rows_in", "rows_out", "dropped"):
            assert ours[key] == theirs[key], (stage, key)

    def kept_ids(root: Path) -> list[str]:
        frame = pl.scan_parquet(root / "dedup" / "*.parquet").filter(
            pl.col("drop_reason").is_null()
        )
        return sorted(frame.select("id").collect()["id"].to_list())

    assert (
        len(kept_ids(run))
        == json.loads((direct / "dedup" / "_manifest.json").read_text())["rows_out"]
    )
    assert kept_ids(run) == kept_ids(direct)
    # each stage's task updated its Asset, with the counts downstream DAGs can read
    events = {e["uri"]: e["extra"] for e in test["asset_events"]}
    assert list(events) == [(run / s).as_uri() for s in WEB]
    dedup = json.loads((run / "dedup" / "_manifest.json").read_text())
    assert events[(run / "dedup").as_uri()]["rows_out"] == dedup["rows_out"]
    # and the scheduler now owes primer_edu a run: the dedup Asset is all it waits on
    assert test["queued_runs"] == [["primer_edu", (run / "dedup").as_uri()]]
