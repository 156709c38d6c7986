"""The provider's exception tree. Third-party errors are translated into these at the boundary."""

from __future__ import annotations


class AsyncQError(Exception):
    """Base of every error this provider raises on purpose."""


class ConfigError(AsyncQError):
    """An ``[asyncq]`` option or a CLI argument has a value we cannot use; the message names it."""


class BrokerUnavailable(AsyncQError):
    """Redis did not answer at the configured URL (shown masked)."""


class PublishError(AsyncQError):
    """A workload could not be published within ``[asyncq] publish_timeout``."""


class MalformedMessage(AsyncQError):
    """A queue message that is not a valid JSON workload; it goes to the dead-letter list."""


class StateError(AsyncQError):
    """A Redis command on the fleet's state (task records, registry, event stream) failed."""


class StateUnavailable(StateError, BrokerUnavailable):
    """Redis did not answer a state command (connection refused, reset or timed out): worth retrying."""
