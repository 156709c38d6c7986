"""Triggers of the AsyncQ provider (they run on Airflow's triggerer)."""
