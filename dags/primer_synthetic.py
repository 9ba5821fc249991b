"""Airflow DAG `primer_synthetic`: seeds -> generate -> validate -> synth_dedup -> decontaminate.

Scheduled on the Assets it reads from primer_edu: `edu_score` (web seed documents) and
`edu_train` (the model `validate` scores with); finishing `decontaminate` feeds
primer_mixture.
"""

from pipeline.orchestration.dags import primer_dag

synthetic = primer_dag(
    "primer_synthetic",
    after="edu_score",
    through="decontaminate",
    description="Primer synthetic data: seed prompts, teacher generation, validation, dedup, decontamination",
)
