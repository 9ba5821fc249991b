"""Readers under fault injection: broken files become counted rows, never exceptions.

Every input is written here: Parquet by pyarrow, with one row group broken by overwriting
bytes of its pages found through the footer's column chunk offsets; JSONL, HTML and WARC
files byte by byte. Counts and reasons are checked exactly. Also: the one id rule and the
one text rule across JSONL, Parquet and Hugging Face datasets, the plan-time checks
(`check_input`, `classify_inputs`), `python -m pipeline.readers`, and a seeded mutation
pass over every format.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.readers import check_input, classify_inputs, iter_batches, iter_hf_dataset
from pipeline.readers import rows as reader_rows
from pipeline.schema import READ_SCHEMA

REPO = Path(__file__).resolve().parents[2]


def read(path: Path | str, **kwargs) -> pa.Table:
    """All batches of `path`, each checked against READ_SCHEMA and readable as Python."""
    batches = list(iter_batches(path, **kwargs))
    for b in batches:
        assert b.schema.equals(READ_SCHEMA), b.schema
        b.validate(full=True)
        b.to_pylist()  # what a stage doing Python work would do: must not raise
    return pa.concat_tables(batches) if batches else READ_SCHEMA.empty_table()


def reasons(table: pa.Table) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for r in table["drop_reason"].to_pylist():
        out[r] = out.get(r, 0) + 1
    return out


def by_id(table: pa.Table) -> dict[str, str | None]:
    return dict(zip(table["id"].to_pylist(), table["drop_reason"].to_pylist(), strict=True))


# --- Parquet: whole files that do not decode -------------------------------------------------


def _parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


_SMALL = pa.table({"id": ["a", "b"], "text": ["one", "two"]})


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="zero-bytes"),
        pytest.param(b"PAR1 this is not really parquet PAR1", id="magic-only"),
        pytest.param(_parquet_bytes(_SMALL)[:-12], id="footer-cut"),
        pytest.param(_parquet_bytes(_SMALL)[:-8] + b"\xff\xff\xff\x7fPAR1", id="footer-length"),
        pytest.param(b'{"id": 1, "text": "jsonl, named .parquet"}\n', id="jsonl-inside"),
        pytest.param(gzip.compress(_parquet_bytes(_SMALL)), id="gzipped"),
    ],
)
def test_a_parquet_file_whose_footer_does_not_decode_is_one_recorded_row(tmp_path, content):
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    t = read(path)
    assert t["id"].to_pylist() == ["bad.parquet:0"]
    assert reasons(t) == {"read:corrupt_parquet": 1} and t["text"][0].as_py() is None
    assert check_input(path) is None  # a data problem, recorded at read time


def test_a_footer_whose_counts_contradict_each_other_is_one_row(tmp_path):
    # The file's num_rows is checked against its row groups' counts: a flipped bit in
    # either must not make the reader invent (or lose) documents.
    src = _parquet_bytes(pa.table({"text": ["x"] * 7}))
    meta = pq.ParquetFile(io.BytesIO(src)).metadata
    assert meta.num_rows == 7
    footer_len = int.from_bytes(src[-8:-4], "little")
    footer = bytearray(src[-8 - footer_len : -8])
    # FileMetaData field 3 (num_rows, i64) is thrift compact zigzag 7 -> 0x0e after its header
    i = footer.index(bytes([0x16, 0x0E]))
    footer[i + 1] = 0x7E  # num_rows 63, the row group still says 7
    path = tmp_path / "liar.parquet"
    path.write_bytes(src[: -8 - footer_len] + bytes(footer) + src[-8:])
    assert pq.ParquetFile(path).metadata.num_rows == 63
    t = read(path)
    assert t["id"].to_pylist() == ["liar.parquet:0"] and reasons(t) == {"read:corrupt_parquet": 1}


# --- Parquet: one broken row group among good ones -------------------------------------------


def _four_groups(path: Path, **kwargs) -> pa.Table:
    table = pa.table(
        {
            "id": [f"doc-{i}" for i in range(100)],
            "text": [f"text number {i} " * 20 for i in range(100)],
            "url": [f"https://e.org/{i}" for i in range(100)],
        }
    )
    pq.write_table(table, path, row_group_size=25, **kwargs)
    return table


def _chunk_span(path: Path, group: int, column: str) -> tuple[int, int, int]:
    """(first page offset, first data page offset, end) of a column chunk, from the footer."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    c = meta.row_group(group).column(names.index(column))
    start = c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
    return start, c.data_page_offset, start + c.total_compressed_size


def _overwrite(path: Path, at: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[at : at + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("column", ["text", "id"])
@pytest.mark.parametrize("compression", ["snappy", "none"])
def test_a_broken_row_group_costs_exactly_its_own_rows(tmp_path, column, compression):
    path = tmp_path / "four.parquet"
    src = _four_groups(path, compression=compression)
    _, data_page, _ = _chunk_span(path, 2, column)
    _overwrite(path, data_page, b"\xff" * 40)  # the data page header no longer decodes

    batches = list(iter_batches(path, batch_rows=10))
    assert [b.num_rows for b in batches] == [10] * 10  # re-batched across the lost group
    t = read(path, batch_rows=10)
    assert reasons(t) == {None: 75, "read:corrupt_parquet": 25}
    good = t.filter(t["drop_reason"].is_null())
    expected = [i for i in range(100) if not 50 <= i < 75]
    assert good["id"].to_pylist() == [f"doc-{i}" for i in expected]
    assert good["text"].to_pylist() == [src["text"][i].as_py() for i in expected]
    assert good["url"].to_pylist() == [f"https://e.org/{i}" for i in expected]
    lost = t.slice(50, 25).to_pylist()
    assert [r["id"] for r in lost] == [f"four.parquet:{i}" for i in range(50, 75)]
    assert {(r["text"], r["html"], r["drop_reason"]) for r in lost} == {
        (None, None, "read:corrupt_parquet")
    }
    assert {r["source_path"] for r in lost} == {str(path)}


def test_a_row_group_that_breaks_part_way_keeps_the_rows_it_yielded(tmp_path):
    path = tmp_path / "pages.parquet"
    # Many small pages per column chunk, so the group's first batches decode before the
    # broken last page is reached.
    src = _four_groups(path, use_dictionary=False, data_page_size=512, write_batch_size=5)
    _, _, end = _chunk_span(path, 2, "text")
    _overwrite(path, end - 40, bytes(32))  # inside the last page's snappy data

    t = read(path, batch_rows=10)
    assert t.num_rows == 100
    kept_in_group = reasons(t).get(None, 0) - 75
    assert 0 < kept_in_group < 25 and kept_in_group % 10 == 0  # whole batches of the group
    assert t["id"].to_pylist()[50 : 50 + kept_in_group] == [
        f"doc-{i}" for i in range(50, 50 + kept_in_group)
    ]
    assert (
        t["text"].to_pylist()[50 : 50 + kept_in_group]
        == src["text"].to_pylist()[50 : 50 + kept_in_group]
    )
    lost = t.slice(50 + kept_in_group, 25 - kept_in_group)
    assert lost["id"].to_pylist() == [f"pages.parquet:{i}" for i in range(50 + kept_in_group, 75)]
    assert reasons(lost) == {"read:corrupt_parquet": 25 - kept_in_group}
    assert t["id"].to_pylist()[75:] == [f"doc-{i}" for i in range(75, 100)]


def test_page_checksums_turn_silent_corruption_into_recorded_rows(tmp_path):
    path = tmp_path / "crc.parquet"
    _four_groups(path, write_page_checksum=True, use_dictionary=False, compression="none")
    _, data_page, end = _chunk_span(path, 1, "text")
    # Plain, uncompressed text: overwritten letters still decode, as other letters. Only
    # the page's CRC tells; the reader asks pyarrow to check it.
    _overwrite(path, (data_page + end) // 2, b"#" * 16)
    t = read(path)
    assert reasons(t) == {None: 75, "read:corrupt_parquet": 25}
    assert t["id"].to_pylist()[25:50] == [f"crc.parquet:{i}" for i in range(25, 50)]


def test_dictionary_indices_past_the_dictionary_are_a_broken_group_not_a_later_crash(tmp_path):
    # pyarrow hands out such a batch without complaint; a stage would fail on it later.
    words = [f"word{i} text" for i in range(100)]
    path = tmp_path / "dict.parquet"
    pq.write_table(
        pa.table({"text": [words[i % 100] for i in range(400)]}),
        path,
        row_group_size=100,
        compression="none",
    )
    _, _, end = _chunk_span(path, 1, "text")
    _overwrite(path, end - 30, b"\xff" * 30)  # bit-packed indices: all ones, past 99
    t = read(path)
    assert reasons(t) == {None: 300, "read:corrupt_parquet": 100}
    assert t["id"].to_pylist()[100:200] == [f"dict.parquet:{i}" for i in range(100, 200)]
    assert t["text"].to_pylist()[200:] == [words[i % 100] for i in range(200, 400)]


def test_many_small_row_groups_come_out_in_full_batches(tmp_path):
    path = tmp_path / "tiny_groups.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(30)]}), path, row_group_size=3)
    assert [b.num_rows for b in iter_batches(path, batch_rows=7)] == [7, 7, 7, 7, 2]
    assert read(path)["id"].to_pylist() == [f"tiny_groups.parquet:{i}" for i in range(30)]


def test_a_parquet_file_deleted_before_it_is_read_raises_file_not_found(tmp_path):
    path = tmp_path / "gone.parquet"
    pq.write_table(_SMALL, path)
    batches = iter_batches(path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="gone.parquet"):
        list(batches)


# --- Parquet text columns of every kind ------------------------------------------------------

_TEXTS = ["alpha", None, "", "alpha"]


@pytest.mark.parametrize(
    "column",
    [
        pytest.param(pa.array(_TEXTS), id="string"),
        pytest.param(pa.array(_TEXTS, pa.large_string()), id="large_string"),
        pytest.param(pa.array(_TEXTS, pa.string_view()), id="string_view"),
        pytest.param(pa.array(_TEXTS).dictionary_encode(), id="dictionary"),
        pytest.param(pa.array([t and t.encode() for t in _TEXTS], pa.binary()), id="binary"),
        pytest.param(
            pa.array([t and t.encode() for t in _TEXTS], pa.large_binary()), id="large_binary"
        ),
    ],
)
def test_every_string_and_binary_text_type_reads_the_same(tmp_path, column):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": column}), path)
    t = read(path)
    assert t["text"].to_pylist() == ["alpha", None, None, "alpha"]
    assert t["drop_reason"].to_pylist() == [
        None,
        "read:missing_text",
        "read:missing_text",
        None,
    ]


def test_binary_and_mislabelled_string_text_follow_the_invalid_utf8_rule(tmp_path):
    values = [
        b"plain ascii",
        b"caf\xe9 " + b"x" * 300,  # one stray byte: kept, replaced
        "\u00e9t\u00e9 \u00e0 la plage".encode("latin-1") * 3,  # another encoding: dropped
        None,
    ]
    expected_reasons = [None, None, "read:invalid_utf8", "read:missing_text"]
    binary = pa.array(values, pa.binary())
    # A writer that never checked its UTF-8: Parquet does not check it when reading either.
    for name, column in [("bin", binary), ("str", binary.view(pa.string()))]:
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"text": column, "url": column}), path)
        t = read(path)
        assert t["drop_reason"].to_pylist() == expected_reasons, name
        assert t["text"][0].as_py() == "plain ascii"
        assert t["text"][1].as_py().startswith("caf\ufffd ")
        assert t["text"][2].as_py() is None
        assert t["url"][2].as_py() is not None  # urls are only replaced, never dropped


@pytest.mark.parametrize(
    "column",
    [
        pytest.param(pa.array([5, None, 7]), id="int64"),
        pytest.param(pa.array([0.5, None, 2.0]), id="float64"),
        pytest.param(pa.array([True, None, False]), id="bool"),
        pytest.param(pa.array([["a"], None, []]), id="list"),
        pytest.param(pa.array([{"t": "a"}, None, {"t": "b"}]), id="struct"),
    ],
)
def test_a_text_column_that_cannot_hold_text_is_text_not_string(tmp_path, column):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": column, "content": ["a", "b", "c"]}), path)
    t = read(path)
    assert t["drop_reason"].to_pylist() == [
        "read:text_not_string",
        "read:missing_text",
        "read:text_not_string",
    ]
    assert t["text"].null_count == 3
    problem = check_input(path)
    assert problem is not None and "cannot hold text" in problem and "content" in problem
    assert str(pq.read_schema(path).field("text").type) in problem and "\n" not in problem


def test_all_null_text_and_id_columns_are_missing_text_and_fallback_ids(tmp_path):
    path = tmp_path / "null.parquet"
    pq.write_table(pa.table({"text": pa.nulls(3), "id": pa.nulls(3)}), path)
    t = read(path)
    assert reasons(t) == {"read:missing_text": 3}
    assert t["id"].to_pylist() == [f"null.parquet:{i}" for i in range(3)]
    assert check_input(path) is None


def test_odd_url_title_and_date_columns_cost_the_field_not_the_document(tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(
        pa.table(
            {
                "text": ["a", "b"],
                "url": pa.array(["https://e.org/a", "https://e.org/b"]).dictionary_encode(),
                "title": pa.array([{"x": 1}, {"x": 2}]),  # a struct: not ours to interpret
                "date": pa.array(["2020-01-02", "not a date"], pa.string_view()),
            }
        ),
        path,
    )
    t = read(path)
    assert reasons(t) == {None: 2}
    assert t["url"].to_pylist() == ["https://e.org/a", "https://e.org/b"]
    assert t["title"].to_pylist() == [None, None]
    assert t["fetch_time"][0].as_py().isoformat() == "2020-01-02T00:00:00+00:00"
    assert t["fetch_time"][1].as_py() is None


def test_a_text_column_named_twice_reads_the_first(tmp_path):
    path = tmp_path / "twice.parquet"
    pq.write_table(
        pa.Table.from_arrays([pa.array(["first"]), pa.array(["second"])], ["text", "text"]),
        path,
    )
    assert read(path)["text"].to_pylist() == ["first"]


# --- one id rule, one text rule: JSONL, Parquet and HF datasets agree -----------------------

# (JSON value, Arrow column holding the same value, the id every reader gives it)
_ID_CASES = [
    (7, pa.array([7], pa.int64()), "7"),
    ("7", pa.array(["7"]), "7"),
    (7.0, pa.array([7.0]), "7"),
    (-3, pa.array([-3], pa.int32()), "-3"),
    (18446744073709551615, pa.array([18446744073709551615], pa.uint64()), "18446744073709551615"),
    (0.5, pa.array([0.5]), "0.5"),
    (1e-07, pa.array([1e-07]), "1e-07"),
    (1e20, pa.array([1e20]), "100000000000000000000"),
    (True, pa.array([True]), "true"),
    ({"b": 1, "a": [2]}, pa.array([{"b": 1, "a": [2]}]), '{"a":[2],"b":1}'),
    ([1, "x"], pa.array([["1", "x"]]), None),  # a list of one type in Arrow: see below
    (None, pa.array([None], pa.int64()), "FALLBACK"),
    ("", pa.array([""]), "FALLBACK"),
]


@pytest.mark.parametrize(("value", "column", "expected"), _ID_CASES)
def test_jsonl_parquet_and_hf_give_a_value_the_same_id(tmp_path, value, column, expected):
    jsonl = tmp_path / "doc.jsonl"
    jsonl.write_text(json.dumps({"id": value, "text": "t"}) + "\n")
    parquet = tmp_path / "doc.parquet"
    pq.write_table(pa.table({"id": column, "text": ["t"]}), parquet)
    got_jsonl = read(jsonl)["id"][0].as_py()
    got_parquet = read(parquet)["id"][0].as_py()
    if expected is None:  # [1, "x"] has no Arrow twin; each side by the rule
        assert got_jsonl == '[1,"x"]' and got_parquet == '["1","x"]'
        return
    if expected == "FALLBACK":
        assert got_jsonl == "doc.jsonl:0" and got_parquet == "doc.parquet:0"
        return
    assert got_jsonl == got_parquet == expected


def test_float_ids_with_nulls_and_nan_match_their_integer_ids(tmp_path):
    # pandas writes an integer id column with a missing value as float64
    path = tmp_path / "f.parquet"
    ids = pa.array([7.0, None, float("nan"), 0.25, 3.0])
    pq.write_table(pa.table({"id": ids, "text": ["t"] * 5}), path)
    assert read(path)["id"].to_pylist() == ["7", "f.parquet:1", "f.parquet:2", "0.25", "3"]


def test_hf_datasets_follow_the_same_id_and_text_rules(tmp_path):
    import datasets

    data = {"id": [7.0, None, 9.0, 10.0], "text": [5, None, 3, 4]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "nums"))
    t = pa.concat_tables(iter_hf_dataset(str(tmp_path / "nums"), batch_rows=3))
    assert t.schema.equals(READ_SCHEMA)
    assert t["id"].to_pylist() == ["7", "nums:train:1", "9", "10"]
    assert t["drop_reason"].to_pylist() == [
        "read:text_not_string",
        "read:missing_text",
        "read:text_not_string",
        "read:text_not_string",
    ]


def test_jsonl_text_that_is_not_a_string_is_text_not_string(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [
        {"id": "n", "text": 5},
        {"id": "f", "text": 0.5},
        {"id": "b", "text": False},
        {"id": "l", "text": ["a"]},
        {"id": "o", "text": {"a": 1}},
        {"id": "null", "text": None},
        {"id": "empty", "text": ""},
        {"id": "absent"},
        {"id": "ok", "text": "fine"},
    ]
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    assert by_id(read(path)) == {
        "n": "read:text_not_string",
        "f": "read:text_not_string",
        "b": "read:text_not_string",
        "l": "read:text_not_string",
        "o": "read:text_not_string",
        "null": "read:missing_text",
        "empty": "read:missing_text",
        "absent": "read:missing_text",
        "ok": None,
    }


# --- JSONL: odd bytes ------------------------------------------------------------------------


def test_boms_crlf_nul_bytes_and_raw_control_characters_are_read(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": 1, "text": "after a BOM"}\r\n'
        b'{"id": 2, "text": "a NUL \x00 inside"}\r\n'
        b'\xef\xbb\xbf{"id": 3, "text": "a concatenated file\'s BOM, a raw \t tab"}\r\n'
        b"\r\n"
        b'{"id": 4, "text": "escaped \\u0000 NUL"}'  # no newline at the end
    )
    t = read(path)
    assert by_id(t) == {"1": None, "2": None, "3": None, "4": None}
    assert t["text"].to_pylist() == [
        "after a BOM",
        "a NUL \x00 inside",
        "a concatenated file's BOM, a raw \t tab",
        "escaped \x00 NUL",
    ]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_a_utf16_jsonl_file_with_a_bom_is_read(tmp_path, encoding):
    text = '{"id": 1, "text": "caf\u00e9"}\r\n{"id": 2, "text": "\U0001f600"}\r\n'
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    path = tmp_path / "u16.jsonl"
    path.write_bytes(data)
    t = read(path)
    assert t["text"].to_pylist() == ["caf\u00e9", "\U0001f600"] and reasons(t) == {None: 2}


def test_lone_surrogate_escapes_are_replaced_under_the_invalid_utf8_rule(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        b'{"id": "a\\ud800", "url": "http://e/\\udc00", "title": "t\\udfff", "text": "one \\ud83d'
        + b" word" * 100
        + b'"}\n'
        b'{"id": "pair", "text": "\\ud83d\\ude00 a real pair"}\n'
        b'{"id": "all", "text": "\\ud800\\ud800"}\n'
    )
    rows = {r["id"]: r for r in read(path).to_pylist()}
    assert set(rows) == {"a\ufffd", "pair", "all"}
    first = rows["a\ufffd"]
    assert first["drop_reason"] is None and first["text"].startswith("one \ufffd word")
    assert first["url"] == "http://e/\ufffd" and first["title"] == "t\ufffd"
    assert rows["pair"]["text"] == "\U0001f600 a real pair"
    assert rows["all"]["drop_reason"] == "read:invalid_utf8"


def test_lines_that_are_not_json_objects_cost_one_row_each(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        b'{"id": "deep", "text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # too deep
        b'{"id": ' + b"9" * 5000 + b', "text": "an int past the digit limit"}',
        b"\x00" * 1000,  # a block of NULs, as a crashed writer leaves
        b'{"id": "ok", "text": "fine"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert by_id(read(path)) == {
        "bad.jsonl:0": "read:invalid_json",
        "bad.jsonl:1": "read:invalid_json",
        "bad.jsonl:2": "read:invalid_json",
        "ok": None,
    }


def test_compression_is_told_by_content_not_by_name(tmp_path):
    doc = b'{"id": 1, "text": "plain"}\n'
    (tmp_path / "plain.jsonl.gz").write_bytes(doc)
    (tmp_path / "gz.jsonl").write_bytes(gzip.compress(doc))
    (tmp_path / "pq.jsonl").write_bytes(_parquet_bytes(_SMALL))
    assert read(tmp_path / "plain.jsonl.gz")["text"].to_pylist() == ["plain"]
    assert read(tmp_path / "gz.jsonl")["text"].to_pylist() == ["plain"]
    t = read(tmp_path / "pq.jsonl")  # Parquet bytes as JSON Lines: bad lines, no crash
    assert t.num_rows > 0 and set(reasons(t)) <= {"read:invalid_json", "read:invalid_utf8"}


def test_a_line_too_long_to_hold_is_one_row_and_reading_goes_on(tmp_path, monkeypatch):
    import zstandard

    monkeypatch.setattr(reader_rows, "MAX_RECORD_BYTES", 1000)
    head = b'{"id": "a", "text": "before"}\n'
    long_line = b'{"id": "long", "text": "' + b"x" * 5000 + b'"}\n'
    tail = b'{"id": "c", "text": "after"}\n'
    no_newline = b"y" * (3 << 20)  # bigger than any read chunk, never held whole
    blob = head + long_line + tail + no_newline
    for name, data in [
        ("l.jsonl", blob),
        ("l.jsonl.zst", zstandard.ZstdCompressor().compress(blob)),
        ("l.jsonl.gz", gzip.compress(blob)),
    ]:
        (tmp_path / name).write_bytes(data)
        assert by_id(read(tmp_path / name)) == {
            "a": None,
            f"{name}:1": "read:too_large",
            "c": None,
            f"{name}:3": "read:too_large",
        }, name


def test_an_html_file_or_warc_record_too_large_to_hold_is_one_row(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_rows, "MAX_RECORD_BYTES", 1000)
    (tmp_path / "big.html").write_bytes(b"<html>" + b"x" * 5000 + b"</html>")
    assert by_id(read(tmp_path / "big.html")) == {"big.html:0": "read:too_large"}
    (tmp_path / "small.html").write_bytes(b"<html>ok</html>")
    assert by_id(read(tmp_path / "small.html")) == {"small.html:0": None}

    http = "application/http; msgtype=response"
    path = tmp_path / "big.warc"
    path.write_bytes(
        _warc_record("response", "http://a/big", _http(b"x" * 5000), http, "big")
        + _warc_record("response", "http://a/ok", _http(b"<html>ok</html>"), http, "ok")
    )
    assert by_id(read(path)) == {"big": "read:too_large", "ok": None}


def test_times_that_fall_outside_the_calendar_in_utc_are_null(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(
        b'{"id": 1, "text": "a", "date": "0001-01-01T00:00:00+14:00"}\n'
        b'{"id": 2, "text": "b", "date": "9999-12-31T23:00:00-05:00"}\n'
        b'{"id": 3, "text": "c", "date": "Tue, 1 Jan 99999 00:00:00 +0000"}\n'
        b'{"id": 4, "text": "d", "date": "2024-01-02T03:04:05+02:00"}\n'
    )
    t = read(path)
    times = t["fetch_time"].to_pylist()
    assert times[:3] == [None, None, None]
    assert times[3].isoformat() == "2024-01-02T01:04:05+00:00"


# --- plan time: check_input and classify_inputs ----------------------------------------------


def test_check_input_names_the_columns_when_the_text_column_is_absent(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a"], "content": ["x"], "n": [1]}), path)
    problem = check_input(path)
    assert problem is not None and "\n" not in problem
    assert str(path) in problem and "'text'" in problem and "text_column" in problem
    assert "[id, content, n]" in problem
    assert check_input(path, text_column="content") is None
    with pytest.raises(ValueError, match="no text column 'text'"):
        list(iter_batches(path))  # the reader still refuses: a call mistake


def test_check_input_passes_stage_outputs_readable_files_and_broken_ones(tmp_path):
    stage = tmp_path / "part-0.parquet"  # a column part of a stage: no text, id + drop_reason
    pq.write_table(pa.table({"id": ["a"], "lang": ["en"], "drop_reason": [None]}), stage)
    assert check_input(stage) is None
    ok = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"text": pa.array([b"bytes"], pa.binary())}), ok)
    assert check_input(ok) is None
    (tmp_path / "zero.parquet").write_bytes(b"")
    assert check_input(tmp_path / "zero.parquet") is None
    (tmp_path / "doc.jsonl").write_text('{"content": "no text key: a row problem"}\n')
    assert check_input(tmp_path / "doc.jsonl") is None
    assert "no such file" in check_input(tmp_path / "missing.parquet")
    assert "WAT file" in check_input(tmp_path / "x.warc.wat.gz")


def test_classify_inputs_sets_aside_files_no_reader_handles_with_a_reason(tmp_path):
    names = [
        "LICENSE",
        "README.md",
        "CC-MAIN-1.warc.wat.gz",
        "manifest.json",
        "notes.txt",
        "docs.jsonl.bz2",
        "warc.paths.gz",
        ".DS_Store",
        "a.jsonl.gz",
        "b.parquet",
        "c.warc.wet.gz",
        "d.JSON.GZ",
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    files = [str(tmp_path / n) for n in [*names, "sub"]]
    readable, rejected = classify_inputs(files)
    assert readable == [str(tmp_path / n) for n in names[-4:]]
    why = {Path(f).name: reason for f, reason in rejected}
    assert set(why) == {*names[:-4], "sub"}
    assert "no file extension" in why["LICENSE"] and "no file extension" in why[".DS_Store"]
    assert ".md" in why["README.md"] and ".txt" in why["notes.txt"]
    assert "WAT" in why["CC-MAIN-1.warc.wat.gz"] and "not documents" in why["warc.paths.gz"]
    assert ".jsonl" in why["manifest.json"] and ".bz2" in why["docs.jsonl.bz2"]
    assert "directory" in why["sub"]
    assert all(len(r) < 100 and "\n" not in r for r in why.values())
    for f, _ in rejected:
        with pytest.raises(ValueError):
            list(iter_batches(f))


# --- the command line ------------------------------------------------------------------------


def test_python_m_pipeline_readers_counts_rows_per_reason(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": 5}\nnot json\n')
    (tmp_path / "z.parquet").write_bytes(b"")
    (tmp_path / "LICENSE").write_text("MIT")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.readers", str(jsonl), str(tmp_path / "z.parquet")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert f"{jsonl}: 3 rows" in out.stdout and "z.parquet: 1 rows" in out.stdout
    for line in ("kept: 1", "read:text_not_string: 1", "read:invalid_json: 1"):
        assert line in out.stdout
    assert "read:corrupt_parquet: 1" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.readers", str(tmp_path / "LICENSE")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert bad.returncode == 1 and "no file extension" in bad.stderr


# --- every format, mutated: rows, never exceptions -------------------------------------------


def _warc_record(rtype: str, uri: str, block: bytes, ctype: str, rid: str) -> bytes:
    head = (
        f"WARC/1.0\r\nWARC-Type: {rtype}\r\nWARC-Record-ID: <urn:uuid:{rid}>\r\n"
        f"WARC-Date: 2024-01-02T03:04:05Z\r\nWARC-Target-URI: {uri}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(block)}\r\n\r\n"
    )
    return head.encode() + block + b"\r\n\r\n"


def _http(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + body


def _seed_files() -> dict[str, bytes]:
    import zstandard

    docs = [
        {"id": i if i % 2 else f"s{i}", "text": f"doc {i} caf\u00e9 " * (i % 9 + 1), "url": "u"}
        for i in range(60)
    ]
    jsonl = b"".join(json.dumps(d).encode() + b"\n" for d in docs)
    http = "application/http; msgtype=response"
    records = [
        _warc_record("response", f"http://a/{i}", _http(b"<p>page %d</p>" % i), http, f"r{i}")
        for i in range(8)
    ]
    table = pa.table(
        {"id": [str(d["id"]) for d in docs], "text": [d["text"] for d in docs], "date": ["x"] * 60}
    )
    return {
        "m.jsonl": jsonl,
        "m.jsonl.gz": gzip.compress(jsonl),
        "m.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl),
        "m.warc": b"".join(records),
        "m.warc.gz": b"".join(gzip.compress(r) for r in records),
        "m.html.gz": gzip.compress(b"<html>" + b"hello " * 500 + b"</html>"),
        "m.parquet": _parquet_bytes(table, row_group_size=15, data_page_size=256),
        "d.parquet": _parquet_bytes(
            pa.table({"text": pa.array([d["text"] for d in docs]).dictionary_encode()}),
            row_group_size=20,
            compression="none",
        ),
    }


def _mutate(rng: random.Random, data: bytes) -> bytes:
    d = bytearray(data)
    i = rng.randrange(len(d))
    kind = rng.randrange(5)
    if kind == 0:  # a few flipped bytes
        for _ in range(rng.randint(1, 8)):
            d[rng.randrange(len(d))] = rng.randrange(256)
    elif kind == 1:  # cut short
        del d[i:]
    elif kind == 2:  # a run of garbage
        d[i : i + 64] = bytes(rng.randrange(256) for _ in range(64))
    elif kind == 3:  # a run of zeros
        d[i : i + 64] = bytes(64)
    else:  # a stretch of the file repeated elsewhere
        j = rng.randrange(len(d))
        d[i:i] = d[j : j + rng.randint(1, 300)]
    return bytes(d)


def test_mutated_files_of_every_format_become_rows_never_exceptions(tmp_path):
    rng = random.Random(20260101)
    for name, data in _seed_files().items():
        path = tmp_path / name
        for attempt in range(25):
            path.write_bytes(_mutate(rng, data))
            try:
                t = read(path, batch_rows=16)
            except Exception as e:  # noqa: BLE001 - the point: report which mutation raised
                keep = tmp_path.parent / f"failed-{attempt}-{name}"
                keep.write_bytes(path.read_bytes())
                raise AssertionError(
                    f"{name} attempt {attempt} raised {e!r}; kept as {keep}"
                ) from e
            assert t["id"].null_count == 0
