"""The fleet page on the real stack: the api-server mounts it from the installed plugin, Airflow's auth
manager guards it, and a real browser (Debian's chromium, driven by playwright) reads and steers the
fleet through it inside the Airflow UI. Writes docs/fleet-page.png.

Chromium missing is a failure, never a skip: `apt-get install -y chromium` (.ci/run does).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from airflow_asyncq_provider.broker.messages import send_workload
from airflow_asyncq_provider.state import dlq, registry
from airflow_asyncq_provider.state.keys import Keys
from devtools.stack import Stack
from tests.system.conftest import REDIS_DB, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "fleet-page.png"
SLEEPERS = "asyncq_test_sleepers"
PAGE = "/plugin/asyncq_fleet"  # the UI's iframe around /asyncq/ (the plugin's url_route)
FRAME = 'iframe[title="AsyncQ fleet"]'
TIMEOUT_MS = 60_000


# ---------------------------------------------------------------------------------------- helpers
def http(stack: Stack, method: str, path: str, *, token: str | None = None, cookie: str | None = None,
         body: Any = None) -> tuple[int, Any]:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cookie:
        headers["Cookie"] = f"_token={cookie}"
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(stack.api_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw, code = response.read(), response.status
    except urllib.error.HTTPError as exc:
        raw, code = exc.read(), exc.code
    try:
        return code, json.loads(raw)
    except ValueError:
        return code, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def fleet(stack: Stack) -> tuple[redis.Redis, Keys]:
    return (redis.Redis(db=REDIS_DB, decode_responses=True),
            Keys(stack.env["AIRFLOW__ASYNCQ__KEY_PREFIX"]))


def worker_named(client: redis.Redis, keys: Keys, prefix: str) -> str:
    names = wait_for(lambda: [n for n in registry.live_workers(client, keys) if n.startswith(f"{prefix}@")],
                     60, f"worker {prefix} to register")
    return names[0]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (the fleet page test never skips)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def sign_in(browser: Any, stack: Stack, user: str, problems: list[str]) -> Any:
    """A page signed in through the simple auth manager's login form, as a person signs in. The fleet
    page's uncaught errors and console errors (a CSP refusal among them) land in ``problems``."""
    context = browser.new_context(viewport={"width": 1440, "height": 1100})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text} at {msg.location}")
            if msg.type == "error" and "/asyncq/" in (msg.location or {}).get("url", "") else None)
    page.goto(f"{stack.api_url}/auth/login/")
    page.locator('input[name="username"]').fill(user)
    page.locator('input[name="password"]').fill(stack.password if user == "admin" else user)
    page.get_by_role("button", name="Sign in").click()
    wait_for(lambda: any(c["name"] == "_token" for c in context.cookies()), 60, f"{user}'s _token cookie")
    # The login page sets the cookie and then navigates to "/" itself; a goto before that navigation
    # finishes is interrupted by it ("Navigation ... is interrupted by another navigation").
    page.wait_for_url(lambda url: "/auth/login" not in url)
    page.wait_for_load_state("load")
    return page


# ---------------------------------------------------------------------------------------- HTTP auth
def test_the_mounted_app_checks_airflows_auth(stack: Stack, fleet: tuple[redis.Redis, Keys]) -> None:
    client, keys = fleet
    worker = worker_named(client, keys, "w-prio")
    viewer, admin = stack.token("viewer"), stack.token("admin")

    for method, path in [("GET", "/asyncq/"), ("GET", "/asyncq/static/fleet.js"), ("GET", "/asyncq/api/fleet"),
                         ("POST", "/asyncq/api/maintenance")]:
        code, _ = http(stack, method, path, body={"worker": worker, "on": True} if method == "POST" else None)
        assert code in (401, 403), (method, path, code)

    for path in ("/asyncq/", "/asyncq/static/fleet.js", "/asyncq/static/fleet.css", "/asyncq/api/fleet"):
        assert http(stack, "GET", path, token=viewer)[0] == 200, path
    code, data = http(stack, "GET", "/asyncq/api/fleet", cookie=viewer)  # the UI's cookie works the same
    assert code == 200 and data["user"] == "viewer" and data["can_control"] is False
    assert {w["worker"].split("@")[0] for w in data["workers"]} >= {"w-default", "w-highmem", "w-prio"}
    assert data["broker"] == f"redis://127.0.0.1:6379/{REDIS_DB}"

    code, data = http(stack, "POST", "/asyncq/api/maintenance", token=viewer,
                      body={"worker": worker, "on": True, "comment": "viewer tries"})
    assert code == 403, data
    assert registry.maintenance(client, keys, worker) is None

    code, data = http(stack, "POST", "/asyncq/api/maintenance", token=admin, body={"worker": worker, "on": False})
    assert code == 200, data
    code, data = http(stack, "POST", "/asyncq/api/dead-letters/replay", token=admin, body={"index": 0, "id": "none"})
    assert code == 409, data  # past the auth check; there is no such dead letter

    # The api-server lists the plugin with its menu entry.
    plugins = stack.api("GET", "/api/v2/plugins")["plugins"]
    (plugin,) = [p for p in plugins if p["name"] == "asyncq_fleet"]
    assert plugin["fastapi_apps"][0]["url_prefix"] == "/asyncq"
    assert plugin["external_views"][0]["url_route"] == "asyncq_fleet"


# ---------------------------------------------------------------------------------------- the browser
def test_the_page_shows_and_steers_the_fleet_in_chromium(stack: Stack, fleet: tuple[redis.Redis, Keys],
                                                         browser: Any) -> None:
    client, keys = fleet
    prio = worker_named(client, keys, "w-prio")
    highmem = worker_named(client, keys, "w-highmem")
    stack.wait_dag(SLEEPERS)
    release = stack.home / f"release-{uuid.uuid4().hex[:8]}"  # the sleepers end once it exists
    run_id = stack.trigger(SLEEPERS, conf={"n": 2, "s": 45, "until": str(release)})
    wait_for(lambda: sum(1 for t in http(stack, "GET", "/asyncq/api/fleet", token=stack.token("viewer"))[1]["tasks"]
                         if (t.get("key") or {}).get("dag_id") == SLEEPERS) == 2,
             180, "both sleepers to run on a worker", stack, every=1)
    # A real dead letter: a malformed message that w-highmem refuses.
    probe = f"fleet-page-probe-{uuid.uuid4().hex[:8]}"
    send_workload(client, task_id=probe, payload='{"type": "FleetPageProbe"}', meta=None, queue="high_mem")
    wait_for(lambda: [r for r in dlq.entries(client, keys) if r.get("id") == probe], 60,
             "w-highmem to dead-letter the probe", stack)

    problems: list[str] = []
    page = sign_in(browser, stack, "admin", problems)
    try:
        page.goto(stack.api_url + PAGE)
        frame = page.frame_locator(FRAME)
        # a worker's row and a running task, with a link to its task instance in the Airflow UI
        frame.locator(f'tr[data-worker="{prio}"]').wait_for()
        link = frame.locator(f'#tasks a[href*="/dags/{SLEEPERS}/runs/"]').first
        link.wait_for()
        assert re.search(r"/tasks/sleeper/mapped/[01]$", link.get_attribute("href") or "")
        row = frame.locator(f'tr[data-worker="{prio}"]')
        assert "ok" in row.inner_text() and "prio" in row.inner_text()

        # maintenance on, with a comment, through the page's confirmation dialog
        row.locator('button[data-action="maintenance-on"]').click()
        frame.locator("#confirm-comment").fill("swapping a disk")
        frame.locator("#confirm-ok").click()
        record = wait_for(lambda: registry.maintenance(client, keys, prio), 30, "maintenance on in Redis")
        assert record["comment"] == "swapping a disk" and record["by"] == "ui:admin"
        row.locator('button[data-action="maintenance-off"]').wait_for()
        assert "swapping a disk" in row.inner_text()

        # replay the dead letter (behind a confirmation): w-highmem refuses it again, for real
        letter = frame.locator(f'tr[data-dead-letter="{probe}"]')
        letter.locator('button[data-action="replay"]').click()
        frame.locator("#confirm-ok").click()
        frame.locator("#notice", has_text=f"replayed {probe} to queue high_mem").wait_for()
        wait_for(lambda: len([r for r in dlq.entries(client, keys) if r.get("id") == probe]) == 1
                 and frame.locator(f'tr[data-dead-letter="{probe}"]').count() == 1
                 and "dead letter" in frame.locator("#events").inner_text(), 60,
                 "the replayed probe to be dead-lettered again", stack)
        frame.locator(f'tr[data-task] a[href*="/dags/{SLEEPERS}/"]').first.wait_for()

        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.wait_for_timeout(500)
        page.screenshot(path=str(SCREENSHOT))

        # maintenance off
        row.locator('button[data-action="maintenance-off"]').click()
        wait_for(lambda: registry.maintenance(client, keys, prio) is None, 30, "maintenance off in Redis")
        row.locator('button[data-action="maintenance-on"]').wait_for()

        # purge, behind a confirmation; cancelling keeps everything
        frame.locator("#purge").click()
        frame.locator("#confirm-cancel").click()
        assert dlq.entries(client, keys)
        frame.locator("#purge").click()
        frame.locator("#confirm-ok").click()
        wait_for(lambda: dlq.entries(client, keys) == [], 30, "the purge to empty the dead-letter list")

        # a task link opens the task instance in the Airflow UI around the iframe
        frame.locator(f'#tasks a[href*="/dags/{SLEEPERS}/runs/"]').first.click()
        page.wait_for_url(re.compile(rf"/dags/{SLEEPERS}/runs/[^/]+/tasks/sleeper/mapped/[01]$"))
        page.get_by_text("sleeper").first.wait_for()
    finally:
        registry.set_maintenance(client, keys, prio, False)
        page.context.close()
    assert SCREENSHOT.stat().st_size > 10_000

    # a viewer reads the same page, opened directly, and is offered no action
    page = sign_in(browser, stack, "viewer", problems)
    try:
        page.goto(f"{stack.api_url}/asyncq/")
        page.locator(f'tr[data-worker="{highmem}"]').wait_for()
        page.locator("#who", has_text="signed in as viewer (read only)").wait_for()
        assert page.locator("button[data-action]").count() == 0
        assert page.locator("#purge").is_hidden()
    finally:
        page.context.close()
    assert problems == []
    release.touch()  # the page has shown and linked the running sleepers: they may end now
    assert stack.wait_run(SLEEPERS, run_id, timeout=240) == "success"
