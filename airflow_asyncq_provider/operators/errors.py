"""Errors of the chunked operators, under the provider's ``AsyncQError`` tree.

Input errors that a retry cannot fix (a missing file, a malformed row with ``on_bad_rows="fail"``, a
budget too small for one record) also subclass Airflow's ``AirflowFailException``, so the task fails at
once instead of burning its retries on the same bad input.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowFailException

from airflow_asyncq_provider.errors import AsyncQError


class ChunkingError(AsyncQError):
    """Base of every error the chunked operators raise on purpose."""


class ChunkPlanningError(ChunkingError, AirflowFailException):
    """The input cannot be cut into chunks that fit the memory budget (the message says what to raise)."""


class InputNotFoundError(ChunkingError, AirflowFailException, FileNotFoundError):
    """The input path does not exist (after templating)."""


class MalformedInputError(ChunkingError, AirflowFailException):
    """Rows the parser cannot read, with ``on_bad_rows="fail"`` (or a structural error in any mode)."""


class ResultTooLargeError(ChunkingError, AirflowFailException):
    """A ``process`` callable returned a non-DataFrame value too large to travel through XCom."""
