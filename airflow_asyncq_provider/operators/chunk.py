"""The chunk: one record-aligned byte range of an input file, and the small descriptor that carries it
through XCom from the split step to the mapped process step.

A descriptor holds only offsets and the path (about 150 bytes plus the path), never data, and it is
refused above ``DESCRIPTOR_LIMIT`` so that XCom stays small whatever the file size.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from airflow_asyncq_provider.operators.errors import ChunkPlanningError

DESCRIPTOR_LIMIT = 1024  # bytes of JSON per chunk descriptor in XCom


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One record-aligned byte range ``[start, end)`` of ``path``; what a chunk task is mapped over.

    ``header_end`` is where the header record ends (0 without a header): a chunk task reads
    ``[0, header_end)`` for the column names. ``piece``/``pieces`` are set when a retry splits the
    chunk after a memory failure; they never travel through XCom.
    """

    path: str
    format: str
    index: int
    count: int
    start: int
    end: int
    header_end: int = 0
    piece: int = 0
    pieces: int = 1

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def label(self) -> str:
        piece = f" piece {self.piece + 1}/{self.pieces}" if self.pieces > 1 else ""
        of = f"/{self.count}" if self.count else ""
        return f"chunk {self.index + 1}{of}{piece} (bytes {self.start}-{self.end})"

    def to_descriptor(self) -> dict[str, Any]:
        descriptor = {"path": self.path, "format": self.format, "index": self.index, "count": self.count,
                      "start": self.start, "end": self.end, "header_end": self.header_end}
        size = len(json.dumps(descriptor))
        if size > DESCRIPTOR_LIMIT:
            raise ChunkPlanningError(
                f"the chunk descriptor for {self.path!r} is {size} bytes of JSON, over the "
                f"{DESCRIPTOR_LIMIT}-byte limit for XCom; use a shorter path"
            )
        return descriptor

    @classmethod
    def from_descriptor(cls, descriptor: dict[str, Any]) -> Chunk:
        try:
            return cls(path=str(descriptor["path"]), format=str(descriptor["format"]),
                       index=int(descriptor["index"]), count=int(descriptor["count"]),
                       start=int(descriptor["start"]), end=int(descriptor["end"]),
                       header_end=int(descriptor.get("header_end", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ChunkPlanningError(f"not a chunk descriptor: {descriptor!r} ({exc})") from exc
