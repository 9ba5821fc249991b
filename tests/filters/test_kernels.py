"""The compiled kernels against their definitions, value for value.

MinHash signatures (filters/dedup/minhash.py) against the definition in numpy: shingles of
`normalise`d text hashed by `filters.text.WordSpans`, each permutation's minimum. Quality
signals (filters/quality/kernels.py) against the regex definitions of words.py and
lines.py (`reference_quality_signals`). Both on the bundled FineWeb sample and on random
text: any Unicode, empty and whitespace-only documents, very long words and lines, mixed
scripts, emoji, combining marks, and the characters the token and sentence patterns treat
specially.

    .venv/bin/pytest tests/filters/test_kernels.py
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from filters.dedup.config import DedupConfig
from filters.dedup.minhash import minhash, permutations
from filters.normalise import normalise
from filters.quality.signals import (
    QUALITY_COLUMNS,
    compute_quality_signals,
    reference_quality_signals,
)
from filters.text import WordSpans, reference_normalise, utf8_buffers
from tests.conftest import fineweb_docs

EDGE_CASES = [
    "",
    " ",
    "\n",
    "\n\n\n",
    " \t\n\x0b\x0c\r\u3000\u00a0\u2028\u2029\u0085\u1680 ",
    "x" * 20_000,
    "a" * 1500 + " b c.",  # a C4 line with a word over 1,000 characters
    "word " * 3000,
    "." * 5000,
    "....... x.",
    "!" * 300 + " a",
    "\u0301" * 50,
    "a\u0345\u0334b a\u0334\u0345b \u0f71\u0f72\u0f74 \u1100\u1161\u11a8 한글 \u0958",  # reordered marks
    "👨‍👩‍👧‍👦 🇫🇷 👍🏽" * 20,
    "e\u0301te\u0301 Ça va. ΣΊΣΥΦΟΣ σίσυφος. İstanbul ıI ſ K. Ünïcödé",
    "مرحبا بالعالم. שלום עולם.",
    "中文，日本語。한국어! ไทย",
    "ﬁ ﬀ ① ½ Ⅻ ㎏ ＡＢＣ ²³",
    "http://example.com/a.b, www.x.org) a@b.co.uk Ph.D. U.S.A. e.g. Dr. Smith's don't "
    "o'clock COVID-19 3.5 1,000 :-) ): '' -- ... A+ |x a)(1 50–59",
    "Lorem Ipsum dolor.\nUse JavaScript { x } now.\nRead our Privacy Policy.\n[1] Done [edit].",
]

_PIECES = [
    *"..!?…,;:()[]{}\"'’‘“”-–—/=<>+|_@#$%^&*~\\·´•",
    "http://", "https://", "www.", "Mr.", "Dr.", "Ph.D.", "e.g.", "U.S.", "a.m.", "J.",
    "x@y.org", "don't", "'s", "’re", "LL", "o'clock", "COVID-19", "3.5", "1,000", "...", "--",
    ":-)", ";)", "):", "''", "lorem ipsum", "JavaScript", "cookie policy", "[2]", "[edit]",
    "[citation needed]", "the", "of", "and", "with", "The", "é", "\u0301", "²", "ſ", "K",
    "中文", "😀", "\u200d", "\ufeff", "\x00", "\x7f", " ", " ", " ", "  ", "\t", "\n", "\n\n",
]  # fmt: skip


def random_texts(seed: int, n: int) -> dict[str, list[str]]:
    """n documents of each kind: of the pieces above; of characters from one of a few
    scripts; of any code points. By kind, since mixing them in one batch slows the regex
    definitions down several times."""
    rng = random.Random(seed)
    pools = ["abc XYZ 019\n", "é ñ ß ẞ Σ ς ﬁ\n", "中 文 한 ไ 。\n", "😀 👍🏽 ‍ \n"]
    return {
        "pieces": ["".join(rng.choices(_PIECES, k=rng.choice([1, 5, 30, 300]))) for _ in range(n)],
        "scripts": [
            "".join(rng.choices(rng.choice(pools), k=rng.choice([3, 50, 1000]))) for _ in range(n)
        ],
        "any": [
            "".join(any_code_point(rng) for _ in range(rng.choice([1, 10, 100]))) for _ in range(n)
        ],
        "edge": EDGE_CASES,
    }


def any_code_point(rng: random.Random) -> str:
    """Any code point but a surrogate (Arrow strings are UTF-8)."""
    c = rng.randrange(0x110000 - 0x800)
    return chr(c + 0x800 if c >= 0xD800 else c)


def all_random_texts(seed: int, n: int) -> list[str]:
    return [t for texts in random_texts(seed, n).values() for t in texts]


# --- normalisation ----------------------------------------------------------------------------

FLAGS = [
    {},
    {"lowercase": False, "strip_punct": False, "strip_accents": False},
    {"strip_accents": False},
    {"strip_punct": False},
]


@pytest.mark.parametrize("flags", FLAGS, ids=["all", "none", "nfkc", "punct-kept"])
def test_normalise_equals_its_definition(flags):
    texts = [d["text"] for d in fineweb_docs()] + [*all_random_texts(3, 300), None, None]
    arr = pa.array(texts, pa.large_string())
    got, want = normalise(arr, **flags), reference_normalise(arr, **flags)
    assert got.type == want.type == pa.large_string()
    assert got.to_pylist() == want.to_pylist()
    # a slice (non-zero offset), a chunked array and an empty batch
    assert normalise(arr.slice(7, 50), **flags).equals(
        reference_normalise(arr.slice(7, 50), **flags)
    )
    chunked = pa.chunked_array([arr.slice(0, 10), arr.slice(10, 5)])
    assert normalise(chunked, **flags).equals(reference_normalise(chunked, **flags))
    assert len(normalise(pa.array([], pa.string()), **flags)) == 0


# --- MinHash ----------------------------------------------------------------------------------

CONFIGS = [
    DedupConfig(),
    DedupConfig(lowercase=False, strip_punct=False, strip_accents=False),
    DedupConfig(ngram=1, bands=4, rows_per_band=3, seed=7),
    DedupConfig(ngram=13),
]


def reference_minhash(texts: list[str | None], config: DedupConfig) -> np.ndarray:
    """The definition: each shingle's hash is the top 32 bits of `WordSpans.span_hashes`
    over its words of `normalise`d text (all the words of a shorter document); a
    signature value is the top 32 bits of the minimum of (a*x + b) mod 2^64."""
    norm = reference_normalise(pa.array(texts, pa.large_string()), **config.norm_flags)
    words = WordSpans.of(*utf8_buffers(pc.fill_null(norm, "")))
    a, b = permutations(config.num_perm, config.seed)
    out = np.full((len(texts), config.num_perm), 0xFFFFFFFF, np.uint32)
    for d, n in enumerate(words.n_words.tolist()):
        if n:
            first = words.first_word[d] + np.arange(max(n - config.ngram + 1, 1))
            last = np.minimum(first + config.ngram - 1, words.first_word[d + 1] - 1)
            x = words.span_hashes(first, last) >> np.uint64(32)
            out[d] = ((x[:, None] * a + b).min(axis=0) >> np.uint64(32)).astype(np.uint32)
    return out


def test_minhash_of_the_sample_is_what_it_has_always_been():
    # sha256 of the signatures of the bundled FineWeb sample, pinned: stored dedup states
    # hold signatures, so a change here must bump the dedup stage's version.
    sig = minhash(pa.array([d["text"] for d in fineweb_docs()]))
    digest = "72b76f6aea50190a62ee8371dd21d4cc81075a1649ecdec86efdfe46e3842e28"
    assert hashlib.sha256(sig.tobytes()).hexdigest() == digest


@pytest.mark.parametrize("config", CONFIGS[:2], ids=["fineweb", "no-folding"])
def test_minhash_equals_its_definition_on_real_text(config):
    texts = [d["text"] for d in fineweb_docs()]
    assert np.array_equal(minhash(pa.array(texts), config), reference_minhash(texts, config))


@pytest.mark.parametrize("config", CONFIGS, ids=["fineweb", "no-folding", "unigrams", "13"])
def test_minhash_equals_its_definition_on_random_text(config):
    texts = [*all_random_texts(1, 500), None]
    assert np.array_equal(minhash(pa.array(texts), config), reference_minhash(texts, config))


def test_minhash_of_normalised_text_equals_its_definition():
    texts = [d["text"] for d in fineweb_docs(100)] + all_random_texts(2, 100)
    config = DedupConfig()
    norm = normalise(pa.array(texts), **config.norm_flags)
    got = minhash(norm, config, normalised=True)
    assert np.array_equal(got, reference_minhash(texts, config))


# --- quality signals ----------------------------------------------------------------------------


def assert_same_signals(texts: list[str | None]) -> None:
    arr = pa.array(texts, pa.large_string())
    got, want = compute_quality_signals(arr), reference_quality_signals(arr)
    for name in QUALITY_COLUMNS:
        g, w = got[name].to_pylist(), want[name].to_pylist()
        bad = [i for i, (x, y) in enumerate(zip(g, w, strict=True)) if x != y]
        assert not bad, (name, len(bad), g[bad[0]], w[bad[0]], (texts[bad[0]] or "")[:300])


def test_quality_signals_equal_the_regex_definitions_on_real_text():
    assert_same_signals([d["text"] for d in fineweb_docs()])


@pytest.mark.parametrize("kind", ["pieces", "scripts", "any", "edge"])
def test_quality_signals_equal_the_regex_definitions_on_random_text(kind):
    assert_same_signals([*random_texts(3, 700)[kind], None])


def test_quality_signals_equal_the_regex_definitions_on_dense_punctuation():
    # Short documents packed with what the token and sentence patterns decide on.
    rng = random.Random(4)
    assert_same_signals(
        ["".join(rng.choices(_PIECES, k=rng.randrange(1, 40))) for _ in range(2500)]
    )
