"""Secret masking: broker passwords, Execution API tokens and the user's registered secrets.

Every text that leaves a process (log lines, CLI output, dead-letter payloads, error messages) goes
through here. It sits at the bottom layer, so settings, state, the worker and the CLI can all use it.
"""

from __future__ import annotations

import logging
import re

# userinfo is greedy up to the *last* "@" of the token, as redis-py splits it: "u:my@pass@host"
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^\s'\"<>]*)@(?=[^\s'\"<>@]*)")
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&]password=)[^&\s'\"<>]*", re.IGNORECASE)
# kombu's Sentinel URL joins one URL per sentinel with ";" (sentinel://:pw@h1:26379;sentinel://:pw@h2:26379);
# each part is masked on its own, or the greedy userinfo above would swallow the hosts up to the last "@".
_URL_JOIN = re.compile(r";(?=[a-zA-Z][a-zA-Z0-9+.-]*://)")
_JWT = re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+")
_TOKEN_FIELD = re.compile(r'("token"\s*:\s*")[^"]*(")')


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, _password = match.group("userinfo").partition(":")
    return f"{match.group('scheme')}{f'{user}:***' if sep else '***'}@"


def mask_secrets(text: str) -> str:
    """Mask the password of every URL anywhere in ``text``, in userinfo and in ``?password=``, and in
    every ``;``-separated part of a Sentinel URL."""
    if "://" not in text:
        return text
    return ";".join(_QUERY_PASSWORD.sub(r"\g<key>***", _URL_USERINFO.sub(_mask_userinfo, part))
                    for part in _URL_JOIN.split(text))


def mask_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``; a bare password is masked too."""
    return mask_secrets(url)


def mask_payload(payload: str) -> str:
    """A workload's JSON with its ``token`` value replaced, for ``dlq show`` and the fleet page."""
    return _TOKEN_FIELD.sub(r"\1***\2", payload)


def mask_all(text: str) -> str:
    """URLs' passwords, JWTs, then whatever Airflow's own secrets masker knows (connection passwords
    and variables the user registered as sensitive)."""
    if "eyJ" in text:
        text = _JWT.sub("<token>", text)
    return _airflow_redact(mask_secrets(text))


def _airflow_redact(text: str) -> str:
    # Airflow 3.3 has two masker singletons, core's and the task SDK's, each knowing only what was
    # registered in its own process (connections and variables read there, mask_secret calls), so both
    # are asked. Ours runs first regardless: neither masker knows the broker URL or a workload's token.
    import importlib

    for module in ("airflow._shared.secrets_masker", "airflow.sdk._shared.secrets_masker"):
        try:
            redacted = importlib.import_module(module).redact(text)
        except ImportError:  # pragma: no cover - outside an Airflow installation
            continue
        if isinstance(redacted, str):
            text = redacted
    return text


class SecretsFilter(logging.Filter):
    """Defence in depth: no token or broker password reaches a log line, whatever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = mask_all(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_filter() -> None:
    """Put ``SecretsFilter`` on every handler of the root logger (the worker and the native lane)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(SecretsFilter())
