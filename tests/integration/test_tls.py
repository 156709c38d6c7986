"""Redis over TLS with an ACL user and a client certificate: a real redis-server started with
``--tls-port``, certificates made by openssl for this test. The state client, the worker (Celery's
transport and our registry) and ``airflow asyncq status`` all work over it; a wrong CA gets an error
that names the setting. Missing redis-server or openssl fails; nothing is skipped."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from airflow_asyncq_provider.errors import BrokerUnavailable
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import registry
from airflow_asyncq_provider.state.client import make_redis, ping_or_raise
from airflow_asyncq_provider.state.keys import Keys
from tests.integration._support import WorkerProcess, airflow_env, run_airflow, wait_for

pytestmark = [pytest.mark.integration]
USER, PASSWORD = "asyncq-tls", "tls-s3cret-pw"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA, plus a
    second CA that signed nothing of this server's."""
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN=asyncq-test-{ca}", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN=asyncq-test-{who}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.crt", "-days", "2", *ext, cwd=d)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    for tool in ("redis-server", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; it is needed for the TLS tests")
    d = tmp_path_factory.mktemp("tls")
    make_certs(d)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(d), "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "yes",
         "--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"],
        cwd=d, stdout=open(d / "redis.log", "wb"), stderr=subprocess.STDOUT)
    url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0"
    good = AsyncQSettings(broker_url=url, key_prefix=f"tls-{uuid.uuid4().hex[:6]}", ssl_ca_certs=str(d / "ca.crt"),
                          ssl_certfile=str(d / "client.crt"), ssl_keyfile=str(d / "client.key"))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                make_redis(good, timeout=1).ping()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError((d / "redis.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        yield SimpleNamespace(dir=d, url=url, port=port, settings=good)
    finally:
        proc.kill()
        proc.wait(10)


def test_state_client_over_tls_with_acl_user_and_client_certificate(tls_redis: SimpleNamespace) -> None:
    client = make_redis(tls_redis.settings)
    ping_or_raise(client, tls_redis.settings, "test")
    client.set("tls-probe", "ok", ex=30)
    assert client.get("tls-probe") == "ok"
    assert client.acl_whoami() == USER


def test_a_wrong_ca_gets_an_error_that_names_the_setting(tls_redis: SimpleNamespace) -> None:
    wrong = AsyncQSettings(broker_url=tls_redis.url, ssl_ca_certs=str(tls_redis.dir / "other-ca.crt"),
                           ssl_certfile=str(tls_redis.dir / "client.crt"),
                           ssl_keyfile=str(tls_redis.dir / "client.key"), publish_timeout=3)
    with pytest.raises(BrokerUnavailable) as info:
        ping_or_raise(make_redis(wrong), wrong, "test")
    message = str(info.value)
    assert "TLS handshake" in message and "ssl_ca_certs" in message
    assert PASSWORD not in message


def test_worker_and_status_over_tls(tls_redis: SimpleNamespace, tmp_path: Path) -> None:
    from celery.utils.nodenames import host_format

    s = tls_redis.settings
    env = airflow_env(tmp_path, broker_url=s.broker_url, key_prefix=s.key_prefix, ssl_ca_certs=s.ssl_ca_certs,
                      ssl_certfile=s.ssl_certfile, ssl_keyfile=s.ssl_keyfile, worker_heartbeat_interval="1")
    node = f"tls-{uuid.uuid4().hex[:6]}@%h"
    worker = WorkerProcess(["-q", "tlsq", "-c", "1", "--hostname", node, "--skip-serve-logs"], env,
                           tmp_path / "worker.log")
    hostname = host_format(node)
    try:
        wait_for(lambda: not worker.alive() or " ready." in worker.output(), 90,
                 lambda: f"the worker to be ready over TLS\n{worker.output()[-3000:]}")
        assert worker.alive(), worker.output()[-3000:]
        client = make_redis(s)
        # consumer_tick_at moves only while Celery's consumer polls Redis: proof the transport speaks TLS
        wait_for(lambda: float(registry.live_workers(client, Keys(s.key_prefix)).get(hostname, {})
                               .get("consumer_tick_at") or 0) > 0, 30, "a consumer tick in the registry")
        status = run_airflow(["asyncq", "status", "--json"], env)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        (row,) = [w for w in report["workers"] if w["worker"] == hostname]
        assert row["health"] == "ok"
        assert PASSWORD not in status.stdout + status.stderr and "***" in report["broker"]
        assert PASSWORD not in worker.output()
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]


def test_status_with_a_wrong_ca_exits_3_and_names_the_setting(tls_redis: SimpleNamespace, tmp_path: Path) -> None:
    env = airflow_env(tmp_path, broker_url=tls_redis.url, ssl_ca_certs=str(tls_redis.dir / "other-ca.crt"),
                      ssl_certfile=str(tls_redis.dir / "client.crt"), ssl_keyfile=str(tls_redis.dir / "client.key"),
                      publish_timeout="3")
    result = run_airflow(["asyncq", "status"], env)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "ssl_ca_certs" in result.stderr and PASSWORD not in result.stdout + result.stderr
