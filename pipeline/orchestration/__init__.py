"""Scheduled runs: Airflow 3 DAGs built from a recipe, one task per stage."""
