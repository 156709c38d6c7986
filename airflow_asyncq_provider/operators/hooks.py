"""The two callables a user hands the chunked operators, and what happens without them.

``process(frame, chunk) -> result`` runs on every chunk (or piece of one, on an adaptive retry); without
it the result is the frame itself. ``combine(accumulated, result) -> accumulated`` folds the results in
chunk order; it must be associative, because a split retry turns one chunk's result into several.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow_asyncq_provider.operators.chunk import Chunk

ProcessFn = Callable[[Any, Chunk], Any]
CombineFn = Callable[[Any, Any], Any]


def apply_process(process: ProcessFn | None, frame: Any, chunk: Chunk) -> Any:
    return frame if process is None else process(frame, chunk)
