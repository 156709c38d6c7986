"""Chunked, memory-aware operators (docs/OPERATORS.md).

The public names load lazily (PEP 562, as Celery's top-level package does): ``import
airflow_asyncq_provider.operators`` imports none of the submodules, and ``from
airflow_asyncq_provider.operators import chunked_fan_out`` imports only what that name needs. pandas
and pyarrow load only inside ``execute``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_asyncq_provider.operators.chunk import Chunk
    from airflow_asyncq_provider.operators.combine import ChunkCombineOperator
    from airflow_asyncq_provider.operators.errors import (
        ChunkingError,
        ChunkPlanningError,
        InputNotFoundError,
        MalformedInputError,
        ResultTooLargeError,
    )
    from airflow_asyncq_provider.operators.fan_out import ChunkedFanOut, chunked_fan_out
    from airflow_asyncq_provider.operators.process import ChunkProcessOperator
    from airflow_asyncq_provider.operators.split import ChunkSplitOperator
    from airflow_asyncq_provider.operators.streaming import ChunkedFileOperator

# public name -> the submodule that defines it
_EXPORTS = {
    "Chunk": "chunk",
    "ChunkCombineOperator": "combine",
    "ChunkProcessOperator": "process",
    "ChunkSplitOperator": "split",
    "ChunkedFanOut": "fan_out",
    "ChunkedFileOperator": "streaming",
    "ChunkingError": "errors",
    "ChunkPlanningError": "errors",
    "InputNotFoundError": "errors",
    "MalformedInputError": "errors",
    "ResultTooLargeError": "errors",
    "chunked_fan_out": "fan_out",
}

__all__ = [
    "Chunk",
    "ChunkCombineOperator",
    "ChunkProcessOperator",
    "ChunkSplitOperator",
    "ChunkedFanOut",
    "ChunkedFileOperator",
    "ChunkingError",
    "ChunkPlanningError",
    "InputNotFoundError",
    "MalformedInputError",
    "ResultTooLargeError",
    "chunked_fan_out",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
