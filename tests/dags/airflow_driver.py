"""Runs inside a Python that has Airflow, for the tests beside it (never imported by pytest).

    python tests/dags/airflow_driver.py OUT.json [DAG_ID]

writes to OUT.json (Airflow logs to stdout) what a DagBag of the DAGs folder holds (import
errors, tasks in order, upstreams, outlets, the Assets each DAG is scheduled on), the web
DAG's schedule with PRIMER_WEB_SCHEDULE set, and, given DAG_ID, the result of running that
DAG once with `dag.test()` on a fresh SQLite database: the run's and tasks' states and the
Asset events. One process for all of it: importing Airflow costs seconds. AIRFLOW_HOME,
the DAGs folder and the PRIMER_* settings come from the environment.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from pathlib import Path


def _dagbag():
    from airflow.models import DagBag

    # no sys.path change: the DAG files must import where the DAGs folder is not on it
    kwargs = {"dag_folder": os.environ["AIRFLOW__CORE__DAGS_FOLDER"]}
    if "include_examples" in inspect.signature(DagBag).parameters:  # gone in Airflow 3.2+
        kwargs["include_examples"] = False
    return DagBag(**kwargs)


def _assets(schedule) -> list[str]:
    objects = getattr(schedule, "objects", None)
    if objects is None:
        return [schedule.uri] if hasattr(schedule, "uri") else []
    return sorted(uri for obj in objects for uri in _assets(obj))


def inspect_dags() -> dict:
    t0 = time.monotonic()
    bag = _dagbag()
    dags = {}
    for dag_id, dag in bag.dags.items():
        timetable = dag.timetable
        dags[dag_id] = {
            "file": Path(dag.fileloc).name,
            "timetable": type(timetable).__name__,
            "schedule_assets": _assets(getattr(timetable, "asset_condition", None)),
            "tags": sorted(dag.tags),
            "max_active_runs": dag.max_active_runs,
            "params": sorted(dag.params.keys()),
            "tasks": [
                {
                    "task_id": t.task_id,
                    "upstream": sorted(t.upstream_task_ids),
                    "downstream": sorted(t.downstream_task_ids),
                    "outlets": [o.uri for o in t.outlets],
                    "retries": t.retries,
                    "execution_timeout_s": t.execution_timeout.total_seconds(),
                }
                for t in dag.topological_sort()
            ],
        }
    return {
        "airflow": __import__("airflow").__version__,
        "import_errors": {k: str(v) for k, v in bag.import_errors.items()},
        "dags": dags,
        "seconds": round(time.monotonic() - t0, 2),
    }


def test_dag(dag_id: str) -> dict:
    from airflow.utils import db

    t0 = time.monotonic()
    db.initdb()
    bag = _dagbag()
    if bag.import_errors:
        return {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}}
    dag = bag.dags[dag_id]
    dr = dag.test()
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = [
            {"uri": e.uri, "extra": e.extra}
            for e in session.query(AssetEvent).order_by(AssetEvent.id)
        ]
        # the runs the scheduler will start because of those events
        queued = sorted(
            [q.target_dag_id, uri]
            for q, uri in session.query(AssetDagRunQueue, AssetModel.uri).join(
                AssetModel, AssetModel.id == AssetDagRunQueue.asset_id
            )
        )
        tis = {ti.task_id: str(ti.state) for ti in dr.get_task_instances(session=session)}
    return {
        "state": str(dr.state),
        "tasks": tis,
        "asset_events": events,
        "queued_runs": queued,
        "seconds": round(time.monotonic() - t0, 2),
    }


def main(out: Path, dag_id: str | None) -> None:
    result = {"inspect": inspect_dags()}
    out.write_text(json.dumps(result, indent=2, default=str))
    os.environ["PRIMER_WEB_SCHEDULE"] = "0 3 * * *"
    web = _dagbag().dags["primer_web"]
    del os.environ["PRIMER_WEB_SCHEDULE"]
    result["web_cron"] = {
        "timetable": type(web.timetable).__name__,
        # the SDK timetable (Airflow 3.2+) has `expression`, the core one (3.1) `_expression`
        "cron": getattr(web.timetable, "expression", None)
        or getattr(web.timetable, "_expression", None),
    }
    if dag_id:
        try:
            result["test"] = test_dag(dag_id)
        except Exception as e:  # reported, so the inspection results above still count
            result["test"] = {"error": f"{type(e).__name__}: {e}"}
    out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
