"""Chunked, memory-aware operators (docs/OPERATORS.md). pandas and pyarrow load only inside ``execute``."""

from airflow_asyncq_provider.operators.chunked import (
    ChunkCombineOperator,
    ChunkedFanOut,
    ChunkedFileOperator,
    ChunkProcessOperator,
    ChunkSplitOperator,
    chunked_fan_out,
)
from airflow_asyncq_provider.operators.chunking import Chunk
from airflow_asyncq_provider.operators.errors import (
    ChunkingError,
    ChunkPlanningError,
    InputNotFoundError,
    MalformedInputError,
    ResultTooLargeError,
)

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
