"""The fleet page's app: who may read, who may act, what it shows, and how the plugin registers.

Authentication is Airflow's own: a real SimpleAuthManager signs and checks real JWTs, and the routes
use Airflow's ``get_user`` and ``requires_access_view``. The one stub is the revoked-token lookup, which
needs the metadata database the unit tier does not have. The fleet's Redis is the in-memory fake,
grown here by the few commands the overview and the actions use.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from airflow_asyncq_provider.errors import BrokerUnavailable
from airflow_asyncq_provider.get_provider_info import get_provider_info
from airflow_asyncq_provider.plugins import fleet_app, fleet_page
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import dlq, fleet_events, records, registry
from airflow_asyncq_provider.state.keys import Keys
from tests.unit.conftest import FakeRedis, workload_messages
from tests.unit.test_imports import PACKAGE, imported_at_import_time

REPO = Path(__file__).resolve().parents[2]
BROKER = "redis://fleet:s3cret-pw@redis.internal:6379/0"
KEYS = Keys("asyncq")
WORKER = "w1@host"

READ_ROUTES = [("GET", "/"), ("GET", "/static/fleet.js"), ("GET", "/static/fleet.css"),
               ("GET", "/static/icon.svg"), ("GET", "/api/fleet")]
ACTION_ROUTES = [
    ("POST", "/api/maintenance", {"worker": WORKER, "on": True, "comment": "disk swap"}),
    ("POST", "/api/dead-letters/replay", {"index": 0, "id": "dead-1"}),
    ("POST", "/api/dead-letters/purge", {"confirm": True}),
]
ALL_ROUTES = [(m, p, None) for m, p in READ_ROUTES] + ACTION_ROUTES


class FleetRedis(FakeRedis):
    """The fake, plus the list, set and scan commands the overview and the actions use."""

    def sadd(self, key: str, *values: str) -> int:
        self.sets.setdefault(key, set()).update(values)
        return len(values)

    def srem(self, key: str, *values: str) -> int:
        self.sets.get(key, set()).difference_update(values)
        return len(values)

    def pexpire(self, key: str, ms: int) -> bool:
        return key in self.hashes

    def hdel(self, key: str, *fields: str) -> int:
        return sum(self.hashes.get(key, {}).pop(f, None) is not None for f in fields)

    def delete(self, *names: str) -> int:
        return sum(any(store.pop(n, None) is not None for store in (self.hashes, self.lists, self.strings))
                   for n in names)

    def llen(self, key: str) -> int:
        return len(self.lists.get(key, []))

    def lrange(self, key: str, start: int, end: int) -> list[str]:
        items = self.lists.get(key, [])
        return items[start:] if end == -1 else items[start:end + 1]

    def lindex(self, key: str, index: int) -> str | None:
        items = self.lists.get(key, [])
        return items[index] if -len(items) <= index < len(items) else None

    def lrem(self, key: str, count: int, value: str) -> int:
        items = self.lists.get(key, [])
        if value in items:
            items.remove(value)
            return 1
        return 0

    def scan_iter(self, match: str = "*", count: int | None = None):
        names = [*self.hashes, *self.lists, *self.strings, *self.sets]
        return iter([n for n in names if fnmatch.fnmatchcase(n, match)])


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def auth(monkeypatch):
    """Airflow's SimpleAuthManager, set up as the api-server sets it up; yields a token maker."""
    from airflow.api_fastapi.app import create_auth_manager, purge_cached_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.models.revoked_token import RevokedToken

    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                       "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "unit-test-jwt-secret-" + "0123456789abcdef" * 4)
    # The only stub: the revoked-token table lives in the metadata DB, which the unit tier has not.
    monkeypatch.setattr(RevokedToken, "is_revoked", classmethod(lambda cls, jti, session=None: False))
    purge_cached_app()
    manager = create_auth_manager()

    def token(role: str) -> str:
        return manager.generate_jwt(SimpleAuthManagerUser(username=role, role=role))

    yield token
    purge_cached_app()


@pytest.fixture
def fake() -> FleetRedis:
    redis = FleetRedis()
    registry.heartbeat(redis, KEYS, WORKER, {
        "queues": ["default"], "slots": 4, "running": 2, "free": 2, "version": "0.1.0",
        "consumer_tick_at": f"{9e9:.3f}", "memory_budget": 2 * 1024**3, "memory_reserved": 512 * 1024**2,
        "memory_in_use": 300 * 1024**2,
        "tasks": {
            "ti-plain": {"pid": 11, "pss": 100 * 1024**2, "request": 256 * 1024**2, "limit": None,
                         "started_at": 1.0, "key": {"dag_id": "etl", "task_id": "load", "try_number": 1,
                                                    "run_id": "manual__2026-01-01T00:00:00+00:00",
                                                    "map_index": -1}},
            "ti-mapped": {"pid": 12, "pss": 1, "request": 1, "limit": 2, "started_at": 1.0,
                          "key": {"dag_id": "etl", "task_id": "square", "try_number": 2, "run_id": "r1",
                                  "map_index": 7}},
        },
    }, ttl=30)
    dlq.push(redis, KEYS, "dead-1", "deliveries exceeded", '{"type": "ExecuteTask", "token": "eyJsecret"}',
             WORKER, queue="high_mem", meta={"memory_request": 1})
    fleet_events.record(redis, KEYS, fleet_events.WORKER_LOST, worker="w9@gone",
                        reason=f"lost; broker {BROKER}")
    return redis


@pytest.fixture
def opened(fake) -> list[fleet_app.Fleet]:
    return []


@pytest.fixture
def app(fake, opened):
    def opener() -> fleet_app.Fleet:
        fleet = fleet_app.Fleet(AsyncQSettings(broker_url=BROKER), fake, KEYS)
        opened.append(fleet)
        return fleet

    return fleet_app.create_app(opener)


def _client(app, **kwargs: Any) -> TestClient:
    return TestClient(app, raise_server_exceptions=True, **kwargs)


def _call(client: TestClient, method: str, path: str, body: Any = None, **kwargs: Any):
    return client.request(method, path, json=body, **kwargs)


# ---------------------------------------------------------------------------------------- who may do what
@pytest.mark.parametrize(("method", "path", "body"), ALL_ROUTES)
def test_every_route_refuses_an_unauthenticated_request(auth, app, opened, method, path, body):
    reply = _call(_client(app), method, path, body)
    assert reply.status_code == 401, reply.text
    assert opened == []  # refused before Redis was touched


@pytest.mark.parametrize(("method", "path", "body"), ALL_ROUTES)
def test_every_route_refuses_a_forged_token(auth, app, method, path, body):
    forged = auth("admin")[:-4] + "AAAA"
    for kwargs in ({"cookies": {"_token": forged}}, {"headers": {"Authorization": f"Bearer {forged}"}}):
        reply = _call(_client(app, **kwargs), method, path, body)
        assert reply.status_code in (401, 403), reply.text


@pytest.mark.parametrize(("method", "path"), READ_ROUTES)
def test_read_routes_accept_a_viewer_by_cookie_and_by_bearer_header(auth, app, method, path):
    token = auth("viewer")
    for kwargs in ({"cookies": {"_token": token}}, {"headers": {"Authorization": f"Bearer {token}"}}):
        reply = _call(_client(app, **kwargs), method, path)
        assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(("method", "path", "body"), ACTION_ROUTES)
def test_action_routes_refuse_a_viewer(auth, app, fake, method, path, body):
    before = json.dumps([fake.hashes, fake.lists], sort_keys=True, default=str)
    reply = _call(_client(app, cookies={"_token": auth("viewer")}), method, path, body)
    assert reply.status_code == 403, reply.text
    assert "[asyncq] configuration" in reply.json()["detail"]
    assert json.dumps([fake.hashes, fake.lists], sort_keys=True, default=str) == before


@pytest.mark.parametrize(("method", "path", "body"), ACTION_ROUTES)
def test_action_routes_accept_an_admin(auth, app, method, path, body):
    reply = _call(_client(app, cookies={"_token": auth("admin")}), method, path, body)
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(("role", "allowed"), [("viewer", False), ("user", False), ("op", True), ("admin", True)])
def test_acting_needs_a_put_on_the_asyncq_configuration(auth, app, role, allowed):
    client = _client(app, headers={"Authorization": f"Bearer {auth(role)}"})
    reply = client.post("/api/maintenance", json={"worker": WORKER, "on": False})
    assert reply.status_code == (200 if allowed else 403)
    assert client.get("/api/fleet").json()["can_control"] is allowed


def _dependency_calls(dependant: Dependant) -> list[Any]:
    calls = []
    for sub in dependant.dependencies:
        calls.append(sub.call)
        calls.extend(_dependency_calls(sub))
    return calls


def unprotected_routes(app) -> list[str]:
    """Routes that do not start with one of the page's two auth dependencies, each resolving the user
    through Airflow's ``get_user``. Anything that is not an APIRoute (a Mount, the docs) counts too."""
    from airflow.api_fastapi.core_api.security import get_user

    found = []
    for route in app.routes:
        name = getattr(route, "path", repr(route))
        if not isinstance(route, APIRoute):
            found.append(name)
            continue
        first = route.dependant.dependencies[0].call if route.dependant.dependencies else None
        if first not in (fleet_app.requires_view, fleet_app.requires_control) \
                or get_user not in _dependency_calls(route.dependant):
            found.append(name)
        elif route.methods - {"GET", "HEAD"} and first is not fleet_app.requires_control:
            found.append(name)  # a route that changes something must need more than viewing
    return found


def test_every_route_of_the_app_has_an_auth_dependency(app):
    assert {r.path for r in app.routes} == {p for _m, p in READ_ROUTES if "static" not in p} | {
        "/static/{name}", *(p for _m, p, _b in ACTION_ROUTES)}
    assert unprotected_routes(app) == []


def test_the_route_check_catches_an_unprotected_route(app):
    @app.get("/api/leak")
    def leak() -> dict[str, str]:
        return {}

    @app.post("/api/steer", dependencies=[__import__("fastapi").Depends(fleet_app.requires_view)])
    def steer() -> dict[str, str]:
        return {}

    app.mount("/files", fleet_app.FileResponse)  # any ASGI app
    assert unprotected_routes(app) == ["/api/leak", "/api/steer", "/files"]


def test_a_browser_without_a_session_gets_a_sign_in_link(auth, app):
    reply = _client(app).get("/", headers={"Accept": "text/html"})
    assert reply.status_code == 401
    assert 'href="../auth/login/"' in reply.text


# ---------------------------------------------------------------------------------------- what it shows
def test_the_fleet_json_is_the_overview_with_links_and_no_secret(auth, app):
    reply = _client(app, cookies={"_token": auth("viewer")}).get("/api/fleet")
    data = reply.json()
    assert reply.headers["cache-control"] == "no-store"
    assert data["broker"] == "redis://fleet:***@redis.internal:6379/0"
    assert (data["user"], data["can_control"], data["key_prefix"]) == ("viewer", False, "asyncq")
    (worker,) = data["workers"]
    assert (worker["worker"], worker["health"], worker["slots"], worker["running"]) == (WORKER, "ok", 4, 2)
    paths = {t["task"]: t["ti_path"] for t in data["tasks"]}
    assert paths == {"ti-plain": "/dags/etl/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00/tasks/load",
                     "ti-mapped": "/dags/etl/runs/r1/tasks/square/mapped/7"}
    (letter,) = data["dead_letters"]
    assert (letter["id"], letter["index"], letter["queue"], letter["error"]) == (
        "dead-1", 0, "high_mem", "deliveries exceeded")
    assert data["events"][0]["kind"] == "worker_lost"
    assert "s3cret-pw" not in reply.text and "eyJsecret" not in reply.text and "payload" not in reply.text


@pytest.mark.parametrize(("key", "path"), [
    (None, None), ({"callback_id": "c1"}, None),
    ({"dag_id": "d", "run_id": "r", "task_id": "t", "map_index": -1}, "/dags/d/runs/r/tasks/t"),
    ({"dag_id": "d", "run_id": "r", "task_id": "g.t", "map_index": 0}, "/dags/d/runs/r/tasks/g.t/mapped/0"),
    ({"dag_id": "a/b", "run_id": "r#1", "task_id": "t"}, "/dags/a%2Fb/runs/r%231/tasks/t"),
])
def test_task_instance_path_follows_the_ui_routes(key, path):
    assert fleet_app.task_instance_path(key) == path


def test_the_page_may_be_framed_only_by_airflow(auth, app):
    reply = _client(app, cookies={"_token": auth("viewer")}).get("/")
    assert reply.headers["content-type"].startswith("text/html")
    assert reply.headers["x-frame-options"] == "SAMEORIGIN"
    assert "frame-ancestors 'self'" in reply.headers["content-security-policy"]
    assert 'src="static/fleet.js"' in reply.text


def test_an_unknown_asset_is_not_served(auth, app):
    client = _client(app, cookies={"_token": auth("viewer")})
    assert client.get("/static/..%2Ffleet_app.py").status_code == 404
    assert client.get("/static/fleet_app.py").status_code == 404


def test_redis_down_is_a_503_naming_the_fix_and_the_next_request_retries(auth):
    calls = []

    def opener() -> fleet_app.Fleet:
        calls.append(1)
        raise BrokerUnavailable(f"fleet page: [asyncq] broker_url is {BROKER} but no Redis answered")

    client = _client(fleet_app.create_app(opener), cookies={"_token": auth("viewer")})
    for _ in range(2):
        reply = client.get("/api/fleet")
        assert reply.status_code == 503
        assert "broker_url" in reply.json()["detail"] and "s3cret-pw" not in reply.text
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------- actions
def test_maintenance_on_and_off_records_who_did_it(auth, app, fake):
    client = _client(app, cookies={"_token": auth("admin")})
    reply = client.post("/api/maintenance", json={"worker": WORKER, "on": True, "comment": "disk swap"})
    assert reply.json()["maintenance"]["by"] == "ui:admin"
    assert registry.maintenance(fake, KEYS, WORKER)["comment"] == "disk swap"
    assert client.get("/api/fleet").json()["workers"][0]["health"] == "maintenance"
    client.post("/api/maintenance", json={"worker": WORKER, "on": False})
    assert registry.maintenance(fake, KEYS, WORKER) is None


def test_maintenance_on_an_unknown_worker_is_refused(auth, app):
    reply = _client(app, cookies={"_token": auth("admin")}).post(
        "/api/maintenance", json={"worker": "nobody@nowhere", "on": True})
    assert reply.status_code == 404


def test_replay_republishes_like_the_cli_and_removes_the_dead_letter(auth, app, fake):
    fake.hset(KEYS.task("dead-1"), records.DELIVERIES, 3)
    reply = _client(app, cookies={"_token": auth("admin")}).post(
        "/api/dead-letters/replay", json={"index": 0, "id": "dead-1"})
    assert reply.json() == {"replayed": "dead-1", "queue": "high_mem"}
    (sent,) = workload_messages(fake)
    assert (sent["task_id"], sent["list"], sent["args"][1]) == ("dead-1", "high_mem", {"memory_request": 1})
    assert sent["argsrepr"] == "(<workload dead-1>)"
    assert records.DELIVERIES not in fake.hashes[KEYS.task("dead-1")]
    assert dlq.entries(fake, KEYS) == []


def test_replay_refuses_when_the_list_moved_under_the_page(auth, app, fake):
    reply = _client(app, cookies={"_token": auth("admin")}).post(
        "/api/dead-letters/replay", json={"index": 0, "id": "some-other-id"})
    assert reply.status_code == 409
    assert workload_messages(fake) == [] and len(dlq.entries(fake, KEYS)) == 1


def test_purge_needs_the_confirmation(auth, app, fake):
    client = _client(app, cookies={"_token": auth("admin")})
    assert client.post("/api/dead-letters/purge", json={}).status_code == 422
    assert client.post("/api/dead-letters/purge", json={"confirm": False}).status_code == 422
    assert client.post("/api/dead-letters/purge", json={"confirm": True}).json() == {"purged": 1}
    assert dlq.entries(fake, KEYS) == []


def test_an_action_without_a_json_body_is_refused(auth, app, fake):
    # A cross-site form can send the cookie along only with a form or text body, never JSON.
    reply = _client(app, cookies={"_token": auth("admin")}).post(
        "/api/dead-letters/purge", content="confirm=true", headers={"Content-Type": "text/plain"})
    assert reply.status_code == 422
    assert len(dlq.entries(fake, KEYS)) == 1


def test_open_pages_share_one_read_of_the_fleet_and_an_action_forgets_it(auth, app, fake, monkeypatch):
    client = _client(app, cookies={"_token": auth("admin")})
    client.get("/api/fleet")
    per_read = fake.commands.count("SMEMBERS")  # the worker set and the queue set
    assert per_read >= 1
    client.get("/api/fleet")
    assert fake.commands.count("SMEMBERS") == per_read  # one read of the fleet for both pages
    client.post("/api/maintenance", json={"worker": WORKER, "on": False})
    reads = fake.commands.count("SMEMBERS")
    client.get("/api/fleet")
    assert fake.commands.count("SMEMBERS") == reads + per_read
    monkeypatch.setattr(fleet_app, "SNAPSHOT_MAX_AGE", -1.0)
    client.get("/api/fleet")
    assert fake.commands.count("SMEMBERS") == reads + 2 * per_read


def test_the_redis_connection_is_opened_once_per_app(auth, app, opened):
    client = _client(app, cookies={"_token": auth("admin")})
    for _ in range(3):
        client.get("/api/fleet")
    client.post("/api/maintenance", json={"worker": WORKER, "on": False})
    assert len(opened) == 1


# ---------------------------------------------------------------------------------------- the plugin
def test_the_plugin_mounts_the_app_and_adds_a_menu_entry():
    plugin = fleet_page.AsyncQFleetPlugin
    (mounted,) = plugin.fastapi_apps
    assert mounted["url_prefix"] == "/asyncq" and isinstance(mounted["app"], fleet_page.LazyFleetApp)
    (view,) = plugin.external_views
    assert view["destination"] == "nav" and view["url_route"] == "asyncq_fleet"
    assert view["href"] == "/asyncq/"


@pytest.mark.parametrize(("base_url", "href"), [
    ("", "/asyncq/"), ("http://airflow.internal:8080", "/asyncq/"),
    ("https://corp.example/airflow/", "/airflow/asyncq/"), ("/airflow", "/airflow/asyncq/"),
])
def test_the_menu_entry_follows_the_base_url(base_url, href):
    assert fleet_page.menu_entry(fleet_page.base_path(base_url))["href"] == href


def test_on_load_reads_the_base_url(monkeypatch):
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://corp.example/airflow")
    monkeypatch.setattr(fleet_page.AsyncQFleetPlugin, "external_views", [])
    fleet_page.AsyncQFleetPlugin.on_load()
    assert fleet_page.AsyncQFleetPlugin.external_views[0]["href"] == "/airflow/asyncq/"


def test_the_lazy_app_builds_the_real_one_on_its_first_request(auth, monkeypatch):
    built = []
    monkeypatch.setattr(fleet_app, "create_app", lambda: built.append(1) or fleet_app.FastAPI())
    lazy = fleet_page.LazyFleetApp()
    assert built == []
    client = TestClient(lazy)
    client.get("/nothing")
    client.get("/nothing")
    assert built == [1]


def test_loading_the_plugin_imports_no_web_or_broker_stack():
    # Every process that loads plugins imports fleet_page; only the api-server builds fleet_app.
    heavy = {"fastapi", "starlette", "redis", "celery", "kombu", "pydantic"}
    assert not imported_at_import_time(f"{PACKAGE}.plugins.fleet_page") & heavy
    assert not imported_at_import_time(f"{PACKAGE}.plugins") & heavy


def test_the_plugin_is_registered_in_the_provider_info_and_as_an_entry_point():
    from importlib.metadata import entry_points

    assert get_provider_info()["plugins"] == [
        {"name": "asyncq_fleet", "plugin-class": "airflow_asyncq_provider.plugins.fleet_page.AsyncQFleetPlugin"}]
    (ep,) = [ep for ep in entry_points(group="airflow.plugins") if ep.value.startswith(PACKAGE)]
    assert ep.load() is fleet_page.AsyncQFleetPlugin
    assert ep.name == fleet_page.AsyncQFleetPlugin.name


def test_the_static_files_are_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = config[f"{PACKAGE}.plugins"]
    static = Path(fleet_app.STATIC)
    for name in ["index.html", *fleet_app.ASSETS]:
        assert (static / name).is_file(), name
        assert any(fnmatch.fnmatch(f"static/{name}", p) for p in patterns), name
