"""Tests of filters/decontam/: benchmark loaders on the real test sets, n-gram hits and
misses on hand-made cases, cut mode, recall on benchmark items planted into real FineWeb
documents (benchmarks/decontam_planting.py), false positives on clean web text, the stage
under the runner, and its fingerprint following the benchmark files.

Run: .venv/bin/python -m pytest -q -s tests/filters/test_decontam.py  (-s prints the
measured recall per planted form and the false-positive rate; about half of the time goes
to building the index of the real benchmark items, once for the module)
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from benchmarks.decontam_planting import FORMS, plant, planted_docs, reformatted
from filters.decontam.benchmarks import Item, load_items
from filters.decontam.decontaminate import DecontaminateStage, hit_report
from pipeline.stage import PreflightError
from pipeline.stage_runner import output_files, run_stage
from tests.conftest import SAMPLE, SHARED, fineweb_docs


def shared_path(name: str) -> Path:
    """A folder of ../shared/data; missing, the test is skipped, or fails where CI=true."""
    path = SHARED / name
    if not path.exists():
        message = f"shared real data not found at {path}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# A GSM8K-style item of 31 words, and a host text that shares nothing with it.
QUESTION = (
    "Marta plants seven rows of tulips in her garden and each row holds twelve bulbs, "
    "but squirrels dig up one third of them before spring. How many tulips bloom in May?"
)
ANSWER = (
    "She plants 7 * 12 = <<7*12=84>>84 bulbs in total.\nThe squirrels dig up 84 / 3 = "
    "<<84/3=28>>28 of the bulbs.\nSo 84 - 28 = <<84-28=56>>56 tulips bloom.\n#### 56"
)
HOST = (
    "The town council met on Tuesday to discuss the new bicycle lanes along the river. "
    "Residents asked for better lighting near the bridge and more benches in the park. "
    "The council will vote on the proposal at its next meeting in the autumn."
)


def words(text: str, lo: int, hi: int) -> str:
    return " ".join(text.split()[lo:hi])


def stage_for(tmp_path: Path, records: dict[str, list[dict]], **config) -> DecontaminateStage:
    """A stage over small benchmark files written from `records` ({file name: rows})."""
    folder = tmp_path / "bench"
    folder.mkdir(exist_ok=True)
    for name, rows in records.items():
        path = folder / name
        if name.endswith(".csv"):
            with path.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DecontaminateStage(benchmarks=str(folder), **config)


def run(stage: DecontaminateStage, texts: list[str | None]) -> list[dict]:
    table = pa.table(
        {"id": [f"d{i}" for i in range(len(texts))], "text": pa.array(texts, pa.large_string())}
    )
    return stage(table).to_pylist()


@pytest.fixture
def gsm(tmp_path) -> DecontaminateStage:
    return stage_for(tmp_path, {"test.jsonl": [{"question": QUESTION, "answer": ANSWER}]})


# --- hand-made cases ------------------------------------------------------------------------


def test_a_shared_13_gram_is_a_hit_and_a_12_gram_is_not(gsm):
    hit13 = f"{HOST} {words(QUESTION, 5, 18)} {HOST}"
    hit12 = f"{HOST} {words(QUESTION, 5, 17)} {HOST}"
    rows = run(gsm, [hit13, hit12, HOST])
    assert rows[0]["contam_benchmarks"] == "gsm8k"
    assert json.loads(rows[0]["contam_items"]) == ["gsm8k/test:0"]
    assert rows[0]["contam_ngrams"] == 1
    assert rows[0]["drop_reason"] == "decontaminate:contaminated"
    for clean in rows[1:]:
        assert clean["drop_reason"] is None
        assert clean["contam_benchmarks"] is clean["contam_items"] is clean["contam_ngrams"] is None


def test_case_punctuation_whitespace_and_unicode_changes_still_hit(gsm):
    w = QUESTION.split()
    messy = "\n\n".join(
        f"“{x.upper()}”!!" if i % 3 == 0 else f"  {x}\t" for i, x in enumerate(w[:20])
    )
    accented = words(QUESTION, 0, 14).replace("Marta", "Márta").replace("seven", "ｓｅｖｅｎ")
    rows = run(gsm, [f"{HOST}\n{messy}", accented])
    assert [r["contam_items"] for r in rows] == ['["gsm8k/test:0"]'] * 2
    assert rows[0]["contam_ngrams"] == 20 - 13 + 1


def test_the_answer_alone_hits_with_or_without_calculator_annotations(gsm):
    clean = "She plants 7 * 12 = 84 bulbs in total. The squirrels dig up 84 / 3 = 28 of the"
    rows = run(gsm, [f"{HOST} {clean}", f"{HOST} {ANSWER}"])
    assert [r["contam_benchmarks"] for r in rows] == ["gsm8k", "gsm8k"]


def test_min_ngrams_counts_distinct_shared_ngrams_per_item(tmp_path):
    stage = stage_for(
        tmp_path, {"test.jsonl": [{"question": QUESTION, "answer": ""}]}, min_ngrams=3
    )
    rows = run(stage, [words(QUESTION, 0, 14), words(QUESTION, 0, 15), QUESTION])
    assert [r["contam_ngrams"] for r in rows] == [None, 3, 31 - 13 + 1]


def mmlu_row(question: str, *choices: str) -> dict:
    return {"question": question, **{f"choice{i}": c for i, c in enumerate(choices)}, "answer": 0}


def test_short_questions_match_whole_and_very_short_ones_are_skipped(tmp_path):
    mmlu = {
        "algebra_test.csv": [
            # 10 words: the question is matched whole, as one 10-gram.
            mmlu_row(
                "Which planet in our solar system has the most moons?",
                "Mars",
                "Saturn",
                "Venus",
                "Earth",
            ),
            # 5 words alone, 9 with its choices: only the whole item is matched.
            mmlu_row("What is the capital city?", "Paris", "Rome", "Oslo", "Bern"),
            # 6 words with its choices: too little to be evidence; not indexed.
            mmlu_row("Predators eat", "lions", "humans", "bunnies", "grass"),
        ]
    }
    texts = [
        f"{HOST} Quiz: which planet in our solar system has the MOST moons? A) Mars {HOST}",
        f"{HOST} which planet in our solar system has the most {HOST}",  # 9 of its 10 words
        f"{HOST} What is the capital city? {HOST}",
        f"{HOST} What is the capital city?\nParis\nRome\nOslo\nBern\n{HOST}",
        f"{HOST} Predators eat: lions, humans, bunnies, grass. {HOST}",
    ]
    stage = stage_for(tmp_path, mmlu)
    got = [r["contam_items"] for r in run(stage, texts)]
    assert got == ['["mmlu/algebra:0"]', None, None, '["mmlu/algebra:1"]', None]
    assert stage.index_stats["items_without_ngrams"] == 1

    strict = stage_for(tmp_path, mmlu, short_min_words=13)  # = ngram: skip short passages
    assert [r["contam_items"] for r in run(strict, texts)] == [None] * 5


def test_template_ngrams_shared_by_many_items_are_not_evidence(tmp_path):
    header = "For which of these two scenarios does the main character do something clearly wrong"
    rows = [
        {"question": f"{header}? Scenario {i}: I gave my neighbour {i} apples and a pear.",
         "choice0": "Wrong", "choice1": "Not wrong", "choice2": "-", "choice3": "-", "answer": "0"}
        for i in range(12)
    ]  # fmt: skip
    stage = stage_for(tmp_path, {"moral_test.csv": rows}, max_items_per_ngram=10)
    out = run(stage, [f"{HOST} {header} {HOST}", f"{HOST} {rows[4]['question']}"])
    assert out[0]["contam_items"] is None
    assert json.loads(out[1]["contam_items"]) == ["mmlu/moral:4"]


def test_cut_mode_removes_the_span_with_its_margin_and_keeps_the_rest(gsm, tmp_path):
    before = " ".join(f"before{i}" for i in range(100))
    after = " ".join(f"after{i}" for i in range(100))
    text = f"{before}\n{QUESTION}\n{after}"
    cut = stage_for(
        tmp_path,
        {"test.jsonl": [{"question": QUESTION, "answer": ANSWER}]},
        mode="cut",
        cut_margin_words=5,
    )
    rows = run(cut, [text, QUESTION, HOST])
    kept = rows[0]
    assert kept["drop_reason"] is None
    assert kept["contam_items"] == '["gsm8k/test:0"]'  # cut rows say what was cut
    assert kept["text"] == f"{' '.join(before.split()[:95])}\n\n{' '.join(after.split()[5:])}"
    # Nothing is left of a row that is only the item: dropped, with its text kept for audit.
    assert rows[1]["drop_reason"] == "decontaminate:contaminated"
    assert rows[1]["text"] == QUESTION
    assert rows[2]["text"] == HOST and rows[2]["contam_items"] is None


def test_cut_mode_drops_rows_with_too_many_spans(tmp_path):
    stage = stage_for(
        tmp_path,
        {"test.jsonl": [{"question": QUESTION, "answer": ANSWER}]},
        mode="cut",
        cut_margin_words=0,
        max_cut_spans=2,
    )
    filler = " ".join(f"filler{i}" for i in range(60))
    quotes = [words(QUESTION, 0, 14), words(QUESTION, 16, 30), words(ANSWER, 0, 22)]
    two = f"{filler} {quotes[0]} {filler} {quotes[1]} {filler}"
    three = f"{two} {quotes[2]} {filler}"
    rows = run(stage, [two, three])
    assert rows[0]["drop_reason"] is None and quotes[0] not in rows[0]["text"]
    assert rows[0]["text"].count(filler) == 3
    assert rows[1]["drop_reason"] == "decontaminate:contaminated"


def test_null_and_empty_text_are_clean(gsm):
    rows = run(gsm, [None, "", "  \n "])
    assert all(r["drop_reason"] is None and r["contam_items"] is None for r in rows)


def test_config_is_validated_and_the_stage_pickles_without_its_index(tmp_path, gsm):
    with pytest.raises(ValidationError, match="benchmarks"):
        DecontaminateStage()
    with pytest.raises(ValidationError, match="extra"):
        DecontaminateStage(benchmarks="x", hub_datasets=["gsm8k"])
    with pytest.raises(ValidationError, match="short_min_words"):
        DecontaminateStage(benchmarks="x", short_min_words=20)
    with pytest.raises(FileNotFoundError, match="decontaminate.benchmarks"):
        DecontaminateStage(benchmarks=str(tmp_path / "missing")).setup()
    run(gsm, [HOST])
    clone = pickle.loads(pickle.dumps(gsm))
    assert not hasattr(clone, "index") and clone.config == gsm.config
    assert run(clone, [QUESTION])[0]["contam_benchmarks"] == "gsm8k"


def test_preflight_names_the_benchmark_source_that_is_not_there(tmp_path, gsm):
    gsm.preflight()  # the folder of the fixture holds a benchmark file
    missing = DecontaminateStage(benchmarks=str(tmp_path / "missing"))
    with pytest.raises(PreflightError, match="no such path") as e:
        missing.preflight()
    assert e.value.key == "benchmarks"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("no benchmark here")
    several = DecontaminateStage(
        benchmarks=[gsm.config.benchmarks[0], "hf:openai/gsm8k:main:test", str(tmp_path / "notes")]
    )
    with pytest.raises(PreflightError, match="holds no .jsonl") as e:
        several.preflight()
    assert e.value.key == "benchmarks[2]"
    with pytest.raises(PreflightError, match="not hf:NAME") as e:
        DecontaminateStage(benchmarks=[gsm.config.benchmarks[0], "hf:gsm8k"]).preflight()
    assert e.value.key == "benchmarks[1]"
    # Files named one by one, and an earlier stage's output, pass (the hub is not asked).
    file = str(Path(gsm.config.benchmarks[0]) / "test.jsonl")
    DecontaminateStage(
        benchmarks=[file, "@generate/bench", "hf:openai/gsm8k:main:test"]
    ).preflight()


def test_the_fingerprint_follows_the_benchmark_files_not_their_mtime(tmp_path, gsm):
    first = gsm.fingerprint()
    folder = Path(gsm.config.benchmarks[0])
    bench = folder / "test.jsonl"
    os.utime(bench, (1, 1))  # touched, not edited
    (folder / "notes.txt").write_text("not a benchmark file")
    assert DecontaminateStage(gsm.config).fingerprint() == first
    bench.write_text(bench.read_text().replace("Marta", "Maria"))  # same size, new content
    edited = gsm.fingerprint()
    assert edited != first
    (folder / "more.jsonl").write_text(json.dumps({"question": HOST, "answer": "x"}) + "\n")
    assert gsm.fingerprint() not in (first, edited)
    # A single file names itself; references and hub datasets are not hashed here.
    assert list(DecontaminateStage(benchmarks=str(bench)).content_fingerprint()) == [str(bench)]
    refs = DecontaminateStage(benchmarks=["@generate/bench", "hf:openai/gsm8k:main:test"])
    assert refs.content_fingerprint() == {}


def test_the_runner_recomputes_the_stage_when_a_benchmark_file_is_edited(tmp_path, gsm):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": [f"{HOST} {QUESTION}", HOST]}), path)
    m = run_stage(gsm, [str(path)], tmp_path / "out")
    assert m["dropped"] == {"decontaminate:contaminated": 1}
    bench = Path(gsm.config.benchmarks[0]) / "test.jsonl"
    bench.write_text(json.dumps({"question": "An unrelated question " * 3, "answer": "x"}) + "\n")
    m = run_stage(DecontaminateStage(gsm.config), [str(path)], tmp_path / "out")
    assert m["attempts"][-1]["parts_run"] == 1 and m["dropped"] == {}


# --- the real benchmarks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_dir() -> Path:
    return shared_path("benchmarks")


@pytest.fixture(scope="module")
def real_stage(bench_dir) -> DecontaminateStage:
    """The stage over every real benchmark, its index built once for the module."""
    stage = DecontaminateStage(benchmarks=str(bench_dir))
    stage.setup()  # the index is built once per process: the stage's own call reuses it
    print(f"\nindex: {stage.index_stats}")
    return stage


@pytest.fixture(scope="module")
def items(real_stage) -> dict[str, Item]:
    return {it.id: it for it in load_items(real_stage.config.benchmarks)}


def test_every_benchmark_file_loads_with_ids_in_file_order(items, bench_dir):
    counts: dict[str, int] = {}
    for item_id in items:
        counts[item_id.split("/")[0]] = counts.get(item_id.split("/")[0], 0) + 1
    assert counts == {
        "gsm8k": 1319,
        "humaneval": 164,
        "mmlu": 14042,
        "arc_challenge": 1172,
        "arc_easy": 2376,
        "boolq": 3270,
        "commonsense_qa": 1221,
        "lambada_openai": 5153,
        "openbook_qa": 500,
        "piqa": 1838,
        "siqa": 1954,
        "triviaqa_sm_sub": 3000,
        "winogrande": 1267,
    }
    line17 = (bench_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[17]
    assert items["gsm8k/test:17"].main == (json.loads(line17)["question"],)
    assert items["mmlu/abstract_algebra:3"].main[0].startswith("Statement 1 |")
    assert items["humaneval/test:0"].main[0].startswith("from typing import List")
    # llm-foundry prompt scaffolding is stripped: fields, not "Question:"/"A." labels.
    csqa = items["commonsense_qa/validation:0"]
    assert csqa.main == (
        "A revolving door is convenient for two direction travel, but it also serves as a "
        "security measure at a what?",
    )
    assert csqa.extra == ("bank", "department store", "mall", "new york")
    assert items["siqa/validation:0"].main[1] == "What does Tracy need to do before this?"
    assert len(items["lambada_openai/test:0"].main) == 1  # one passage of paragraphs
    assert items["winogrande/validation:0"].main[2] == (
        "Sarah was a much better surgeon than Maria so always got the easier cases."
    )


def test_the_index_is_small_and_records_its_build(real_stage):
    s = real_stage.index_stats
    assert s["items"] == 37276 and 1_000_000 < s["ngrams"] < 3_000_000
    assert s["index_bytes"] < 80e6
    assert s["template_ngrams_dropped"] < 200 and s["items_without_ngrams"] < 200


# --- recall on planted contamination -----------------------------------------------------------


@pytest.fixture(scope="module")
def planted(real_stage, items) -> dict[str, dict[str, float]]:
    """200 real items (60 GSM8K, 70 MMLU, 45 ARC, 25 HumanEval) planted into real FineWeb
    documents in each form -> recall per form, overall and per benchmark."""
    texts, meta = planted_docs(items, [d["text"] for d in fineweb_docs()])
    out = real_stage(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}))
    found = [json.loads(x) if x else [] for x in out["contam_items"].to_pylist()]
    recall: dict[str, dict[str, float]] = {}
    for form in FORMS:
        rows = [(i, i in f) for (fm, i), f in zip(meta, found, strict=True) if fm == form]
        per = {"all": np.mean([ok for _, ok in rows])}
        for bench in ("gsm8k", "mmlu", "arc", "humaneval"):
            per[bench] = np.mean([ok for i, ok in rows if i.startswith(bench)])
        recall[form] = {k: round(float(v), 3) for k, v in per.items()}
    print("\nrecall on 200 planted items:", json.dumps(recall))
    return recall


def test_verbatim_and_reformatted_items_are_found(planted):
    assert planted["verbatim"]["all"] >= 0.99
    assert planted["reformatted"]["all"] >= 0.95


def test_questions_quoted_alone_are_found_down_to_8_words(planted):
    # Questions of 8-12 words are matched whole; shorter ones (a few % of MMLU and ARC,
    # e.g. "Which of these snakes is poisonous?") are not evidence enough on their own.
    assert planted["question_only"]["all"] >= 0.9


def test_light_rephrasing_is_partly_missed_as_ngram_methods_do(planted):
    # n-gram overlap needs 13 unchanged words in a row: long GSM8K questions survive three
    # changed words, short MMLU and ARC questions mostly do not. A known limit, reported.
    assert 0.4 <= planted["rephrased"]["all"] < planted["reformatted"]["all"]
    assert planted["rephrased"]["gsm8k"] >= 0.6


# --- false positives on clean web text --------------------------------------------------------


def test_clean_web_text_has_few_false_positives(real_stage):
    docs = [d["text"] for d in fineweb_docs()]
    for f in sorted(SAMPLE.glob("ccnet-*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs += [json.loads(line)["text"] for line in fh]
    out = real_stage(pa.table({"id": [str(i) for i in range(len(docs))], "text": docs}))
    hits = out.filter(pc.is_valid(out["contam_items"]))
    rate = len(hits) / len(docs)
    print(f"\nfalse positives: {len(hits)} of {len(docs)} web documents ({rate:.2%})")
    for row in hits.to_pylist():
        print("  hit:", row["id"], row["contam_items"])
    assert len(docs) == 520 and rate <= 0.01


# --- the runner ---------------------------------------------------------------------------------


def test_runs_under_the_runner_with_drop_reasons_and_a_hit_report(real_stage, items, tmp_path):
    hosts = fineweb_docs(6)
    gsm, arc = items["gsm8k/test:17"], items["arc_easy/test:3"]
    hosts[1]["text"] = plant(hosts[1]["text"], "\n".join(gsm.main), np.random.default_rng(1))
    hosts[4]["text"] += "\n" + reformatted(arc, np.random.default_rng(2))
    files = []
    for k in range(2):
        part = hosts[k * 3 : k * 3 + 3]
        path = tmp_path / f"in-{k}.parquet"
        pq.write_table(
            pa.table({"id": [d["id"] for d in part], "text": [d["text"] for d in part]}), path
        )
        files.append(str(path))
    m = run_stage(real_stage, files, tmp_path / "out")
    assert m["rows_in"] == 6 and m["dropped"] == {"decontaminate:contaminated": 2}

    out = pa.concat_tables(
        pq.read_table(f) for f in output_files(tmp_path / "out" / "decontaminate")
    )
    rows = {r["id"]: r for r in out.to_pylist()}
    assert rows[hosts[1]["id"]]["contam_items"] == '["gsm8k/test:17"]'
    assert rows[hosts[4]["id"]]["contam_benchmarks"] == "arc_easy"
    for d in (hosts[0], hosts[2], hosts[3], hosts[5]):
        r = rows[d["id"]]
        assert r["drop_reason"] is None
        assert r["contam_benchmarks"] is r["contam_items"] is r["contam_ngrams"] is None

    report = hit_report([tmp_path / "out" / "decontaminate"])
    assert report["rows"] == 6 and report["contaminated"] == report["dropped"] == 2
    assert report["benchmarks"]["gsm8k"] == {
        "documents": 1,
        "items_hit": 1,
        "top_items": [("gsm8k/test:17", 1)],
    }
    assert set(report["benchmarks"]) == {"gsm8k", "arc_easy"}


def test_benchmarks_from_a_hugging_face_dataset_folder(tmp_path, bench_dir):
    import datasets

    rows = [
        json.loads(x) for x in (bench_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:20]
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "gsm8k_hub"))
    items = load_items([str(tmp_path / "gsm8k_hub")])
    assert len(items) == 20 and items[3].id == "gsm8k/test:3"
    stage = DecontaminateStage(benchmarks=[str(tmp_path / "gsm8k_hub")])
    doc = "Some page. " + rows[5]["question"] + " More text follows here."
    out = stage(pa.table({"id": ["d"], "text": pa.array([doc], pa.large_string())}))
    assert out["drop_reason"].to_pylist() == ["decontaminate:contaminated"]
    assert json.loads(out["contam_items"][0].as_py()) == ["gsm8k/test:5"]
