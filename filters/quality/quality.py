"""The `quality` stage: heuristic quality signals (Gopher quality + repetition, C4,
FineWeb) and the filter on them.

What: `QualityStage` adds the typed `q_*` columns of `pipeline.schema`
(`signals.compute_quality_signals`) and marks `drop_reason` ("quality:<rule>", e.g.
`quality:gopher_min_words`, `quality:gopher_rep_dup_line_frac`, `quality:c4_lorem_ipsum`,
`quality:fineweb_line_punct`); `quality_drop_rules` turns the columns and a `QualityConfig`
into `(reason, mask)` pairs. Rules run in FineWeb's order (Gopher repetition, Gopher
quality, C4, FineWeb), so the first failing rule names the reason. C4's line-removal
rewrite of the text is not done: only its document-level signals are scored.

Why: these are the rule-based filters behind MassiveText (Gopher, Rae et al. 2021, App. A),
C4 (Raffel et al. 2020, Sec. 2.2) and FineWeb (Penedo et al. 2024). Scores are kept as
columns so a threshold can change without re-scoring, and every cut can be counted.

How: the definitions follow datatrove's `GopherQualityFilter`, `GopherRepetitionFilter`,
`C4QualityFilter` and `FineWebQualityFilter`, computed by one compiled pass per document
(see `signals.py`); the keep/drop decisions agree with datatrove's on nearly every document
(benchmarks/README.md). Known differences:
- Words come from `TOKEN_PATTERN` (words.py), a regex that approximates the spaCy English
  tokenizer datatrove uses, so a document's word count can differ slightly from spaCy's.
  The alpha-word fraction (threshold 0.8) is the one rule sensitive to that.
- Lines are split on "\\n" only (extracted web text has no other line breaks).
- C4 sentences approximate spaCy's sentencizer with a regex (lines.py).
- n-grams are compared word by word; datatrove compares them joined without spaces.

    from filters.quality.quality import QualityStage
    out = QualityStage()(table)            # adds q_* columns, marks drop_reason
    out = QualityStage(c4=False)(table)    # a filter family switched off

Tests: `.venv/bin/pytest tests/filters/test_quality.py`.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from filters.quality.signals import QUALITY_COLUMNS, compute_quality_signals
from pipeline.stage import Stage, StageConfig, mark_dropped, set_column


class QualityConfig(StageConfig):
    """Thresholds over the `q_*` columns; each default is the published one."""

    gopher_quality: bool = True
    """Apply the Gopher quality rules (Rae et al. 2021, App. A, "quality filters")."""
    gopher_repetition: bool = True
    """Apply the Gopher repetition rules (Rae et al. 2021, App. A, Table A1)."""
    c4: bool = True
    """Apply the C4 document rules (Raffel et al. 2020, Sec. 2.2)."""
    fineweb: bool = True
    """Apply the FineWeb rules (Penedo et al. 2024; datatrove FineWebQualityFilter)."""

    max_chars: int = Field(1_000_000, ge=1)
    """Documents longer than this are dropped as `quality:too_long` before any signal is
    computed (their q_* are null). Gopher's own rules (at most 100,000 words, of mean length
    at most 10) drop every document much over 1M characters anyway, and the repetition
    signals of one enormous, repetitive document cost minutes."""

    # Gopher quality (Rae et al. 2021, App. A; datatrove GopherQualityFilter defaults).
    min_words: int = Field(50, ge=0)  # Gopher: keep 50..100,000 words
    max_words: int = Field(100_000, ge=0)  # Gopher: keep 50..100,000 words
    min_mean_word_len: float = Field(3.0, ge=0)  # Gopher: mean word length 3..10 chars
    max_mean_word_len: float = Field(10.0, ge=0)  # Gopher: mean word length 3..10 chars
    max_symbol_word_ratio: float = Field(0.1, ge=0)  # Gopher: "#" or ellipsis per word <= 0.1
    max_frac_lines_bullet: float = Field(0.9, ge=0, le=1)  # Gopher: <= 90% bullet lines
    max_frac_lines_ellipsis: float = Field(0.3, ge=0, le=1)  # Gopher: <= 30% end in ellipsis
    min_frac_words_alpha: float = Field(0.8, ge=0, le=1)  # Gopher: >= 80% words with a letter
    min_stop_words: int = Field(2, ge=0)  # Gopher: at least 2 of the 8 stop words

    # Gopher repetition (Rae et al. 2021, Table A1; datatrove GopherRepetitionFilter).
    max_dup_line_frac: float = Field(0.30, ge=0, le=1)  # Table A1: duplicate line fraction
    max_dup_para_frac: float = Field(0.30, ge=0, le=1)  # Table A1: duplicate paragraph fraction
    max_dup_line_char_frac: float = Field(0.20, ge=0, le=1)  # Table A1: dup line char fraction
    max_dup_para_char_frac: float = Field(0.20, ge=0, le=1)  # Table A1: dup para char fraction
    max_top_2gram_frac: float = Field(0.20, ge=0)  # Table A1: top 2-gram char fraction
    max_top_3gram_frac: float = Field(0.18, ge=0)  # Table A1: top 3-gram char fraction
    max_top_4gram_frac: float = Field(0.16, ge=0)  # Table A1: top 4-gram char fraction
    max_dup_5gram_frac: float = Field(0.15, ge=0, le=1)  # Table A1: dup 5-gram char fraction
    max_dup_6gram_frac: float = Field(0.14, ge=0, le=1)  # Table A1: dup 6-gram char fraction
    max_dup_7gram_frac: float = Field(0.13, ge=0, le=1)  # Table A1: dup 7-gram char fraction
    max_dup_8gram_frac: float = Field(0.12, ge=0, le=1)  # Table A1: dup 8-gram char fraction
    max_dup_9gram_frac: float = Field(0.11, ge=0, le=1)  # Table A1: dup 9-gram char fraction
    max_dup_10gram_frac: float = Field(0.10, ge=0, le=1)  # Table A1: dup 10-gram char fraction

    # C4 (Raffel et al. 2020, Sec. 2.2; TFDS c4_utils; datatrove C4QualityFilter).
    c4_min_sentences: int = Field(5, ge=0)  # C4: discard pages with fewer than 5 sentences
    c4_drop_lorem_ipsum: bool = True  # C4: remove any page containing "lorem ipsum"
    c4_drop_curly_bracket: bool = True  # C4: remove any page containing a curly bracket

    # FineWeb (Penedo et al. 2024; defaults of datatrove FineWebQualityFilter, as run).
    fw_min_line_punct_frac: float = Field(0.12, ge=0, le=1)  # FineWeb: >= 12% end in punct.
    fw_line_punct_exclude_zero: bool = False  # FineWeb: datatrove line_punct_exclude_zero
    fw_max_short_line_frac: float = Field(0.67, ge=0, le=1)  # FineWeb: <= 67% lines <= 30 chars
    fw_max_dup_line_char_frac: float = Field(0.01, ge=0, le=1)  # FineWeb: char_duplicates_ratio
    fw_max_newline_word_ratio: float = Field(0.3, ge=0)  # FineWeb: new_line_ratio


def _above(table: pa.Table, column: str, limit: float) -> pa.ChunkedArray:
    # Compare at the column's own precision: a float32 fraction of exactly 0.3 must not
    # read as 0.30000001 > 0.3 and drop a document that sits on the threshold.
    return pc.greater(table[column], pa.scalar(limit, table[column].type))


def _below(table: pa.Table, column: str, limit: float) -> pa.ChunkedArray:
    return pc.less(table[column], pa.scalar(limit, table[column].type))


def quality_drop_rules(table: pa.Table, cfg: QualityConfig) -> list[tuple[str, pa.ChunkedArray]]:
    """(reason, mask) pairs for `mark_dropped`, in FineWeb's order of filters.

    FineWeb runs Gopher repetition, then Gopher quality, then C4, then FineWeb; within a
    family the rules go in datatrove's order, so the first failing rule names the reason.
    """
    rules: list[tuple[str, pa.ChunkedArray]] = []
    if cfg.gopher_repetition:
        rules += [
            ("gopher_rep_dup_para_frac", _above(table, "q_dup_para_frac", cfg.max_dup_para_frac)),
            (
                "gopher_rep_dup_para_char_frac",
                _above(table, "q_dup_para_char_frac", cfg.max_dup_para_char_frac),
            ),
            ("gopher_rep_dup_line_frac", _above(table, "q_dup_line_frac", cfg.max_dup_line_frac)),
            (
                "gopher_rep_dup_line_char_frac",
                _above(table, "q_dup_line_char_frac", cfg.max_dup_line_char_frac),
            ),
        ]
        for n in (2, 3, 4):
            limit = getattr(cfg, f"max_top_{n}gram_frac")
            rules.append((f"gopher_rep_top_{n}gram", _above(table, f"q_top_{n}gram_frac", limit)))
        for n in range(5, 11):
            limit = getattr(cfg, f"max_dup_{n}gram_frac")
            rules.append((f"gopher_rep_dup_{n}gram", _above(table, f"q_dup_{n}gram_frac", limit)))
    if cfg.gopher_quality:
        n_words = table["q_n_words"]
        rules += [
            ("gopher_min_words", pc.less(n_words, cfg.min_words)),
            ("gopher_max_words", pc.greater(n_words, cfg.max_words)),
            ("gopher_min_mean_word_len", _below(table, "q_mean_word_len", cfg.min_mean_word_len)),
            ("gopher_max_mean_word_len", _above(table, "q_mean_word_len", cfg.max_mean_word_len)),
            (
                "gopher_symbol_word_ratio",
                _above(table, "q_symbol_word_ratio", cfg.max_symbol_word_ratio),
            ),
            (
                "gopher_bullet_lines",
                _above(table, "q_frac_lines_bullet", cfg.max_frac_lines_bullet),
            ),
            (
                "gopher_ellipsis_lines",
                _above(table, "q_frac_lines_ellipsis", cfg.max_frac_lines_ellipsis),
            ),
            ("gopher_alpha_words", _below(table, "q_frac_words_alpha", cfg.min_frac_words_alpha)),
            ("gopher_stop_words", pc.less(table["q_n_stop_words"], cfg.min_stop_words)),
        ]
    if cfg.c4:
        if cfg.c4_drop_lorem_ipsum:
            rules.append(("c4_lorem_ipsum", table["q_c4_has_lorem"]))
        if cfg.c4_drop_curly_bracket:
            rules.append(("c4_curly_bracket", table["q_c4_has_curly"]))
        rules.append(("c4_min_sentences", pc.less(table["q_c4_n_sentences"], cfg.c4_min_sentences)))
    if cfg.fineweb:
        punct = table["q_fw_line_punct_frac"]
        low_punct = _below(table, "q_fw_line_punct_frac", cfg.fw_min_line_punct_frac)
        if cfg.fw_line_punct_exclude_zero:
            low_punct = pc.and_(low_punct, pc.not_equal(punct, 0))
        rules += [
            ("fineweb_line_punct", low_punct),
            (
                "fineweb_short_lines",
                _above(table, "q_fw_short_line_frac", cfg.fw_max_short_line_frac),
            ),
            (
                "fineweb_dup_line_chars",
                _above(table, "q_fw_dup_line_char_frac", cfg.fw_max_dup_line_char_frac),
            ),
            (
                "fineweb_newline_ratio",
                _above(table, "q_fw_newline_word_ratio", cfg.fw_max_newline_word_ratio),
            ),
        ]
    return rules


class QualityStage(Stage):
    """Adds the `q_*` signals and marks rows that fail a `QualityConfig` threshold."""

    name: ClassVar[str] = "quality"
    Config: ClassVar[type[StageConfig]] = QualityConfig
    needs: ClassVar[tuple[str, ...]] = ("text",)
    adds: ClassVar[tuple[str, ...]] = QUALITY_COLUMNS
    # Every key but max_chars only judges the signals: a new min_words marks the stored
    # q_* columns again instead of computing them again.
    threshold_keys: ClassVar[frozenset[str]] = frozenset(
        set(QualityConfig.model_fields) - set(StageConfig.model_fields) - {"max_chars"}
    )
    score_reasons: ClassVar[frozenset[str]] = frozenset({"too_long"})

    def score(self, table: pa.Table) -> pa.Table:
        text = table["text"]
        if pa.types.is_null(text.type):  # an all-null batch read without a schema
            text = text.cast(pa.string())
        too_long = pc.fill_null(pc.greater(pc.utf8_length(text), self.config.max_chars), False)
        any_long = pc.any(too_long).as_py()
        if any_long:
            text = pc.if_else(too_long, pa.scalar("", text.type), text)
        signals = compute_quality_signals(text)
        for column in QUALITY_COLUMNS:
            values = signals[column]
            if any_long:
                values = pc.if_else(too_long, pa.scalar(None, values.type), values)
            table = set_column(table, column, values)
        return mark_dropped(table, self.name, [("too_long", too_long)])

    def mark(self, table: pa.Table) -> pa.Table:
        return mark_dropped(table, self.name, quality_drop_rules(table, self.config))
