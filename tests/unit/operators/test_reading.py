"""Reading a chunk: malformed rows counted and skipped, or failing with the chunk and examples."""

from __future__ import annotations

import io

import pytest

from airflow_asyncq_provider.operators import reading
from airflow_asyncq_provider.operators.chunk import Chunk
from airflow_asyncq_provider.operators.errors import ChunkingError, MalformedInputError


def chunk_of(data: bytes, header_end: int, fmt: str = "csv") -> Chunk:
    return Chunk(path="mem", format=fmt, index=2, count=5, start=header_end, end=len(data),
                 header_end=header_end)


def read(data: bytes, on_bad_rows: str = "skip", options: dict | None = None, fmt: str = "csv"):
    fh = io.BytesIO(data)
    header_end = data.index(b"\n") + 1 if fmt == "csv" else 0
    columns = reading.read_columns(fh, header_end, options or {}) if fmt == "csv" else None
    return reading.read_chunk(fh, chunk_of(data, header_end, fmt), columns=columns,
                              read_options=options or {}, on_bad_rows=on_bad_rows)


def test_clean_chunk_has_no_bad_rows():
    result = read(b"a,b\n1,x\n2,y\n")
    assert result.rows == 2 and result.bad_rows == 0
    assert result.frame.columns.tolist() == ["a", "b"]


def test_too_many_fields_are_counted_and_skipped():
    result = read(b"a,b\n1,x\n2,y,extra\n3,z\n4,w,1,2\n")
    assert result.frame["a"].tolist() == [1, 3]
    assert result.bad_rows == 2
    assert "expected 2 fields, saw 3" in result.bad_examples[0]


def test_too_many_fields_fail_with_chunk_and_example():
    with pytest.raises(MalformedInputError, match=r"chunk 3/5 \(bytes 4-\d+\): 1 malformed row.*saw 3.*"
                                                  r"on_bad_rows='skip'"):
        read(b"a,b\n1,x\n2,y,extra\n", on_bad_rows="fail")


def test_values_that_do_not_convert_to_the_declared_dtype():
    data = b"id,qty,price\n1,5,1.5\n2,lots,2.5\n3,7,n/a\n4,,4.0\n5,9,\n"
    result = read(data, options={"dtype": {"id": "int64", "qty": "int64", "price": "float64"}})
    # 'lots' and the empty int are malformed; 'n/a' is pandas' NA for floats, an empty float is NA
    assert result.frame["id"].tolist() == [1, 3, 5]
    assert str(result.frame["qty"].dtype) == "int64"
    assert result.bad_rows == 2
    assert any("'lots' is not int64" in e for e in result.bad_examples)


def test_declared_dtype_failure_in_fail_mode():
    with pytest.raises(MalformedInputError, match="'lots' is not int64"):
        read(b"id,qty\n1,5\n2,lots\n", on_bad_rows="fail", options={"dtype": {"qty": "int64"}})


def test_undecodable_bytes_are_counted_in_skip_mode():
    result = read(b"a,b\n1,ok\n2,\xff\xfe\n3,fine\n")
    assert result.frame["a"].tolist() == [1, 3]
    assert result.bad_rows == 1
    assert "not valid utf-8" in result.bad_examples[0]


def test_unterminated_quote_stops_the_parser_with_the_chunk_named():
    with pytest.raises(MalformedInputError, match=r"chunk 3/5.*EOF inside string"):
        read(b'a,b\n1,"open\n')


def test_jsonl_bad_lines_are_counted():
    data = b'{"i": 1}\n{"i": 2\n[1, 2]\n{"i": 4}\n\n'
    result = read(data, fmt="jsonl")
    assert result.frame["i"].tolist() == [1, 4]
    assert result.bad_rows == 2
    with pytest.raises(MalformedInputError, match="2 malformed row"):
        read(data, fmt="jsonl", on_bad_rows="fail")


def test_empty_jsonl_chunk():
    assert read(b"", fmt="jsonl").rows == 0


@pytest.mark.parametrize("option", ["skiprows", "nrows", "chunksize", "header", "comment", "compression"])
def test_options_that_change_rows_are_refused(option):
    with pytest.raises(ChunkingError, match=option):
        reading.validate_read_options({option: 1}, "csv")


def test_unknown_on_bad_rows():
    with pytest.raises(ChunkingError, match="'skip'.*'fail'"):
        reading.check_on_bad_rows("warn")


def test_header_with_bom_and_quotes():
    data = '\ufeff"a,1",b\r\n1,2\r\n'.encode()
    assert reading.read_columns(io.BytesIO(data), data.index(b"\n") + 1, {}) == ["a,1", "b"]


def test_range_reader_reads_only_its_range():
    fh = io.BytesIO(b"0123456789")
    raw = reading.RangeReader(fh, 3, 7)
    assert io.BufferedReader(raw).read() == b"3456"
