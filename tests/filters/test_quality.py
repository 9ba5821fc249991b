"""Tests for filters/quality/: each signal on short hand-checked texts, the thresholds at
and around their limits, the stage contract, and the vectorised code against a plain
per-document Python transcription of datatrove's definitions on random documents.

    .venv/bin/pytest tests/filters/test_quality.py
"""

from __future__ import annotations

import pickle
import random
import re
from collections import Counter

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import ValidationError

from filters.quality.lines import SENT_BOUNDARY, SENT_NOT_END
from filters.quality.quality import QualityConfig, QualityStage, quality_drop_rules
from filters.quality.signals import QUALITY_COLUMNS, compute_quality_signals
from filters.quality.words import STOP_WORDS, TOKEN_PATTERN
from pipeline.schema import FIELDS

GOOD = (
    "The water cycle describes how water moves between the oceans, the air and the land. "
    "Heat from the sun evaporates water from lakes and seas, and the vapour rises into the sky.\n"
    "As the vapour cools it condenses into tiny droplets that gather to form clouds. When the "
    "droplets grow heavy enough, they fall back to the ground as rain or snow.\n"
    "Some of that water soaks into the soil and feeds plants, while the rest flows through "
    "rivers back to the sea. The cycle then begins again, and it has done so for billions of "
    "years."
)


def signals(*texts: str | None) -> list[dict]:
    table = compute_quality_signals(pa.array(list(texts), pa.large_string()))
    return table.to_pylist()


def one(text: str | None) -> dict:
    return signals(text)[0]


def tokens(text: str) -> list[str]:
    return pl.Series([text]).str.extract_all(TOKEN_PATTERN).to_list()[0]


def reasons(texts: list[str | None], **config) -> list[str | None]:
    table = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts})
    return QualityStage(**config)(table)["drop_reason"].to_pylist()


# --- schema and stage contract ----------------------------------------------------------------


def test_signal_columns_are_the_schema_quality_block_with_its_types():
    table = compute_quality_signals(pa.array(["hello world."]))
    assert tuple(table.column_names) == QUALITY_COLUMNS
    assert tuple(n for n in FIELDS if n.startswith("q_")) == QUALITY_COLUMNS
    for name in QUALITY_COLUMNS:
        assert table.schema.field(name).type == FIELDS[name].type


def test_stage_adds_columns_keeps_every_row_and_marks_reasons():
    short = " ".join(f"word{i}" for i in range(40)) + "."  # 40 distinct words
    table = pa.table({"id": ["a", "b"], "text": [GOOD, short]})
    out = QualityStage()(table)
    assert out.num_rows == 2
    assert set(QUALITY_COLUMNS) <= set(out.column_names)
    assert out["drop_reason"].to_pylist() == [None, "quality:gopher_min_words"]


def test_stage_keeps_an_earlier_reason_and_rescoring_replaces_columns():
    table = pa.table({"id": ["a"], "text": ["short."], "drop_reason": ["langid:low_score"]})
    out = QualityStage()(table)
    assert out["drop_reason"].to_pylist() == ["langid:low_score"]
    again = QualityStage()(out)
    assert again.column_names == out.column_names


def test_stage_pickles_with_its_config():
    stage = pickle.loads(pickle.dumps(QualityStage(min_words=10)))
    assert stage.config.min_words == 10


def test_a_clean_paragraph_passes_every_filter():
    assert reasons([GOOD]) == [None]
    s = one(GOOD)
    assert s["q_n_words"] > 50 and s["q_c4_n_sentences"] == 6 and s["q_n_stop_words"] >= 2


@pytest.mark.parametrize("text", ["", None, "   \n\n  \n"])
def test_empty_or_null_text_scores_zero_and_is_dropped_for_too_few_words(text):
    s = one(text)
    assert all(v in (0, 0.0, False) for v in s.values()), s
    assert reasons([text]) == ["quality:gopher_min_words"]


def test_documents_in_a_batch_do_not_leak_into_each_other():
    docs = [GOOD, "", None, "a b\n\na b", GOOD, "the cat sat\nthe cat sat", "x"]
    large = pa.large_string()
    chunked = pa.chunked_array([pa.array(docs[:3], large), pa.array(docs[3:], large)])
    batch = compute_quality_signals(chunked).to_pylist()
    assert batch == [one(doc) for doc in docs]


# --- Gopher quality ----------------------------------------------------------------------------


def test_words_and_symbols_follow_spacy_like_tokens():
    assert tokens("The cat sat on the mat.") == ["The", "cat", "sat", "on", "the", "mat", "."]
    assert tokens("Mr. Smith paid $3.50 (U.S.) for COVID-19 tests, didn't he?") == [
        "Mr.", "Smith", "paid", "$", "3.50", "(", "U.S.", ")", "for", "COVID-19", "tests",
        ",", "didn", "'t", "he", "?",
    ]  # fmt: skip
    s = one("The cat sat on the mat.")
    assert s["q_n_words"] == 6  # the "." is a symbol, not a word
    assert s["q_mean_word_len"] == pytest.approx(17 / 6)
    assert s["q_frac_words_alpha"] == pytest.approx(6 / 7)  # symbols count in the denominator
    assert s["q_n_stop_words"] == 1  # distinct, case-sensitive: "the" but not "The"


def test_stop_words_are_counted_once_each():
    assert one("the the the of of and")["q_n_stop_words"] == 3
    assert one(" ".join(STOP_WORDS))["q_n_stop_words"] == 8


def test_symbol_word_ratio_takes_the_worse_of_hashes_and_ellipses():
    assert one("# a # b # c")["q_symbol_word_ratio"] == pytest.approx(3 / 6)
    assert one("wait... what… ok")["q_symbol_word_ratio"] == pytest.approx(2 / 5)


def test_bullet_and_ellipsis_line_fractions():
    # str.splitlines(): the final newline does not open a fifth line.
    assert one("- one\n• two\n  - three\nfour\n")["q_frac_lines_bullet"] == pytest.approx(3 / 4)
    assert one("a...\nb…  \nc\n")["q_frac_lines_ellipsis"] == pytest.approx(2 / 3)


def test_unicode_lengths_are_in_characters_not_bytes():
    s = one("Ça va très bien. Привет мир. 日本語のテキスト。")
    assert s["q_n_words"] == 7
    assert s["q_mean_word_len"] == pytest.approx((2 + 2 + 4 + 4 + 6 + 3 + 8) / 7)
    assert s["q_frac_words_alpha"] == pytest.approx(7 / 10)
    assert s["q_fw_line_punct_frac"] == 1.0  # "。" is terminal punctuation


# --- Gopher repetition -------------------------------------------------------------------------


def test_duplicate_lines():
    s = one("the cat sat\nthe cat sat\nhello world.")  # 36 characters
    assert s["q_dup_line_frac"] == pytest.approx(1 / 3)
    assert s["q_dup_line_char_frac"] == pytest.approx(11 / 36)


def test_duplicate_paragraphs_split_on_blank_lines_after_strip():
    s = one("a b\n\nc d\n\na b\n\n\ne f")  # 19 characters, paragraphs ab cd ab ef
    assert s["q_dup_para_frac"] == pytest.approx(1 / 4)
    assert s["q_dup_para_char_frac"] == pytest.approx(3 / 19)
    s = one("  a b\n\na b  \n")  # the document is stripped first, so both read "a b"
    assert s["q_dup_para_frac"] == pytest.approx(1 / 2)
    assert s["q_dup_para_char_frac"] == pytest.approx(3 / 13)


def test_top_ngram_fraction_counts_the_most_frequent_ngram_with_its_spaces():
    s = one("one two one two one two three")  # 29 characters
    assert s["q_top_2gram_frac"] == pytest.approx(3 * len("one two") / 29)
    # "one two one" and "two one two" both occur twice: the first seen wins.
    assert s["q_top_3gram_frac"] == pytest.approx(2 * len("one two one") / 29)
    # overlapping occurrences are all counted, as in datatrove (the fraction can pass 1)
    assert s["q_top_4gram_frac"] == pytest.approx(2 * len("one two one two") / 29)


def test_top_ngram_without_repeats_counts_the_first_ngram_once():
    s = one("alpha beta gamma")  # 16 characters, no repeated bigram
    assert s["q_top_2gram_frac"] == pytest.approx(len("alpha beta") / 16)
    assert s["q_top_4gram_frac"] == 0.0  # fewer than 4 words: no 4-grams at all


def test_duplicate_ngram_characters_are_joined_without_spaces():
    text = "alpha beta gamma delta epsilon alpha beta gamma delta epsilon"  # 61 characters
    s = one(text)
    assert s["q_dup_5gram_frac"] == pytest.approx(len("alphabetagammadeltaepsilon") / 61)
    assert s["q_dup_6gram_frac"] == 0.0


def test_duplicate_ngrams_skip_like_datatrove():
    # 5-grams: the one at 1 repeats the one at 0, so the reader counts it and jumps to 6;
    # the 5-gram at 7 equals the one at 3, which was jumped over and so never "seen".
    text = "a a a a a a b a a a b a"
    assert one(text)["q_dup_5gram_frac"] == pytest.approx(5 / len(text))


# --- C4 ---------------------------------------------------------------------------------------


def test_c4_sentences_are_counted_in_kept_lines():
    five = "One. Two two. Three three three.\nFour is here! Five is here?"
    assert one(five)["q_c4_n_sentences"] == 5
    assert one("Mr. Smith went home. He slept.")["q_c4_n_sentences"] == 2
    # lines without terminal punctuation, with fewer than 3 words, or about cookies go
    dropped_lines = "No full stop here\nToo short.\nRead our privacy policy now."
    assert one(dropped_lines)["q_c4_n_sentences"] == 0


def test_c4_lorem_ipsum_and_curly_bracket():
    assert one("Lorem ipsum dolor sit amet.")["q_c4_has_lorem"] is True
    assert one("if (x) { return y; } is code.")["q_c4_has_curly"] is True
    assert one("plain text with no code.")["q_c4_has_curly"] is False
    # As in the C4 reference code, only lines that survive the line rules are checked:
    # a line without terminal punctuation is removed before the check, and lines that
    # mention javascript are removed before the curly-bracket check.
    assert one("lorem ipsum without an ending")["q_c4_has_lorem"] is False
    assert one("Use javascript { here } please.")["q_c4_has_curly"] is False


ABBREVIATION_LINES = [
    "e.g. i.e. U.S.A. Dr. St. a.m.",
    "e.g... i.e... U.S.A.",  # an initial right before an ellipsis: both kinds of non-end
    "x... y... z... w.",
    "Dr... St... a.m. x.",
    "1... 2... 3.",
    "a. . . b. c.",
    ". . . . .",
    "...\n...\n. .\n1.2.3.",
]


def test_abbreviations_and_ellipses_never_count_fewer_than_one_sentence_per_line():
    # A boundary after an initial that is also an ellipsis used to be taken back twice, and
    # the unsigned match counts wrapped past zero: the batch failed to cast to int32.
    got = signals(*ABBREVIATION_LINES, GOOD)
    assert [r["q_c4_n_sentences"] for r in got] == [2, 1, 1, 1, 1, 2, 1, 0, 6]
    out = QualityStage()(pa.table({"id": ["a", "b"], "text": ABBREVIATION_LINES[1:3]}))
    assert out["q_c4_n_sentences"].to_pylist() == [1, 1]  # the stage runs, too short to keep
    assert all(r.startswith("quality:") for r in out["drop_reason"].to_pylist())


def test_sentence_ends_taken_back_never_outnumber_the_boundaries():
    # The invariant the C4 sentence count rests on, over random runs of the characters and
    # abbreviations that make boundaries ambiguous.
    rng = random.Random(7)
    pieces = [*"..!?…,;()\"'aegDrStUx1", " ", " ", "\t"]
    pieces += ["Dr", "St", "Mr", "e.g.", "i.e.", "U.S.A.", "a.m.", "...", "..", " "]
    lines = ["".join(rng.choices(pieces, k=rng.randrange(1, 30))) for _ in range(20_000)]
    series = pl.Series(lines)
    boundaries = series.str.count_matches(SENT_BOUNDARY).to_numpy()
    not_ends = series.str.count_matches(SENT_NOT_END).to_numpy()
    worst = int((not_ends.astype(int) - boundaries).argmax())
    assert (not_ends <= boundaries).all(), lines[worst]
    assert min(r["q_c4_n_sentences"] for r in signals(*lines[:2000])) >= 0


# --- FineWeb -----------------------------------------------------------------------------------


def test_fineweb_line_signals_ignore_blank_lines():
    s = one("Hello there.\nno punct\n\n  \nAnother line!")
    assert s["q_fw_line_punct_frac"] == pytest.approx(2 / 3)
    assert s["q_fw_short_line_frac"] == 1.0
    assert s["q_fw_newline_word_ratio"] == pytest.approx(4 / 8)  # 4 newlines, 8 tokens
    long = "x" * 31
    assert one(f"{long}\nshort\n{long}")["q_fw_short_line_frac"] == pytest.approx(1 / 3)


def test_fineweb_duplicate_line_characters_exclude_newlines():
    s = one("the cat sat\nthe cat sat\nhello world.")
    assert s["q_fw_dup_line_char_frac"] == pytest.approx(11 / 34)


# --- thresholds ---------------------------------------------------------------------------------

PERMISSIVE = {
    **{f"max_top_{n}gram_frac": 100.0 for n in (2, 3, 4)},
    **{f"max_dup_{n}gram_frac": 1.0 for n in range(5, 11)},
    "max_dup_line_frac": 1.0,
    "max_dup_para_frac": 1.0,
    "max_dup_line_char_frac": 1.0,
    "max_dup_para_char_frac": 1.0,
}


def test_a_fraction_exactly_at_its_threshold_is_kept():
    lines = [f"line number {i} is here." for i in range(7)]
    at = "\n".join(lines + lines[:3])  # 3 of 10 lines are duplicates: exactly 0.3
    over = "\n".join(lines[:6] + lines[:4])  # 4 of 10
    cfg = {**PERMISSIVE, "max_dup_line_frac": 0.3}
    only_rep = {"gopher_quality": False, "c4": False, "fineweb": False}
    assert reasons([at, over], **only_rep, **cfg) == [None, "quality:gopher_rep_dup_line_frac"]


def _table(**columns) -> pa.Table:
    good = {name: 0 for name in QUALITY_COLUMNS}
    good.update(
        q_n_words=200,
        q_mean_word_len=5.0,
        q_frac_words_alpha=0.9,
        q_n_stop_words=5,
        q_c4_n_sentences=10,
        q_c4_has_lorem=False,
        q_c4_has_curly=False,
        q_fw_line_punct_frac=0.9,
    )
    good.update(columns)
    return pa.table({k: pa.array([v], FIELDS[k].type) for k, v in good.items()})


def first_reason(cfg: QualityConfig | None = None, **columns) -> str | None:
    for name, mask in quality_drop_rules(_table(**columns), cfg or QualityConfig()):
        if pc.any(pc.fill_null(mask, False)).as_py():
            return name
    return None


@pytest.mark.parametrize(
    ("column", "kept", "dropped", "reason"),
    [
        ("q_n_words", 50, 49, "gopher_min_words"),
        ("q_n_words", 100_000, 100_001, "gopher_max_words"),
        ("q_mean_word_len", 3.0, 2.99, "gopher_min_mean_word_len"),
        ("q_mean_word_len", 10.0, 10.01, "gopher_max_mean_word_len"),
        ("q_symbol_word_ratio", 0.1, 0.11, "gopher_symbol_word_ratio"),
        ("q_frac_lines_bullet", 0.9, 0.91, "gopher_bullet_lines"),
        ("q_frac_lines_ellipsis", 0.3, 0.31, "gopher_ellipsis_lines"),
        ("q_frac_words_alpha", 0.8, 0.79, "gopher_alpha_words"),
        ("q_n_stop_words", 2, 1, "gopher_stop_words"),
        ("q_dup_para_frac", 0.3, 0.31, "gopher_rep_dup_para_frac"),
        ("q_dup_para_char_frac", 0.2, 0.21, "gopher_rep_dup_para_char_frac"),
        ("q_dup_line_frac", 0.3, 0.31, "gopher_rep_dup_line_frac"),
        ("q_dup_line_char_frac", 0.2, 0.21, "gopher_rep_dup_line_char_frac"),
        ("q_top_2gram_frac", 0.2, 0.21, "gopher_rep_top_2gram"),
        ("q_top_3gram_frac", 0.18, 0.19, "gopher_rep_top_3gram"),
        ("q_top_4gram_frac", 0.16, 0.17, "gopher_rep_top_4gram"),
        ("q_dup_5gram_frac", 0.15, 0.16, "gopher_rep_dup_5gram"),
        ("q_dup_10gram_frac", 0.10, 0.11, "gopher_rep_dup_10gram"),
        ("q_c4_n_sentences", 5, 4, "c4_min_sentences"),
        ("q_c4_has_lorem", False, True, "c4_lorem_ipsum"),
        ("q_c4_has_curly", False, True, "c4_curly_bracket"),
        ("q_fw_line_punct_frac", 0.12, 0.11, "fineweb_line_punct"),
        ("q_fw_short_line_frac", 0.67, 0.68, "fineweb_short_lines"),
        ("q_fw_dup_line_char_frac", 0.01, 0.011, "fineweb_dup_line_chars"),
        ("q_fw_newline_word_ratio", 0.3, 0.31, "fineweb_newline_ratio"),
    ],
)
def test_published_default_thresholds(column, kept, dropped, reason):
    assert first_reason(**{column: kept}) is None
    assert first_reason(**{column: dropped}) == reason


def test_family_switches_and_rule_order():
    assert first_reason(QualityConfig(c4=False), q_c4_has_lorem=True) is None
    off = QualityConfig(gopher_quality=False, gopher_repetition=False, c4=False, fineweb=False)
    assert quality_drop_rules(_table(), off) == []
    # FineWeb's order: repetition before quality, so repetition names the reason
    assert first_reason(q_n_words=10, q_dup_line_frac=0.9) == "gopher_rep_dup_line_frac"
    # line_punct_exclude_zero keeps documents with no punctuated line at all
    exclude = QualityConfig(fw_line_punct_exclude_zero=True)
    assert first_reason(exclude, q_fw_line_punct_frac=0.0) is None
    assert first_reason(exclude, q_fw_line_punct_frac=0.05) == "fineweb_line_punct"


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="min_word"):
        QualityConfig(min_word=3)
    with pytest.raises(ValidationError, match="max_dup_line_frac"):
        QualityConfig(max_dup_line_frac=1.5)


# --- the vectorised code against a plain per-document transcription ---------------------------


def _dups(items: list[str]) -> tuple[int, int]:
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n, chars = n + 1, chars + len(item)
        seen.add(item)
    return n, chars


def _all_dup(words: list[str], n: int) -> int:
    seen: set[tuple[str, ...]] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = tuple(words[i : i + n])
        if gram in seen:
            chars, i = chars + len("".join(gram)), i + n
        else:
            seen.add(gram)
            i += 1
    return chars


def _reference(text: str) -> dict[str, float]:
    """datatrove's repetition and line definitions, one document at a time."""
    words, size = tokens(text), len(text)
    out = {}
    paras = re.split(r"\n{2,}", text.strip())
    n, chars = _dups(paras)
    out["q_dup_para_frac"], out["q_dup_para_char_frac"] = n / len(paras), chars / size
    lines = re.split("\n+", text)
    n, chars = _dups(lines)
    out["q_dup_line_frac"], out["q_dup_line_char_frac"] = n / len(lines), chars / size
    for n in (2, 3, 4):
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        gram, count = Counter(grams).most_common(1)[0]
        out[f"q_top_{n}gram_frac"] = len(gram) * count / size
    for n in range(5, 11):
        out[f"q_dup_{n}gram_frac"] = _all_dup(words, n) / size
    kept = [line for line in text.split("\n") if line.strip()]
    out["q_fw_short_line_frac"] = sum(len(line) <= 30 for line in kept) / len(kept)
    out["q_fw_dup_line_char_frac"] = _dups(kept)[1] / len(text.replace("\n", ""))
    out["q_fw_newline_word_ratio"] = text.count("\n") / len(words)
    return out


def _random_document(rng: random.Random) -> str:
    vocab = ["a", "b", "cc", "the", "of", "dog", "ran", "x1", "."]
    lines = []
    for _ in range(rng.randrange(1, 12)):
        if lines and rng.random() < 0.3:
            lines.append(rng.choice(lines))  # repeated line
        elif rng.random() < 0.15:
            lines.append("")  # paragraph break
        else:
            lines.append(" ".join(rng.choice(vocab[: rng.randrange(2, 9)]) for _ in range(20)))
    return "\n".join(lines).strip() + " end"


def test_vectorised_signals_match_a_per_document_reference():
    rng = random.Random(0)
    docs = [_random_document(rng) for _ in range(150)]
    got = signals(*docs)
    for doc, row in zip(docs, got, strict=True):
        for name, want in _reference(doc).items():
            assert row[name] == pytest.approx(want, rel=1e-5, abs=1e-6), (name, doc)


def test_documents_over_max_chars_are_dropped_before_any_signal():
    ok = "The cat sat on the mat and looked at the dog. " * 20
    table = pa.table({"id": ["long", "ok"], "text": ["word " * 250_001, ok]})
    out = QualityStage(max_chars=1_000_000)(table)
    assert out["drop_reason"].to_pylist()[0] == "quality:too_long"
    assert out["q_n_words"].to_pylist()[0] is None
    assert out["q_n_words"].to_pylist()[1] == 220
    assert QualityStage(max_chars=2_000_000)(table)["drop_reason"][0].as_py() != "quality:too_long"
