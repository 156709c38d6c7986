"""Human memory sizes ("512MiB", "2G", "1.5GiB", 1048576) to bytes, and back for messages."""

from __future__ import annotations

import re

from airflow_asyncq_provider.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mi": 1024**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_size(value: object, what: str) -> int:
    """Bytes in ``value``; ``what`` names the setting in the error (for example a task and a field)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a memory size; use a value like '512MiB' or '2G'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ConfigError(f"{what}: {value!r} is not a memory size; use a value like '512MiB' or '2G'")
        number, unit = float(match.group("num")), match.group("unit").lower()
    else:
        raise ConfigError(f"{what}: expected a memory size string like '512MiB', got {type(value).__name__}")
    if unit not in _UNITS:
        raise ConfigError(
            f"{what}: unknown unit {unit!r} in {value!r}; use B, KiB, MiB, GiB, TiB (or K, M, G, T)"
        )
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what}: {value!r} must be greater than zero")
    return size


def format_size(size: int) -> str:
    """Whole MiB for what operators read in logs and reasons; KiB below 1 MiB, so a small size never
    reads "0 MiB"; GiB from 10 GiB on."""
    mib = size / 1024**2
    if mib >= 10240:
        return f"{mib / 1024:.1f} GiB"
    if size < 1024**2:
        return f"{size / 1024:.0f} KiB"
    return f"{mib:.0f} MiB"
