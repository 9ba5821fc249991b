"""Airflow DAG `primer_edu`: edu_annotate -> edu_train -> edu_score, one task per stage.

Scheduled on the Asset of the deduplicated web text (primer_web's `dedup`); finishing
`edu_score` starts primer_synthetic and, with `decontaminate`, primer_mixture.
"""

from pipeline.orchestration.dags import primer_dag

edu = primer_dag(
    "primer_edu",
    after="dedup",
    through="edu_score",
    description="Primer educational value: teacher ratings, the fastText scorer, scores",
)
