"""state.urls: masking never lets the secret through; validation names the source."""

from __future__ import annotations

import pytest

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.state.urls import mask_url, validate_broker_url

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(("url", "masked"), [
    (f"redis://user:{SECRET}@redis.internal:6379/0", "redis://user:***@redis.internal:6379/0"),
    (f"redis://:{SECRET}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    (f"redis://{SECRET}@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    (f"rediss://airflow:{SECRET}@redis.internal:6380/1", "rediss://airflow:***@redis.internal:6380/1"),
    (f"redis+socket://:{SECRET}@/var/run/redis.sock", "redis+socket://:***@/var/run/redis.sock"),
])
def test_mask_url_hides_the_password(url, masked):
    assert mask_url(url) == masked
    assert SECRET not in mask_url(url)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://redis.internal:6380/0",
                                 "redis+socket:///var/run/redis.sock", "", "not a url"])
def test_mask_url_leaves_urls_without_credentials_alone(url):
    assert mask_url(url) == url


def test_mask_url_keeps_the_user_name():
    # The user is what an operator needs to find the ACL; only the password is secret.
    assert mask_url(f"redis://airflow:{SECRET}@h/0").startswith("redis://airflow:***@")


def test_mask_url_finds_a_url_only_at_the_start():
    # ping_or_raise masks exception text too; plain text with an @ in it is not a URL.
    assert mask_url("Error 111 connecting to 127.0.0.1:1. Connection refused.") == (
        "Error 111 connecting to 127.0.0.1:1. Connection refused.")


def test_mask_url_password_containing_at_sign():
    url = "redis://user:my@pass@redis.internal:6379/0"
    from redis.connection import parse_url

    assert parse_url(url)["password"] == "my@pass"  # redis-py accepts and uses this URL
    assert "pass" not in mask_url(url)


def test_mask_url_password_in_query_string():
    url = f"redis://127.0.0.1:6379/0?password={SECRET}"
    from redis.connection import parse_url

    assert parse_url(url)["password"] == SECRET
    assert SECRET not in mask_url(url)


def test_validation_error_never_contains_a_password_with_a_slash():
    with pytest.raises(ConfigError) as err:
        validate_broker_url("redis://:pa/ss@redis.internal:6379/0", "[asyncq] broker_url")
    assert "pa/ss" not in str(err.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://u:p@h:6380/0"])
def test_validate_accepts_supported_schemes(url):
    assert validate_broker_url(url, "src") == url


@pytest.mark.parametrize(("url", "fragment"), [
    ("", "src is empty"),
    ("amqp://guest@rabbit//", "scheme 'amqp' is not supported"),
    ("http://h:6379/0", "scheme 'http' is not supported"),
    ("localhost:6379", "scheme '(none)' is not supported"),
    ("redis://h:port/0", "src (redis://…) is not a valid URL"),
    ("redis://:6379/0", "names no host"),
])
def test_validate_refuses_with_the_source_named(url, fragment):
    with pytest.raises(ConfigError) as err:
        validate_broker_url(url, "src")
    assert str(err.value).startswith("src ")
    assert fragment in str(err.value)


def test_validate_error_masks_the_password():
    with pytest.raises(ConfigError) as err:
        validate_broker_url(f"amqp://guest:{SECRET}@rabbit//", "src")
    assert SECRET not in str(err.value)
    assert "amqp://guest:***@rabbit//" in str(err.value)
