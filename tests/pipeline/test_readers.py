"""Readers: every format yields READ_SCHEMA batches, and bad input becomes counted rows.

Real files come from ../shared/data (Common Crawl, wget and warcio WARCs, FineWeb Parquet,
Dolma JSONL, trafilatura's HTML); broken variants of them are made in tmp_path.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.readers import READERS, detect_format, iter_batches, iter_hf_dataset
from pipeline.schema import READ_SCHEMA

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DOLMA_WARC = DATA / "warc" / "dolma" / "sample-0000.warc.gz"
WARCIO = DATA / "warc" / "warcio"
WHIRLWIND = DATA / "warc" / "whirlwind-python"
FINEWEB = DATA / "web_text" / "fineweb_sample"
CCNET = DATA / "web_text" / "dolma_ccnet"
HTML_DIR = DATA / "html_extraction" / "trafilatura-eval-en" / "html"

# Under CI=true a missing data folder fails the tests that need it instead of skipping them.
needs_data = pytest.mark.skipif(
    not DATA.is_dir() and os.environ.get("CI") != "true",
    reason=f"shared real data not found at {DATA} (clone shared/ beside)",
)


def read(path: Path | str, **kwargs) -> pa.Table:
    """All batches of `path`, each checked against READ_SCHEMA, concatenated."""
    batches = list(iter_batches(path, **kwargs))
    for b in batches:
        assert b.schema.equals(READ_SCHEMA), b.schema
    return pa.concat_tables(batches) if batches else READ_SCHEMA.empty_table()


def reasons(table: pa.Table) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for r in table["drop_reason"].to_pylist():
        out[r] = out.get(r, 0) + 1
    return out


def kept(table: pa.Table) -> pa.Table:
    return table.filter(table["drop_reason"].is_null())


# --- formats and dispatch --------------------------------------------------------------------


def test_detect_format_picks_the_longest_extension_and_explains_unknown_ones(tmp_path):
    assert detect_format("a/CC-MAIN-1.warc.wet.gz") == ".warc.wet.gz"
    assert detect_format("x.WARC.GZ") == ".warc.gz"
    assert detect_format(Path("d.jsonl.zst")) == ".jsonl.zst"
    assert detect_format("page.htm") == ".htm"
    assert set(READERS) >= {".warc", ".wet", ".jsonl.gz", ".parquet", ".html.gz", ".ndjson"}
    with pytest.raises(ValueError, match=r"notes\.txt.*\.jsonl.*\.parquet.*\.warc\.gz"):
        detect_format("notes.txt")
    with pytest.raises(ValueError, match="a WAT file: crawl metadata"):
        detect_format("x.warc.wat.gz")
    with pytest.raises(ValueError, match="is a directory"):
        detect_format(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(iter_batches(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize(
    "name",
    [
        "e.warc.gz",
        "e.warc",
        "e.wet.gz",
        "e.jsonl",
        "e.jsonl.gz",
        "e.jsonl.zst",
        "e.html",
        "e.html.gz",
    ],
)
def test_an_empty_file_yields_no_rows(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    assert read(tmp_path / name).num_rows == 0


def test_an_empty_parquet_file_is_a_failed_write_not_an_empty_one(tmp_path):
    (tmp_path / "e.parquet").write_bytes(b"")  # a Parquet file with no rows still has a footer
    t = read(tmp_path / "e.parquet")
    assert t["id"].to_pylist() == ["e.parquet:0"] and reasons(t) == {"read:corrupt_parquet": 1}


# --- WARC and WET ----------------------------------------------------------------------------


@needs_data
def test_dolma_warc_gives_its_22_captures_in_batches():
    batches = list(iter_batches(DOLMA_WARC, batch_rows=10))
    assert [b.num_rows for b in batches] == [10, 10, 2]
    t = read(DOLMA_WARC)
    assert t.num_rows == 22 and reasons(t) == {None: 22}  # no request/warcinfo/metadata rows
    row = t.slice(0, 1).to_pylist()[0]
    assert row["id"] == "283E41D7-F686-4C3E-B7DA-E8D248A100C1"  # no <urn:uuid: ... >
    assert row["url"] == "https://www.semanticscholar.org/research/research-team"  # no <>
    assert row["fetch_time"].isoformat() == "2024-04-25T16:24:44+00:00"
    assert row["content_type"] == "text/html" and row["text"] is None
    assert row["html"].startswith(b"<!DOCTYPE html>")
    assert row["source_path"] == str(DOLMA_WARC)
    # wget's own log and arguments are resource records, not pages
    assert not any(u.startswith("metadata://") for u in t["url"].to_pylist())
    assert len(set(t["id"].to_pylist())) == 22


@needs_data
def test_warcio_edge_cases_match_warcio_decoding():
    from warcio.archiveiterator import ArchiveIterator

    def warcio_bodies(path: Path) -> list[bytes]:
        with open(path, "rb") as f:
            return [
                r.content_stream().read()
                for r in ArchiveIterator(f)
                if r.rec_type in ("response", "resource")
            ]

    # response gzip-encoded on the wire + a revisit + requests: only the response is read
    t = read(WARCIO / "example.warc.gz")
    assert t.num_rows == 1 and t["url"][0].as_py() == "http://example.com/"
    assert t["html"][0].as_py() == warcio_bodies(WARCIO / "example.warc.gz")[0]
    assert t["html"][0].as_py().startswith(b"<!doctype html>")  # gunzipped

    # chunked transfer encoding is undone
    t = read(WARCIO / "example-iana.org-chunked.warc")
    body = t["html"][0].as_py()
    assert body == warcio_bodies(WARCIO / "example-iana.org-chunked.warc")[0]
    assert body.startswith(b"<!doctype html>") and body.rstrip().endswith(b"</html>")

    # a resource record is a document; its Content-Type loses its parameters
    t = read(WARCIO / "example-resource.warc.gz")
    assert t.to_pylist()[0] | {"html": None} == {
        "id": "6e7f60da-2c7b-11e7-aaf7-0242ac120007",
        "text": None,
        "html": None,
        "url": "http://example.com/",
        "title": None,
        "fetch_time": t["fetch_time"][0].as_py(),
        "content_type": "text/html",
        "source_path": str(WARCIO / "example-resource.warc.gz"),
        "drop_reason": None,
    }
    assert t["html"][0].as_py() == warcio_bodies(WARCIO / "example-resource.warc.gz")[0]


@needs_data
def test_whirlwind_warc_and_wet_describe_the_same_page():
    warc = read(WHIRLWIND / "whirlwind.warc.gz")
    wet = read(WHIRLWIND / "whirlwind.warc.wet.gz")
    assert warc.num_rows == wet.num_rows == 1
    assert warc["url"][0] == wet["url"][0]
    assert warc["url"][0].as_py() == "https://an.wikipedia.org/wiki/Escopete"
    assert warc["html"][0].as_py().startswith(b"<!DOCTYPE html>")
    assert wet["html"][0].as_py() is None
    assert wet["text"][0].as_py().startswith("Escopete")
    assert wet["content_type"][0].as_py() == "text/plain"
    assert wet["id"][0].as_py() == "ba729a40-ff84-4085-8d48-0a5b2ee0c42d"  # conversion record
    assert wet["fetch_time"][0] == warc["fetch_time"][0]


@needs_data
def test_a_warc_gz_cut_in_half_keeps_what_came_before_plus_one_row(tmp_path):
    full = read(DOLMA_WARC)
    data = DOLMA_WARC.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) // 2])
    t = read(cut)
    good = kept(t)
    assert reasons(t) == {None: 13, "read:truncated_gzip": 1}
    assert good["id"].to_pylist() == full["id"].to_pylist()[:13]
    assert good["html"].to_pylist() == full["html"].to_pylist()[:13]
    dropped = t.filter(t["drop_reason"].is_valid()).to_pylist()[0]
    assert dropped["id"] == full["id"][13].as_py()  # the record the cut went through
    assert dropped["html"] is None and dropped["url"] == full["url"][13].as_py()


def _gzip_members(data: bytes) -> list[int]:
    starts, pos = [], 0
    while pos < len(data):
        starts.append(pos)
        d = zlib.decompressobj(wbits=31)
        d.decompress(data[pos:])
        pos = len(data) - len(d.unused_data)
    return starts


@needs_data
def test_a_cut_inside_warc_headers_is_still_reported(tmp_path):
    data = DOLMA_WARC.read_bytes()
    members = _gzip_members(data)
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: members[5] + 30])  # a few bytes into a record's gzip member
    t = read(cut)
    assert list(reasons(t)) == [None, "read:truncated_gzip"]
    plain = tmp_path / "cut.warc"
    raw = gzip.decompress(data[: members[5]])
    plain.write_bytes(raw + b"WARC/1.0\r\nWARC-Type: resp")
    t = read(plain)
    assert reasons(t)["read:truncated_record"] == 1


@needs_data
def test_any_cut_inside_a_response_header_gives_exactly_one_truncated_row(tmp_path):
    data = DOLMA_WARC.read_bytes()
    members = _gzip_members(data)
    start, end = members[16], members[17]  # the 8th response record
    cut = tmp_path / "cut.warc.gz"
    seen = 0
    for k in range(20, end - start, 5):
        d = zlib.decompressobj(wbits=31)
        if b"\r\n\r\n" in d.decompress(data[start : start + k]):
            break  # past the WARC header
        cut.write_bytes(data[: start + k])
        t = read(cut)
        assert reasons(t) == {None: 7, "read:truncated_gzip": 1}, k
        seen += 1
    assert seen > 10


@needs_data
def test_a_corrupt_gzip_member_costs_one_record_and_reading_resumes(tmp_path):
    full = read(DOLMA_WARC)
    data = bytearray(DOLMA_WARC.read_bytes())
    members = _gzip_members(bytes(data))
    # members: warcinfo, then request/response pairs; member 4 is the second response
    mid = (members[4] + members[5]) // 2
    data[mid : mid + 64] = bytes(64)
    bad = tmp_path / "bad.warc.gz"
    bad.write_bytes(bytes(data))
    t = read(bad)
    assert reasons(t) == {None: 21, "read:corrupt_gzip": 1}
    assert kept(t)["id"].to_pylist() == [i for k, i in enumerate(full["id"].to_pylist()) if k != 1]


@needs_data
def test_a_malformed_warc_header_costs_one_record(tmp_path):
    raw = gzip.decompress(DOLMA_WARC.read_bytes())
    second_response = raw.find(b"WARC-Type: response", raw.find(b"WARC-Type: response") + 1)
    header = raw.rfind(b"WARC/1.0", 0, second_response)
    bad = tmp_path / "bad.warc"
    bad.write_bytes(raw[:header] + b"XXXX/9.9" + raw[header + 8 :])
    t = read(bad)
    assert reasons(t) == {None: 21, "read:malformed_record": 1}


def _record(rtype: str, uri: str, block: bytes, ctype: str, rid: str) -> bytes:
    head = (
        f"WARC/1.0\r\nWARC-Type: {rtype}\r\nWARC-Record-ID: <urn:uuid:{rid}>\r\n"
        f"WARC-Date: 2024-01-02T03:04:05Z\r\nWARC-Target-URI: {uri}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(block)}\r\n\r\n"
    )
    return head.encode() + block + b"\r\n\r\n"


def _http(status: str, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: text/html; charset=UTF-8", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_warc_records_that_are_not_pages_are_skipped_and_bad_ones_counted(tmp_path):
    http = "application/http; msgtype=response"
    page = b"<html><body>hello</body></html>"
    path = tmp_path / "mixed.warc"
    path.write_bytes(
        _record("warcinfo", "", b"software: test\r\n", "application/warc-fields", "w")
        + _record("request", "http://a/", b"GET / HTTP/1.1\r\n\r\n", "application/http", "q")
        + _record("response", "http://a/", _http("200 OK", page), http, "ok")
        + _record("response", "http://a/gone", _http("404 Not Found", b"nope"), http, "404")
        + _record(
            "response",
            "http://a/c",
            _http("200 OK", b"zz\r\nx", "Transfer-Encoding: chunked"),
            http,
            "chunk",
        )
        + _record("response", "http://a/e", _http("200 OK", b""), http, "empty")
        + _record("response", "dns:a", b"20240102 a. 60 IN A 1.2.3.4", "text/dns", "dns")
        + _record("revisit", "http://a/", _http("200 OK", b""), http, "rev")
        + _record("resource", "metadata://crawler/log", b"log", "text/plain", "log")
        + _record("conversion", "http://a/", "caf\u00e9".encode(), "text/plain", "wet")
        + _record("conversion", "http://a/l", "caf\u00e9".encode("latin-1") * 9, "text/plain", "l1")
    )
    t = read(path)
    got = dict(zip(t["id"].to_pylist(), t["drop_reason"].to_pylist(), strict=True))
    assert got == {
        "ok": None,
        "404": "read:http_status",
        "chunk": "read:bad_encoding",
        "empty": "read:empty_payload",
        "wet": None,
        "l1": "read:invalid_utf8",
    }
    rows = {r["id"]: r for r in t.to_pylist()}
    assert rows["ok"]["html"] == page and rows["ok"]["content_type"] == "text/html"
    assert rows["wet"]["text"] == "caf\u00e9" and rows["wet"]["html"] is None
    assert rows["404"]["url"] == "http://a/gone" and rows["404"]["html"] is None


# --- JSONL -----------------------------------------------------------------------------------


def _docs(n: int) -> list[dict]:
    return [
        {
            "id": i,
            "text": f"document {i}",
            "url": f"https://e.org/{i}",
            "timestamp": "2024-05-06T07:08:09Z",
            "title": f"T{i}",
        }
        for i in range(n)
    ]


def _jsonl(docs: list[dict]) -> bytes:
    return b"".join(json.dumps(d).encode() + b"\n" for d in docs)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz"])
def test_jsonl_plain_gzip_and_zstd(tmp_path, suffix):
    import zstandard

    blob = _jsonl(_docs(25))
    if suffix.endswith(".gz"):
        blob = gzip.compress(blob)
    elif suffix.endswith(".zst"):
        blob = zstandard.ZstdCompressor().compress(blob)
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(blob)
    assert [b.num_rows for b in iter_batches(path, batch_rows=10)] == [10, 10, 5]
    t = read(path)
    assert t["id"].to_pylist() == [str(i) for i in range(25)]  # int ids become strings
    row = t.to_pylist()[3]
    assert row["text"] == "document 3" and row["url"] == "https://e.org/3"
    assert row["title"] == "T3" and row["content_type"] == "text/plain"
    assert row["fetch_time"].isoformat() == "2024-05-06T07:08:09+00:00"
    assert row["html"] is None and row["drop_reason"] is None


@pytest.mark.parametrize(
    ("suffix", "reason"), [(".gz", "truncated_gzip"), (".zst", "truncated_zstd")]
)
def test_a_truncated_compressed_jsonl_keeps_the_lines_before_the_cut(tmp_path, suffix, reason):
    import zstandard

    docs = [{"id": i, "text": f"{i} " + "word " * 200} for i in range(400)]
    blob = _jsonl(docs)
    z = gzip.compress(blob) if suffix == ".gz" else zstandard.ZstdCompressor().compress(blob)
    path = tmp_path / f"cut.jsonl{suffix}"
    path.write_bytes(z[: len(z) // 2])
    t = read(path)
    good = kept(t)
    assert 0 < good.num_rows < 400
    assert good["id"].to_pylist() == [str(i) for i in range(good.num_rows)]
    assert reasons(t)[f"read:{reason}"] == 1 and t.num_rows == good.num_rows + 1


def test_bad_jsonl_lines_become_rows_and_reading_goes_on(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"id": "a", "text": "fine"}\n'
        b"\n"  # blank lines are not records
        b'{"id": "b", "text": "caf\xe9 ' + b"x" * 300 + b'"}\n'  # one stray byte: kept
        b'{"id": "c", "text": "\xe9\xe8\xe0\xe7 latin-1 \xe9\xe9", "url": "http://c"}\n'
        b'{"id": "d", "text": "no closing brace"\n'
        b"[1, 2, 3]\n"
        b'{"id": "e", "text": null}\n'
        b'{"id": "f", "url": "http://f", "date": "not a date"}\n'
        b'{"id": "g", "text": "last", "date": "yesterday"}\n'
    )
    t = read(path)
    got = dict(zip(t["id"].to_pylist(), t["drop_reason"].to_pylist(), strict=True))
    assert got == {
        "a": None,
        "b": None,
        "c": "read:invalid_utf8",
        "bad.jsonl:4": "read:invalid_json",  # no id to keep: file name and line number
        "bad.jsonl:5": "read:invalid_json",
        "e": "read:missing_text",
        "f": "read:missing_text",
        "g": None,
    }
    rows = {r["id"]: r for r in t.to_pylist()}
    assert rows["b"]["text"].startswith("caf\ufffd ")
    assert rows["c"]["url"] == "http://c" and rows["c"]["text"] is None
    assert rows["f"]["url"] == "http://f"
    assert rows["g"]["fetch_time"] is None  # an unparseable date is null, not an error


def test_a_50mb_document_streams_through(tmp_path):
    big = "0123456789" * 5_000_000
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(json.dumps({"id": "small", "text": "before"}).encode() + b"\n")
        f.write(json.dumps({"id": "big", "text": big}).encode() + b"\n")
        f.write(json.dumps({"id": "after", "text": "after"}).encode() + b"\n")
    t = read(path)
    assert t["id"].to_pylist() == ["small", "big", "after"]
    assert len(t["text"][1].as_py()) == 50_000_000 and reasons(t) == {None: 3}


@needs_data
def test_dolma_jsonl_takes_url_and_title_from_metadata():
    t = read(CCNET / "cc_en_head-0091.jsonl.gz")
    assert t.num_rows == 10 and reasons(t) == {None: 10}
    row = t.to_pylist()[0]
    assert (
        row["url"]
        == row["id"]
        == ("http://100kinvesting.com/2016/11/28/first-teleconference-calls-invoice-factoring/")
    )
    assert row["title"].startswith("First Teleconference Calls")
    assert row["fetch_time"].isoformat() == "2020-03-29T09:04:10+00:00"  # "created"


# --- Parquet and Hugging Face datasets -------------------------------------------------------


@needs_data
def test_fineweb_parquet():
    path = FINEWEB / "batch_000001.parquet"
    src = pq.read_table(path)
    assert [b.num_rows for b in iter_batches(path, batch_rows=32)] == [32, 32, 32, 4]
    t = read(path)
    assert t["id"].to_pylist() == src["id"].to_pylist()  # FineWeb's own ids, kept as given
    assert t["text"].to_pylist() == src["text"].to_pylist()
    assert t["url"].to_pylist() == src["url"].to_pylist()
    assert t["fetch_time"].null_count == 0 and reasons(t) == {None: 100}


def test_parquet_fallback_ids_missing_text_and_bad_dates(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table(
            {
                "text": ["a", None, "", "d"],
                "date": ["2020-01-02", "garbage", None, "2021-03-04T05:06:07+02:00"],
                "other": [1, 2, 3, 4],
            }
        ),
        path,
    )
    t = read(path, batch_rows=3)
    assert t["id"].to_pylist() == ["p.parquet:0", "p.parquet:1", "p.parquet:2", "p.parquet:3"]
    assert t["drop_reason"].to_pylist() == [None, "read:missing_text", "read:missing_text", None]
    times = [x.isoformat() if x else None for x in t["fetch_time"].to_pylist()]
    assert times == ["2020-01-02T00:00:00+00:00", None, None, "2021-03-04T03:06:07+00:00"]
    with pytest.raises(ValueError, match="no text column 'content'.*text_column="):
        read(path, text_column="content")


def test_a_corrupt_parquet_file_is_one_row(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not really parquet PAR1")
    t = read(path)
    assert t["id"].to_pylist() == ["broken.parquet:0"]
    assert reasons(t) == {"read:corrupt_parquet": 1}


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    data = {"id": [7, 8, 9], "text": ["seven", None, "nine"], "url": ["u7", "u8", None]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "ds"))
    t = pa.concat_tables(iter_hf_dataset(str(tmp_path / "ds"), batch_rows=2))
    assert t.schema.equals(READ_SCHEMA)
    assert t["id"].to_pylist() == ["7", "8", "9"]
    assert t["drop_reason"].to_pylist() == [None, "read:missing_text", None]
    assert t["url"].to_pylist() == ["u7", "u8", None]

    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"body": ["x", "y"]})}).save_to_disk(
        str(tmp_path / "dd")
    )
    t = pa.concat_tables(iter_hf_dataset(str(tmp_path / "dd"), split="test", text_column="body"))
    assert t["id"].to_pylist() == ["dd:test:0", "dd:test:1"]
    assert t["text"].to_pylist() == ["x", "y"]
    with pytest.raises(ValueError, match="no split 'train'"):
        list(iter_hf_dataset(str(tmp_path / "dd")))


def test_hf_streaming_from_a_local_data_folder(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "part.jsonl").write_bytes(_jsonl(_docs(5)))
    t = pa.concat_tables(iter_hf_dataset(str(folder), batch_rows=2))
    assert t.schema.equals(READ_SCHEMA)
    assert t["id"].to_pylist() == ["0", "1", "2", "3", "4"]
    assert t["fetch_time"][0].as_py().isoformat() == "2024-05-06T07:08:09+00:00"


# --- HTML files ------------------------------------------------------------------------------


@needs_data
def test_html_gz_file_is_one_document(tmp_path):
    src = HTML_DIR / "bbc.com.52241221.html.gz"
    t = read(src)
    assert t.num_rows == 1
    row = t.to_pylist()[0]
    assert row["id"] == "bbc.com.52241221.html.gz:0"
    assert row["html"] == gzip.decompress(src.read_bytes())
    assert row["content_type"] == "text/html" and row["text"] is None

    cut = tmp_path / "cut.html.gz"
    cut.write_bytes(src.read_bytes()[:500])
    assert read(cut).to_pylist()[0]["drop_reason"] == "read:truncated_gzip"


def test_plain_html_file(tmp_path):
    path = tmp_path / "page.html"
    path.write_bytes(b"<html><title>x</title></html>")
    t = read(path)
    assert t["html"].to_pylist() == [b"<html><title>x</title></html>"]
    assert t["id"].to_pylist() == ["page.html:0"]
