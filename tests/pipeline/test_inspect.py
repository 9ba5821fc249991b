"""pipeline.views.runs, frames and why: a run folder opened with polars, on the real
quickstart run and on tiny run folders built here in the layout `primer run` writes (cheap,
and able to leave stages out or plant hostile text)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import xxhash

import pipeline.views.why as why_module
from pipeline.views.frames import SAMPLE_SEED, histogram, pick, sample_key
from pipeline.views.runs import LINEAGE, MissingData, open_run, resolve_run_dir
from pipeline.views.why import dropped_by, format_why, main, why_command
from tests.conftest import REPO

EVIL = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
LEAKED = "sk-live-4f9aQ2xZ8mN3bV7cK1pL"  # a credential an error message happened to quote
QUALITY_ERROR = f"ValueError: cannot count words (teacher key {LEAKED})"
WEB = ["extract", "langid", "quality", "dedup"]


def _write_stage(
    root: Path,
    name: str,
    parts: dict[str, pl.DataFrame],
    rows_in: int,
    order: int,
    uses: str | None = None,
    kind: str | None = None,
) -> dict:
    folder = root / name
    folder.mkdir(parents=True)
    dropped: dict[str, int] = {}
    for part, df in parts.items():
        df.write_parquet(folder / f"{part}.parquet")
        for r in df["drop_reason"].drop_nulls():
            dropped[r] = dropped.get(r, 0) + 1
    rows_out = rows_in - sum(dropped.values())
    ts = f"2026-01-01T00:00:{order:02d}+00:00"
    manifest = {
        "stage": name,
        "uses": uses or name,
        "part_names": list(parts),
        "complete": True,
        "parts": len(parts),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
        "bytes": 0,
        "work_seconds": 0.1,
        "wall_seconds": 0.2,
        "attempts": [{"started": ts, "finished": ts, "parts_run": len(parts)}],
        "guardrail": {"drop_fraction": 0.0, "max_drop_fraction": 0.9, "exceeded": False},
    }
    if kind:
        manifest["kind"] = kind
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    return manifest


def _split(df: pl.DataFrame, n: int = 2) -> dict[str, pl.DataFrame]:
    size = -(-df.height // n)
    return {f"part-{i}": df.slice(i * size, size) for i in range(n)}


def make_run(root: Path, web_only: bool = False, evil: bool = False) -> Path:
    """A small run folder: 12 web documents through extract -> langid -> quality -> dedup
    (and, unless `web_only`, edu_score, generate, decontaminate, mixture and train_smoke),
    with run_summary.json; `evil` plants hostile HTML in text, urls, titles and lineage."""
    ids = [f"d{i:02d}" for i in range(12)]
    docs = pl.DataFrame(
        {
            "id": ids,
            "text": [f"document {i} " + "word " * (20 + 10 * i) for i in range(12)],
            "url": [f"https://example.com/{i}" for i in range(12)],
            "title": [f"title {i}" for i in range(12)],
        }
    )
    if evil:
        docs = docs.with_columns(
            text=pl.lit(EVIL + " and more text " * 40),
            url=pl.lit("javascript:alert(1)//" + EVIL),
            title=pl.lit(EVIL),
        )
    reason = pl.lit(None, dtype=pl.String)
    stages, order = [], 0

    def add(name, df, rows_in, **kw):
        nonlocal order
        order += 1
        stages.append(_write_stage(root, name, _split(df), rows_in, order, **kw))
        return df.filter(pl.col("drop_reason").is_null())

    kept = add("extract", docs.with_columns(drop_reason=reason), 12)
    kept = kept.with_columns(
        lang=pl.lit("en"),
        lang_score=pl.Series([0.95 - 0.01 * i for i in range(12)], dtype=pl.Float32),
        drop_reason=pl.when(pl.col("id") == "d11").then(pl.lit("langid:lang_not_allowed")),
    )
    kept = add("langid", kept, 12)
    bad_reason = "quality:gopher_min_words" + (EVIL if evil else "")
    kept = kept.with_columns(
        q_n_words=pl.int_range(20, 20 + pl.len(), dtype=pl.Int32),
        q_frac_words_alpha=pl.Series([0.5 + 0.04 * i for i in range(11)], dtype=pl.Float32),
        q_mean_word_len=pl.lit(4.5, dtype=pl.Float32),
        drop_reason=pl.when(pl.col("id") == "d09")
        .then(pl.lit(bad_reason))
        .when(pl.col("id") == "d10")
        .then(pl.lit("quality:error")),  # a row the stage could not process
        error=pl.when(pl.col("id") == "d10").then(pl.lit(QUALITY_ERROR)),
    )
    kept = add("quality", kept, 11).drop("error")
    older = root / "quality" / "part-0.parquet"  # written before the `error` column existed
    pl.read_parquet(older).drop("error").write_parquet(older)
    kept = kept.with_columns(
        drop_reason=pl.when(pl.col("id") == "d08").then(pl.lit("dedup:exact_duplicate"))
    )
    kept = add("dedup", kept, 9)
    if not web_only:
        edu_int = pl.Series([i % 6 for i in range(8)], dtype=pl.Int8)
        kept = kept.with_columns(
            edu_int=edu_int,
            edu_score=(edu_int.cast(pl.Float32) + 0.3),
            edu_phase1=edu_int >= 2,
            edu_phase2=edu_int >= 3,
            drop_reason=pl.when(edu_int < 2).then(pl.lit("edu_score:below_phase1")),
        )
        add("edu_score", kept, 8)
        style = EVIL if evil else "textbook"
        synth = pl.DataFrame(
            {
                "id": ["s0", "s1", "s2"],
                "text": [(EVIL if evil else "A lesson. ") + "Plants need light. " * 30] * 3,
                "drop_reason": [None, None, None],
                "teacher_model": ["tiny-teacher"] * 3,
                "teacher_backend": ["local"] * 3,
                "template_id": ["synth"] * 3,
                "template_version": pl.Series([1, 1, 1], dtype=pl.Int32),
                "seed_id": ["k0", "k1", "k2"],
                "seed_source": ["web:" + (EVIL if evil else "d05"), "taxonomy:x", "taxonomy:y"],
                "style": [style, "story", "story"],
                "audience": ["kids"] * 3,
                "persona": [None, "a teacher", None],
                "temperature": pl.Series([0.7] * 3, dtype=pl.Float32),
                "top_p": pl.Series([0.95] * 3, dtype=pl.Float32),
                "max_tokens": pl.Series([64] * 3, dtype=pl.Int32),
                "sample_seed": [11, 12, 13],
                "finish_reason": ["stop", "length", "stop"],
                "prompt_tokens": pl.Series([50] * 3, dtype=pl.Int32),
                "completion_tokens": pl.Series([40] * 3, dtype=pl.Int32),
            },
            schema_overrides={"drop_reason": pl.String, "persona": pl.String},
        )
        add("generate", synth, 3)
        synth = synth.with_columns(
            drop_reason=pl.when(pl.col("id") == "s2").then(pl.lit("decontaminate:contaminated"))
        )
        add("decontaminate", synth, 3)
        order += 1
        stages.append(_write_stage(root, "mixture", {}, 7, order, kind="artifact"))
        phase = lambda name, srcs: {  # noqa: E731
            "name": name,
            "tokens": sum(t for _, t in srcs),
            "documents": 2 * len(srcs),
            "budget_tokens": 1000,
            "shards": [],
            "sources": [
                {"name": n, "tokens": t, "documents": 2, "epochs": 1.5, "weight": 0.5}
                | {"max_epochs": 2.0, "available_tokens": t, "filter": None}
                for n, t in srcs
            ],
        }
        mix = {
            "tokenizer": {"name": "phi3", "vocab_size": 32064, "eos_id": 32000},
            "seq_len": 64,
            "seed": 1,
            "phases": [
                phase("phase1", [("web", 1000)]),
                phase("phase2", [("web_edu", 600), ("synthetic", 400)]),
            ],
        }
        (root / "mixture" / "manifest.json").write_text(json.dumps(mix))
        order += 1
        stages.append(_write_stage(root, "train_smoke", {}, 8, order, kind="artifact"))
        metrics = {"losses": [10.0, 9.0, 8.5, 8.0], "first_loss": 10.0, "last_loss": 8.0}
        metrics |= {"loss_fell": True, "tokens": 512, "tokens_per_s": 100.0, "parameters": 1000}
        (root / "train_smoke" / "metrics.json").write_text(json.dumps(metrics))
    keys = ("stage", "parts", "rows_in", "rows_out", "dropped", "bytes", "work_seconds")
    keys += ("wall_seconds", "guardrail")
    summary = {
        "recipe": "tiny" + (EVIL if evil else ""),
        "recipe_path": "tiny.yaml",
        "output": str(root),
        "runs": [{"started": "2026-01-01T00:00:00+00:00", "finished": "x", "wall_seconds": 1.5}],
        "wall_seconds_all_runs": 1.5,
        "stages": [{k: m[k] for k in keys} | {"attempts": 1} for m in stages],
        "artifacts": {},
    }
    (root / "run_summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture
def tiny_run(tmp_path):
    return open_run(make_run(tmp_path / "run"))


def test_funnel_equals_the_run_summary(quickstart_run):
    run_dir, summary = quickstart_run
    run = open_run(run_dir)
    funnel = {r["stage"]: r for r in run.funnel().iter_rows(named=True)}
    assert list(funnel) == [s["stage"] for s in summary["stages"]]
    for s in summary["stages"]:
        f = funnel[s["stage"]]
        assert (f["rows_in"], f["kept"]) == (s["rows_in"], s["rows_out"])
        assert f["dropped"] == sum(s["dropped"].values())
        assert {r["reason"]: r["count"] for r in f["reasons"]} == s["dropped"]
    assert funnel["mixture"]["kind"] == "artifact" and funnel["quality"]["kind"] == "rows"
    assert funnel["synth_dedup"]["uses"] == "dedup"
    reasons = run.drop_reasons()
    by_stage = dict(reasons.group_by("stage").agg(pl.col("count").sum()).iter_rows())
    assert by_stage == {
        s["stage"]: sum(s["dropped"].values()) for s in summary["stages"] if s["dropped"]
    }
    # the edu_score parts hold every scored document: kept = the summary's rows_out
    edu = run.edu_scores().collect()
    assert edu.filter(pl.col("kept")).height == funnel["edu_score"]["kept"]
    assert edu["edu_score"].null_count() == 0
    lineage = run.synthetic().collect()
    assert (
        run.synthetic_stage() == "decontaminate"
        and lineage.height == funnel["decontaminate"]["rows_in"]
    )
    assert lineage["teacher_model"].null_count() == 0 and lineage["seed_id"].null_count() == 0
    mix = run.mixture()
    for phase in json.loads((run_dir / "mixture/manifest.json").read_text())["phases"]:
        assert mix.filter(pl.col("phase") == phase["name"])["tokens"].sum() == phase["tokens"]
    assert run.train_smoke().height == summary["artifacts"]["train_smoke"]["steps"]


def test_frames_are_lazy_and_read_only_the_columns_used(tiny_run):
    lf = tiny_run.edu_scores()
    assert isinstance(lf, pl.LazyFrame)
    n, total = map(int, re.search(r"PROJECT (\d+)/(\d+) COLUMNS", lf.explain()).groups())
    assert n < total and "text" not in lf.collect_schema()  # never the text
    assert "text" not in tiny_run.synthetic().collect_schema()
    assert tiny_run.synthetic(text=12).collect()["text"].str.len_chars().max() == 12
    kept = tiny_run.stage("quality", kept_only=True, columns=["id"]).collect()
    assert kept.columns == ["id"] and kept.height == 11 - 2
    assert tiny_run.stage("extract").collect().height == 12  # both parts
    assert tiny_run.stage("extract", max_parts=1).collect().height == 6


def test_samples_per_edu_bucket_are_short_and_stable(tiny_run):
    s = tiny_run.samples_per_edu_bucket(n=1, chars=30)
    assert s["edu_int"].to_list() == [0, 1, 2, 3, 4, 5]
    assert s["text"].str.len_chars().max() <= 30 and s["truncated"].all()
    assert s.equals(tiny_run.samples_per_edu_bucket(n=1, chars=30))
    two = tiny_run.samples_per_edu_bucket(n=2, chars=30)
    assert two.group_by("edu_int").len()["len"].max() == 2


def test_synthetic_rows_carry_their_lineage(tiny_run):
    rows = tiny_run.synthetic(kept_only=True).collect()
    assert rows.height == 2 and set(LINEAGE) <= set(rows.columns)
    picked = tiny_run.synthetic_samples(per_style=1, chars=20)
    assert sorted(picked["style"].to_list()) == ["story", "textbook"]
    assert picked["text"].str.len_chars().max() <= 20


def test_a_web_only_run_says_what_is_missing(tmp_path):
    run = open_run(make_run(tmp_path / "web", web_only=True))
    assert run.stages == WEB and run.funnel().height == 4
    for what in ("edu_score", "synthetic", "mixture", "train_smoke", "edu_train"):
        assert not run.has(what)
    with pytest.raises(MissingData, match="edu_score"):
        run.edu_scores()
    with pytest.raises(MissingData, match="synthetic"):
        run.synthetic()
    with pytest.raises(MissingData, match="mixture"):
        run.mixture()
    with pytest.raises(MissingData, match="train_smoke"):
        run.train_smoke()
    with pytest.raises(MissingData, match="stages: extract, langid, quality, dedup"):
        run.stage("nope")
    assert run.lang_scores().collect().height == 12


def test_without_run_summary_the_funnel_comes_from_the_manifests(tiny_run):
    expected = tiny_run.funnel()
    (tiny_run.path / "run_summary.json").unlink()
    rebuilt = open_run(tiny_run.path)
    assert rebuilt.funnel().equals(expected)
    assert rebuilt.header()["recipe"] is None


def test_histogram_counts_every_value_once(tiny_run):
    lf = tiny_run.quality_signals(["q_frac_words_alpha"])
    h = histogram(lf, "q_frac_words_alpha", bins=5, by="kept")
    assert h.height == 10 and h["count"].sum() == 11
    assert h.filter(~pl.col("kept"))["count"].sum() == 2
    assert histogram(lf.filter(pl.lit(False)), "q_frac_words_alpha").is_empty()


def test_run_folder_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a notebook kernel started in notebooks/
    monkeypatch.setenv("PRIMER_RUN", "configs")
    assert resolve_run_dir() == REPO / "configs"
    (tmp_path / "configs").mkdir()
    assert resolve_run_dir() == Path("configs")  # the working directory wins
    monkeypatch.delenv("PRIMER_RUN")
    assert resolve_run_dir(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="PRIMER_RUN"):
        open_run(tmp_path / "missing")


# --- "why was this document dropped?" ------------------------------------------------------


def test_why_lists_every_stage_a_document_went_through(tiny_run):
    why = tiny_run.why("d09")
    assert why.columns == ["stage", "part", "drop_reason", "error"]
    assert why.rows() == [
        ("extract", "part-1", None, None),
        ("langid", "part-1", None, None),
        ("quality", "part-1", "quality:gopher_min_words", None),
    ]
    assert dropped_by(why) == {
        "stage": "quality",
        "part": "part-1",
        "drop_reason": "quality:gopher_min_words",
        "error": None,
    }
    # kept to the end: every stage, none dropped it (edu_score kept edu_int >= 2)
    kept = tiny_run.why("d02")
    assert kept["stage"].to_list() == [*WEB, "edu_score"]
    assert kept["drop_reason"].null_count() == kept.height and dropped_by(kept) is None
    assert tiny_run.why("d00")["drop_reason"].to_list()[-1] == "edu_score:below_phase1"
    # synthetic rows are ids of their own, through their own stages
    assert tiny_run.why("s2").rows() == [
        ("generate", "part-1", None, None),
        ("decontaminate", "part-1", "decontaminate:contaminated", None),
    ]
    assert tiny_run.why("no-such-id").is_empty()
    assert tiny_run.why("no-such-id").columns == why.columns


def test_why_shows_the_error_of_a_row_the_stage_could_not_process(tiny_run):
    """The `error` column exists only in parts written since it was added (quality's
    part-1 here): a stage or part without it reads as null, never a schema error."""
    why = tiny_run.why("d10")
    assert why.rows()[-1] == ("quality", "part-1", "quality:error", QUALITY_ERROR)
    assert why["error"].to_list()[:-1] == [None, None]
    text = format_why(why, "d10", tiny_run.path)
    assert "dropped by quality: quality:error" in text
    assert "error: ValueError: cannot count words" in text
    assert LEAKED not in text  # a credential quoted by a message is masked when printed


def test_why_reads_only_three_columns_with_the_id_filter_in_the_scan(tiny_run, monkeypatch):
    """What makes it cheap on a big run: the scan of each stage projects id, drop_reason and
    error, and the id filter runs inside the Parquet scan, not after a full read."""
    plans = []
    collect = pl.LazyFrame.collect

    def spy(self, *a, **kw):
        plans.append(self.explain())
        return collect(self, *a, **kw)

    monkeypatch.setattr(pl.LazyFrame, "collect", spy)
    tiny_run.why("d09")
    assert len(plans) == len([s for s in tiny_run.stages if tiny_run.files(s)])
    for plan in plans:
        scan = plan[plan.index("Parquet SCAN") :]
        assert "SELECTION" in scan and "d09" in scan  # the predicate is pushed into the scan
        n = int(re.search(r"PROJECT (\d+)/\d+ COLUMNS", scan).group(1))
        assert n <= 3 and "text" not in plan


def test_why_command_prints_and_returns_an_exit_code(tiny_run, tmp_path, capsys):
    assert why_command(str(tiny_run.path), "d09") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"document 'd09' in {tiny_run.path}:"
    assert "quality:gopher_min_words  (part-1)" in out
    assert out.rstrip().endswith("dropped by quality: quality:gopher_min_words")
    assert main([str(tiny_run.path), "d02"]) == 0
    assert "kept by every stage it went through (the last: edu_score)" in capsys.readouterr().out
    assert why_command(str(tiny_run.path), "nope") == 1  # in no stage
    assert "no stage in" in capsys.readouterr().out
    assert why_command(str(tmp_path / "missing"), "d09") == 2
    assert "is not a run folder" in capsys.readouterr().err


def _documented(snippet_start: str) -> str:
    """The line of pipeline.views.why's docstring (the README's text) that starts so."""
    lines = [ln.strip() for ln in why_module.__doc__.splitlines()]
    [line] = [ln for ln in lines if ln.startswith(snippet_start)]
    return line


def test_the_documented_why_snippets_run_as_written_on_the_quickstart(
    quickstart_run, tmp_path, monkeypatch
):
    """The docstring's (and README's) `why` lines, verbatim but for the id, from a folder
    where runs/quickstart is the session's quickstart run: its stages differ in columns and
    edu_score holds column parts (the tiny run above covers parts without `error`)."""
    run_dir, _ = quickstart_run
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(run_dir)
    monkeypatch.chdir(tmp_path)
    run = open_run(run_dir)
    quality_drop = (
        run.stage("quality", columns=["id", "drop_reason"])
        .filter(pl.col("drop_reason").is_not_null())
        .sort("id")
        .collect()
        .row(0, named=True)
    )
    edu_kept = run.edu_scores().filter(pl.col("kept")).sort("id").collect()["id"][0]
    api = _documented('open_run("runs/quickstart").why(')
    one_liner = _documented('pl.scan_parquet("runs/quickstart/*/*.parquet"')
    for doc_id in (quality_drop["id"], edu_kept):
        namespace: dict = {}
        exec(
            "from pipeline.views.runs import open_run\nwhy = " + api.replace("DOC_ID", doc_id),
            namespace,
        )
        why = namespace["why"]
        exec("import polars as pl\nfound = " + one_liner.replace("DOC_ID", doc_id), namespace)
        found = namespace["found"]
        # the one-liner finds the same rows (path order, not run order)
        stages = found["part"].str.split("/").list.get(-2).to_list()
        assert sorted(zip(stages, found["drop_reason"], strict=True), key=str) == sorted(
            zip(why["stage"], why["drop_reason"], strict=True), key=str
        )
        assert found["error"].null_count() == found.height
        assert why["stage"].to_list()[:4] == WEB[: why.height]
    assert (
        dropped_by(open_run("runs/quickstart").why(quality_drop["id"]))["drop_reason"]
        == (quality_drop["drop_reason"])
    )
    kept = open_run("runs/quickstart").why(edu_kept)
    assert kept["stage"].to_list() == [*WEB, "edu_score"]  # edu_score read from its column part
    assert dropped_by(kept) is None
    # and the command line, as documented
    cli = subprocess.run(
        [sys.executable, "-m", "pipeline.views.why", "runs/quickstart", quality_drop["id"]],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.rstrip().endswith(f"dropped by quality: {quality_drop['drop_reason']}")


# --- stable sample picks -------------------------------------------------------------------


def test_sample_key_is_xxh64_of_the_id_with_the_seed():
    ids = pl.Series("id", ["d00", "synth-1", "", None, "é"])
    assert sample_key(ids).to_list() == [
        641297306691886958,
        17007514205900273842,
        3633977153420339851,
        None,
        16468414647005457966,
    ]
    assert sample_key(ids.drop_nulls(), seed=SAMPLE_SEED).to_list() == [
        xxhash.xxh64_intdigest(s.encode(), SAMPLE_SEED) for s in ids.drop_nulls()
    ]


def test_picks_are_pinned_and_independent_of_row_order(tiny_run):
    """The same run shows the same samples on every polars version: pinned here."""
    frame = pl.DataFrame(
        {"id": [f"doc-{i:03d}" for i in range(30)], "g": [i % 3 for i in range(30)]}
    )
    picked = pick(frame, "g", 2)
    assert sorted(picked.rows()) == [
        ("doc-000", 0), ("doc-008", 2), ("doc-012", 0),
        ("doc-013", 1), ("doc-016", 1), ("doc-026", 2),
    ]  # fmt: skip
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=3)
    assert pick(shuffled, "g", 2).equals(picked)
    # edu_int 0 holds d00 and d06, 1 holds d01 and d07; the others one document each
    one = tiny_run.samples_per_edu_bucket(n=1, chars=30)
    assert one.select("edu_int", "id").rows() == [
        (0, "d00"), (1, "d01"), (2, "d02"), (3, "d03"), (4, "d04"), (5, "d05"),
    ]  # fmt: skip


def test_the_readme_shows_the_tested_why_snippets():
    """The README's "why" lines are the docstring's, which the test above runs."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for start in (
        'open_run("runs/quickstart").why(',
        'pl.scan_parquet("runs/quickstart/*/*.parquet"',
    ):
        assert _documented(start) in readme, start
