"""worker.command: argument parsing and the documented exit codes."""

from __future__ import annotations

import pytest

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.worker import command
from airflow_asyncq_provider.worker.command import parse_concurrency, parse_queues


def test_exit_codes_are_the_documented_ones():
    from airflow_asyncq_provider import exitcodes

    assert (exitcodes.OK, exitcodes.CONFIG, exitcodes.BROKER, exitcodes.FORKSERVER, exitcodes.DRAIN_TIMEOUT,
            exitcodes.FORCED) == (0, 2, 3, 4, 5, 6)
    for code in ("0", "2", "3", "4", "5", "6"):
        assert f"  {code}  " in command.__doc__


def test_parse_queues_defaults():
    assert parse_queues(None, "dq") == ["dq"]


@pytest.mark.parametrize(("raw", "expected"), [
    ("a", ["a"]), ("a,b", ["a", "b"]), (" a , b ", ["a", "b"]), ("high_mem", ["high_mem"]),
])
def test_parse_queues_splits_and_strips(raw, expected):
    assert parse_queues(raw, "dq") == expected


@pytest.mark.parametrize("raw", ["", "bad queue", "a,,b", "a,", ",a", "a, b c"])
def test_parse_queues_refuses(raw):
    with pytest.raises(ConfigError) as err:
        parse_queues(raw, "dq")
    assert str(err.value).startswith("airflow asyncq worker -q: queue name ")


def test_parse_queues_error_names_the_bad_queue():
    with pytest.raises(ConfigError, match="'bad queue'"):
        parse_queues("good,bad queue", "dq")


@pytest.mark.parametrize(("raw", "expected"), [(None, 8), ("1", 1), (" 16 ", 16), (4, 4)])
def test_parse_concurrency_accepts(raw, expected):
    assert parse_concurrency(raw, 8) == expected


@pytest.mark.parametrize("raw", ["0", "-2", "many", "1.5", "", []])
def test_parse_concurrency_refuses(raw):
    with pytest.raises(ConfigError) as err:
        parse_concurrency(raw, 8)
    assert str(err.value) == f"airflow asyncq worker -c must be a positive integer, got {raw!r}"


# ------------------------------------------------------------------------------------ secrets in logs
JWT = "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJ4IiwiZXhwIjoxfQ.c2lnbmF0dXJlLXNlY3JldA"


def _filtered(msg: str, *args: object) -> str:
    import logging

    from airflow_asyncq_provider.redaction import SecretsFilter

    record = logging.LogRecord("t", logging.INFO, __file__, 1, msg, args or None, None)
    assert SecretsFilter().filter(record) is True  # it cleans, it never drops a line
    return record.getMessage()


@pytest.mark.parametrize(("msg", "args", "expected"), [
    ("broker redis://airflow:s3cret@h:6379/0 is down", (), "broker redis://airflow:***@h:6379/0 is down"),
    ("broker %s", ("rediss://:s3cret@h/0",), "broker rediss://:***@h/0"),
    (f"workload token {JWT} expired", (), "workload token <token> expired"),
    ("payload %s", (f'{{"token": "{JWT}"}}',), 'payload {"token": "<token>"}'),
    ("nothing to hide at 5%", (), "nothing to hide at 5%"),
])
def test_secrets_filter_masks_passwords_and_tokens(msg, args, expected):
    assert _filtered(msg, *args) == expected


def test_secrets_filter_password_with_at_sign():
    assert "ss" not in _filtered("broker redis://u:p@ss@h:6379/0 is down").replace("is down", "")
