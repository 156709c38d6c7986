"""AsyncQExecutor: Airflow task instances on a memory-aware Celery fleet over Redis."""

__version__ = "0.1.0"
