"""Chunk planning: record-aligned byte ranges, sizing from a budget, and the boundaries that break naive
splitting (a record across a boundary, quoted newlines, empty input, one huge line, a tiny budget)."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pandas as pd
import pytest

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.operators import boundaries, chunking, reading
from airflow_asyncq_provider.operators.boundaries import RecordLayout
from airflow_asyncq_provider.operators.budget import memory_budget_bytes
from airflow_asyncq_provider.operators.chunk import Chunk
from airflow_asyncq_provider.operators.errors import ChunkPlanningError, MalformedInputError

MIB = 1024**2
CSV = RecordLayout.for_input("csv")


def plan(path: Path, *, budget: int = 512 * MIB, overhead: int = 100 * MIB, layout: RecordLayout = CSV,
         header: bool = True, **kwargs):
    data_size = path.stat().st_size
    with open(path, "rb") as fh:
        columns = reading.read_columns(fh, boundaries.header_end(fh, data_size, layout, header), {}) \
            if layout.format == "csv" and header else None
        parse = reading.sample_parser(file_format=layout.format, columns=columns, read_options={})
        return chunking.plan_chunks(str(path), fh, data_size, layout=layout, header=header, budget=budget,
                                    overhead=overhead, parse=parse, **kwargs)


def read_all(path: Path, chunks, layout: RecordLayout = CSV, header: bool = True):
    with open(path, "rb") as fh:
        columns = reading.read_columns(fh, chunks[0].header_end, {}) if header else None
        return [reading.read_chunk(fh, c, columns=columns, read_options={}, on_bad_rows="fail").frame
                for c in chunks]


def assert_tiles(chunks, start: int, size: int) -> None:
    """Chunks cover [start, size) exactly: contiguous, no overlap, no gap."""
    assert chunks[0].start == start
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.end == b.start
    assert chunks[-1].end == size
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.count for c in chunks} == {len(chunks)}


def tricky_csv(rows: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "note", "amount"])
    notes = ["plain", 'has "quotes"', "multi\nline\nnote", "comma, inside", "", '"\n"', "x" * 50]
    for i in range(rows):
        writer.writerow([i, rng.choice(notes), f"{rng.random() * 100:.2f}"])
    return out.getvalue().encode()


# ------------------------------------------------------------------ boundaries
def test_find_record_end_skips_newlines_inside_quotes():
    data = b'a,b\n1,"x\ny\nz"\n2,w\n'
    fh = io.BytesIO(data)
    # byte 8 is inside the quoted field of record 2: its end is after 'z"\n'
    assert boundaries.find_record_end(fh, 4, 8, len(data), CSV) == data.index(b'2,w')
    # the newline layout would cut inside the quotes
    assert boundaries.find_record_end(fh, 4, 8, len(data), RecordLayout(quotechar=None)) == data.index(b"y")


def test_record_spanning_the_target_ends_the_chunk(tmp_path):
    path = tmp_path / "span.csv"
    path.write_bytes(b"k,v\n" + b"".join(f"{i},{'v' * 20}\n".encode() for i in range(100)))
    result = plan(path, min_chunks=7)
    assert_tiles(result.chunks, 4, path.stat().st_size)
    data = path.read_bytes()
    for c in result.chunks:
        assert data[c.end - 1:c.end] == b"\n"  # every chunk ends on a record end
        assert c.length >= result.chunk_bytes or c is result.chunks[-1]
    frames = read_all(path, result.chunks)
    assert sum(len(f) for f in frames) == 100
    assert pd.concat(frames, ignore_index=True)["k"].tolist() == list(range(100))


@pytest.mark.parametrize("seed", range(8))
def test_quoted_newlines_and_quotes_survive_any_cut(tmp_path, seed):
    path = tmp_path / "tricky.csv"
    path.write_bytes(tricky_csv(400, seed))
    rng = random.Random(seed)
    result = plan(path, min_chunks=rng.randint(2, 40), sample_bytes=rng.choice([64, 1024, MIB]))
    assert_tiles(result.chunks, result.header_end, path.stat().st_size)
    whole = pd.read_csv(path)
    got = pd.concat(read_all(path, result.chunks), ignore_index=True)
    pd.testing.assert_frame_equal(got, whole)


def test_empty_file_has_no_chunks(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    result = plan(path)
    assert result.chunks == ()
    assert result.header_end == 0


def test_header_only_has_no_chunks(tmp_path):
    path = tmp_path / "header.csv"
    path.write_bytes(b"a,b,c\n")
    result = plan(path)
    assert result.chunks == ()
    assert result.header_end == 6


def test_last_record_without_trailing_newline(tmp_path):
    path = tmp_path / "tail.csv"
    path.write_bytes(b"a,b\n1,2\n3,4")
    result = plan(path, min_chunks=2)
    assert result.chunks[-1].end == path.stat().st_size
    assert pd.concat(read_all(path, result.chunks))["a"].tolist() == [1, 3]


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.csv"
    path.write_bytes(b"a,b\r\n" + b"".join(f'{i},"x\r\ny"\r\n'.encode() for i in range(50)))
    result = plan(path, min_chunks=5)
    frames = pd.concat(read_all(path, result.chunks), ignore_index=True)
    assert frames["a"].tolist() == list(range(50))
    assert set(frames["b"]) == {"x\r\ny"}


def test_single_huge_line_is_one_chunk(tmp_path):
    path = tmp_path / "huge.csv"
    huge = "y" * (3 * MIB)
    path.write_bytes(f"a,b\n1,{huge}\n".encode())
    result = plan(path, budget=512 * MIB, overhead=100 * MIB, min_chunks=8)
    assert len(result.chunks) == 1
    (frame,) = read_all(path, result.chunks)
    assert frame["b"].str.len().tolist() == [len(huge)]


def test_single_huge_line_among_small_ones_stays_whole(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"a,b\n" + b"".join(f"{i},s\n".encode() for i in range(2000))
                     + b"2000," + b"z" * MIB + b"\n" + b"2001,s\n")
    result = plan(path, sample_bytes=1024, budget=512 * MIB, overhead=100 * MIB, min_chunks=4)
    frames = pd.concat(read_all(path, result.chunks), ignore_index=True)
    assert frames["a"].tolist() == list(range(2002))


def test_budget_smaller_than_one_record_is_a_clear_error(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_bytes(b"a,b\n" + b"".join(f"{i},{'w' * 4000}\n".encode() for i in range(10)))
    # 1 MiB of room for data, 3x work factor, ~1x expansion: about 300 KB per chunk would be fine...
    plan(path, budget=101 * MIB, overhead=100 * MIB)
    # ...but 1 KiB of room cannot hold one 4 KB record
    with pytest.raises(ChunkPlanningError,
                       match=r"a record of \d+ bytes does not fit one chunk.*raise memory_budget"):
        plan(path, budget=100 * MIB + 1024, overhead=100 * MIB)


def test_plan_refuses_a_late_record_bigger_than_a_chunk_may_be(tmp_path):
    """The sample sees only small records; the scan finds the big one further on (the same check as the
    streaming operator's)."""
    path = tmp_path / "late.csv"
    rows = "".join(f"r{i % 5},{i},\n" for i in range(3000))
    path.write_text("region,amount,note\n" + rows + "r1,1," + "x" * 200_000 + "\n")
    late = r"late.csv: the record ending at byte \d+ is longer than \d+ bytes.*memory_budget 100 MiB; raise"
    with pytest.raises(ChunkPlanningError, match=late):
        plan(path, budget=100 * MIB, overhead=int(99.95 * MIB), sample_bytes=1024)


def test_record_fits_check_is_exact_at_the_limit():
    # a range cut for 100 bytes that ends at 150 holds a record of at least 51 bytes
    chunking.check_record_fits("x.csv", 0, 150, chunk_bytes=100, max_chunk_bytes=51, budget=2 * MIB)
    with pytest.raises(ChunkPlanningError, match=r"x.csv: the record ending at byte 150 is longer than 50 "
                                                 r"bytes, the most one chunk may hold under memory_budget "
                                                 r"2 MiB; raise memory_budget"):
        chunking.check_record_fits("x.csv", 0, 150, chunk_bytes=100, max_chunk_bytes=50, budget=2 * MIB)


def test_record_larger_than_the_whole_budget_is_not_read_into_memory(tmp_path):
    path = tmp_path / "giant.csv"
    path.write_bytes(b"a\n" + b"g" * (3 * MIB) + b"\n")
    with pytest.raises(ChunkPlanningError, match="larger than the whole memory_budget"):
        plan(path, budget=2 * MIB, overhead=MIB)


def test_budget_below_overhead_names_the_fix(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"a\n1\n")
    with pytest.raises(ChunkPlanningError, match=r"leaves no room for data.*raise memory_budget to at least"):
        plan(path, budget=64 * MIB, overhead=200 * MIB)


@pytest.mark.parametrize("value", ["512 MB/s", "2 GiBs", "lots", "-1GiB", True, [512]])
def test_memory_budget_of_the_wrong_unit(value):
    with pytest.raises(ConfigError, match="memory_budget"):
        memory_budget_bytes(value, "t: memory_budget")


def test_memory_budget_without_unit_suggests_one():
    with pytest.raises(ChunkPlanningError, match=r"512 bytes.*'512MiB'"):
        memory_budget_bytes(512, "t: memory_budget")
    assert memory_budget_bytes("1.5GiB", "x") == int(1.5 * 1024**3)


def test_chunk_size_follows_budget_and_expansion():
    assert chunking.chunk_bytes_for(1024 * MIB, 224 * MIB, 2.0, 4.0) == 100 * MIB
    assert chunking.chunk_bytes_for(1024 * MIB, 224 * MIB, 1.0, 2.0) == 400 * MIB
    with pytest.raises(ChunkPlanningError, match="work_factor"):
        chunking.chunk_bytes_for(1024 * MIB, 0, 1.0, 0.5)


def test_plan_sizes_chunks_from_the_sample(tmp_path):
    path = tmp_path / "big.csv"
    path.write_bytes(tricky_csv(20_000))
    result = plan(path, budget=100 * MIB + 600_000, overhead=100 * MIB, work_factor=2.0)
    expected = int(600_000 / (result.sample.expansion * 2.0))
    assert result.chunk_bytes == expected
    assert 1 < len(result.chunks) <= path.stat().st_size // expected + 1
    assert all(c.length < 2 * expected for c in result.chunks)
    assert result.sample.records > 0 and result.sample.expansion > 0.5
    assert "chunk(s) of about" in result.describe()


def test_max_chunks_is_enforced(tmp_path):
    path = tmp_path / "many.csv"
    path.write_bytes(tricky_csv(2000))
    with pytest.raises(ChunkPlanningError, match=r"more than max_chunks=3"):
        plan(path, min_chunks=50, max_chunks=3)


def test_unterminated_quote_is_reported(tmp_path):
    path = tmp_path / "open.csv"
    rows = b"".join(f"{i},x\n".encode() for i in range(3000))
    path.write_bytes(b"a,b\n" + rows + b'9,"never closed\n1,2\n')
    with pytest.raises(MalformedInputError, match="unterminated quote"):
        plan(path, min_chunks=4, sample_bytes=64)


def test_bare_quotes_in_unquoted_fields_are_detected_on_the_sample(tmp_path):
    path = tmp_path / "bare.csv"
    path.write_bytes(b"item,size\n" + b"".join(f'ruler {i},12" long\n'.encode() for i in range(50)))
    with pytest.raises(MalformedInputError, match="not RFC 4180"):
        plan(path)
    # the escape hatch: quotes are data
    result = plan(path, layout=RecordLayout.for_input("csv", {"quoting": csv.QUOTE_NONE}))
    assert result.chunks


def test_escapechar_is_refused_with_a_hint():
    with pytest.raises(ChunkPlanningError, match="escapechar.*boundary='newline'"):
        RecordLayout.for_input("csv", {"escapechar": "\\"})
    assert RecordLayout.for_input("csv", {"escapechar": "\\"}, boundary="newline").quotechar is None


def test_jsonl_boundaries_are_newlines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"i": i, "s": "a,\"b\"\\n"}) + "\n" for i in range(300)))
    layout = RecordLayout.for_input("jsonl")
    result = plan(path, layout=layout, header=False, min_chunks=6)
    assert result.header_end == 0
    assert_tiles(result.chunks, 0, path.stat().st_size)
    frames = read_all(path, result.chunks, layout, header=False)
    assert pd.concat(frames, ignore_index=True)["i"].tolist() == list(range(300))


# ------------------------------------------------------------------ descriptors and pieces
def test_descriptors_are_small_and_round_trip(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(tricky_csv(500))
    result = plan(path, min_chunks=5)
    for c in result.chunks:
        descriptor = c.to_descriptor()
        assert len(json.dumps(descriptor)) < 1024
        assert Chunk.from_descriptor(descriptor) == c


def test_descriptor_with_an_absurd_path_is_refused():
    chunk = Chunk(path="/" + "p" * 2000, format="csv", index=0, count=1, start=0, end=1)
    with pytest.raises(ChunkPlanningError, match="1024-byte limit"):
        chunk.to_descriptor()


def test_not_a_descriptor():
    with pytest.raises(ChunkPlanningError, match="not a chunk descriptor"):
        Chunk.from_descriptor({"path": "x"})


def test_split_chunk_into_record_aligned_pieces(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(tricky_csv(1000))
    (chunk,) = plan(path).chunks
    with open(path, "rb") as fh:
        pieces = boundaries.split_chunk(fh, chunk, 4, CSV)
    assert len(pieces) == 4
    assert [p.piece for p in pieces] == [0, 1, 2, 3] and {p.pieces for p in pieces} == {4}
    assert_tiles([Chunk(**{**p.__dict__, "index": i, "count": 4}) for i, p in enumerate(pieces)],
                 chunk.start, chunk.end)
    whole = pd.read_csv(path)
    got = pd.concat(read_all(path, pieces), ignore_index=True)
    pd.testing.assert_frame_equal(got, whole)


def test_split_chunk_of_one_record_cannot_split(tmp_path):
    path = tmp_path / "one.csv"
    path.write_bytes(b"a\n" + b"x" * 5000 + b"\n")
    (chunk,) = plan(path).chunks
    with open(path, "rb") as fh:
        assert boundaries.split_chunk(fh, chunk, 2, CSV) == [
            chunk.__class__(**{**chunk.__dict__, "pieces": 1})]
