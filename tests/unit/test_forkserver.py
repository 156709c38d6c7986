"""forkserver: how a child's exit is encoded and described, for every branch."""

from __future__ import annotations

import os
import signal

import pytest

from airflow_asyncq_provider.worker.forkserver import (
    EXIT_CRASHED,
    EXIT_DUPLICATE,
    EXIT_SIGNAL_BASE,
    describe_exit,
    encode_supervisor_return,
)


@pytest.mark.parametrize(("returned", "encoded"), [
    (0, 0), (1, 1), (63, 63),
    (64, 63), (200, 63), (201, 63), (255, 63), (10**6, 63),  # clamped below the signal range
    (-9, EXIT_SIGNAL_BASE + 9), (-15, EXIT_SIGNAL_BASE + 15), (-63, EXIT_SIGNAL_BASE + 63),
    (-64, EXIT_SIGNAL_BASE + 63), (-(10**6), EXIT_SIGNAL_BASE + 63),  # clamped to a valid exit status
])
def test_encode_supervisor_return(returned, encoded):
    assert encode_supervisor_return(returned) == encoded


def test_encoded_codes_never_collide_with_the_reserved_ones():
    for returned in range(-300, 300):
        code = encode_supervisor_return(returned)
        assert 0 <= code <= 127, returned  # a valid exit status, below the reserved codes
        assert code not in (EXIT_DUPLICATE, EXIT_CRASHED)


def test_describe_success():
    assert describe_exit(0, None, None) == (True, "exit code 0")
    assert describe_exit(0, None, {}) == (True, "exit code 0")
    assert describe_exit(0, None, {"duplicate": True}) == (True, "exit code 0")


def test_describe_reported_error_wins():
    ok, reason = describe_exit(EXIT_CRASHED, None, {"error": "RuntimeError: boom"})
    assert (ok, reason) == (False, "supervisor crashed: RuntimeError: boom")
    # ...even over a signal or a zero code: the child said what went wrong.
    assert describe_exit(0, None, {"error": "x"}) == (False, "supervisor crashed: x")
    assert describe_exit(None, 9, {"error": "x"}) == (False, "supervisor crashed: x")


def test_describe_supervisor_killed_by_signal():
    assert describe_exit(None, signal.SIGKILL, None) == (False, "supervisor killed by signal SIGKILL (9)")
    assert describe_exit(None, 99, None) == (False, "supervisor killed by signal 99")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_describe_task_killed_by_signal(sig):
    ok, reason = describe_exit(encode_supervisor_return(-sig), None, None)
    assert not ok
    assert reason == f"task process killed by signal {signal.Signals(sig).name} ({int(sig)})"


def test_describe_task_killed_by_an_unnamed_signal():
    assert describe_exit(EXIT_SIGNAL_BASE + 63, None, None) == (False, "task process killed by signal 63")
    assert describe_exit(EXIT_DUPLICATE - 1, None, None)[1] == (
        f"task process killed by signal {EXIT_DUPLICATE - 1 - EXIT_SIGNAL_BASE}")


def test_describe_crash_without_error():
    assert describe_exit(EXIT_CRASHED, None, None) == (False, "supervisor crashed (no error reported)")
    assert describe_exit(EXIT_CRASHED, None, {"error": ""}) == (
        False, "supervisor crashed (no error reported)")


@pytest.mark.parametrize("code", [1, 63, EXIT_SIGNAL_BASE, EXIT_DUPLICATE, 255, None])
def test_describe_plain_exit_codes(code):
    assert describe_exit(code, None, None) == (False, f"task process exited with code {code}")



def test_forked_server_handle_reports_exit_and_kills() -> None:
    """ForkedServer stands in for Popen when the worker forks the fork server itself."""
    import subprocess as sp

    from airflow_asyncq_provider.worker.forkclient import ForkedServer

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    handle = ForkedServer(pid, w)
    os.close(r)
    assert handle.wait(10) == 3 and handle.poll() == 3
    handle.stdin.close()

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.read(r, 1)  # blocks until killed
        os._exit(0)
    handle = ForkedServer(pid, w)
    os.close(r)
    assert handle.poll() is None
    with pytest.raises(sp.TimeoutExpired):
        handle.wait(0.2)
    handle.kill()
    assert handle.poll() == -9
    handle.stdin.close()


def test_fork_server_pre_builds_the_api_ssl_context() -> None:
    from airflow.sdk.api import client

    from airflow_asyncq_provider.worker.compat import warm_shared_caches

    assert warm_shared_caches() is True
    # what every forked supervisor's Client() will ask for is now the one object built here
    built = client.Client._get_ssl_context_cached(client.API_SSL_CA_FILE_PATH, client.API_SSL_CERT_PATH)
    assert built is client.Client._get_ssl_context_cached(client.API_SSL_CA_FILE_PATH, client.API_SSL_CERT_PATH)


def test_fork_server_loads_the_listener_manager_once_for_every_fork() -> None:
    from airflow.sdk.listener import get_listener_manager

    from airflow_asyncq_provider.worker.compat import warm_listener_manager

    get_listener_manager.cache_clear()
    assert warm_listener_manager() is True
    built = get_listener_manager()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked task process finds the parent's manager and loads no plugin again
        os.close(r)
        os.write(w, b"1" if get_listener_manager() is built and get_listener_manager.cache_info().misses == 1
                 else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(r)
