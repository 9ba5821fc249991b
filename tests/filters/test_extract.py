"""The `extract` stage on real pages: gold snippets, WARC payloads, and every drop reason."""

from __future__ import annotations

import codecs
import gzip
import json
import os
import pickle
import re
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from filters.cascade import drop_boilerplate_lines
from filters.extract import (
    ExtractConfig,
    ExtractStage,
    decode_html,
    needs_fallback,
)
from pipeline.schema import READ_SCHEMA

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GOLD = DATA / "html_extraction" / "trafilatura-eval-en"
WARC = DATA / "warc" / "dolma" / "sample-0000.warc.gz"
SAMPLE_WARC = Path(__file__).resolve().parents[2] / "data" / "sample" / "dolma-sample-0000.warc.gz"
# Gold pages every backend gets fully right (all `with` snippets in, all `without` out).
GOLD_FILES = (
    "flowfx.de.tmux.html",
    "strangemachines.io.performant.html",
    "fouryears.eu.interning.html",
)
BACKENDS = ("resiliparse", "trafilatura", "cascade")
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000010000000100806000000") * 40


def rows(*records: dict) -> pa.Table:
    """A reader-shaped table; `id` defaults to the row number."""
    return pa.Table.from_pylist(
        [{"id": str(i), **r} for i, r in enumerate(records)], schema=READ_SCHEMA
    )


def _need(path: Path) -> None:
    """Shared data a test reads: missing, the test is skipped, or fails where CI=true."""
    if not path.exists():
        message = f"shared data not found at {path}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def gold() -> list[tuple[dict, bytes]]:
    _need(GOLD)
    items = json.loads((GOLD / "evaldata_en_subset.json").read_text(encoding="utf-8"))
    by_file = {item["file"]: item for item in items.values()}
    return [
        (by_file[f], gzip.decompress((GOLD / by_file[f]["html_gz"]).read_bytes()))
        for f in GOLD_FILES
    ]


def read_warc(path: Path) -> list[dict]:
    """The WARC's HTTP responses as reader-shaped rows."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    with path.open("rb") as fh:
        return [
            {
                "id": rec.record_id,
                "html": rec.reader.read(),
                "url": rec.headers.get("WARC-Target-URI"),
                "content_type": rec.http_headers.get("Content-Type"),
            }
            for rec in ArchiveIterator(fh, record_types=WarcRecordType.response, parse_http=True)
        ]


@pytest.fixture(scope="module")
def warc_pages() -> list[dict]:
    _need(WARC)
    return read_warc(WARC)


@pytest.fixture(scope="module")
def sample_pages() -> dict[str, dict]:
    """The bundled sample's pages by URL."""
    return {page["url"]: page for page in read_warc(SAMPLE_WARC)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_gold_pages_keep_main_text_and_leave_boilerplate_out(gold, backend):
    table = rows(*({"html": raw, "content_type": "text/html"} for _, raw in gold))
    out = ExtractStage(backend=backend)(table)

    assert out["drop_reason"].null_count == len(gold)
    assert out["html"].null_count == len(gold)  # raw bytes are not carried downstream
    columns = [out[c].to_pylist() for c in ("text", "title", "n_chars")]
    for (item, _), text, title, n_chars in zip(gold, *columns, strict=True):
        found = norm(text)
        assert all(norm(s) in found for s in item["with"]), item["file"]
        assert not any(norm(s) in found for s in item["without"]), item["file"]
        assert title
        assert n_chars == len(text)


def test_default_backend_extracts_every_dolma_warc_page(warc_pages):
    out = ExtractStage()(rows(*warc_pages))

    assert ExtractStage().config.backend == "cascade"
    assert out["drop_reason"].null_count == len(warc_pages) == 22
    assert min(out["n_chars"].to_pylist()) > 100
    assert out["title"].null_count == 0
    texts = dict(zip(out["url"].to_pylist(), out["text"].to_pylist(), strict=True))
    assert "Kyle Lo" in texts["<https://kyleclo.com/>"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_rows_pass_through_untouched(backend):
    text = "  Already extracted text, from a WET record.\nSecond line.  "
    table = rows(
        {"text": text, "title": "kept title"},
        {"text": "Another document.", "content_type": "text/html"},
    )
    out = ExtractStage(backend=backend)(table)

    assert out["text"].to_pylist() == [text, "Another document."]
    assert out["title"].to_pylist() == ["kept title", None]
    assert out["n_chars"].to_pylist() == [len(text), len("Another document.")]
    assert out["drop_reason"].null_count == 2


def test_cascade_asks_trafilatura_only_where_the_fast_text_is_poor(sample_pages, monkeypatch):
    import trafilatura

    asked = []
    real = trafilatura.extract
    monkeypatch.setattr(
        trafilatura, "extract", lambda html, **kw: asked.append(html) or real(html, **kw)
    )
    # resiliparse keeps only the heading and the intro of this page's list of facts
    poor, good = (
        sample_pages["<https://soldaini.net/facts/>"],
        sample_pages["<https://kyleclo.com/>"],
    )
    fast = ExtractStage(backend="resiliparse")(rows(poor))["text"].to_pylist()[0]
    assert needs_fallback(fast) and "pronounced" not in fast

    out = ExtractStage(backend="cascade")(rows(poor, good))

    assert len(asked) == 1 and "facts about me" in asked[0]  # the good page stays on the fast path
    assert out["drop_reason"].null_count == 2
    facts, home = out["text"].to_pylist()
    assert "My last name is pronounced sol-dah-ee-nee" in facts
    assert "Kyle Lo" in home
    assert out["title"].null_count == 0


def test_cascade_reads_the_articles_container_and_drops_boilerplate_lines():
    story = " ".join(f"The committee met on day {i} and agreed on the budget." for i in range(12))
    sidebar = " ".join(f"Trending story number {i} about celebrities." for i in range(12))
    page = f"""<html><body><div class="wrap">
        <div class="sidebar-left"><p>{sidebar}</p></div>
        <div class="article-body"><h2>Budget agreed</h2><p>{story}</p>
          <p>Advertisement</p>
          <p>Sign up for our newsletter to get the latest news.</p>
          <p>The newsletter of the committee, a document of 40 pages sent to every member in
          the spring, lists every line of the budget with its cost and the vote on it.</p>
        </div>
        <div class="sidebar-right"><p>{sidebar}</p></div></div></body></html>"""
    text = ExtractStage(backend="cascade")(rows({"html": page.encode()}))["text"][0].as_py()
    assert "agreed on the budget" in text and "Budget agreed" in text
    assert "Trending story" not in text  # outside the article's container
    assert "Advertisement" not in text and "Sign up for our newsletter" not in text
    assert "The newsletter of the committee, a document of 40 pages" in text  # long: not a call
    assert drop_boilerplate_lines("Share\nShare this with your class: it is long enough.") == (
        "Share this with your class: it is long enough."
    )

    # a container with too little text is not trusted: the whole page's main text is read
    short = page.replace(story, "Too short.")
    text = ExtractStage(backend="cascade")(rows({"html": short.encode()}))["text"][0].as_py()
    assert "Too short." in text


def test_the_cascades_rules_are_in_its_fingerprint_only():
    assert ExtractStage(backend="cascade").content_fingerprint() == {"cascade": "2"}
    assert ExtractStage(backend="trafilatura").content_fingerprint() == {}


def test_cascade_survives_empty_garbage_and_too_deep_html():
    table = rows(
        {"html": b""},
        {"html": b"</p></div></body><p"},
        {"html": b"<<<>>><html><</"},
        {"html": b"<html><head><title>only a title</title></head></html>"},
        {"html": "<p>A short page, ünïcode ☃.</p>".encode()},
        {"html": b"<html><body>" + b"<div><p>nested paragraph text</p>" * 3000},
        {"html": PNG},
    )
    out = ExtractStage(backend="cascade")(table)

    assert out["drop_reason"].to_pylist() == [
        "extract:empty",
        "extract:empty",
        None,  # text is text, even when it looks like markup
        "extract:empty",
        None,  # trafilatura finds nothing on a short page: the fast text stays
        None,  # too deep for resiliparse: trafilatura's turn
        "extract:decode_error",
    ]
    assert out["text"].to_pylist()[4] == "A short page, ünïcode ☃."
    assert "nested paragraph text" in out["text"].to_pylist()[5]
    assert out["title"].to_pylist()[3] == "only a title"


def test_non_html_content_types_are_dropped_and_plain_text_is_decoded():
    table = rows(
        {"html": b"%PDF-1.4 ...", "content_type": "application/pdf"},
        {"html": PNG, "content_type": "image/png"},
        {"html": "Grüße aus Köln".encode("latin-1"), "content_type": "text/plain; charset=latin1"},
        {
            "html": b"<p>Hello there, this is a page.</p>",
            "content_type": "TEXT/HTML; Charset=UTF-8",
        },
    )
    out = ExtractStage(backend="resiliparse")(table)

    assert out["drop_reason"].to_pylist() == ["extract:non_html", "extract:non_html", None, None]
    assert out["text"].to_pylist()[2] == "Grüße aus Köln"
    assert out["text"].to_pylist()[3] == "Hello there, this is a page."
    assert out["html"].null_count == 4

    strict = ExtractStage(backend="resiliparse", text_content_types=[])(table)
    assert strict["drop_reason"].to_pylist()[2] == "extract:non_html"


def test_oversized_payload_is_dropped_without_parsing(warc_pages):
    small, big = sorted(warc_pages, key=lambda r: len(r["html"]))[:: len(warc_pages) - 1]
    limit = len(small["html"]) + 1
    out = ExtractStage(max_html_bytes=limit)(rows(small, big))

    assert out["drop_reason"].to_pylist() == [None, "extract:oversized"]
    assert out["text"].to_pylist()[1] is None
    assert out["html"].null_count == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_and_broken_payloads_are_recorded_drops(backend, warc_pages):
    page = next(r["html"] for r in warc_pages if r["url"] == "<https://kyleclo.com/>")
    table = rows(
        {"html": PNG, "content_type": "text/html"},  # an image served as HTML
        {"html": gzip.compress(page), "content_type": "text/html"},  # Content-Encoding left on
        {"html": b"<html><head><title>t</title></head><body> </body></html>"},
        {"html": page[: len(page) // 2], "content_type": "text/html"},  # cut mid-page
        {"html": page[:-3000] + b"\xff\xfe<<</div></p><!--", "content_type": "text/html"},
    )
    out = ExtractStage(backend=backend)(table)

    assert out["drop_reason"].to_pylist() == [
        "extract:decode_error",
        "extract:decode_error",
        "extract:empty",
        None,  # a truncated capture still yields its text
        None,  # so does one with a garbled tail
    ]
    assert out["title"].to_pylist()[2] == "t"  # the title is kept even when the body is empty
    assert "Kyle Lo" in out["text"].to_pylist()[3]


def test_an_extractor_that_raises_is_a_parser_error_drop_not_a_crash():
    stage = ExtractStage(backend="resiliparse")
    stage.setup()
    stage._ready = True
    real = stage._extract

    def flaky(html: str):
        if "boom" in html:
            raise RuntimeError("extractor bug")
        return real(html)

    stage._extract = flaky
    out = stage(rows({"html": b"<p>boom</p>"}, {"html": b"<p>a fine page</p>"}))
    assert out["drop_reason"].to_pylist() == ["extract:parser_error", None]


def test_deeply_nested_divs_are_dropped_fast_by_resiliparse_and_handled_by_trafilatura():
    page = b"<html><body>" + b"<div><p>nested paragraph text</p>" * 3000
    out = ExtractStage(backend="resiliparse")(rows({"html": page}))
    assert out["drop_reason"].to_pylist() == ["extract:too_deep"]

    out = ExtractStage(backend="trafilatura")(rows({"html": page}))
    assert out["drop_reason"].to_pylist()[0] in (None, "extract:empty")


def test_rows_dropped_upstream_keep_their_reason_and_lose_their_bytes():
    table = rows({"html": b"<p>some page text</p>", "drop_reason": "url:blocklist"})
    out = ExtractStage(backend="resiliparse")(table)
    assert out["drop_reason"].to_pylist() == ["url:blocklist"]
    assert out["html"].to_pylist() == [None]
    assert out["text"].to_pylist() == [None]


def test_decoding_follows_bom_utf8_header_and_meta_charset():
    assert decode_html(codecs.BOM_UTF16_LE + "<p>naïve</p>".encode("utf-16-le")) == "<p>naïve</p>"
    assert decode_html("<p>café</p>".encode()) == "<p>café</p>"
    assert decode_html("<p>café</p>".encode("cp1252"), "windows-1252") == "<p>café</p>"
    meta = '<meta charset="windows-1252"><p>déjà vu</p>'.encode("cp1252")
    assert decode_html(meta) == '<meta charset="windows-1252"><p>déjà vu</p>'
    utf16 = "<p>hi</p>".encode("utf-16-le")  # no BOM: only the header says what it is
    assert decode_html(utf16, "UTF-16LE") == "<p>hi</p>"
    with pytest.raises(UnicodeError):
        decode_html(PNG)


def test_config_is_typed_and_the_stage_pickles_without_its_extractor():
    with pytest.raises(ValidationError):
        ExtractConfig(backend="beautifulsoup")
    with pytest.raises(ValidationError):
        ExtractConfig(max_html_byte=10)  # a typo is an error, not a silent default

    stage = ExtractStage(backend="resiliparse", max_html_bytes=4096)
    stage(rows({"text": "warm"}))
    clone = pickle.loads(pickle.dumps(stage))
    assert clone.config == stage.config and not hasattr(clone, "_extract")
    assert clone(rows({"html": b"<p>after the trip</p>"}))["text"].to_pylist() == ["after the trip"]
