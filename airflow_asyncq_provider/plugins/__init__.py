"""Airflow plugins the provider ships: the fleet page in the Airflow 3 UI (``fleet_page``).

Empty on purpose. Airflow's plugin manager imports ``fleet_page`` in every process that loads plugins
(scheduler, dag-processor, triggerer, task processes); only the api-server ever builds the page's
FastAPI app (``fleet_app``), on its first request.
"""
