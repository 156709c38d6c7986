"""``airflow asyncq worker`` / ``status`` misuse: a one-line message and the documented exit code."""

from __future__ import annotations

import pytest

from ._support import REDIS_URL, airflow_env, run_airflow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = "Sup3r-S3cret-pw"


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_bad_queue_name_exits_2_naming_the_queue(tmp_path, key_prefix):
    result = run_airflow(["asyncq", "worker", "-q", "bad queue", "--skip-serve-logs"],
                         airflow_env(tmp_path, broker_url=REDIS_URL, key_prefix=key_prefix))
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result.stderr)
    assert line.startswith("error: airflow asyncq worker -q: queue name 'bad queue'")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "fragment"), [
    (["-c", "0"], "airflow asyncq worker -c must be a positive integer, got '0'"),
    (["-q", "a,,b"], "queue name ''"),
])
def test_other_bad_arguments_exit_2(tmp_path, key_prefix, args, fragment):
    result = run_airflow(["asyncq", "worker", *args, "--skip-serve-logs"],
                         airflow_env(tmp_path, broker_url=REDIS_URL, key_prefix=key_prefix))
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result.stderr)
    assert fragment in line


def test_bad_setting_exits_2_naming_it(tmp_path):
    result = run_airflow(["asyncq", "worker", "--skip-serve-logs"],
                         airflow_env(tmp_path, broker_url=f"amqp://guest:{SECRET}@rabbit//"))
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result.stderr)
    assert line.startswith("error: [asyncq] broker_url is 'amqp://guest:***@rabbit//'")
    assert SECRET not in result.stderr + result.stdout


def test_unreachable_broker_exits_3_with_one_masked_line(tmp_path):
    url = f"redis://asyncq:{SECRET}@127.0.0.1:1/0"
    result = run_airflow(["asyncq", "worker", "-q", "q1", "--skip-serve-logs"],
                         airflow_env(tmp_path, broker_url=url, publish_timeout="1"))
    assert result.returncode == 3, result.stderr
    (line,) = _error_lines(result.stderr)
    assert line.startswith("error: airflow asyncq worker: [asyncq] broker_url is "
                           "redis://asyncq:***@127.0.0.1:1/0 but no Redis answered there")
    assert "AIRFLOW__ASYNCQ__BROKER_URL" in line
    assert SECRET not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_status_with_unreachable_broker_exits_3(tmp_path):
    url = f"redis://:{SECRET}@127.0.0.1:1/0"
    result = run_airflow(["asyncq", "status"], airflow_env(tmp_path, broker_url=url, publish_timeout="1"))
    assert result.returncode == 3, result.stderr
    (line,) = _error_lines(result.stderr)
    assert "redis://:***@127.0.0.1:1/0" in line
    assert SECRET not in result.stderr + result.stdout


def test_status_without_workers(tmp_path, key_prefix):
    result = run_airflow(["asyncq", "status"], airflow_env(tmp_path, broker_url=REDIS_URL,
                                                           key_prefix=key_prefix))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"broker: {REDIS_URL}", "no live workers"]
