"""Airflow DAG `primer_web`: extract -> langid -> quality -> dedup, one task per stage.

Runs when the recipe's input folder gets a new crawl (its Asset is updated) or on the
cron in PRIMER_WEB_SCHEDULE; finishing `dedup` updates its Asset, which starts
primer_edu. Everything comes from the recipe (see pipeline.orchestration.dags.primer_dag).
"""

from pipeline.orchestration.dags import primer_dag

web = primer_dag(
    "primer_web",
    through="dedup",
    description="Primer web path: extract, language id, quality signals, deduplication",
)
