"""HTML to main text: the `extract` stage.

Rows that carry a raw payload in `html` (WARC responses, .html files) get their main text
extracted into `text` and their `<title>` into `title` (when the reader gave none); the
raw bytes are then set to null so they are not carried downstream. Rows that already have
`text` (JSONL, WET, Parquet input) pass through with the text untouched (given text wins
over a payload in the same row), and rows dropped upstream are not parsed. Every row leaves
with `n_chars`, and every row that cannot yield text gets a recorded drop reason:

    extract:non_html       content type neither HTML (`allowed_content_types`) nor plain
                           text (`text_content_types`)
    extract:oversized      payload larger than `max_html_bytes`
    extract:decode_error   bytes that do not decode to text (binary served as HTML)
    extract:parser_error   the extractor raised on this page (a recorded drop, never a crash)
    extract:too_deep       resiliparse only: over 1,000 unclosed <div>s, which would make
                           its main-content pass take seconds to minutes (quadratic); the
                           cascade hands such pages to trafilatura
    extract:empty          no text, or fewer than `min_text_chars` non-blank characters

Why the default backend is the cascade: on trafilatura's English gold set it scores as
trafilatura does (F1 0.927 against 0.928; a paired bootstrap over pages puts the difference
in [-0.017, +0.017]; 0.918 against 0.925 on the half of the pages its line rules were not
chosen on), keeps more boilerplate out (precision 0.915 against 0.908) and runs ~8x faster
per core on the dolma WARC sample (~330 against ~43 pages/s) and ~5x on the gold set's large
pages. It reads resiliparse's main-content text of the article's container where the page
marks one (trafilatura's own body-container patterns), else of the whole page, leaves out
boilerplate containers (author boxes, related links, newsletter blocks) and boilerplate
lines, and asks trafilatura only where that text is under 300 characters (~4% of the gold
pages, ~5% of the dolma sample; the rules and their measurements: filters/cascade.py).
`backend: trafilatura` (`trafilatura_mode: fast`, no fallback extractors) is trafilatura
alone; resiliparse alone is faster still and scores lower (F1 0.87, `backend: resiliparse`).
The README and `benchmarks/extraction_quality.py` give the measured F1 and pages/s.
Extraction runs as a per-row loop because each document is one call into a C (resiliparse)
or lxml (trafilatura) library; the loop only touches the rows that need it, and the masks,
the scatter of results and the drop reasons around it are vectorised.

    python -m benchmarks.extraction_quality     # quality and speed of every backend
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Callable
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from filters.cascade import (
    MAX_UNCLOSED_DIVS,
    RULES_VERSION,
    cascade_fast_text,
    needs_fallback,
    too_deep,
)
from pipeline.stage import Stage, StageConfig, mark_dropped, set_column

Backend = Literal["resiliparse", "trafilatura", "cascade"]
TrafilaturaMode = Literal["fast", "balanced", "precision", "recall"]

# WHATWG recognises exactly these byte-order marks, and a BOM beats any declared charset.
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_CHARSET = re.compile(r"charset\s*=\s*[\"']?([^\"';\s]+)", re.IGNORECASE)


class ExtractConfig(StageConfig):
    """Settings of the `extract` stage."""

    backend: Backend = "cascade"
    """Main-text extractor. "cascade" (resiliparse on the article's container, trafilatura
    where that text is short) scored F1 0.927 on the gold set against trafilatura's 0.928, at
    ~5-8x trafilatura's speed per core; "trafilatura" alone; "resiliparse" alone scored 0.87
    at ~8-10x (see benchmarks/extraction_quality.py)."""

    trafilatura_mode: TrafilaturaMode = "fast"
    """trafilatura variant: "fast" (no fallback extractors; same F1 as "balanced" on the gold
    set, 1.4-1.6x faster), "balanced" (library default), "precision" (`favor_precision`, what
    FineWeb used), "recall" (`favor_recall`). The cascade uses it on the pages it hands to
    trafilatura; ignored by resiliparse."""

    include_comments: bool = False
    """Keep user comment sections. Off: comments are rarely the page's main text, and
    leaving them out raised resiliparse's precision from 0.77 to 0.80 on the gold set."""

    max_html_bytes: int = Field(2 * 1024 * 1024, ge=1)
    """Payloads larger than this are dropped (`extract:oversized`) without being parsed.
    2 MiB: Common Crawl truncates payloads at 1 MiB, so no CC record is lost, and the largest
    page of the gold set (1.6 MB) still passes; the cap bounds the time and memory one row
    can take (extraction time grows with page size) and the pages above it are mostly
    inlined data, feeds or dumps rather than prose."""

    min_text_chars: int = Field(1, ge=1)
    """Rows with fewer non-blank characters of text are dropped (`extract:empty`). 1 drops
    only pages with no main text: length thresholds proper belong to the quality signals,
    where they are counted as such."""

    allowed_content_types: list[str] = ["text/html", "application/xhtml+xml"]
    """MIME types (lower-case, without parameters) whose payload is HTML to extract. A row
    with no content type at all is treated as HTML (local .html files)."""

    text_content_types: list[str] = ["text/plain"]
    """MIME types whose payload is already text: decoded and kept as is. Empty: drop them."""


class TooDeep(ValueError):
    """A page nested too deeply for the extractor to finish in bounded time."""


def decode_html(data: bytes, charset: str | None = None) -> str:
    """Decode a web payload to str, preferring valid UTF-8; raise UnicodeError for binary.

    Order: byte-order mark; strict UTF-8 (the encoding of nearly all of today's web, and a
    byte string with non-ASCII bytes that is valid UTF-8 is almost never meant as another
    encoding, while mislabelled charsets are common); the HTTP `charset`; the `<meta>`
    charset in the first KiB; uchardet. Undecodable bytes become U+FFFD.
    """
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding, map_encoding_to_html5

    for bom, encoding in _BOMS:
        if data.startswith(bom):
            text = data[len(bom) :].decode(encoding, errors="replace")
            break
    else:
        declared = map_encoding_to_html5(charset, fallback_utf8=False) if charset else None
        if declared and declared.startswith("utf-16"):  # BOM-less UTF-16 is valid "UTF-8"
            text = data.decode(declared, errors="replace")
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                encoding = declared or detect_encoding(data, from_html_meta=True)
                text = bytes_to_str(data, encoding, errors="replace")
    # HTML text has no NULs and few replacement characters; images, PDFs or gzip bodies
    # served as text/html decode into plenty of both.
    if (text.count("\x00") + text.count("\ufffd")) * 20 > len(text):
        raise UnicodeError("payload is binary, not text (over 5% NUL or undecodable bytes)")
    return text


def html_title(html: str) -> str | None:
    """The document's `<title>`, whitespace-collapsed; None when it has none."""
    from resiliparse.parse.html import HTMLTree

    return _clean_title(HTMLTree.parse(html).title)


def _clean_title(title: str | None) -> str | None:
    return (" ".join(title.split()) or None) if title else None


def make_extractor(config: ExtractConfig) -> Callable[[str], tuple[str | None, str | None]]:
    """A function html -> (main text or None, title or None) for the configured backend.

    Every backend gets the same decoded str, so the benchmark and the stage measure the same
    thing. Imports are lazy: trafilatura is only needed when a backend uses it.
    """
    if config.backend == "resiliparse":
        return _resiliparse_extractor(config)
    trafilatura_text = _trafilatura_extractor(config)
    if config.backend == "trafilatura":

        def trafilatura_extract(html: str) -> tuple[str | None, str | None]:
            return trafilatura_text(html), html_title(html)

        return trafilatura_extract

    from resiliparse.parse.html import HTMLTree

    def cascade_extract(html: str) -> tuple[str | None, str | None]:
        tree = HTMLTree.parse(html)  # parsed once for the fast text and the title
        text = cascade_fast_text(html, tree, config.include_comments)
        if needs_fallback(text):
            # trafilatura finding nothing on a short page leaves the short text, not no text
            text = trafilatura_text(html) or text
        return text, _clean_title(tree.title)

    return cascade_extract


def _resiliparse_extractor(config: ExtractConfig) -> Callable[[str], tuple[str | None, str | None]]:
    """html -> (resiliparse's main-content text, title); raises TooDeep for pages it would
    take minutes on."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    def resiliparse_extract(html: str) -> tuple[str | None, str | None]:
        if too_deep(html):
            raise TooDeep(f"over {MAX_UNCLOSED_DIVS} unclosed <div> elements")
        tree = HTMLTree.parse(html)  # parsed once for both the text and the title
        text = extract_plain_text(
            tree, main_content=True, comments=config.include_comments, alt_texts=False
        )
        return text, _clean_title(tree.title)

    return resiliparse_extract


def _trafilatura_extractor(config: ExtractConfig) -> Callable[[str], str | None]:
    """html -> trafilatura's main text (None when it finds none), in `trafilatura_mode`."""
    try:
        import trafilatura
    except ImportError as e:
        raise ImportError(
            f"extract.backend '{config.backend}' needs the trafilatura package: "
            "`pip install 'trafilatura>=2.0'`, or set `backend: resiliparse`"
        ) from e
    # trafilatura logs an ERROR line for every empty or unparsable page; at crawl scale that
    # floods worker logs, and the stage records each such page as a counted drop instead.
    logging.getLogger("trafilatura").setLevel(logging.CRITICAL)
    options = {
        "fast": {"fast": True},
        "balanced": {},
        "precision": {"favor_precision": True},
        "recall": {"favor_recall": True},
    }[config.trafilatura_mode]

    def trafilatura_text(html: str) -> str | None:
        return trafilatura.extract(
            html, include_comments=config.include_comments, include_tables=True, **options
        )

    return trafilatura_text


def _mime(content_type: pa.ChunkedArray) -> pa.ChunkedArray:
    """'Text/HTML; charset=UTF-8' -> 'text/html' (null stays null)."""
    bare = pc.replace_substring_regex(content_type, pattern=";.*$", replacement="")
    return pc.utf8_lower(pc.utf8_trim_whitespace(bare))


def _np(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean mask as numpy, null read as False."""
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


class ExtractStage(Stage):
    """Main text and title from raw HTML; text rows pass through. See the module docstring."""

    name = "extract"
    version = 1
    Config = ExtractConfig
    needs = ("html", "text", "content_type")
    adds = ("title", "n_chars")

    config: ExtractConfig

    def content_fingerprint(self) -> dict[str, str]:
        # The cascade's rules, versioned on their own (filters/cascade.py)
        return {"cascade": str(RULES_VERSION)} if self.config.backend == "cascade" else {}

    def setup(self) -> None:
        self._extract = make_extractor(self.config)

    def process(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        n = len(table)
        html = table["html"]
        text = table["text"].combine_chunks()
        title = (
            table["title"].combine_chunks()
            if "title" in table.column_names
            else pa.nulls(n, pa.string())
        )
        mime = _mime(table["content_type"])
        is_html_type = _np(pc.is_null(mime)) | _np(
            pc.is_in(mime, pa.array(cfg.allowed_content_types, pa.string()))
        )
        is_text_type = _np(pc.is_in(mime, pa.array(cfg.text_content_types, pa.string())))
        # Payloads to look at: present, no text given, not dropped upstream (no work wasted).
        todo = (
            _np(pc.is_valid(html)) & _np(pc.is_null(text)) & _np(pc.is_null(table["drop_reason"]))
        )
        non_html = todo & ~(is_html_type | is_text_type)
        oversized = todo & ~non_html & _np(pc.greater(pc.binary_length(html), cfg.max_html_bytes))
        run = todo & ~non_html & ~oversized

        idx = np.flatnonzero(run)
        errors = pa.nulls(n, pa.string())
        if len(idx):
            texts, titles, reasons = self._extract_rows(
                html.take(idx).to_pylist(),
                table["content_type"].take(idx).to_pylist(),
                is_text_type[idx].tolist(),
            )
            mask = pa.array(run)
            text = pc.replace_with_mask(text, mask, pa.array(texts, pa.large_string()))
            new_titles = pc.replace_with_mask(
                pa.nulls(n, pa.string()), mask, pa.array(titles, pa.string())
            )
            title = pc.coalesce(title, new_titles)  # a reader's title wins
            errors = pc.replace_with_mask(errors, mask, pa.array(reasons, pa.string()))

        visible = pc.utf8_length(pc.utf8_trim_whitespace(text))
        table = set_column(table, "text", text)
        table = set_column(table, "title", title)
        table = set_column(table, "html", pa.nulls(n, pa.large_binary()))
        table = set_column(table, "n_chars", pc.cast(pc.utf8_length(text), pa.int64()))
        return mark_dropped(
            table,
            self.name,
            [
                ("non_html", pa.array(non_html)),
                ("oversized", pa.array(oversized)),
                ("decode_error", pc.equal(errors, "decode_error")),
                ("parser_error", pc.equal(errors, "parser_error")),
                ("too_deep", pc.equal(errors, "too_deep")),
                ("empty", pc.fill_null(pc.less(visible, cfg.min_text_chars), True)),
            ],
        )

    def _extract_rows(
        self, payloads: list[bytes], content_types: list[str | None], plain: list[bool | None]
    ) -> tuple[list[str | None], list[str | None], list[str | None]]:
        """The per-row loop over (text, title, drop reason); one library call per page."""
        rows = [self._extract_one(*row) for row in zip(payloads, content_types, plain, strict=True)]
        texts, titles, reasons = zip(*rows, strict=True)
        return list(texts), list(titles), list(reasons)

    def _extract_one(
        self, data: bytes, content_type: str | None, is_plain: bool | None
    ) -> tuple[str | None, str | None, str | None]:
        m = _CHARSET.search(content_type) if content_type else None
        try:
            doc = decode_html(data, m.group(1) if m else None)
        except (UnicodeError, LookupError):
            return None, None, "decode_error"
        if is_plain:
            return doc, None, None
        try:
            body, title = self._extract(doc)
        except TooDeep:
            return None, None, "too_deep"
        except Exception:  # a page that breaks the parser is one recorded drop, not a crash
            return None, None, "parser_error"
        return (body.strip() or None) if body else None, title, None
