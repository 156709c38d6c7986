"""redaction and broker URL validation: masking never lets the secret through; validation names the source."""

from __future__ import annotations

import pytest

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.redaction import mask_url
from airflow_asyncq_provider.settings import validate_broker_url

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


def test_mask_all_also_masks_what_airflow_knows_is_secret():
    """A connection password the user registered with Airflow's masker is masked in our log lines too."""
    import logging

    from airflow.sdk._shared.secrets_masker import mask_secret

    from airflow_asyncq_provider.redaction import SecretsFilter, mask_all

    mask_secret("conn-pw-8f3a1c")
    assert mask_all("login failed with conn-pw-8f3a1c for redis://u:pw@h/0") == \
        "login failed with *** for redis://u:***@h/0"
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "pw %s", ("conn-pw-8f3a1c",), None)
    SecretsFilter().filter(record)
    assert "conn-pw-8f3a1c" not in record.getMessage()


@pytest.mark.parametrize(("url", "masked"), [
    (f"sentinel://:{SECRET}@s1:26379;sentinel://:{SECRET}@s2:26379/0",
     "sentinel://:***@s1:26379;sentinel://:***@s2:26379/0"),
    (f"sentinel://airflow:{SECRET}@s1:26379/2;sentinel://s2:26380;sentinel://s3",
     "sentinel://airflow:***@s1:26379/2;sentinel://s2:26380;sentinel://s3"),
    # a password only on a later part, and one holding an "@": each part is masked on its own
    (f"sentinel://s1:26379;sentinel://u:my@{SECRET}@s2:26379", "sentinel://s1:26379;sentinel://u:***@s2:26379"),
    (f"sentinel://{SECRET}@s1;sentinel://{SECRET}@s2", "sentinel://***@s1;sentinel://***@s2"),
])
def test_mask_url_masks_every_part_of_a_sentinel_url(url, masked):
    assert mask_url(url) == masked
    assert SECRET not in mask_url(url)


def test_a_sentinel_url_inside_a_message_is_masked_and_the_rest_kept():
    text = f"broker sentinel://:{SECRET}@s1:26379;sentinel://:{SECRET}@s2:26379/0 down; retrying in 1 s"
    assert mask_url(text) == "broker sentinel://:***@s1:26379;sentinel://:***@s2:26379/0 down; retrying in 1 s"


def test_sentinel_validation_errors_never_contain_a_password():
    for url in (f"sentinel://:{SECRET}@s1;redis://:{SECRET}@h", f"sentinel://:{SECRET}@s1:port",
                f"sentinel://:{SECRET}@s1;sentinel://:other{SECRET}@s2", f"sentinel://:{SECRET}@s1/x"):
        with pytest.raises(ConfigError) as err:
            validate_broker_url(url, "[asyncq] broker_url")
        assert SECRET not in str(err.value), str(err.value)


def test_a_sentinel_url_password_never_reaches_a_log_line():
    import logging

    from airflow_asyncq_provider.redaction import SecretsFilter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "broker %s", (
        f"sentinel://u:{SECRET}@s1:26379;sentinel://u:{SECRET}@s2:26379/0",), None)
    SecretsFilter().filter(record)
    assert SECRET not in record.getMessage()
