"""Errors of native queue tasks. All are ``AsyncQError`` subclasses, so one ``except`` catches ours."""

from __future__ import annotations

from airflow_asyncq_provider.errors import AsyncQError


class NativeTaskError(AsyncQError):
    """Base of every native-task error raised on purpose."""


class UnknownTaskError(NativeTaskError):
    """No native lane has registered a task of that name (checked before anything is sent)."""


class ArgumentNotSerializable(NativeTaskError, TypeError):
    """An argument cannot be encoded as JSON; the message names it."""


class ResultTooLarge(NativeTaskError):
    """A task's JSON result is larger than the operator accepts into XCom."""


class NativeTaskFailed(NativeTaskError):
    """The remote task raised. Subclasses created on the fly carry the remote exception's type name."""

    remote_type: str = ""
    remote_traceback: str = ""
