"""Human memory sizes ("512MiB", "2G", "1.5GiB", 1048576) to bytes, and back for messages.

pydantic's ``ByteSize`` does the arithmetic (pydantic comes with Airflow). Around it we keep what it
gets wrong for us, each piece tested in tests/unit/test_settings.py:

* the syntax: ``ByteSize`` reads "1_000", ".5K" and "1.", and ignores whatever follows its unit
  ("1G of RAM" is 1 GB), so a value must match ``_SIZE`` first;
* the units: ``ByteSize`` also knows P, E and bits ("8bit" is one byte), which we refuse, and it lacks
  the short IEC forms Ki, Mi, Gi, Ti, which we accept;
* the inputs: ``ByteSize`` reads ``True`` as 1 byte and refuses floats such as ``1.5e9``, and it allows
  0; we refuse booleans and zero and accept finite floats.
"""

from __future__ import annotations

import functools
import math
import re
from typing import TYPE_CHECKING

from airflow_asyncq_provider.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import ByteSize, TypeAdapter

MIB = 1024**2

_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")
# The units we accept, as ByteSize spells them; "" and "b" are bytes.
_UNITS = {"", "b", "k", "kb", "kib", "m", "mb", "mib", "g", "gb", "gib", "t", "tb", "tib"}
_SHORT_IEC = {"ki": "kib", "mi": "mib", "gi": "gib", "ti": "tib"}  # not in ByteSize


@functools.cache
def _byte_size() -> TypeAdapter[ByteSize]:
    from pydantic import ByteSize, TypeAdapter

    return TypeAdapter(ByteSize)


def _not_a_size(value: object, what: str) -> ConfigError:
    return ConfigError(f"{what}: {value!r} is not a memory size; use a value like '512MiB' or '2G'")


def _string_size(value: str, what: str) -> int:
    from pydantic import ValidationError

    match = _SIZE.match(value)
    if not match:
        raise _not_a_size(value, what)
    unit = match.group("unit").lower()
    unit = _SHORT_IEC.get(unit, unit)
    if unit not in _UNITS:
        raise ConfigError(
            f"{what}: unknown unit {unit!r} in {value!r}; "
            "use B, KiB, MiB, GiB, TiB (or K, M, G, T)"
        )
    try:
        return int(_byte_size().validate_python(match.group("num") + unit))
    except ValidationError as exc:
        raise _not_a_size(value, what) from exc


def parse_size(value: object, what: str) -> int:
    """Bytes in ``value``; ``what`` names the setting in the error (for example a task and a field)."""
    if isinstance(value, bool):
        raise _not_a_size(value, what)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise _not_a_size(value, what)
        size = int(value)
    elif isinstance(value, str):
        size = _string_size(value, what)
    else:
        raise ConfigError(f"{what}: expected a memory size string like '512MiB', got {type(value).__name__}")
    if size <= 0:
        raise ConfigError(f"{what}: {value!r} must be greater than zero")
    return size


def format_size(size: int) -> str:
    """A size as people read it in logs and reasons: bytes below 10 KiB, KiB below 1 MiB (so a small
    size never reads "0 MiB"), whole MiB, and GiB with one decimal from 10 GiB on."""
    if size < 10 * 1024:
        return f"{size} bytes"
    if size < MIB:
        return f"{size / 1024:.0f} KiB"
    mib = size / MIB
    if mib >= 10240:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib:.0f} MiB"
