"""report.html: written by every `primer run`, complete on the quickstart, safe with hostile
document text, and still useful (with the missing sections said so) for a web-only run."""

from __future__ import annotations

import logging
import re
import shutil
import time

import pytest

from pipeline.recipe import load_recipe
from pipeline.run import run_recipe
from pipeline.views.report import SECTIONS, main, write_report
from pipeline.views.runs import open_run
from tests.conftest import fineweb_docs, write_jsonl_parts
from tests.pipeline.test_inspect import make_run

TITLES = [title for _, title, _ in SECTIONS]


def _sections(page: str) -> dict[str, str]:
    """Section title -> its HTML."""
    out = {}
    for m in re.finditer(r'<section id="[^"]+"><h2>(.*?)</h2>(.*?)</section>', page, re.S):
        out[m.group(1)] = m.group(2)
    return out


@pytest.fixture(scope="module")
def web_run(tmp_path_factory):
    """A real web-only run (extract -> langid -> quality -> dedup, in-process, ~2 s)."""
    tmp = tmp_path_factory.mktemp("web")
    inputs = write_jsonl_parts(tmp / "in", fineweb_docs(40), 2)
    raw = {
        "name": "web",
        "executor": "local",
        "stages": {"extract": {"input": [str(p) for p in inputs]}, "langid": {}},
    }
    raw["stages"] |= {"quality": {}, "dedup": {}}
    run_recipe(load_recipe(raw=raw), output=tmp / "run")
    return raw, tmp / "run"


def test_the_quickstart_run_has_a_complete_report(quickstart_run):
    run_dir, summary = quickstart_run
    page = (run_dir / "report.html").read_text()  # written by run_recipe itself
    sections = _sections(page)
    assert list(sections) == TITLES
    for title, body in sections.items():
        assert "Skipped:" not in body and "section failed" not in body, (title, body[:300])
    assert page.count("<svg") >= 10  # funnel, language, 6 quality signals, edu, mixture, loss
    for stage in summary["stages"]:
        assert f"<td>{stage['stage']}</td>" in sections["Funnel"]
    assert "decontaminate" in sections["Synthetic samples with lineage"]
    assert "teacher_model" in sections["Synthetic samples with lineage"]
    assert "phase2" in sections["Mixture composition per phase"]
    assert "edu_int 3" in sections["Sample documents per edu bucket"]
    t0 = time.perf_counter()
    write_report(run_dir)
    print(f"report on the quickstart: {time.perf_counter() - t0:.2f} s")


def test_hostile_text_is_escaped(tmp_path):
    run = make_run(tmp_path / "run", evil=True)  # in text, url, title, reasons, lineage, recipe
    page = write_report(run).read_text()
    low = page.lower()
    assert "<script" not in low and "<img" not in low  # no element comes from the data
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))  # no url linked
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page  # shown as text
    sections = _sections(page)
    for title in ("Sample documents per edu bucket", "Synthetic samples with lineage"):
        assert "&lt;img src=x onerror=alert(1)&gt;" in sections[title]
    assert "content=\"default-src 'none'; style-src 'unsafe-inline'" in page  # and a CSP


def test_a_web_only_run_reports_what_it_has(web_run):
    _, run_dir = web_run
    sections = _sections((run_dir / "report.html").read_text())  # written by run_recipe
    assert list(sections) == TITLES
    for title in ("Run", "Funnel", "Drop reasons per stage", "Language scores", "Quality signals"):
        assert "Skipped:" not in sections[title] and "section failed" not in sections[title]
    for title in TITLES[5:]:
        assert "Skipped:" in sections[title], title
    assert "no &#x27;edu_score&#x27; stage output" in sections["Educational value"]


def test_a_broken_section_costs_only_that_section(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "mixture" / "manifest.json").write_text("{not json")
    sections = _sections(write_report(run).read_text())
    assert "This section failed: JSONDecodeError" in sections["Mixture composition per phase"]
    assert "<svg" in sections["Smoke train"] and "<svg" in sections["Funnel"]


def test_a_report_failure_does_not_fail_a_finished_run(web_run, tmp_path, monkeypatch, caplog):
    raw, run_dir = web_run
    shutil.copytree(run_dir, tmp_path / "run")
    (tmp_path / "run" / "report.html").unlink()

    def broken(_):
        raise RuntimeError("disk full")

    monkeypatch.setattr("pipeline.views.report.write_report", broken)
    with caplog.at_level(logging.ERROR, logger="primer"):
        summary = run_recipe(load_recipe(raw=raw), output=tmp_path / "run")
    assert [s["stage"] for s in summary["stages"]] == ["extract", "langid", "quality", "dedup"]
    assert not (tmp_path / "run" / "report.html").exists()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "report.html was NOT written" in errors[0].getMessage()
    assert "disk full" in caplog.text  # with the traceback


def test_standalone_command(tmp_path, capsys):
    run = make_run(tmp_path / "run", web_only=True)
    assert main([str(run), "--output", str(tmp_path / "r.html")]) == 0
    assert "r.html" in capsys.readouterr().out and (tmp_path / "r.html").is_file()
    assert main([str(tmp_path / "missing")]) == 2


def test_report_samples_are_the_stable_picks(tmp_path):
    """The report shows inspect's picks (xxh64 of the id), and says how they were chosen."""
    run = make_run(tmp_path / "run")
    body = _sections(write_report(run, samples=2).read_text())["Sample documents per edu bucket"]
    shown = re.findall(r'<div class="meta">(d\d\d) ', body)
    picked = open_run(run).samples_per_edu_bucket(n=2)["id"].to_list()
    assert shown == picked and sorted(shown) == [f"d{i:02d}" for i in range(8)]
    assert "Picked by the xxh64 of the id (seed 17)" in body
