"""``[core] executor = airflow_asyncq_provider.executors.AsyncQExecutor``."""

from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

__all__ = ["AsyncQExecutor"]
