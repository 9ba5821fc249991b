"""edu_train's label sources, its group-disjoint split, the combiner and the length guardrail,
and configs/edu_classifier.yaml on the shipped data (the real shared data in the slow test)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from filters.edu.combiner import (
    Combiner,
    GradedCombiner,
    combiner_features,
    fit_combiner,
    fit_graded,
    load_combiner,
)
from filters.edu.labels import format_rows, group_of, read_text_rows, url_hosts
from filters.edu.score import EduScoreStage
from filters.edu.train import EduTrainStage
from pipeline.stage import PreflightError
from pipeline.stage_runner import GuardrailError
from tests.conftest import REPO, SHARED, require_data

EDU = REPO / "data" / "edu" / "openstax.jsonl.gz"
WEB = sorted(str(p) for p in (REPO / "data" / "sample").glob("fineweb-*.jsonl.gz"))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def web_rows(n: int, start: int = 0) -> list[dict]:
    """Real FineWeb documents of data/sample with their URLs."""
    out = []
    for f in WEB:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh]
    return out[start : start + n]


# --- pieces -----------------------------------------------------------------------------------


def test_groups_are_web_domains_then_books_then_the_file():
    t = pa.table({
        "url": ["https://www.Example.org/a?x=1", "http://news.site.com:8080/b", None, None],
        "book": [None, "ignored: a url wins", "Psychology 2e", None],
    })  # fmt: skip
    assert url_hosts(t["url"]).to_pylist() == ["example.org", "news.site.com", None, None]
    assert group_of(t, ["url", "book"], "file:x.jsonl").to_pylist() == [
        "host:example.org", "host:news.site.com", "book:Psychology 2e", "file:x.jsonl",
    ]  # fmt: skip


def test_format_labels_map_formats_to_ratings_and_leave_unknown_ones_out(tmp_path):
    path = write_jsonl(tmp_path / "wo.jsonl.gz", [
        {"id": "a", "text": "A tutorial on fractions.", "url": "http://a.com/1", "format": "Tutorial"},
        {"id": "b", "text": "Buy now!", "url": "http://b.com/1", "format": "Spam / Ads"},
        {"id": "c", "text": "Something else.", "url": "http://c.com/1", "format": "Unheard Of"},
        {"id": "d", "text": "", "url": "http://d.com/1", "format": "Tutorial"},
    ])  # fmt: skip
    rows = read_text_rows(path, "text", "id", ["url"], extra=("format",))
    assert rows["id"].to_pylist() == ["a", "b", "c"]  # the empty text is not a document
    table, left_out = format_rows(rows, {"Tutorial": 5, "Spam / Ads": 0}, "format")
    assert table["label"].to_pylist() == [5, 0] and left_out == 1
    assert table["group"].to_pylist() == ["host:a.com", "host:b.com"]


def test_format_caps_lower_the_rating_by_another_column(tmp_path):
    path = write_jsonl(tmp_path / "wo.jsonl.gz", [
        {"id": "a", "text": "A tutorial.", "url": "http://a.com/", "format": "Tutorial", "topic": "Adult"},
        {"id": "b", "text": "A tutorial.", "url": "http://b.com/", "format": "Tutorial", "topic": "Health"},
        {"id": "c", "text": "Buy now!", "url": "http://c.com/", "format": "Spam / Ads", "topic": "Adult"},
    ])  # fmt: skip
    mapping = {"Tutorial": 5, "Spam / Ads": 0}
    rows = read_text_rows(path, "text", "id", ["url"], extra=("format",), optional=("topic", "x"))
    assert rows.column_names == ["id", "text", "group", "format", "topic"]
    table, _ = format_rows(rows, mapping, "format", {"topic": {"Adult": 1}})
    assert table["label"].to_pylist() == [1, 5, 0]
    assert table["capped"].to_pylist() == [True, False, False]
    # a file without the column is not capped
    table, _ = format_rows(rows.drop(["topic"]), mapping, "format", {"topic": {"Adult": 1}})
    assert table["label"].to_pylist() == [5, 5, 0]
    stage = EduTrainStage(format_labels=[path], format_caps={"topic": {"Adult": 0}})
    table, report = stage.collect([])
    assert dict(zip(table["id"].to_pylist(), table["label"].to_pylist(), strict=True)) == {
        "a": 0, "b": 5, "c": 0,
    }  # fmt: skip
    assert report["formats"]["capped"] == 1
    with pytest.raises(ValidationError, match="ratings must be 0-5"):
        EduTrainStage(format_labels=[path], format_caps={"topic": {"Adult": 9}})


def test_the_combiner_recovers_a_known_logistic_model_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2)) * [2.0, 0.5] + [1.0, 3.0]
    z = (x - [1.0, 3.0]) / [2.0, 0.5]
    p = 1 / (1 + np.exp(-(0.3 + 1.5 * z[:, 0] - 0.8 * z[:, 1])))
    y = rng.random(4000) < p
    c = fit_combiner(x, y, ["fasttext", "log_length"], 3, l2=0.0)
    assert c.weights == pytest.approx([1.5, -0.8], abs=0.15) and c.bias == pytest.approx(
        0.3, abs=0.1
    )
    # calibrated: predicted probabilities match observed rates by decile
    q = c.predict(x)
    bins = np.quantile(q, np.linspace(0, 1, 11))
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        m = (q >= lo) & (q <= hi)
        assert abs(q[m].mean() - y[m].mean()) < 0.06
    c.save(tmp_path / "combiner.json")
    assert Combiner.load(tmp_path / "combiner.json") == c
    with pytest.raises(ValueError, match="one class"):
        fit_combiner(x, np.ones(len(x), bool), ["fasttext"], 3)


def test_a_graded_combiner_has_a_head_per_threshold_and_reads_class_probabilities(tmp_path):
    rng = np.random.default_rng(1)
    n = 3000
    rating = rng.integers(0, 6, n)
    # a 6-class model's probabilities that lean towards the true rating
    logits = rng.normal(size=(n, 6)) + 2.0 * (np.arange(6) == rating[:, None])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    values = np.arange(6.0)
    text = pa.array(["x" * int(k) for k in rng.integers(1, 500, n)], pa.large_string())
    names = ["fasttext_logit", "fasttext_ge1", "log_length"]
    x = combiner_features(names, probs @ values, text, probs=probs, values=values)
    p_ge1 = probs[:, 1:].sum(axis=1)
    assert x[:, 1] == pytest.approx(np.log(p_ge1 / (1 - p_ge1)))
    assert x[:, 0] == pytest.approx(np.log((probs @ values) / (5 - probs @ values)))
    g = fit_graded(x, rating, [3, 1, 3], names)
    assert isinstance(g, GradedCombiner) and g.thresholds == [1, 3] and g.features == names
    singles = [fit_combiner(x, rating >= k, names, k) for k in (1, 3)]
    # 2 P(>= 1) + 3 P(>= 3), over 5
    want = (2 * singles[0].predict(x) + 3 * singles[1].predict(x)) / 5
    assert g.predict(x) == pytest.approx(want)
    # "not junk" is what the ge1 feature says: the >=1 head leans on it most
    weights = dict(zip(names, g.heads[0].weights, strict=True))
    assert weights["fasttext_ge1"] > abs(weights["log_length"])
    g.save(tmp_path / "combiner.json")
    assert load_combiner(tmp_path / "combiner.json") == g
    singles[0].save(tmp_path / "one.json")
    assert load_combiner(tmp_path / "one.json") == singles[0]
    with pytest.raises(ValueError, match="class probabilities"):
        combiner_features(["fasttext_ge1"], probs @ values, text)


def test_paths_expand_variables_with_defaults(monkeypatch):
    monkeypatch.delenv("PRIMER_EDU_DATA", raising=False)
    stage = EduTrainStage(proxy_positive=["${PRIMER_EDU_DATA:-data/edu}/openstax*.jsonl.gz"])
    assert stage.config.proxy_positive == ["data/edu/openstax*.jsonl.gz"]
    monkeypatch.setenv("PRIMER_EDU_DATA", "/data/edu_training")
    stage = EduTrainStage(proxy_positive=["${PRIMER_EDU_DATA:-data/edu}/openstax*.jsonl.gz"])
    assert stage.config.proxy_positive == ["/data/edu_training/openstax*.jsonl.gz"]
    monkeypatch.delenv("PRIMER_EDU_DATA")
    with pytest.raises(ValidationError, match=r"PRIMER_EDU_DATA, which is not set"):
        EduTrainStage(proxy_positive=["$PRIMER_EDU_DATA/openstax.jsonl.gz"])
    with pytest.raises(ValidationError, match="ratings must be 0-5"):
        EduTrainStage(format_labels=["x.jsonl"], format_scores={"Tutorial": 7})
    with pytest.raises(ValidationError, match="unknown feature 'n_links'"):
        EduTrainStage(format_labels=["x.jsonl"], combiner=["fasttext", "n_links"])
    with pytest.raises(ValidationError, match="needs a fastText feature"):
        EduTrainStage(format_labels=["x.jsonl"], combiner=["log_length"])
    with pytest.raises(ValidationError, match="ratings 1-5"):
        EduTrainStage(format_labels=["x.jsonl"], combiner_thresholds=[0, 3])


def test_a_missing_source_fails_preflight_unless_allowed(tmp_path):
    cfg = {
        "proxy_positive": [str(EDU)],
        "format_labels": [str(tmp_path / "weborganizer*.jsonl.gz")],
    }
    with pytest.raises(PreflightError, match="matches no file") as e:
        EduTrainStage(**cfg).preflight()
    assert e.value.key == "format_labels.0"
    EduTrainStage(**cfg, allow_missing=True).preflight()
    with pytest.raises(PreflightError) as e:
        EduTrainStage(
            **cfg, allow_missing=True, decontam_benchmarks=[str(tmp_path / "nope")]
        ).preflight()
    assert e.value.key == "decontam_benchmarks.0"


# --- training --------------------------------------------------------------------------------


def test_labels_from_formats_and_proxies_are_split_by_domain_and_decontaminated(tmp_path):
    gsm = json.loads((REPO / "data/benchmarks/gsm8k/test.jsonl").read_text().splitlines()[0])
    web = web_rows(200)
    formats = write_jsonl(tmp_path / "wo.jsonl.gz", [
        {"id": f"w{i}", "text": d["text"], "url": d["url"],
         "format": "Knowledge Article" if i % 3 == 0 else "Product Page"}
        for i, d in enumerate(web[:120])
    ])  # fmt: skip
    leaked = {"id": "leak", "text": "Practice problem. " + gsm["question"], "book": "Leaky Book"}
    with gzip.open(EDU, "rt", encoding="utf-8") as f:
        reference = [json.loads(line) for line in f.readlines()[:100]]
    positives = write_jsonl(tmp_path / "ref.jsonl.gz", [leaked, *reference])
    negatives = write_jsonl(tmp_path / "neg.jsonl.gz", web[120:])
    stage = EduTrainStage(format_labels=[formats], proxy_positive=[positives],
                          proxy_negative=[negatives], decontam_benchmarks=["data/benchmarks"],
                          epoch=5, cv_folds=0, combiner=[], min_margin_over_length=None)  # fmt: skip
    table, report = stage.collect([])
    assert report["formats"]["labels"] == 120 and report["proxy"] == {
        "positives": 101,
        "negatives": 80,
    }
    assert report["decontamination"]["rows"] == 1 and report["decontamination"]["benchmarks"] == {
        "gsm8k": 1
    }
    assert "leak" not in table["id"].to_pylist()

    stage.build([], str(tmp_path / "out"))
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    assert m["data"]["split"]["shared_groups"] == 0 and m["data"]["split"]["test_groups"] > 0
    assert set(m["held_out_by_source"]) == {"formats", "proxy"}
    assert m["held_out"]["baseline_length"]["binary_f1"] is not None
    assert m["guardrail"]["passed"] is None and m["guardrail"]["message"] == "off"


def test_shuffled_proxy_copies_are_trained_on_and_never_evaluated(tmp_path):
    with gzip.open(EDU, "rt", encoding="utf-8") as f:
        reference = [json.loads(line) for line in f.readlines()[:80]]
    positives = write_jsonl(tmp_path / "ref.jsonl.gz", reference)
    negatives = write_jsonl(tmp_path / "neg.jsonl.gz", web_rows(80))
    stage = EduTrainStage(proxy_positive=[positives], proxy_negative=[negatives],
                          proxy_negative_label=2, proxy_shuffled=1.0, epoch=5, cv_folds=0,
                          combiner=[], min_margin_over_length=None)  # fmt: skip
    table, report = stage.collect([])
    assert report["proxy"] == {"positives": 80, "negatives": 80, "shuffled": 160}
    rows = {r["id"]: r for r in table.to_pylist()}
    for i, r in rows.items():
        if not i.startswith("shuffled:"):
            assert not r["synthetic"] and r["label"] in (5, 2)
            continue
        src = rows[i[len("shuffled:") :]]
        assert r["synthetic"] and r["label"] == 0 and r["group"] == src["group"]
        assert sorted(r["text"].split()) == sorted(src["text"][:3000].split())
        assert r["text"] != " ".join(src["text"][:3000].split())
    stage.build([], str(tmp_path / "out"))
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    assert m["held_out"]["label_counts"]["0"] == 0  # no synthetic row is evaluated
    assert m["data"]["split"]["shared_groups"] == 0
    assert m["data"]["train"] + m["data"]["test"] < m["data"]["documents"]


def _length_only_docs(n: int, seed: int = 0) -> list[dict]:
    """Documents whose label follows their length (with noise): nothing in the words tells
    the two kinds apart."""
    words = [t for d in web_rows(50) for t in d["text"].split()][:5000]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(50, 600))
        long = k + rng.normal(0, 60) > 325
        out.append({"id": f"d{i}", "text": " ".join(rng.choice(words, k)), "url": f"http://s{i}.org/",
                    "format": "Tutorial" if long else "Spam / Ads"})  # fmt: skip
    return out


def test_a_model_that_does_not_beat_length_stops_the_stage(tmp_path):
    path = write_jsonl(tmp_path / "wo.jsonl.gz", _length_only_docs(300))
    cfg = {"format_labels": [path], "epoch": 5, "cv_folds": 0, "combiner": []}
    with pytest.raises(
        GuardrailError, match=r"GUARDRAIL: stage 'edu_train'.*roc_auc.*does not beat length"
    ):
        EduTrainStage(**cfg).build([], str(tmp_path / "fail"))
    m = json.loads((tmp_path / "fail/metrics.json").read_text())  # left for inspection
    assert m["guardrail"]["passed"] is False and m["guardrail"]["length"] > m["guardrail"]["model"]
    EduTrainStage(**cfg, on_weak_model="warn").build([], str(tmp_path / "warn"))
    EduTrainStage(**cfg, min_margin_over_length=None).build([], str(tmp_path / "off"))


def test_the_combiner_learns_length_and_edu_score_applies_it(tmp_path):
    path = write_jsonl(tmp_path / "wo.jsonl.gz", _length_only_docs(300))
    out = tmp_path / "out"
    EduTrainStage(format_labels=[path], epoch=5, cv_folds=0, min_margin_over_length=None).build(
        [], str(out)
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["score"] == "combiner" and m["combiner"]["standardised_weights"]["log_length"] > 1
    combined, length = (
        m["held_out_combined"]["roc_auc"],
        m["held_out"]["baseline_length"]["roc_auc"],
    )
    assert combined == pytest.approx(length, abs=0.03) and combined > m["held_out"]["roc_auc"] + 0.2

    docs = _length_only_docs(40, seed=1)
    table = pa.table({"id": [d["id"] for d in docs],
                      "text": pa.array([d["text"] for d in docs], pa.large_string())})  # fmt: skip
    raw = EduScoreStage(model=str(out / "model.bin"), use_combiner=False, drop_below_phase1=False)(
        table
    )
    scored = EduScoreStage(model=str(out / "model.bin"), drop_below_phase1=False)(table)
    comb = Combiner.load(out / "combiner.json")
    ft = raw["edu_score"].to_numpy().astype(np.float64)
    want = 5 * comb.predict(combiner_features(comb.features, ft, table["text"]))
    assert scored["edu_score"].to_numpy() == pytest.approx(want, abs=1e-4)
    n_words = np.array([len(d["text"].split()) for d in docs])
    s = scored["edu_score"].to_numpy()
    assert s[n_words > 450].min() > s[n_words < 200].max()
    # the combiner is part of a model file's fingerprint
    assert "combiner.json" in EduScoreStage(model=str(out / "model.bin")).content_fingerprint()


def _graded_docs(n: int, seed: int = 0) -> list[dict]:
    """Junk (word lists, rating 0), plain prose (rating 1) and teaching prose (rating 5):
    each kind has its own words, so the text model can tell all three apart."""
    rng = np.random.default_rng(seed)
    vocab = {
        kind: words.split(" ")
        for kind, words in (
            ("Spam / Ads", "buy cheap deal price discount click offer shop sale free"),
            ("Personal Blog", "today my we went our trip felt really nice weekend"),
            ("Tutorial", "first step learn example equation explains because therefore"),
        )
    }
    out = []
    for i in range(n):
        kind = list(vocab)[i % 3]
        words = rng.choice(vocab[kind] * 3 + vocab["Personal Blog"], int(rng.integers(40, 200)))
        out.append({"id": f"g{i}", "text": " ".join(words), "url": f"http://g{i}.org/",
                    "format": kind})  # fmt: skip
    return out


def test_a_graded_combiner_is_trained_and_applied_by_edu_score(tmp_path):
    path = write_jsonl(tmp_path / "wo.jsonl.gz", _graded_docs(240))
    out = tmp_path / "out"
    EduTrainStage(
        format_labels=[path], epoch=5, cv_folds=0, min_margin_over_length=None,
        combiner=["fasttext_logit", "fasttext_ge1", "log_length"], combiner_thresholds=[1, 3],
    ).build([], str(out))  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["score"] == "combiner" and m["combiner"]["thresholds"] == [1, 3]
    assert set(m["combiner"]["standardised_weights"]) == {">=1", ">=3"}
    comb = load_combiner(out / "combiner.json")
    assert isinstance(comb, GradedCombiner) and comb.thresholds == [1, 3]

    docs = _graded_docs(30, seed=1)
    table = pa.table({"id": [d["id"] for d in docs],
                      "text": pa.array([d["text"] for d in docs], pa.large_string())})  # fmt: skip
    stage = EduScoreStage(model=str(out / "model.bin"), drop_below_phase1=False)
    stage.setup()
    probs = stage._scorer.probs(table["text"], True, 3000)
    want = 5 * comb.predict(
        combiner_features(
            comb.features, probs @ stage._values, table["text"], probs=probs, values=stage._values
        )  # fmt: skip
    )
    scored = stage(table)["edu_score"].to_numpy()
    assert scored == pytest.approx(want, abs=1e-4)
    kind = [d["format"] for d in docs]
    by = {k: scored[[f == k for f in kind]] for k in set(kind)}
    # junk < plain prose < teaching prose, and the phase thresholds fall between them
    assert by["Spam / Ads"].max() < 1.5 <= by["Personal Blog"].min()
    assert by["Personal Blog"].max() < 2.5 <= by["Tutorial"].min()


def test_the_recipe_loads_with_the_shipped_data_by_default(monkeypatch):
    from pipeline.recipe import load_recipe

    monkeypatch.delenv("PRIMER_EDU_DATA", raising=False)
    [spec] = load_recipe(REPO / "configs" / "edu_classifier.yaml").stages
    cfg = spec.config
    assert cfg.proxy_positive == ["data/edu/openstax*.jsonl.gz"] and cfg.allow_missing
    spec.cls(cfg).preflight()


@pytest.mark.slow
def test_the_recipe_on_the_shared_data_beats_length_on_unseen_domains_and_human_labels(tmp_path):
    data = require_data(SHARED / "edu_training" / "weborganizer.jsonl.gz").parent
    run = tmp_path / "run"
    env = {**__import__("os").environ, "PRIMER_EDU_DATA": str(data)}
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/edu_classifier.yaml",
                    "--output", str(run)], check=True, cwd=REPO, env=env, timeout=900,
                   capture_output=True)  # fmt: skip
    m = json.loads((run / "edu_train/metrics.json").read_text())
    assert m["data"]["split"]["shared_groups"] == 0 and m["guardrail"]["passed"] is True
    web = m["held_out_by_source"]["formats"]
    assert web["roc_auc"] >= 0.8 and web["roc_auc"] > web["baseline_length"]["roc_auc"] + 0.1
    assert web["spearman"] > web["baseline_length"]["spearman"]
    assert web["binary_f1"] > web["baseline_length"]["binary_f1"]

    import benchmarks.edu_quality as edu_quality

    edu_quality.DATA = data
    res = edu_quality.evaluate_sets(run / "edu_train", seed=0, test_fraction=0.2, all_domains=False)
    human = res["hplt_human"]
    assert human["fasttext"] > human["length"] + 0.15 and human["combiner"] > 0.7
