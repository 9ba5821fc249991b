"""A large raw input is read as several parts, each its own task and commit, with the same
rows as one whole read: Parquet by ranges of its row groups, gzip WARC and plain JSONL by
byte ranges (each holding the records that start in it)."""

from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.parts import ReadOptions, plan_parts
from pipeline.readers import iter_batches
from pipeline.readers import rows as reader_rows
from pipeline.stage_runner import output_files, run_stage
from tests.conftest import fineweb_docs
from tests.pipeline.test_thresholds import LengthStage


def _big_parquet(path, groups=10, rows=30):
    docs = fineweb_docs(groups * rows)
    ids = [d["id"] for d in docs]
    ids[rows * 6] = ids[0]  # the same id in groups 0 and 6
    ids[5] = None  # no id: "<file>:<row>" with the file's row number
    table = pa.table({"id": ids, "text": [d["text"] for d in docs]})
    pq.write_table(table, path, row_group_size=rows)
    return str(path)


def _rows(run):
    t = pa.concat_tables(pq.read_table(f) for f in output_files(run / "length"))
    return t.sort_by([("source_path", "ascending"), ("id", "ascending")])


def test_a_large_parquet_is_split_at_row_groups(tmp_path):
    f = _big_parquet(tmp_path / "big.parquet")
    parts = plan_parts([f], read=ReadOptions(max_rows_per_part=70))
    assert [p.row_groups for p in parts] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert len({p.name for p in parts}) == 5
    assert plan_parts([f], read=ReadOptions(max_rows_per_part=300))[0].row_groups is None

    split = run_stage(
        LengthStage(), [f], tmp_path / "split", read=ReadOptions(max_rows_per_part=70)
    )
    whole = run_stage(LengthStage(), [f], tmp_path / "whole")
    assert split["parts"] == 5 and whole["parts"] == 1
    assert split["rows_in"] == whole["rows_in"] == 300
    assert split["dropped"] == whole["dropped"]
    a, b = _rows(tmp_path / "split"), _rows(tmp_path / "whole")
    # The same documents and decisions; only the repeated id is not renamed, since its two
    # rows are in two parts, told apart by their source_path.
    assert sorted(a["text"].to_pylist()) == sorted(b["text"].to_pylist())
    assert whole["ids_renamed"] == 1 and split["ids_renamed"] == 0
    spans = ["0-1", "2-3", "4-5", "6-7", "8-9"]
    assert set(a["source_path"].to_pylist()) == {f"{f}#row_groups={s}" for s in spans}
    assert "big.parquet:5" in a["id"].to_pylist() and "big.parquet:5" in b["id"].to_pylist()


def test_a_killed_sub_part_is_redone_alone(tmp_path):
    f = _big_parquet(tmp_path / "big.parquet")
    read = ReadOptions(max_rows_per_part=70)
    first = run_stage(LengthStage(), [f], tmp_path / "run", read=read)
    sorted((tmp_path / "run/length/_parts").glob("*.json"))[2].unlink()
    again = run_stage(LengthStage(), [f], tmp_path / "run", read=read)
    assert again["attempts"][-1]["parts_run"] == 1
    assert again["rows_out"] == first["rows_out"]


def test_dedup_keeps_one_of_two_identical_rows_in_two_sub_parts(tmp_path):
    from filters.dedup.dedup import DedupStage

    docs = fineweb_docs(60)
    texts = [d["text"] for d in docs]
    texts[45] = texts[3]  # identical text, same id, in row groups 0 and 3
    ids = [d["id"] for d in docs]
    ids[45] = ids[3]
    f = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), f, row_group_size=15)
    read = ReadOptions(max_rows_per_part=20)
    run = tmp_path / "run"
    run_stage(LengthStage(min_chars=0), [str(f)], run, read=read)
    m = run_stage(DedupStage(), output_files(run / "length"), run)
    assert m["dropped"].get("dedup:exact_duplicate", 0) == 1


# --- byte ranges: gzip WARC and plain JSONL -------------------------------------------------


def _record(i: int, rid: bool = True) -> bytes:
    body = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<p>page %d %s</p>" % (
        i,
        b"x" * (i * 37 % 900),
    )
    head = "WARC/1.0\r\nWARC-Type: response\r\n"
    head += f"WARC-Record-ID: <urn:uuid:r{i}>\r\n" if rid else ""
    head += (
        f"WARC-Date: 2024-01-02T03:04:05Z\r\nWARC-Target-URI: http://a/{i}\r\n"
        f"Content-Type: application/http; msgtype=response\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body + b"\r\n\r\n"


def _warc_gz(path, n=60) -> bytes:
    """n records, one gzip member each (a few without a record id), one member corrupt in
    the middle and the file cut inside its last member."""
    members = [gzip.compress(_record(i, rid=i % 11 != 0)) for i in range(n)]
    bad = bytearray(members[n // 2])
    bad[30:60] = bytes(30)  # deflate data zeroed: a record that does not inflate
    members[n // 2] = bytes(bad)
    data = b"".join(members)
    data = data[: len(data) - 25]  # cut inside the last member
    path.write_bytes(data)
    return data


def _read(path, byte_range=None) -> pa.Table:
    tables = list(iter_batches(path, batch_rows=7, byte_range=byte_range))
    return pa.concat_tables(tables) if tables else None


def _key(t: pa.Table) -> list[tuple]:
    if t is None:
        return []
    cols = [t[c].to_pylist() for c in ("url", "drop_reason", "html", "text")]
    return list(zip(*cols, strict=True))


def _in_ranges(path, size: int, step: int) -> list[tuple]:
    got = []
    for a in range(0, size, step):
        got += _key(_read(path, (a, min(a + step, size))))
    return got


@pytest.mark.parametrize("step", [1 << 16, 4000, 1500, 333])
def test_byte_ranges_of_a_warc_read_every_record_exactly_once(tmp_path, step):
    path = tmp_path / "crawl.warc.gz"
    size = len(_warc_gz(path))
    whole = _read(path)
    reasons = whole["drop_reason"].to_pylist()
    assert reasons.count("read:corrupt_gzip") == 1 and reasons[-1] == "read:truncated_gzip"
    assert sorted(_in_ranges(path, size, step), key=repr) == sorted(_key(whole), key=repr)


def test_byte_ranges_of_mutated_warcs_keep_the_same_documents(tmp_path):
    """Corruption anywhere (flipped bytes, garbage, cuts): no exception, and the kept records
    of the ranges are the whole file's."""
    rng = random.Random(7)
    path = tmp_path / "m.warc.gz"
    data = b"".join(gzip.compress(_record(i)) for i in range(30))
    for _ in range(30):
        d = bytearray(data)
        i = rng.randrange(len(d))
        if rng.random() < 0.5:
            d[i : i + 40] = bytes(rng.randrange(256) for _ in range(40))
        else:
            del d[i:]
        path.write_bytes(bytes(d))
        whole = [k for k in _key(_read(path)) if k[1] is None]
        step = rng.choice([700, 2000, 5000])
        got = [k for k in _in_ranges(path, len(d), step) if k[1] is None]
        assert sorted(got, key=repr) == sorted(whole, key=repr)


def test_a_warc_written_as_one_gzip_member_is_read_whole_by_its_first_range(tmp_path):
    path = tmp_path / "one.warc.gz"
    path.write_bytes(gzip.compress(b"".join(_record(i) for i in range(20))))
    size = path.stat().st_size
    assert _read(path, (size // 2, size)) is None
    assert len(_in_ranges(path, size, size // 3 + 1)) == 20


def _jsonl(path) -> bytes:
    lines = []
    for i in range(200):
        if i % 17 == 0:
            lines.append(b"")  # blank line: no row
        elif i % 13 == 0:
            lines.append(b"{not json")
        elif i % 7 == 0:
            lines.append(json.dumps({"text": f"no id {i}"}).encode() + b"\r")  # CRLF
        else:
            lines.append(json.dumps({"id": f"d{i}", "text": f"doc {i} " * (i % 30 + 1)}).encode())
    data = b"\n".join(lines)  # no newline after the last line
    path.write_bytes(data)
    return data


def test_byte_ranges_of_a_jsonl_file_read_every_line_exactly_once(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_rows, "MAX_RECORD_BYTES", 150)  # long lines: too_large rows
    path = tmp_path / "docs.jsonl"
    data = _jsonl(path)
    whole = _read(path)
    fallback = {i for i in whole["id"].to_pylist() if i.startswith("docs.jsonl:")}
    assert whole["drop_reason"].to_pylist().count("read:too_large") > 3 and fallback
    for step in (len(data) // 3 + 1, 997, 150, 64):
        parts = [_read(path, (a, min(a + step, len(data)))) for a in range(0, len(data), step)]
        got = pa.concat_tables([p for p in parts if p is not None])
        assert sorted(_key(got), key=repr) == sorted(_key(whole), key=repr)
        named = [i for i in got["id"].to_pylist() if not i.startswith("docs.jsonl:")]
        assert named == [i for i in whole["id"].to_pylist() if i not in fallback]
        offsets = {int(i.split("@")[1]) for i in got["id"].to_pylist() if "@" in i}
        assert all(o == 0 or data[o - 1 : o] == b"\n" for o in offsets)  # a line's start


def test_large_warc_and_jsonl_inputs_are_planned_and_run_as_byte_range_parts(tmp_path):
    warc = tmp_path / "crawl.warc.gz"
    size = len(_warc_gz(warc))
    jsonl = tmp_path / "docs.jsonl"
    _jsonl(jsonl)
    small_gz = tmp_path / "small.jsonl.gz"
    small_gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    read = ReadOptions(max_bytes_per_part=4000)
    files = [str(warc), str(jsonl), str(small_gz)]
    parts = plan_parts(files, read=read)
    by_file = {f: [p for p in parts if p.source == f] for f in files}
    assert len(by_file[str(warc)]) == -(-size // 4000) > 3
    assert len(by_file[str(small_gz)]) == 1 and by_file[str(small_gz)][0].byte_range is None
    assert len({p.name for p in parts}) == len(parts)
    assert by_file[str(warc)][1].label == f"{warc}#bytes=4000-7999"

    split = run_stage(LengthStage(min_chars=0), files, tmp_path / "split", read=read)
    whole = run_stage(LengthStage(min_chars=0), files, tmp_path / "whole")
    assert split["parts"] == len(parts) and whole["parts"] == 3
    assert split["rows_in"] == whole["rows_in"]
    assert split["dropped"] == whole["dropped"]
    a, b = _rows(tmp_path / "split"), _rows(tmp_path / "whole")
    assert sorted(a["text"].drop_null().to_pylist()) == sorted(b["text"].drop_null().to_pylist())

    sorted((tmp_path / "split/length/_parts").glob("*.json"))[3].unlink()
    again = run_stage(LengthStage(min_chars=0), files, tmp_path / "split", read=read)
    assert again["attempts"][-1]["parts_run"] == 1 and again["rows_out"] == split["rows_out"]
