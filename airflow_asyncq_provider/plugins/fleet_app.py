"""The fleet page's FastAPI app: the page, the fleet as JSON, and three actions (maintenance, replay a
dead letter, purge the dead letters).

The api-server mounts plugin apps without any protection of its own, so every route here depends on
Airflow's auth manager, as edge3's UI routes do:

* reading (the page, its assets, ``GET /api/fleet``) needs ``requires_access_view(AccessView.JOBS)``,
  which every role of the simple auth manager has, viewer included;
* acting (every ``POST``) needs the auth manager to allow a ``PUT`` on the ``[asyncq]`` configuration
  section: steering the fleet changes how the executor runs. Under the simple auth manager that is op
  and admin; under FAB, admin.

The user is whoever the request's JWT names: the ``_token`` cookie the Airflow UI sets (the page's own
requests are same-origin, so the cookie goes with them) or an ``Authorization: Bearer`` header. The
cookie is SameSite=Lax and every action takes a JSON body, which a cross-site form cannot send, so a
foreign page cannot act in a signed-in user's name.

All data comes from ``state.overview.snapshot``, the function ``airflow asyncq status`` reads. Payloads
never leave Redis (``snapshot`` drops them), the broker URL is masked, and every string is masked again
before it is sent, in case an error text or an event carries a secret.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import quote

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import AccessView, ConfigurationDetails
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_view
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from airflow_asyncq_provider.errors import AsyncQError, ConfigError, PublishError
from airflow_asyncq_provider.redaction import mask_all, mask_url
from airflow_asyncq_provider.settings import SECTION, AsyncQSettings
from airflow_asyncq_provider.state import dlq, overview, records, registry
from airflow_asyncq_provider.state.keys import Keys

if TYPE_CHECKING:
    import redis

STATIC = Path(__file__).with_name("static")
ASSETS = {"fleet.js": "text/javascript", "fleet.css": "text/css", "icon.svg": "image/svg+xml"}
# The page may be framed by the Airflow UI (same origin) and loads nothing from elsewhere.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'self'",
                "X-Frame-Options": "SAMEORIGIN", "Cache-Control": "no-store"}
NO_STORE = {"Cache-Control": "no-store"}
SNAPSHOT_MAX_AGE = 2.0


# ------------------------------------------------------------------------------------------ permissions
def may_control(user: BaseUser) -> bool:
    """Whether ``user`` may steer the fleet: a PUT on the ``[asyncq]`` configuration section."""
    return get_auth_manager().is_authorized_configuration(
        method="PUT", details=ConfigurationDetails(section=SECTION), user=user)


#: Dependency of every read route (Airflow's own, as in edge3).
requires_view = requires_access_view(AccessView.JOBS)


def requires_control(user: GetUserDep) -> None:
    """Dependency of every action route."""
    if not may_control(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"Forbidden: steering the fleet needs permission to change the [{SECTION}] "
                            "configuration")


# ------------------------------------------------------------------------------------------ the fleet
@dataclasses.dataclass
class Fleet:
    """What the routes talk to: settings, one Redis client for the app's lifetime, the key names."""

    settings: AsyncQSettings
    client: redis.Redis
    keys: Keys
    _last: tuple[float, dict[str, Any]] | None = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, Any]:
        """``overview.snapshot``, read at most once per ``SNAPSHOT_MAX_AGE`` for every open page: each
        tab polls every 5 s, and the overview scans the keyspace for the queues' names."""
        with self._lock:
            now = time.monotonic()
            if self._last is None or now - self._last[0] > SNAPSHOT_MAX_AGE:
                self._last = (now, overview.snapshot(self.client, self.keys))
            return copy.deepcopy(self._last[1])

    def changed(self) -> None:
        """After an action: the next read shows its effect."""
        with self._lock:
            self._last = None


def open_fleet() -> Fleet:
    from airflow_asyncq_provider.settings import load_settings
    from airflow_asyncq_provider.state.client import connect

    settings = load_settings()
    return Fleet(settings, connect(settings, "fleet page"), Keys(settings.key_prefix))


class FleetConnection:
    """Opens the fleet on the first request that needs it. A failure is not kept: the next request
    tries again, so the page recovers by itself when Redis comes back."""

    def __init__(self, opener: Callable[[], Fleet]) -> None:
        self._opener = opener
        self._fleet: Fleet | None = None
        self._lock = threading.Lock()

    def get(self) -> Fleet:
        with self._lock:
            if self._fleet is None:
                self._fleet = self._opener()
            return self._fleet


def get_fleet(request: Request) -> Fleet:
    return request.app.state.fleet.get()


FleetDep = Annotated[Fleet, Depends(get_fleet)]


# ------------------------------------------------------------------------------------------ what is shown
def task_instance_path(key: Any) -> str | None:
    """The Airflow UI's path of a running workload's task instance (its routes in 3.3:
    ``/dags/<dag_id>/runs/<run_id>/tasks/<task_id>`` and ``.../mapped/<map_index>``); None for a
    callback or a workload without a key."""
    if not isinstance(key, dict) or not all(key.get(k) for k in ("dag_id", "run_id", "task_id")):
        return None
    dag_id, run_id, task_id = (quote(str(key[k]), safe="") for k in ("dag_id", "run_id", "task_id"))
    path = f"/dags/{dag_id}/runs/{run_id}/tasks/{task_id}"
    map_index = key.get("map_index")
    if isinstance(map_index, int) and map_index >= 0:
        path += f"/mapped/{map_index}"
    return path


def scrub(value: Any) -> Any:
    """Every string masked (URL passwords, JWTs, Airflow's registered secrets), at any depth."""
    if isinstance(value, str):
        return mask_all(value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def fleet_view(fleet: Fleet, user: BaseUser) -> dict[str, Any]:
    data = fleet.snapshot()
    for row in data["tasks"]:
        row["ti_path"] = task_instance_path(row.get("key"))
    data.update(key_prefix=fleet.settings.key_prefix, user=user.get_name(), can_control=may_control(user))
    # After scrub: Airflow's masker knows the whole URL as a sensitive option and would hide the host too.
    return {**scrub(data), "broker": mask_url(fleet.settings.broker_url)}


# ------------------------------------------------------------------------------------------ actions
class MaintenanceBody(BaseModel):
    worker: str = Field(min_length=1, max_length=255)
    on: bool
    comment: str = Field("", max_length=500)


class ReplayBody(BaseModel):
    index: int = Field(ge=0)
    #: the dead letter's task id as the page showed it: a replay refuses to run if the list moved
    id: str = Field(min_length=1)


class PurgeBody(BaseModel):
    confirm: Literal[True]  # the page's confirmation, as --yes is the CLI's


def set_maintenance(fleet: Fleet, body: MaintenanceBody, user: BaseUser) -> dict[str, Any]:
    if body.on and body.worker not in registry.live_workers(fleet.client, fleet.keys):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no live worker named {body.worker!r}")
    registry.set_maintenance(fleet.client, fleet.keys, body.worker, body.on, comment=body.comment,
                             by=f"ui:{user.get_name()}")
    return {"worker": body.worker, "maintenance": registry.maintenance(fleet.client, fleet.keys, body.worker)}


def replay(fleet: Fleet, body: ReplayBody) -> dict[str, Any]:
    """What ``airflow asyncq dlq replay`` does: a fresh delivery count, the same message again on its
    queue, then the dead letter removed."""
    import redis

    from airflow_asyncq_provider.broker.messages import send_workload

    letters = dlq.entries(fleet.client, fleet.keys)
    if not body.index < len(letters) or letters[body.index].get("id") != body.id:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"dead letter #{body.index} is no longer {body.id!r}; reload the page")
    record = letters[body.index]
    queue = record.get("queue") or fleet.settings.default_queue
    records.reset_deliveries(fleet.client, fleet.keys, body.id)
    try:
        send_workload(fleet.client, task_id=body.id, payload=record.get("payload"),
                      meta=record.get("meta"), queue=queue)
    except (redis.RedisError, OSError) as exc:
        raise PublishError(f"replaying {body.id} to queue {queue!r} failed ({type(exc).__name__}: "
                           f"{mask_all(str(exc))}); the dead letter is kept") from exc
    dlq.remove(fleet.client, fleet.keys, record)
    return {"replayed": body.id, "queue": queue}


# ------------------------------------------------------------------------------------------ the app
def create_app(opener: Callable[[], Fleet] = open_fleet) -> FastAPI:
    # No /docs, /redoc or /openapi.json: they would be routes without an auth dependency.
    app = FastAPI(title="AsyncQ fleet page", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fleet = FleetConnection(opener)
    view, control = [Depends(requires_view)], [Depends(requires_control)]

    @app.get("/", dependencies=view, response_class=FileResponse)
    def page() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/static/{name}", dependencies=view, response_class=FileResponse)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no asset {name!r}")
        return FileResponse(STATIC / name, media_type=ASSETS[name])

    @app.get("/api/fleet", dependencies=view)
    def fleet_json(user: GetUserDep, fleet: FleetDep) -> JSONResponse:
        return JSONResponse(fleet_view(fleet, user), headers=NO_STORE)

    @app.post("/api/maintenance", dependencies=control)
    def maintenance(body: MaintenanceBody, user: GetUserDep, fleet: FleetDep) -> dict[str, Any]:
        try:
            return set_maintenance(fleet, body, user)
        finally:
            fleet.changed()

    @app.post("/api/dead-letters/replay", dependencies=control)
    def replay_dead_letter(body: ReplayBody, fleet: FleetDep) -> dict[str, Any]:
        try:
            return replay(fleet, body)
        finally:
            fleet.changed()

    @app.post("/api/dead-letters/purge", dependencies=control)
    def purge_dead_letters(body: PurgeBody, fleet: FleetDep) -> dict[str, Any]:
        try:
            return {"purged": dlq.purge(fleet.client, fleet.keys)}
        finally:
            fleet.changed()

    app.add_exception_handler(AsyncQError, _fleet_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


async def _fleet_error(request: Request, exc: Exception) -> JSONResponse:
    """Our errors already name the setting and the fix; a config error is the deployment's to fix."""
    code = status.HTTP_500_INTERNAL_SERVER_ERROR if isinstance(exc, ConfigError) else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse({"detail": mask_all(str(exc))}, status_code=code, headers=NO_STORE)


async def _http_error(request: Request, exc: Exception) -> Response:
    """A browser that opens the page without signing in gets a link to the login page, still a 401."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == status.HTTP_401_UNAUTHORIZED and "text/html" in request.headers.get("accept", ""):
        # the page is <base>/asyncq/, so the login page is ../auth/login/
        return HTMLResponse('<p>Not signed in. <a href="../auth/login/">Sign in to Airflow</a> and open '
                            "the fleet page again.</p>", status_code=exc.status_code)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
