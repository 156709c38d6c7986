"""Reading one chunk (a record-aligned byte range) into a pandas DataFrame, counting malformed rows.

pandas is imported inside the functions: it is the ``data`` extra, and the scheduler and DAG parsing
import the operators without it.

A row is *malformed* when the parser cannot use it: more fields than the header (pandas' "bad line"),
a value that does not convert to the ``dtype`` declared for its column (an empty value in an integer
column included), bytes that are not valid in the declared ``encoding``, or a JSONL line that is not a
JSON object. With ``on_bad_rows="skip"`` they are dropped and counted (with a few examples for the
log); with ``"fail"`` the task fails naming the chunk, the count and the first examples. A row with
*fewer* fields than the header is not malformed for pandas: the missing values are NA.

The fast path is one ``read_csv`` call streaming from the byte range. Only a chunk whose declared
dtypes fail to convert is read a second time, with those columns as strings, to find and count the
rows at fault; clean chunks pay nothing for the check.

``InputReader`` bundles what every chunked operator needs to read one input (record layout, columns,
parsing options), and ``RowTally`` sums rows and malformed rows across chunks, pieces and chunk results.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import warnings
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from airflow_asyncq_provider.operators.boundaries import RecordLayout
from airflow_asyncq_provider.operators.chunk import Chunk
from airflow_asyncq_provider.operators.chunking import SampleParser
from airflow_asyncq_provider.operators.errors import ChunkingError, MalformedInputError

if TYPE_CHECKING:
    import pandas as pd

ON_BAD_ROWS = ("skip", "fail")
MAX_EXAMPLES = 3
# read_csv options that change which bytes form a row, or that the operators set themselves
RESERVED_OPTIONS = frozenset({
    "header", "names", "skiprows", "skipfooter", "nrows", "chunksize", "iterator", "engine",
    "on_bad_lines", "lineterminator", "comment", "filepath_or_buffer", "memory_map", "compression",
})
_BAD_LINE = re.compile(r"Skipping line (\d+): (.*)")


def validate_read_options(read_options: dict[str, Any] | None, file_format: str) -> dict[str, Any]:
    options = dict(read_options or {})
    reserved = sorted(RESERVED_OPTIONS & options.keys())
    if reserved:
        raise ChunkingError(
            f"read_options {reserved} cannot be used with chunked reading: the operator decides them "
            f"(use the header= and names= arguments of the operator; a compressed file cannot be read "
            f"by byte ranges, decompress it first)"
        )
    if file_format == "jsonl":
        unknown = sorted(options.keys() - {"dtype", "encoding"})
        if unknown:
            raise ChunkingError(f"read_options {unknown} are not supported for JSONL; use dtype or encoding")
    return options


def check_on_bad_rows(value: str) -> str:
    if value not in ON_BAD_ROWS:
        raise ChunkingError(f"on_bad_rows={value!r} is not supported; use 'skip' (count and drop) or 'fail'")
    return value


class RangeReader(io.RawIOBase):
    """A read-only view of bytes ``[start, end)`` of an open binary handle."""

    def __init__(self, fh: IO[bytes], start: int, end: int) -> None:
        super().__init__()
        self._fh = fh
        self._remaining = end - start
        fh.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._remaining)
        if n <= 0:
            return 0
        data = self._fh.read(n)
        buffer[: len(data)] = data
        self._remaining -= len(data)
        return len(data)


@dataclasses.dataclass
class ChunkFrame:
    frame: pd.DataFrame
    bad_rows: int = 0
    bad_examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.frame)


def read_columns(fh: IO[bytes], header_end: int, read_options: dict[str, Any]) -> list[str] | None:
    """Column names from the header record ``[0, header_end)``; None without a header."""
    if header_end <= 0:
        return None
    fh.seek(0)
    raw = fh.read(header_end)
    encoding = read_options.get("encoding") or "utf-8"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise MalformedInputError(f"the header record is not valid {encoding}: {exc}") from exc
    text = text.lstrip("\ufeff")
    sep = read_options.get("sep", read_options.get("delimiter", ","))
    if not isinstance(sep, str) or len(sep) != 1:
        raise ChunkingError(f"read_options sep={sep!r}: chunked reading needs a one-character separator")
    row = next(csv.reader(io.StringIO(text), delimiter=sep, quotechar=read_options.get("quotechar", '"')),
               [])
    return [name.strip("\r\n") for name in row]


def read_chunk(fh: IO[bytes], chunk: Chunk, *, columns: list[str] | None, read_options: dict[str, Any],
               on_bad_rows: str) -> ChunkFrame:
    """The rows of ``chunk`` as a DataFrame; malformed rows counted (skip) or raised (fail)."""

    def source() -> io.BufferedReader:
        return io.BufferedReader(RangeReader(fh, chunk.start, chunk.end), buffer_size=1 << 20)

    if chunk.format == "jsonl":
        result = _read_jsonl(source().read(), read_options, chunk.label)
    else:
        result = _read_csv(source, columns, read_options, chunk.label)
    if result.bad_rows and on_bad_rows == "fail":
        raise MalformedInputError(
            f"{chunk.label}: {result.bad_rows} malformed row(s); first: {'; '.join(result.bad_examples)}. "
            f"Fix the input, or pass on_bad_rows='skip' to count and drop them"
        )
    return result


def parse_bytes(data: bytes, *, file_format: str, columns: list[str] | None,
                read_options: dict[str, Any]) -> ChunkFrame:
    if file_format == "jsonl":
        return _read_jsonl(data, read_options, "sample")
    return _read_csv(lambda: io.BytesIO(data), columns, read_options, "sample")


def sample_parser(*, file_format: str, columns: list[str] | None,
                  read_options: dict[str, Any]) -> SampleParser:
    """For ``chunking.take_sample``: (rows including malformed ones, deep memory of the frame)."""

    def parse(data: bytes) -> tuple[int, int]:
        result = parse_bytes(data, file_format=file_format, columns=columns, read_options=read_options)
        return result.rows + result.bad_rows, int(result.frame.memory_usage(deep=True).sum())

    return parse


@dataclasses.dataclass
class InputReader:
    """Everything needed to read chunks of one input: layout, columns, parsing options."""

    layout: RecordLayout
    header: bool
    names: list[str] | None
    read_options: dict[str, Any]
    on_bad_rows: str

    @classmethod
    def build(cls, *, file_format: str, header: bool, names: Sequence[str] | None,
              read_options: dict[str, Any] | None, boundary: str, on_bad_rows: str) -> InputReader:
        options = validate_read_options(read_options, file_format)
        return cls(layout=RecordLayout.for_input(file_format, options, boundary),
                   header=header if file_format == "csv" else False,
                   names=list(names) if names else None, read_options=options,
                   on_bad_rows=check_on_bad_rows(on_bad_rows))

    def columns(self, fh: Any, header_end: int) -> list[str] | None:
        return self.names or read_columns(fh, header_end, self.read_options)

    def sample_parser(self, columns: list[str] | None) -> SampleParser:
        return sample_parser(file_format=self.layout.format, columns=columns, read_options=self.read_options)

    def read(self, fh: Any, chunk: Chunk, columns: list[str] | None) -> ChunkFrame:
        return read_chunk(fh, chunk, columns=columns, read_options=self.read_options,
                          on_bad_rows=self.on_bad_rows)


class RowTally:
    """Rows read and malformed rows dropped, with the first few examples for the log."""

    def __init__(self) -> None:
        self.rows = 0
        self.bad_rows = 0
        self.bad_examples: list[str] = []

    def add(self, rows: int, bad_rows: int, examples: Sequence[str], where: str = "") -> None:
        self.rows += rows
        self.bad_rows += bad_rows
        for example in examples:
            if len(self.bad_examples) < MAX_EXAMPLES:
                self.bad_examples.append(f"{where}: {example}" if where else example)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "bad_rows": self.bad_rows, "bad_examples": self.bad_examples}


# ------------------------------------------------------------------ CSV
def _read_csv(source: Any, columns: list[str] | None, read_options: dict[str, Any],
              label: str) -> ChunkFrame:
    import pandas as pd

    options = dict(read_options)
    dtype = options.pop("dtype", None)
    common = {"header": None, "names": columns, "engine": "c", "on_bad_lines": "warn", **options}
    try:
        frame, bad = _csv_call(pd, source, dtype=dtype, **common)
        return ChunkFrame(frame, len(bad), bad[:MAX_EXAMPLES])
    except UnicodeDecodeError as exc:
        encoding = options.get("encoding") or "utf-8"
        frame, bad = _csv_call(pd, source, dtype=dtype, encoding_errors="replace", **common)
        return _drop_undecodable(pd, frame, bad, encoding, exc)
    except pd.errors.ParserError as exc:
        raise MalformedInputError(f"{label}: the CSV parser stopped: {exc}") from exc
    except (ValueError, TypeError) as exc:
        if not isinstance(dtype, dict):
            raise MalformedInputError(
                f"{label}: {exc}; declare dtype per column to count bad values") from exc
        return _read_csv_coercing(pd, source, common, dtype, label)


def _csv_call(pd: Any, source: Any, **kwargs: Any) -> tuple[pd.DataFrame, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        frame = pd.read_csv(source(), **kwargs)
    bad: list[str] = []
    for warning in caught:
        if issubclass(warning.category, pd.errors.ParserWarning):
            for match in _BAD_LINE.finditer(str(warning.message)):
                bad.append(f"line {match.group(1)} of the chunk: {match.group(2)}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return frame, bad


def _drop_undecodable(pd: Any, frame: pd.DataFrame, bad: list[str], encoding: str,
                      exc: UnicodeDecodeError) -> ChunkFrame:
    mask = pd.Series(False, index=frame.index)
    for column in frame.columns:
        if frame[column].dtype.kind in "OSU" or str(frame[column].dtype) == "str":
            mask |= frame[column].astype("str").str.contains("\ufffd", regex=False, na=False)
    examples = [f"bytes that are not valid {encoding} ({exc.reason})"] if mask.any() else []
    return ChunkFrame(frame[~mask].reset_index(drop=True), len(bad) + int(mask.sum()),
                      (bad + examples)[:MAX_EXAMPLES])


def _read_csv_coercing(pd: Any, source: Any, common: dict[str, Any], dtype: dict[str, Any],
                       label: str) -> ChunkFrame:
    """Slow path: the declared columns as strings, converted one by one, bad rows located."""
    frame, bad_lines = _csv_call(pd, source, dtype={c: "str" for c in dtype}, **common)
    bad = pd.Series(False, index=frame.index)
    examples: list[str] = []
    converted: dict[str, Any] = {}
    for column, wanted in dtype.items():
        if column not in frame.columns:
            continue
        target = pd.api.types.pandas_dtype(wanted)
        raw = frame[column]
        if target.kind in "iuf":
            values = pd.to_numeric(raw, errors="coerce")
            failed = values.isna() if target.kind in "iu" else raw.notna() & values.isna()
        else:
            try:
                converted[column] = raw.astype(target)
            except (ValueError, TypeError) as exc:
                raise MalformedInputError(f"{label}: column {column!r} does not convert to {wanted}: {exc}") \
                    from exc
            continue
        for position in failed[failed].index[: MAX_EXAMPLES - len(examples)]:
            examples.append(f"row {position + 1} of the chunk: column {column!r} = {raw[position]!r} is "
                            f"not {wanted}")
        bad |= failed
        converted[column] = values
    keep = ~bad
    frame = frame[keep].reset_index(drop=True)
    for column, values in converted.items():
        frame[column] = values[keep].reset_index(drop=True).astype(pd.api.types.pandas_dtype(dtype[column]))
    count = len(bad_lines) + int(bad.sum())
    return ChunkFrame(frame, count, (bad_lines + examples)[:MAX_EXAMPLES])


# ------------------------------------------------------------------ JSONL
def _read_jsonl(data: bytes, read_options: dict[str, Any], label: str) -> ChunkFrame:
    import pandas as pd

    dtype = read_options.get("dtype")
    encoding = read_options.get("encoding") or "utf-8"
    if not data.strip():
        return ChunkFrame(pd.DataFrame())
    try:
        frame = pd.read_json(io.BytesIO(data), lines=True, dtype=dtype if dtype is not None else True,
                             encoding=encoding)
        return ChunkFrame(frame)
    except (ValueError, TypeError):
        pass  # find the lines at fault
    records: list[dict[str, Any]] = []
    examples: list[str] = []
    bad = 0
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode(encoding))
            if not isinstance(value, dict):
                raise ValueError(f"a JSON {type(value).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            bad += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"line {number} of the chunk: {str(exc)[:120]}")
            continue
        records.append(value)
    frame = pd.DataFrame.from_records(records)
    if isinstance(dtype, dict):
        try:
            frame = frame.astype({c: t for c, t in dtype.items() if c in frame.columns})
        except (ValueError, TypeError) as exc:
            raise MalformedInputError(f"{label}: {exc}") from exc
    return ChunkFrame(frame, bad, examples)
