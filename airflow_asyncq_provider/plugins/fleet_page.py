"""The fleet page as an Airflow plugin: a FastAPI app mounted at ``/asyncq`` and a menu entry that shows
it in the Airflow 3 UI (Browse > AsyncQ fleet, in an iframe at ``/plugin/asyncq_fleet``).

Airflow imports this module wherever it loads plugins: the scheduler, the dag-processor, the triggerer
and every task process, through both the ``airflow.plugins`` entry point and the provider info. So it
imports nothing but ``AirflowPlugin`` and reads no config when imported.

edge3 builds its app only when ``sys.argv`` says ``airflow api-server``. We get the same effect
without guessing from the command line: ``fastapi_apps`` holds ``LazyFleetApp``, a few-line ASGI app
that imports and builds the real one (``fleet_app.create_app``) on the first request it serves, and
only the api-server ever serves a request. It works the same under uvicorn, gunicorn or any other
launcher of ``airflow.api_fastapi.main:app``.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/asyncq"
URL_ROUTE = "asyncq_fleet"


class LazyFleetApp:
    """ASGI app that builds the fleet page's FastAPI app when it serves its first request."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._app is None:
                from airflow_asyncq_provider.plugins.fleet_app import create_app

                self._app = create_app()
            return self._app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app = self._app if self._app is not None else self.get()
        await app(scope, receive, send)


def base_path(base_url: str | None) -> str:
    """The path part of ``[api] base_url`` without its trailing slash: "" when Airflow is at the root."""
    path = urlsplit(base_url).path if base_url and "://" in base_url else (base_url or "")
    return path.rstrip("/")


def menu_entry(base: str) -> dict[str, Any]:
    """The ``external_views`` entry; ``url_route`` makes the UI show ``href`` in an iframe."""
    return {
        "name": "AsyncQ fleet",
        "href": f"{base}{URL_PREFIX}/",
        "destination": "nav",
        "url_route": URL_ROUTE,
        # Browse, not Admin: anyone who may view the fleet finds it; the actions check permission.
        "category": "browse",
        "icon": f"{base}{URL_PREFIX}/static/icon.svg",
    }


class AsyncQFleetPlugin(AirflowPlugin):
    """Workers, running tasks, queues, dead letters and fleet events in the Airflow UI."""

    name = "asyncq_fleet"
    fastapi_apps = [{"app": LazyFleetApp(), "url_prefix": URL_PREFIX, "name": "AsyncQ fleet page"}]
    external_views = [menu_entry("")]

    @classmethod
    def on_load(cls, *args: Any, **kwargs: Any) -> None:
        """Airflow calls this once the plugin is loaded: the place to read ``[api] base_url``, so the
        menu entry points under it when Airflow is served from a sub-path."""
        from airflow.configuration import conf

        cls.external_views = [menu_entry(base_path(conf.get("api", "base_url", fallback="")))]
