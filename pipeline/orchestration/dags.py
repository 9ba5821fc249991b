"""The Airflow DAGs of a recipe: `primer_dag` builds one for a slice of its stages.

The DAG files in dags/ are a call to `primer_dag` each: a DAG file imports only installed
modules, so it loads wherever Airflow parses it, `airflow dags list --local` included,
without the DAGs folder on sys.path. Each task runs one stage through
pipeline/orchestration/tasks.py (`run_task`). Airflow is imported only when a DAG is
built, so importing this module (and tasks.py) needs no Airflow.

    python -m pipeline.orchestration.dags plan [RECIPE]    # the stages the DAGs are built from
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.orchestration.tasks import (
    Settings,
    StagePlan,
    input_folder,
    plan,
    run_task,
)

log = logging.getLogger("primer.orchestrate")

# Airflow's execution_timeout fires after run_task's own timeout, which stops cleanly
TIMEOUT_GRACE_S = 120


def stage_asset(output: Path) -> Any:
    """The Airflow Asset for a stage's output folder: updated each time the stage finishes."""
    from airflow.sdk import Asset

    return Asset(output.as_uri())


def _stage_task(stage: StagePlan, settings: Settings) -> Any:
    from airflow.sdk import task

    outlet = stage_asset(stage.output)

    @task(
        task_id=stage.name,
        outlets=[outlet],
        retries=settings.retries,
        retry_delay=timedelta(seconds=settings.retry_delay_s),
        execution_timeout=timedelta(seconds=settings.stage_timeout_s + TIMEOUT_GRACE_S),
        doc_md=f"`primer run {settings.recipe} --stages {stage.name} --output {settings.run}`",
    )
    def run_one(**context: Any) -> dict[str, Any]:
        params = context["params"]
        result = run_task(
            stage.name,
            settings,
            dag_id=context["dag"].dag_id,
            run_id=context["run_id"],
            overrides=params["overrides"],
            executor=params["executor"],
            ray_jobs_address=params["ray_jobs_address"],
            logger=log,
        )
        context["outlet_events"][outlet].extra = {
            k: result[k] for k in ("fingerprint", "rows_in", "rows_out") if k in result
        }
        return result

    return run_one


def primer_dag(
    dag_id: str,
    *,
    after: str | None = None,
    through: str | None = None,
    description: str,
    settings: Settings | None = None,
) -> Any:
    """The Airflow DAG for the recipe's stages after `after` (exclusive) through `through`
    (inclusive); None (no DAG) when the recipe lacks a boundary stage.

    Which stages fall in the slice, their order, output folders and inputs all come from
    the recipe (`plan`), so a stage added to the recipe lands in its DAG without editing a
    DAG file. Each task runs `run_task` with retries (safe: primer resumes finished
    parts), a timeout, and an outlet Asset for its output folder (`file:///RUN/STAGE`)
    whose event `extra` carries the stage's fingerprint and row counts. The DAG is
    scheduled on the Assets of the stages outside it that it reads (finishing `dedup`
    starts the educational-value DAG, and so on down to the mixture); a DAG whose first
    stage reads files waits for an event on their folder's Asset (a crawler's `POST
    /api/v2/assets/events {"asset_id": ID}`, or "Create Asset Event" in the UI), or runs
    on PRIMER_WEB_SCHEDULE instead. The recipe and run folder are fixed at parse time
    because the Assets name them; a run's params override `overrides`, `executor` and
    `ray_jobs_address`."""
    from airflow.sdk import Param, chain, dag

    settings = settings or Settings.from_env()
    stages = plan(settings.recipe, settings.run, settings.overrides)
    names = [s.name for s in stages]
    missing = [b for b in (after, through) if b and b not in names]
    if missing:
        log.info("%s: recipe %s has no stage %s: no DAG", dag_id, settings.recipe, missing)
        return None
    start = names.index(after) + 1 if after else 0
    mine = stages[start : names.index(through) + 1 if through else len(names)]
    if not mine:
        return None
    inside = {s.name for s in mine}
    upstream = list(dict.fromkeys(r for s in mine for r in s.reads if r not in inside))
    schedule: Any = [stage_asset(settings.run / r) for r in upstream] or None
    first_input = input_folder(mine[0])
    if first_input is not None:
        schedule = settings.web_schedule or [stage_asset(first_input)]
    waits_on = (
        f"the Assets {', '.join(a.uri for a in schedule)}"
        if isinstance(schedule, list)
        else f"the schedule {schedule!r}"
    )

    @dag(
        dag_id=dag_id,
        description=description,
        schedule=schedule,
        start_date=datetime(2025, 1, 1, tzinfo=UTC),
        catchup=False,
        max_active_runs=1,  # two runs of one DAG would write the same run folder
        tags=["primer"],
        doc_md=(
            f"{description}\n\nRecipe `{settings.recipe}`, run folder `{settings.run}`; "
            f"stages {' -> '.join(s.name for s in mine)}; runs on {waits_on}."
        ),
        params={
            "overrides": Param(
                list(settings.overrides),
                type="array",
                items={"type": "string"},
                description="`--set key=value` overrides for this run's stages",
            ),
            "executor": Param(
                settings.executor,
                type=["null", "string"],
                enum=[None, "ray", "local"],
                description="ray or local; null: the recipe's",
            ),
            "ray_jobs_address": Param(
                settings.ray_jobs_address,
                type=["null", "string"],
                description="Ray Jobs API (http://head:8265): run stages as Ray jobs",
            ),
        },
    )
    def build() -> None:
        chain(*[_stage_task(s, settings)() for s in mine])

    return build()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "plan":
        print("usage: python -m pipeline.orchestration.dags plan [RECIPE]", file=sys.stderr)
        return 2
    s = Settings.from_env()
    if len(args) > 1:
        s = replace(s, recipe=Path(args[1]).resolve())
    for p in plan(s.recipe, s.run, s.overrides):
        src = ", ".join(p.reads) or ", ".join(p.files)
        print(f"{p.name:<14} {p.kind:<14} {p.output}  <- {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
