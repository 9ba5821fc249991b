"""Airflow DAG `primer_mixture`: mixture -> train_smoke (the recipe's stages after decontaminate).

Scheduled on the Assets of what it mixes: `edu_score` (web) and `decontaminate`
(synthetic); it runs once both have been updated since its last run.
"""

from pipeline.orchestration.dags import primer_dag

mixture = primer_dag(
    "primer_mixture",
    after="decontaminate",
    description="Primer mixture: Phi-3 tokens into two-phase Megatron shards, then a smoke train",
)
