"""Build an Airflow 3 DAG for a slice of a Primer recipe: one task per stage, nothing else.

The DAG files beside this one each name a slice of the recipe by its boundary stages
(the web path runs through `dedup`; educational value runs after `dedup` through
`edu_score`; ...). Everything else comes from the recipe through pipeline.orchestrate:
which stages fall in the slice (a stage added to the recipe lands in its DAG without
editing a DAG file), their order, their output folders and what they read. Each task
runs `primer run RECIPE --stages STAGE --output RUN` (or submits it as a Ray job), with
retries (safe: primer resumes finished parts), a timeout, and an outlet Asset for its
output folder (`file:///RUN/STAGE`). A DAG is scheduled on the Assets of the stages
outside it that it reads, so finishing `dedup` starts the educational-value DAG, and so
on down to the mixture. The web DAG waits for an event on its input folder's Asset
(`file:///.../data/sample` for the quickstart: a crawler says "a new crawl arrived" with
`POST /api/v2/assets/events {"asset_id": ID}`, or "Create Asset Event" in the UI), or runs
on the cron in PRIMER_WEB_SCHEDULE instead. A stage already up to date finishes at once
(primer skips it) and still updates its Asset; the event's `extra` carries the stage's
fingerprint and row counts, so a consumer can tell whether anything changed.

Configuration is the environment of the scheduler and the workers (see
pipeline/orchestrate.py: PRIMER_RECIPE, PRIMER_RUN_DIR, PRIMER_BIN, PRIMER_EXECUTOR,
PRIMER_OVERRIDES, PRIMER_RAY_JOBS_ADDRESS, PRIMER_STAGE_TIMEOUT, PRIMER_RETRIES, ...);
a run's params override `overrides`, `executor` and `ray_jobs_address` for that run.
The recipe and run folder are fixed at parse time because the Assets name them.

Airflow adds this folder to sys.path when it parses a DAG bundle, which is how the DAG
files import this module; .airflowignore keeps Airflow from parsing it as a DAG file.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param, chain, dag, task

from pipeline import orchestrate

log = logging.getLogger(__name__)
TIMEOUT_GRACE_S = (
    120  # Airflow's execution_timeout fires after orchestrate's own, which stops cleanly
)


def stage_asset(output: Path) -> Asset:
    """The Asset for a stage's output folder: updated each time the stage finishes."""
    return Asset(output.as_uri())


def _stage_task(stage: orchestrate.StagePlan, settings: orchestrate.Settings) -> Any:
    outlet = stage_asset(stage.output)

    @task(
        task_id=stage.name,
        outlets=[outlet],
        retries=settings.retries,
        retry_delay=timedelta(seconds=settings.retry_delay_s),
        execution_timeout=timedelta(seconds=settings.stage_timeout_s + TIMEOUT_GRACE_S),
        doc_md=f"`primer run {settings.recipe} --stages {stage.name} --output {settings.run}`",
    )
    def run_stage(**context: Any) -> dict[str, Any]:
        params = context["params"]
        result = orchestrate.run_stage(
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

    return run_stage


def primer_dag(
    dag_id: str,
    *,
    after: str | None = None,
    through: str | None = None,
    description: str,
) -> DAG | None:
    """The DAG for the recipe's stages after `after` (exclusive) through `through`
    (inclusive); None (no DAG) when the recipe lacks a boundary stage."""
    settings = orchestrate.Settings.from_env()
    stages = orchestrate.plan(settings.recipe, settings.run, settings.overrides)
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
    first_input = orchestrate.input_folder(mine[0])
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
