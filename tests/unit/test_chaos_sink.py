"""bench/chaos/sink.py, the chaos run's side-effect server, against the DAG's own sender.

The server runs on 127.0.0.1 with a file in tmp_path. The sender is the one the task processes run,
``send_line`` in bench/chaos/dags/asyncq_chaos.py, loaded from its file as the DAG folder loads it.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from bench.chaos.sink import MAX_LINE, SideEffectServer, problem

DAG_FILE = Path(__file__).resolve().parents[2] / "bench" / "chaos" / "dags" / "asyncq_chaos.py"


@pytest.fixture(scope="module")
def dag() -> ModuleType:
    spec = importlib.util.spec_from_file_location("asyncq_chaos_under_test", DAG_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def effects(tmp_path: Path) -> Path:
    return tmp_path / "side_effects.log"


@pytest.fixture
def logged() -> list[str]:
    return []


@pytest.fixture
def server(effects: Path, logged: list[str]) -> Iterator[SideEffectServer]:
    sink = SideEffectServer(effects, "127.0.0.1", read_timeout=0.5, log=logged.append)
    sink.start()
    yield sink
    sink.stop()


def line(i: int, tag: str = "done") -> str:
    return f"{tag} asyncq_chaos work {i} 1 chaos_000 aqc001h1 h1 {1_700_000_000 + i:.3f}\n"


def exchange(sink: SideEffectServer, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(sink.address, timeout=timeout) as sock:
        sock.sendall(data)
        return sock.recv(64)


def test_lines_from_many_threads_are_each_written_once_and_whole(dag: ModuleType, server: SideEffectServer,
                                                                  effects: Path) -> None:
    sent = [line(i, tag) for i in range(40) for tag in ("start", "done")]
    errors: list[BaseException] = []

    def send(chunk: list[str]) -> None:
        for text in chunk:
            try:
                dag.send_line(server.url, text)  # returns only on ok
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=send, args=(sent[k::8],)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    written = effects.read_text().splitlines(keepends=True)
    assert sorted(written) == sorted(sent)
    assert server.stats()["written"] == len(sent)


@pytest.mark.parametrize("data", [
    b"hello\n",
    b"done asyncq_chaos work x 1 chaos_000 aqc001h1 h1 1.0\n",  # map_index is not a number
    b"done asyncq_chaos work 1 1 chaos_000 aqc001h1 h1 1.0\nstart asyncq_chaos work 1 1 r h h 1.0\n",
    b"done asyncq_chaos \xff\xfe 1 1 chaos_000 aqc001h1 h1 1.0\n",
    b"done asyncq_chaos work 1 1 chaos_000 aqc001h1 h1 " + b"9" * MAX_LINE + b"\n",
], ids=["garbage", "not-a-number", "two-lines", "not-utf8", "oversized"])
def test_a_line_of_the_wrong_shape_gets_error_and_is_not_written(server: SideEffectServer, effects: Path,
                                                                  logged: list[str], data: bytes) -> None:
    assert exchange(server, data) == b"error\n"
    assert exchange(server, line(1).encode()) == b"ok\n"  # and the server goes on
    assert effects.read_text() == line(1)
    assert server.stats()["rejected"] == 1
    assert any("rejected" in message for message in logged)


def test_the_sender_raises_on_an_error_answer(dag: ModuleType, server: SideEffectServer) -> None:
    with pytest.raises(dag.SideEffectFailed, match="not ok"):
        dag.send_line(server.url, "garbage\n")


def test_a_silent_client_is_dropped_after_the_timeout_without_blocking_others(
        dag: ModuleType, server: SideEffectServer, effects: Path) -> None:
    with socket.create_connection(server.address, timeout=5) as silent:
        began = time.monotonic()
        dag.send_line(server.url, line(2))  # served while the silent one waits
        assert time.monotonic() - began < 0.5
        assert silent.recv(64) == b""  # closed by the server, with no answer
        assert time.monotonic() - began < 4
    assert effects.read_text() == line(2)
    assert server.stats()["timed_out"] == 1


def test_beyond_max_clients_a_connection_gets_error(effects: Path) -> None:
    sink = SideEffectServer(effects, "127.0.0.1", read_timeout=2, max_clients=1, log=lambda _m: None)
    sink.start()
    try:
        with socket.create_connection(sink.address, timeout=5):
            time.sleep(0.3)  # the silent one holds the only slot
            assert exchange(sink, line(3).encode()) == b"error\n"
        assert sink.stats()["busy"] == 1
        assert not effects.read_text()
    finally:
        sink.stop()


def test_a_stopped_server_refuses_and_stop_may_run_twice(dag: ModuleType, effects: Path) -> None:
    sink = SideEffectServer(effects, "127.0.0.1", log=lambda _m: None)
    sink.start()
    url = sink.url
    sink.stop()
    sink.stop()
    with pytest.raises(dag.SideEffectFailed, match="ConnectionRefusedError"):
        dag.send_line(url, line(4), timeout=2)


def test_the_sender_raises_on_a_refused_connection(dag: ModuleType) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: a connect is refused
        began = time.monotonic()
        with pytest.raises(dag.SideEffectFailed, match="ConnectionRefusedError"):
            dag.send_line(f"tcp://127.0.0.1:{port}", line(5), timeout=2)
        assert time.monotonic() - began < 1.5


def test_the_sender_raises_on_a_server_that_never_answers(dag: ModuleType) -> None:
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()  # the kernel completes the handshake; nobody reads or answers
        began = time.monotonic()
        with pytest.raises(dag.SideEffectFailed, match="did not answer within 0.3 s"):
            dag.send_line(f"tcp://127.0.0.1:{mute.getsockname()[1]}", line(6), timeout=0.3)
        assert time.monotonic() - began < 2


def test_the_sender_wants_a_tcp_url(dag: ModuleType) -> None:
    with pytest.raises(ValueError, match="tcp://host:port"):
        dag.send_line("tcp://127.0.0.1", line(7))


def test_problem_accepts_exactly_the_lines_account_reads() -> None:
    assert problem(line(8).encode()) is None
    assert problem(line(8).rstrip("\n").encode()) == "not one whole line"
    assert problem(b"done a b 1 1 r h\x07 w 1.0\n") == "control characters"
    assert problem(b"other asyncq_chaos work 1 1 r h w 1.0\n") is not None
    assert problem(b"done asyncq_chaos work 1 1 r h 1.0\n") is not None  # 8 fields: an empty worker name
