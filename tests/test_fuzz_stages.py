"""Fuzz every stage that maps text with random and adversarial documents.

What: a seeded generator (`fuzz_texts`, `fuzz_pages`; plain `random` with a fixed seed, so a
failure reproduces) makes a few hundred documents built to break text code: punctuation
runs, abbreviations and ellipses, U+FFFD, control characters (NUL, C0, DEL, NEL, U+2028/9,
a lone CR), zero-width and combining marks, right-to-left and mixed scripts, emoji with
joiners, a 200,000-character word, documents of only blank lines or only whitespace, the
empty string, one character, thousands of short lines, long repeated n-grams; and raw HTML
for extract (cut-off tags, a charset that lies, binary bytes, 3,000 nested <div>s, pages of
only <script>). Each stage runs on the real thing (real fastText models, the real lid.176,
the real Phi-3 tokenizer) and must return one row per input row, in order, with the column
types of pipeline/schema.py, and every row either kept or dropped with "<stage>:<reason>".

Why: at crawl scale one odd document in a billion is certain; a stage that raises on it
turns into a recorded row error at best (the runner's bisection) and a stopped run at worst.

Run: .venv/bin/python -m pytest -q tests/test_fuzz_stages.py
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.schema import FIELDS, READ_SCHEMA
from tests.conftest import fineweb_docs

SEED = 20261204
REASON = re.compile(r"^([a-z_0-9]+):([a-z_0-9]+)$")

_WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was",
          "on", "be", "by", "this", "are", "from", "water", "cycle", "river", "cloud", "rain",
          "heat", "sun", "ocean", "plant", "soil", "energy", "light"]  # fmt: skip
_SCRIPTS = [
    "שלום עולם זה טקסט בעברית",  # Hebrew (RTL)
    "مرحبا بالعالم هذا نص عربي",  # Arabic (RTL)
    "Привет мир это текст",  # Cyrillic
    "日本語のテキストです。中文文本。",  # CJK, no spaces
    "नमस्ते दुनिया यह पाठ है",  # Devanagari, combining vowel signs
    "สวัสดีชาวโลกนี่คือข้อความ",  # Thai, no spaces
    "Ελληνικά κείμενο εδώ",  # Greek
]
_EMOJI = ["😀", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "🇫🇷", "❤️", "🧑🏿‍🚀", "\U0001f9ea"]
_CONTROL = ["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\x85",
            "\u2028", "\u2029", "\r", "\r\n", "\t"]  # fmt: skip
_INVISIBLE = ["\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", "\u00ad", "\u202e", "\u200f"]
_COMBINING = ["\u0301", "\u0308", "\u0327", "\u20dd", "\u0489", "\u036f"]
_ABBREVIATIONS = ["e.g.", "i.e.", "U.S.A.", "Dr.", "St.", "a.m.", "Mr.", "vs.", "Ph.D.",
                  "etc.", "No.", "p.m.", "...", "…", ".", ". . .", "1.2.3.", "3.14."]  # fmt: skip
_PUNCT = list("!?.,;:-—–'\"()[]{}<>/\\|@#$%^&*_+=~`") + ["...", "?!", "!!!", "--"]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randrange(3, 15))]
    return " ".join(words).capitalize() + rng.choice([".", "!", "?", "", "..."])


def _mixed(rng: random.Random) -> str:
    """A document assembled from pieces of every kind."""
    kinds = [
        lambda: _sentence(rng),
        lambda: " ".join(rng.choices(_ABBREVIATIONS, k=rng.randrange(1, 12))),
        lambda: "".join(rng.choices(_PUNCT, k=rng.randrange(1, 40))),
        lambda: rng.choice(_SCRIPTS),
        lambda: "".join(rng.choices(_EMOJI, k=rng.randrange(1, 6))),
        lambda: rng.choice(_CONTROL) * rng.randrange(1, 4),
        lambda: rng.choice(_WORDS) + "".join(rng.choices(_INVISIBLE + _COMBINING, k=8)),
        lambda: "\ufffd" * rng.randrange(1, 5) + rng.choice(_WORDS),
        lambda: "\n" * rng.randrange(1, 4),
        lambda: str(rng.randrange(10**9)) + "." + str(rng.randrange(100)),
    ]
    return " ".join(rng.choice(kinds)() for _ in range(rng.randrange(1, 30)))


def fuzz_texts(seed: int = SEED, n_random: int = 220) -> list[str | None]:
    """Hand-picked adversarial documents, then `n_random` random mixtures (deterministic)."""
    rng = random.Random(seed)
    fixed: list[str | None] = [
        "",
        None,
        "a",
        ".",
        "\ufffd",
        "\x00",
        "\r",
        " ",
        "\n\n\n\n\n",
        " \t \u3000 \u00a0 \u2003 \n \t ",
        "e.g. i.e. U.S.A. Dr. St. a.m.",
        "e.g... i.e... U.S.A.",
        "x... y... z... w.",
        "...\n...\n...\n. . .\n1.2.3.4.\n3.14. 2.71.",
        "!!!???...,,,;;;" * 50,
        "\ufffd" * 5000,
        "text\x00with\x00nuls\x00inside it all",
        "lone\rcarriage\rreturns\rand\x85next\u2028line\u2029para",
        "".join(chr(c) for c in range(0x20)) + "\x7f\x85",
        "z\u0351\u0352\u0353\u0354" * 300 + " zalgo",
        "\u200b\u200c\u200d\ufeff" * 500,
        "\u202eright-to-left override\u202c and back " * 20,
        " ".join(_SCRIPTS) * 10,
        "".join(_EMOJI) * 200,
        "w" * 200_000,  # one word of 200k characters
        "short line.\n" * 5000,
        "the cat sat on the mat " * 3000,  # long repeated n-grams
        "\n".join(["same line"] * 2000),
        "<script>alert(1)</script> {curly} lorem ipsum dolor sit amet.",
        "\ud7ff\ue000\uffff\U0010ffff edge code points",
    ]
    return fixed + [_mixed(rng) for _ in range(n_random)]


def fuzz_pages(seed: int = SEED) -> list[tuple[bytes, str | None]]:
    """(payload, content type) pairs of adversarial HTML for extract."""
    rng = random.Random(seed + 1)
    body = "<p>" + " ".join(_sentence(rng) for _ in range(20)) + "</p>"
    good = f"<html><head><title>t</title></head><body>{body}</body></html>"
    pages: list[tuple[bytes, str | None]] = [
        (b"", "text/html"),
        (b"<", "text/html"),
        (good.encode()[: len(good) // 2], "text/html"),  # cut mid-page
        (b"<html><body><p>unclosed <b><i><div><span", "text/html"),
        (b"<html><head><title>cut", None),
        (b"<<<<>>>></></><!--", "text/html"),
        (b"<!-- never closed " + body.encode(), "text/html"),
        (f'<meta charset="utf-16">{good}'.encode(), "text/html"),  # a charset that lies
        (f'<meta charset="bogus-9">{good}'.encode(), "text/html; charset=bogus-9"),
        (good.encode("utf-8"), 'text/html; charset=""'),
        (good.replace("t", "é").encode("latin-1"), "text/html; charset=utf-8"),
        (good.encode("utf-16-le"), "text/html"),  # UTF-16 without a BOM
        (b"\xff\xfe" + good.encode("utf-16-le")[:-1], "text/html"),  # odd length after BOM
        (bytes(rng.randrange(256) for _ in range(4000)), "text/html"),  # binary garbage
        (b"\x00" * 2000, "text/html"),
        (b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(500)), "text/html"),
        (b"<html><body>" + b"<div>" * 3000 + b"deep" + b"</div>" * 10, "text/html"),
        (b"<html><body>" + b"<div><p>nested text</p>" * 3000, "text/html"),
        (b"<html><head><script>" + b"var x = 1;" * 2000 + b"</script></head></html>", None),
        (b"<html><body><script>document.write('only js')</script></body></html>", "text/html"),
        (b"<html><style>body{color:red}</style><body></body></html>", "text/html"),
        (b"<p>" + b"\xe2\x80" * 100 + b"</p>", "text/html"),  # cut multi-byte characters
        (b"<p title='" + b"a" * 100_000 + b"'>x</p>", "text/html"),  # a huge attribute
        (f"<p>{'&amp;' * 2000}&#0;&#xD800;&#x110000;&bogus;</p>".encode(), "text/html"),
        (("<p>\u202e\u200b\ufeff" + " ".join(_SCRIPTS) + "</p>").encode(), "TEXT/HTML;;;"),
        (good.encode(), "application/octet-stream"),
        (good.encode(), "text/plain; charset=utf-8"),
        (b"\x1f\x8b\x08\x00" + bytes(200), "text/html"),  # a gzip body left encoded
        (good.encode(), None),
    ]
    return pages


# --- the batch and what every stage must give back ------------------------------------------

TEXTS = fuzz_texts()
PRIOR = {3: "read:invalid_json", 40: "langid:low_score"}
"""Rows dropped before the stage: they must come out with the reason they came in with."""


def fuzz_table(texts: list[str | None] = TEXTS) -> pa.Table:
    """The fuzz documents as two parts' worth of rows that both number their ids from 0,
    each carrying the file it came from (as readers give them)."""
    half = len(texts) // 2
    ids = [str(i) for i in range(half)] + [str(i) for i in range(len(texts) - half)]
    sources = ["a.jsonl"] * half + ["b.jsonl"] * (len(texts) - half)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "text": pa.array(texts, pa.large_string()),
            "source_path": pa.array(sources, pa.string()),
            "drop_reason": pa.array([PRIOR.get(i) for i in range(len(texts))], pa.string()),
        }
    )


def check_contract(out: pa.Table, table: pa.Table, adds: tuple[str, ...], *stages: str) -> None:
    """One row per input row in order, schema types, and reasons "<stage>:<reason>"."""
    assert len(out) == len(table)
    key = ["source_path", "id"] if "source_path" in table.column_names else ["id"]
    for c in key:
        assert out[c].to_pylist() == table[c].to_pylist(), c
    for f in out.schema:
        assert f.type == FIELDS[f.name].type, (f.name, f.type, FIELDS[f.name].type)
    missing = set(adds) - set(out.column_names)
    assert not missing, missing
    before = table["drop_reason"].to_pylist() if "drop_reason" in table.column_names else None
    for i, reason in enumerate(out["drop_reason"].to_pylist()):
        if before is not None and before[i] is not None:
            assert reason == before[i], (i, before[i], reason)
        elif reason is not None:
            m = REASON.match(reason)
            assert m and m.group(1) in stages, (i, reason)


def require(path: Path, what: str) -> Path:
    """A prepared asset the test needs: missing, skip, or fail where CI=true."""
    if not path.exists():
        message = f"{what} not found at {path} (`make setup` prepares it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_lid176() -> None:
    from pipeline.assets import lid176_path

    require(lid176_path(), "fastText's lid.176 model")


@pytest.fixture(scope="module")
def edu_model(tmp_path_factory) -> str:
    """A tiny real fastText classifier (labels 0-4 by length) on the bundled FineWeb sample."""
    from filters.edu.train import fit_fasttext

    folder = tmp_path_factory.mktemp("edu")
    lines = [
        f"__label__{min(len(d['text']) // 1500, 4)} " + d["text"][:2000].lower().replace("\n", " ")
        for d in fineweb_docs(120)
    ]
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    params = {"epoch": 5, "lr": 0.1, "dim": 8, "wordNgrams": 2, "bucket": 20_000,
              "minCount": 1, "thread": 1, "seed": 0}  # fmt: skip
    fit_fasttext(str(folder / "train.txt"), params, str(folder / "model.bin"))
    return str(folder / "model.bin")


QUESTION = (
    "Marta plants seven rows of tulips in her garden and each row holds twelve bulbs, "
    "but squirrels dig up one third of them before spring. How many tulips bloom in May?"
)


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("bench")
    rows = [
        {"question": QUESTION, "answer": "She plants 7 * 12 = <<7*12=84>>84 bulbs. #### 56"},
        {"question": "\x00\ufffd é" * 12, "answer": "\u200b"},  # an item as odd as the rest
    ]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


# --- the stages ---------------------------------------------------------------------------------


def test_quality_scores_every_document():
    from filters.quality.quality import QualityStage
    from filters.quality.signals import QUALITY_COLUMNS

    table = fuzz_table()
    out = QualityStage()(table)
    check_contract(out, table, QualityStage.adds, "quality")
    for c in QUALITY_COLUMNS:
        values = out[c].to_numpy(zero_copy_only=False)
        if out[c].type == pa.float32():
            assert np.isfinite(values).all(), c
        elif pa.types.is_integer(out[c].type):
            assert (values >= 0).all(), c
    # Null text scores as empty, and is then too short like any empty document.
    assert out["q_n_words"][1].as_py() == 0


def test_langid_labels_every_document():
    from filters.langid import LangIdStage

    require_lid176()
    table = fuzz_table()
    out = LangIdStage()(table)
    check_contract(out, table, LangIdStage.adds, "langid")
    score = out["lang_score"].to_numpy()
    assert out["lang"].null_count == 0 and ((score >= 0) & (score <= 1)).all()


def test_dedup_keeps_one_of_each_text_across_parts_with_repeated_ids(tmp_path):
    from filters.dedup.dedup import DedupStage

    table = fuzz_table()
    half = len(TEXTS) // 2
    parts = [table.slice(0, half), table.slice(half)]
    stage = DedupStage()
    stage.prepare(parts, str(tmp_path / "state"))
    out = pa.concat_tables(stage(p) for p in parts)
    check_contract(out, table, DedupStage.adds, "dedup")
    kept = out.filter(pc.is_null(out["drop_reason"]))
    hashes = pc.drop_null(kept["text_hash"])
    assert len(pc.unique(hashes)) == len(hashes)  # identical texts are never both kept
    assert pc.sum(pc.starts_with(out["drop_reason"], "dedup:")).as_py() > 0


def test_edu_score_scores_every_document(edu_model):
    from filters.edu.score import EduScoreStage

    table = fuzz_table()
    for engine in ("fused", "fasttext"):
        out = EduScoreStage(model=edu_model, engine=engine, phase1_min_score=2.0)(table)
        check_contract(out, table, EduScoreStage.adds, "edu_score")
        score = out["edu_score"].to_numpy()
        assert ((score >= 0) & (score <= 4)).all(), engine  # the model's labels are 0-4


def test_validate_checks_every_document(edu_model):
    from generators.validate import ValidateStage

    require_lid176()
    table = fuzz_table()
    finish = ["stop", "length", None, "\x00"]
    table = table.append_column(
        "finish_reason", pa.array(finish * (len(table) // 4 + 1))[: len(table)]
    )
    out = ValidateStage(edu_model=edu_model)(table)
    # validate runs langid, the repetition rules and edu_score inside: their reasons show.
    check_contract(out, table, ValidateStage.adds, "validate", "langid", "quality", "edu_score")


@pytest.mark.parametrize("mode", ["drop", "cut"])
def test_decontaminate_every_document(benchmarks, mode):
    from filters.decontam.decontaminate import DecontaminateStage

    rng = random.Random(SEED + 2)
    texts = [
        t
        if t is None or rng.random() < 0.7
        else f"{t[: len(t) // 2]} {QUESTION} {t[len(t) // 2 :]}"
        for t in TEXTS
    ]
    table = fuzz_table(texts)
    out = DecontaminateStage(benchmarks=benchmarks, mode=mode, min_chars_after_cut=50)(table)
    check_contract(out, table, DecontaminateStage.adds, "decontaminate")
    hit = pc.is_valid(out["contam_items"])
    assert pc.sum(hit).as_py() > 0
    if mode == "cut":
        kept_hits = out.filter(pc.and_(hit, pc.is_null(out["drop_reason"])))
        assert not any(QUESTION in t for t in kept_hits["text"].to_pylist())


@pytest.mark.parametrize("backend", ["resiliparse", "trafilatura", "cascade"])
def test_extract_every_page(backend):
    from filters.extract import ExtractStage

    pages = fuzz_pages()
    rows = [{"id": f"p{i}", "html": h, "content_type": c} for i, (h, c) in enumerate(pages)]
    rows += [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    table = pa.Table.from_pylist(rows, schema=READ_SCHEMA)
    out = ExtractStage(backend=backend)(table)
    check_contract(out, table, ExtractStage.adds, "extract")
    assert out["html"].null_count == len(out)  # no raw bytes go downstream
    extracted = out.slice(0, len(pages)).filter(pc.is_null(out.slice(0, len(pages))["drop_reason"]))
    assert len(extracted) > 0 and pc.min(extracted["n_chars"]).as_py() > 0
    text_rows = out.slice(len(pages))
    assert text_rows["text"].to_pylist() == TEXTS  # given text passes through untouched


@pytest.fixture(scope="module")
def phi3():
    from pipeline.assets import assets_dir
    from pipeline.tokens.tokenizer import load_tokenizer

    require(assets_dir() / "phi3" / "tokenizer.json", "the Phi-3 tokenizer")
    return load_tokenizer("phi3")


def test_the_phi3_tokenizer_encodes_every_document(phi3):
    from pipeline.tokens.tokenizer import PHI3_MODEL_VOCAB_SIZE

    texts = [t for t in TEXTS if t is not None]
    ids, lengths = phi3.encode_batch(texts)
    assert len(lengths) == len(texts) and int(lengths.sum()) == len(ids)
    assert (lengths[[i for i, t in enumerate(texts) if t.strip()]] > 0).all()
    assert int(ids.max()) < PHI3_MODEL_VOCAB_SIZE


def _tokenize_part(tokenizer, table: pa.Table, folder: Path) -> dict:
    """The mixture's per-part tokenizing pass over `table` written as a stage part."""
    import pyarrow.parquet as pq

    from pipeline.tokens.token_cache import tokenize_part

    pq.write_table(table, folder / "part.parquet")
    return tokenize_part(tokenizer, str(folder / "part.parquet"), None, str(folder / "tok"), 64)


def test_the_mixture_tokenizes_every_kept_document(phi3, tmp_path):
    table = fuzz_table()
    table = table.filter(pc.is_valid(table["text"]))
    stats = _tokenize_part(phi3, table, tmp_path)
    kept = table.filter(pc.is_null(table["drop_reason"]))
    _, lengths = phi3.encode_batch(kept["text"].to_pylist())
    assert stats["documents"] == stats["rows_in"] == len(kept)
    assert stats["tokens"] == int(lengths.sum()) + len(kept)  # each document + its EOS


def test_the_mixture_tokenizes_a_kept_row_without_text(phi3, tmp_path):
    table = fuzz_table().slice(0, 8)  # row 1 has no text and no drop reason
    stats = _tokenize_part(phi3, table, tmp_path)
    assert stats["rows_in"] == 8 - 1  # row 3 was dropped earlier


# --- batches at the edges: no rows, and a text column typed null -----------------------------


def _stage(name: str, edu_model: str, benchmarks: str):
    from filters.decontam.decontaminate import DecontaminateStage
    from filters.edu.score import EduScoreStage
    from filters.langid import LangIdStage
    from filters.quality.quality import QualityStage
    from generators.validate import ValidateStage

    if name in ("langid", "validate"):
        require_lid176()
    return {
        "quality": lambda: QualityStage(),
        "langid": lambda: LangIdStage(),
        "edu_score": lambda: EduScoreStage(model=edu_model),
        "validate": lambda: ValidateStage(),
        "decontaminate": lambda: DecontaminateStage(benchmarks=benchmarks),
    }[name]()


@pytest.mark.parametrize(
    "name",
    [
        "quality",
        "langid",
        "edu_score",
        "validate",
        "decontaminate",
    ],
)
def test_a_batch_of_no_rows(name, edu_model, benchmarks):
    table = fuzz_table().slice(0, 0)
    stage = _stage(name, edu_model, benchmarks)
    check_contract(stage(table), table, stage.adds, name)


def test_dedup_and_extract_take_a_batch_of_no_rows(tmp_path):
    from filters.dedup.dedup import DedupStage
    from filters.extract import ExtractStage

    table = fuzz_table().slice(0, 0)
    stage = DedupStage()
    stage.prepare([table], str(tmp_path / "state"))
    check_contract(stage(table), table, DedupStage.adds, "dedup")
    empty = READ_SCHEMA.empty_table()
    check_contract(ExtractStage(backend="resiliparse")(empty), empty, ExtractStage.adds, "extract")


@pytest.mark.parametrize(
    "name",
    [
        "quality",
        "langid",
        "edu_score",
        "validate",
        "decontaminate",
    ],
)
def test_a_text_column_typed_null(name, edu_model, benchmarks):
    table = pa.table({"id": ["a", "b"], "text": pa.nulls(2)})
    stage = _stage(name, edu_model, benchmarks)
    out = stage(table)
    check_contract(out, table, stage.adds, name)
