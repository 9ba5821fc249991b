"""Recipes are validated in full before any work, and errors name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.recipe import ConfigError, load_recipe
from tests.conftest import REPO

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _recipe(tmp_path, body: dict) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(body))
    return str(p)


def test_quickstart_loads_with_inputs_relative_to_the_recipe():
    loaded = load_recipe(QUICKSTART)
    assert [s.name for s in loaded.stages] == [
        "extract",
        "langid",
        "quality",
        "dedup",
        "edu_annotate",
        "edu_train",
        "edu_score",
        "seeds",
        "generate",
        "validate",
        "synth_dedup",
        "decontaminate",
        "mixture",
        "train_smoke",
    ]
    assert loaded.stages[-4].cls.name == "dedup"
    assert all(p.startswith(str(REPO)) for p in loaded.stages[0].inputs)


def test_typo_in_a_stage_key_names_the_key_and_suggests(tmp_path):
    path = _recipe(
        tmp_path, {"name": "x", "stages": {"quality": {"input": [str(QUICKSTART)], "min_wrods": 3}}}
    )
    with pytest.raises(
        ConfigError, match=r"stages\.quality\.min_wrods: unknown key \(did you mean 'min_words'\?\)"
    ):
        load_recipe(path)


def test_unknown_stage_lists_known_ones(tmp_path):
    path = _recipe(tmp_path, {"name": "x", "stages": {"qualty": {"input": [str(QUICKSTART)]}}})
    with pytest.raises(ConfigError, match=r"unknown stage 'qualty' \(did you mean 'quality'\?\)"):
        load_recipe(path)


def test_wrong_type_and_top_level_typo(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.langid\.min_score: .*got 'high'"):
        load_recipe(QUICKSTART, ["stages.langid.min_score=high"])
    path = _recipe(tmp_path, {"name": "x", "stagse": {}})
    with pytest.raises(ConfigError, match=r"stagse: unknown key \(did you mean 'stages'\?\)"):
        load_recipe(path)


def test_missing_input_fails_before_work(tmp_path):
    path = _recipe(tmp_path, {"name": "x", "stages": {"extract": {"input": ["nope/*.warc.gz"]}}})
    with pytest.raises(ConfigError, match=r"stages\.extract\.input: .*matches no file"):
        load_recipe(path)


def test_set_overrides_and_version_pins(tmp_path):
    loaded = load_recipe(
        QUICKSTART, ["stages.langid.min_score=0.9", "stages.langid.languages=[en, fr]"]
    )
    cfg = {s.name: s.config for s in loaded.stages}["langid"]
    assert cfg.min_score == 0.9 and cfg.languages == ["en", "fr"]
    path = _recipe(tmp_path, {"name": "x", "stages": {"quality_v99": {"input": [str(QUICKSTART)]}}})
    with pytest.raises(ConfigError, match="pins version 99"):
        load_recipe(path)


def test_cli_exits_2_with_a_readable_message(capsys):
    code = main(["run", str(QUICKSTART), "--set", "stages.dedup.bandz=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stages.dedup.bandz: unknown key (did you mean 'bands'?)" in err


def test_every_stage_problem_is_listed_at_once(capsys):
    code = main(
        ["run", str(QUICKSTART), "--set", "stages.dedup.bandz=3", "--set", "stages.quality.x=1"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "stages.dedup.bandz: unknown key" in err and "stages.quality.x: unknown key" in err


def test_cli_lists_stages_with_defaults_modules_and_kinds_of_keys(capsys):
    from pipeline import registry

    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for name in ("extract_v1", "langid_v1", "quality_v1", "dedup_v3"):
        assert name in out
    assert "min_score = 0.65  (threshold)" in out
    for name in registry.names():  # `primer stages` leads to each stage's file in one hop
        path = registry.location(name)[0].replace(".", "/") + ".py"
        assert f"in {path}" in out and (REPO / path).is_file()


def test_a_stage_runs_twice_under_another_name(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "hello"}\n')
    loaded = load_recipe(
        raw={
            "name": "twice",
            "stages": {
                "dedup": {"input": [str(src)]},
                "dedup_again": {"stage": "dedup", "input": ["@dedup"], "ngram": 3},
            },
        }
    )
    again = loaded.stages[1]
    assert (again.name, again.cls.name, again.config.ngram) == ("dedup_again", "dedup", 3)
    with pytest.raises(ConfigError, match="stages.oops: unknown stage 'dedupp'"):
        load_recipe(raw={"name": "x", "stages": {"oops": {"stage": "dedupp", "input": [str(src)]}}})


def test_production_recipe_validates_with_paths_from_the_environment(monkeypatch):
    monkeypatch.setenv("PRIMER_CC", "/mnt/cc")
    monkeypatch.setenv("PRIMER_RUNS", "/mnt/runs")
    loaded = load_recipe(REPO / "configs" / "phi3_mini.yaml", check_inputs=False)
    assert loaded.output == Path("/mnt/runs/phi3_mini")
    assert loaded.stages[0].inputs == ["/mnt/cc/**/*.warc.gz"]
    assert [s.name for s in loaded.stages][-2:] == ["mixture", "train_smoke"]
    mixture = loaded.stages[-2].config
    assert sum(p.tokens for p in mixture.phases) == 3_300_000_000_000  # Phi-3-mini's 3.3T
