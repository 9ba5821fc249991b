"""The cascade backend's fast pass (`extract.backend: cascade`, the default): resiliparse's
main-content text of the article's container, less boilerplate containers and lines, and the
test that hands a page to trafilatura instead.

What: `cascade_fast_text(html, tree, include_comments)` is the fast text (None for a page
too deeply nested for resiliparse, `too_deep`); `needs_fallback(text)` says when trafilatura
decides instead; `drop_boilerplate_lines(text)` is the line filter. filters/extract.py runs
them per page.

Why a module of its own: these are the rules the cascade's quality rests on, each with the
measurement that chose it; they change together and are versioned together
(`ExtractStage.content_fingerprint`).

How: below, in the order the fast pass applies them. F1 figures are on trafilatura's English
gold set (benchmarks/extraction_quality.py); "tuning half" and "the other half" are its
split of the pages by MD5 of the file name.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resiliparse.parse.html import HTMLTree

RULES_VERSION = 2
"""The version of the rules below, in the extract stage's fingerprint for the cascade only:
bump it when they change, and only cascade runs recompute (2: the article's container and
boilerplate lines)."""

# resiliparse's main-content pass is quadratic in <div> nesting depth (a page of 3,000
# unclosed <div>s takes 0.9 s, 20,000 take minutes), and broken markup that never closes its
# <div>s is exactly how real pages get that deep. Real pages leave a few dozen unclosed at
# most (32 at worst in the gold set); 1,000 bounds one page's cost to ~0.1 s.
MAX_UNCLOSED_DIVS = 1000

# The cascade's fast pass leaves out elements whose class or id contains one of these words:
# author boxes, footers, widgets, tag lists, related links, newsletter and banner blocks,
# embeds and teasers, which resiliparse's own main-content rules keep and trafilatura drops
# (before the container step, cascade precision 0.87, resiliparse's 0.81). The words are from
# trafilatura's discard rules; these nine are the ones that raised F1 when added one at a time on half of
# the gold set (the other half scored them, see benchmarks/extraction_quality.py). The
# page's frame elements are exempt: a theme's `<body class="single-author">` must not blank
# the page.
_BOILERPLATE_WORDS = (
    "author", "footer", "widget", "tags", "related", "newsletter", "banner", "embed", "teaser"
)  # fmt: skip
_BOILERPLATE_SELECTORS = [
    f'[{attr}*="{word}"]:not(html, body, main, article)'
    for word in _BOILERPLATE_WORDS
    for attr in ("class", "id")
]
# The article's own container, where the page marks one, as trafilatura's BODY_XPATH finds it
# (trafilatura/xpaths.py, transcribed to CSS): four groups tried in order, the first element
# in document order that matches any selector of a group. The cascade reads the text of the
# first container that holds `_CASCADE_MIN_CHARS` or more, else of the whole page: sidebars,
# comment threads and link lists outside the article stay out, which resiliparse's own
# main-content rules keep: cascade F1 0.912 -> 0.917 on the gold set, 0.902 -> 0.915 on the
# half the other rules were not chosen on. Not tuned on the gold set. The container is parsed
# inside <main>, so resiliparse takes all of it as main content (a closing list stays).
_BLOCKS = ":is(article, div, main, section)"  # one :is() list: ~4x faster to match than 4


def _attrs(attr: str, op: str, values: tuple[str, ...]) -> list[str]:
    return [f'[{attr}{op}"{v}"]' for v in values]


def _blocks_with(*attrs: list[str]) -> str:
    return f"{_BLOCKS}:is({', '.join(a for group in attrs for a in group)})"


_ARTICLE_TOKENS = (
    "entry-content", "article-content", "art-content", "article__content", "article-body",
    "article__body", "articlebody", "articleBody", "body-text",
)  # fmt: skip
_CONTAINER_SELECTORS = (
    _blocks_with(
        _attrs("class", "=", ("post", "entry")),
        _attrs("itemprop", "=", ("articleBody",)),
        _attrs("id", "=", ("articleContent",)),
        _attrs("id", "*=", _ARTICLE_TOKENS),
        _attrs("class", "*=", _ARTICLE_TOKENS),
        _attrs(
            "class",
            "*=",
            (
                "post-text",
                "post_text",
                "post-body",
                "post-entry",
                "postentry",
                "post-content",
                "post_content",
                "postcontent",
                "postContent",
                "post_inner_wrapper",
                "article-text",
                "articletext",
                "articleText",
                "page-content",
                "text-content",
                "ArticleContent",
                "article__container",
            ),
        ),  # fmt: skip
    ),
    "article",
    _blocks_with(
        _attrs("role", "=", ("article",)),
        _attrs("id", "=", ("article", "story")),
        _attrs("class", "=", ("postarea", "art-postcontent", "text", "cell", "story")),
        _attrs("id", "*=", ("story-body",)),
        _attrs(
            "class",
            "*=",
            (
                "fulltext",
                "post-bodycopy",
                "story-content",
                "storycontent",
                "theme-content",
                "blog-content",
                "section-content",
                "single-content",
                "single-post",
                "main-column",
                "wpb_text_column",
                "story-body",
                "field-body",
            ),
        ),  # fmt: skip
    ),
    _blocks_with(
        _attrs("id", "=", ("content",)),
        _attrs("class", "=", ("content",)),
        _attrs("id", "*=", ("content-main", "content-body", "contentBody", "main-content")),
        _attrs(
            "class",
            "*=",
            (
                "content-main",
                "content_main",
                "content-body",
                "content__body",
                "main-content",
                "page-content",
            ),
        ),  # fmt: skip
    ),
)
# Lines the cascade drops from its fast text: a line that is only a boilerplate label, a
# copyright, "Read more" or "Last modified" line, and a short newsletter or subscription
# call. Chosen on the tuning half of the gold set (F1 +0.019 there, +0.003 on the other half)
# and checked on FineWeb, where they drop 0.16% of lines, nearly all of them boilerplate (a
# short line that only mentions a newsletter goes too).
_BOILERPLATE_LINE = re.compile(
    r"(advertisements?|explore further|feedback to editors|view comments|comments?|share"
    r"|share this( article| story| post)?|print|email|related( articles| posts| stories)?"
    r"|tags?:?|sponsored)",
    re.IGNORECASE,
)
_BOILERPLATE_PREFIX = re.compile(r"(read more\b|©|copyright\b|last (modified|updated)\b)", re.I)
_BOILERPLATE_CALL = re.compile(
    r"\b(newsletters?|subscribe|sign up (here|now|today|for)|signing up (for|to))\b", re.I
)
# Below this many non-blank characters the fast text is not trusted and trafilatura decides:
# the fast pass found no article (empty pages, script-rendered bodies, a selector that hit
# the article's own container) or the page is short, where trafilatura's finer rules matter
# most. On the tuning half, 300 to 600 scored alike and 750 or more only 0.004 higher while
# sending half as many pages again to trafilatura; 300 sends ~11% of the gold pages.
_CASCADE_MIN_CHARS = 300


def cascade_fast_text(html: str, tree: HTMLTree, include_comments: bool) -> str | None:
    """The cascade's fast pass over the parsed `html`: resiliparse's main-content text of the
    article's container (`_CONTAINER_SELECTORS`) where one holds enough text, else of the
    whole page, with the boilerplate containers (`_BOILERPLATE_SELECTORS`) and lines
    (`drop_boilerplate_lines`) left out; None for a page too deeply nested for resiliparse."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    if too_deep(html):
        return None
    options = {
        "main_content": True,
        "comments": include_comments,
        "alt_texts": False,
        "skip_elements": _BOILERPLATE_SELECTORS,
    }
    body = tree.body
    for selector in _CONTAINER_SELECTORS if body is not None else ():
        node = body.query_selector(selector)
        if node is None:
            continue
        text = extract_plain_text(HTMLTree.parse(f"<main>{node.html}</main>"), **options)
        if not needs_fallback(text):
            return drop_boilerplate_lines(text)
    return drop_boilerplate_lines(extract_plain_text(tree, **options))


def drop_boilerplate_lines(text: str) -> str:
    """`text` without its boilerplate lines (see `_BOILERPLATE_LINE`)."""
    kept = []
    for line in text.split("\n"):
        bare = line.strip()
        words = len(bare.split())
        if (
            _BOILERPLATE_LINE.fullmatch(bare)
            or (words <= 40 and _BOILERPLATE_PREFIX.match(bare))
            or (words <= 25 and _BOILERPLATE_CALL.search(bare))
        ):
            continue
        kept.append(line)
    return "\n".join(kept)


def needs_fallback(fast_text: str | None) -> bool:
    """True when the cascade asks trafilatura instead: no fast text, or fewer than
    `_CASCADE_MIN_CHARS` non-blank characters of it."""
    return fast_text is None or sum(map(len, fast_text.split())) < _CASCADE_MIN_CHARS


def too_deep(html: str) -> bool:
    """Over `MAX_UNCLOSED_DIVS` unclosed <div>s (closes counted only when needed)."""
    opened = html.count("<div") + html.count("<DIV")
    return (
        opened > MAX_UNCLOSED_DIVS
        and opened - html.count("</div") - html.count("</DIV") > MAX_UNCLOSED_DIVS
    )
