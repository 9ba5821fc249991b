"""The fused fastText engine against fastText's own predict, on models trained here.

The fused engine re-implements fastText's tokenization, hashing, vocabulary lookup and
word n-grams; these tests train real fastText models (bigrams, trigrams, unigrams, a
vocabulary with bytes that are not UTF-8, two words with the same hash) and require the
same probabilities as `model.predict` on real FineWeb text and on text built to hit every
rule: separators, a literal `</s>`, label-like tokens, long tokens, NUL bytes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from filters.fasttext_scorer import (
    FusedScorer,
    NativeScorer,
    fasttext_inputs,
    fasttext_lines,
    load_fasttext,
    make_scorer,
    predict_all,
)
from filters.langid import default_model_path
from tests.conftest import fineweb_docs

# Float rounding: fastText adds up a line's rows in 32-bit floats (the fused engine in 64-bit,
# over folded rows), so long lines differ most: about 1.3e-5 on "the " x 3000.
TOLERANCE = 5e-5

ODD = [
    "",
    "\n\n",
    "   leading and trailing   ",
    "Élève à l'école\r\nÜBER straße",
    "tab\tsep\x0bvt\x0cff\rcr",
    "nul\x00joined words",
    "\u00a0 no-break\u2003em space are not separators",
    "before </s> after: fastText stops at a literal end-of-line token",
    "</s>",
    "the </s>",
    "__label__3 __label__ __label__x the label-like tokens are skipped",
    "__labe not a label",
    "exactly8 exactly9x eight888 ninenine9",
    "x" * 300 + " a token longer than 255 bytes",
    "日本語のテキスト です " * 50,
    "the " * 3000,
    " ".join(f"w{i}" for i in range(2000)),
]


def _train(folder: Path, specs: dict[str, tuple[list[bytes], dict]]) -> dict[str, object]:
    """Supervised models, each trained in a fresh spawned process, as edu_train does
    (see EduTrainStage._train)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from filters.edu.train import fit_fasttext

    jobs = {}
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for name, (lines, params) in specs.items():
            path, model_path = folder / f"{name}.txt", folder / f"{name}.bin"
            path.write_bytes(b"\n".join(lines) + b"\n")
            args = {"epoch": 25, "lr": 0.1, "dim": 16, "wordNgrams": 2, "bucket": 20_000,
                    "minCount": 1, "thread": 1, "seed": 0, **params}  # fmt: skip
            jobs[name] = pool.submit(fit_fasttext, str(path), args, str(model_path))
        for job in jobs.values():
            job.result()
    return {name: load_fasttext(folder / f"{name}.bin") for name in specs}


def _labelled(docs: list[dict]) -> list[bytes]:
    """Five classes by length, so the model has something to learn."""
    out = []
    for i, d in enumerate(docs):
        line = d["text"][:3000].lower().replace("\n", " ")
        out.append(f"__label__{min(len(d['text']) // 1500, 4)} {line}".encode())
        if i % 7 == 0:
            out.append(f"__label__{i % 5} ".encode() + line.encode())
    return out


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return fineweb_docs()


@pytest.fixture(scope="module")
def texts(docs) -> pa.Array:
    return pa.array([d["text"] for d in docs] + ODD + [None], pa.large_string())


@pytest.fixture(scope="module")
def models(tmp_path_factory, docs) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("ft")
    lines = _labelled(docs[:300])
    # Bytes that are not UTF-8 become words of the vocabulary (fastText reads bytes).
    raw = [b"__label__0 caf\xe9 \xff\xfe na\xefve the", b"__label__1 \xc3\x28 the of"] * 3
    specs = {
        "bigrams": (lines, {}),
        "trigrams": (lines, {"wordNgrams": 3, "bucket": 5_000}),
        "unigrams": (lines, {"wordNgrams": 1}),
        "not_utf8": (lines + raw, {}),
        "subwords": (lines, {"minn": 2, "maxn": 4}),
        "hs": (lines, {"loss": "hs"}),
    }
    return _train(folder, specs)


def assert_same(model, texts: pa.Array, lowercase: bool, max_chars: int | None) -> None:
    want = NativeScorer(model).probs(texts, lowercase, max_chars)
    got = FusedScorer(model).probs(texts, lowercase, max_chars)
    assert got.shape == want.shape and not np.isnan(want).any()
    worst = np.abs(got - want).max()
    assert worst < TOLERANCE, (worst, texts[int(np.abs(got - want).max(axis=1).argmax())])


def test_native_engine_is_model_predict_exactly(models, texts):
    """fasttext_inputs + predict_all (bytes straight to the native multilinePredict) and
    the native scorer give exactly what model.predict gives over fasttext_lines."""
    model = models["bigrams"]
    index = {lbl: i for i, lbl in enumerate(model.get_labels())}
    for lowercase, max_chars in ((True, 3000), (False, None), (True, 7)):
        lines = fasttext_lines(texts, lowercase, max_chars)
        want_labels, want_probs = model.predict(lines, k=-1, threshold=0.0)
        got_labels, got_probs = predict_all(model, fasttext_inputs(texts, lowercase, max_chars))
        assert got_labels == want_labels
        assert np.array_equal(np.asarray(got_probs), np.asarray(want_probs))
        table = NativeScorer(model).probs(texts, lowercase, max_chars)
        for row, labels, probs in zip(table, want_labels, want_probs, strict=True):
            assert [row[index[lbl]] for lbl in labels] == np.minimum(probs, 1.0).tolist()


@pytest.mark.parametrize("name", ["bigrams", "trigrams", "unigrams", "not_utf8"])
def test_fused_engine_gives_fasttexts_probabilities(models, texts, name):
    for lowercase, max_chars in ((True, 3000), (False, None), (True, 7), (False, 1)):
        assert_same(models[name], texts, lowercase, max_chars)


def test_fused_engine_on_each_document_alone_and_on_slices(models, texts):
    """Offsets of sliced and chunked columns are honoured; one document is a batch."""
    model = models["bigrams"]
    fused, native = FusedScorer(model), NativeScorer(model)
    for i in (0, 7, len(texts) - len(ODD) - 1):
        one = texts.slice(i, 1)
        np.testing.assert_allclose(
            fused.probs(one, True, 3000), native.probs(one, True, 3000), atol=TOLERANCE
        )
    chunked = pa.chunked_array([texts.slice(3, 40), texts.slice(100, 60)])
    np.testing.assert_allclose(
        fused.probs(chunked, True, 3000), native.probs(chunked, True, 3000), atol=TOLERANCE
    )
    assert fused.probs(texts.slice(0, 0), True, 3000).shape == (0, len(fused.labels))


def _fnv(words: np.ndarray) -> np.ndarray:
    """fastText's hash of each row of a uint8 matrix (all bytes < 128: no sign games)."""
    h = np.full(len(words), 2166136261, np.uint64)
    for j in range(words.shape[1]):
        h = ((h ^ words[:, j]) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF)
    return h


def test_words_with_the_same_hash_are_told_apart(tmp_path, docs):
    """Two words of the vocabulary whose fastText hashes are equal: the lookup compares the
    bytes, so each document gets its own word's row, as in fastText."""
    rng = np.random.default_rng(0)
    words = rng.integers(ord("a"), ord("z") + 1, size=(300_000, 6), dtype=np.uint8)
    h = _fnv(words.astype(np.uint64))
    order = np.argsort(h, kind="stable")
    same = np.nonzero(np.diff(h[order]) == 0)[0]
    pairs = [(words[order[i]], words[order[i + 1]]) for i in same]
    a, b = next((bytes(x), bytes(y)) for x, y in pairs if bytes(x) != bytes(y))
    lines = _labelled(docs[:200]) + [b"__label__4 " + a + b" " + a] * 20 + [b"__label__0 " + b] * 20
    model = _train(tmp_path, {"collide": (lines, {})})["collide"]
    assert model.get_word_id(a.decode()) >= 0 and model.get_word_id(b.decode()) >= 0
    probe = pa.array([a.decode(), b.decode(), f"{a.decode()} {b.decode()}"], pa.large_string())
    assert_same(model, probe, False, None)


def test_auto_falls_back_to_fasttext_for_models_it_cannot_run(models, caplog):
    for name, why in (("subwords", "character n-grams"), ("hs", "not softmax")):
        with caplog.at_level(logging.INFO, logger="primer.fasttext"):
            scorer = make_scorer(models[name])
        assert isinstance(scorer, NativeScorer) and why in caplog.text
        with pytest.raises(ValueError, match=why):
            make_scorer(models[name], "fused")
    lid = load_fasttext(default_model_path())  # lid.176.ftz: quantized, with subwords
    assert FusedScorer.unsupported(lid) == "the model is quantized (.ftz)"
    assert isinstance(make_scorer(lid), NativeScorer)
    assert isinstance(make_scorer(models["bigrams"]), FusedScorer)
    assert isinstance(make_scorer(models["bigrams"], "fasttext"), NativeScorer)
