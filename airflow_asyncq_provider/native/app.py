"""The fleet app users define native tasks on: ``from airflow_asyncq_provider.native import fleet``.

Creating it reads no configuration. Celery asks for its configuration on first use (sending a task, or
the lane starting), and only then ``native_config(load_settings())`` runs, so task modules import cheaply
and tests can use ``fleet.conf.update(task_always_eager=True)`` without any Airflow config.
"""

from __future__ import annotations

from typing import Any

from celery import Celery


def _settings_defaults() -> dict[str, Any]:
    from airflow_asyncq_provider.broker.config import native_config
    from airflow_asyncq_provider.settings import load_settings

    return native_config(load_settings())


fleet = Celery("asyncq-native", task_cls="airflow_asyncq_provider.native.task:NativeTask",
               set_as_current=False)
fleet.add_defaults(_settings_defaults)
