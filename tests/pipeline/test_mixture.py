"""The mixture stage: budgets and epochs, exact shares, Phi-3 tokens in Megatron shards."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import read_json
from pipeline.recipe import ConfigError, load_recipe
from pipeline.run import run_recipe
from pipeline.tokens.allocation import MixtureError, SourcePlan, allocate, parse_tokens
from pipeline.tokens.mixture import MixtureConfig, MixtureStage
from pipeline.tokens.shards import IndexedDataset
from tests.conftest import fineweb_docs


def test_parse_tokens():
    assert parse_tokens(400_000) == 400_000
    assert parse_tokens("400k") == 400_000
    assert parse_tokens("2.5B") == 2_500_000_000
    assert parse_tokens("3.3T") == 3_300_000_000_000
    with pytest.raises(ValueError, match="not a token count"):
        parse_tokens("lots")


def _plans(*spec):
    return [SourcePlan(n, w, e, avail, avail // 100) for n, w, e, avail in spec]


def test_allocate_exact_shares_and_epochs():
    plans = _plans(
        ("web", 0.7, 1.0, 900_000), ("edu", 0.2, 2.0, 150_000), ("syn", 0.1, 4.0, 30_000)
    )
    assert allocate("p", 1_000_001, plans) == 1_000_001
    assert sum(p.tokens for p in plans) == 1_000_001
    for p in plans:
        assert abs(p.tokens - p.weight * 1_000_001) <= 1
    assert plans[1].epochs == pytest.approx(200_000 / 150_000, abs=1e-5)  # upsampled
    assert plans[2].epochs == pytest.approx(100_000 / 30_000, abs=1e-4)
    assert plans[0].epochs < 1  # downsampled


def test_allocate_names_the_short_source_and_the_gap():
    plans = _plans(("web", 0.5, 1.0, 900_000), ("syn", 0.5, 2.0, 100_000))
    with pytest.raises(MixtureError) as e:
        allocate("phase2", 1_000_000, plans)
    msg = str(e.value)
    assert "phase2" in msg and "'syn'" in msg and "short by 300,000" in msg and "web" not in msg


def test_allocate_scale_keeps_weights():
    plans = _plans(("web", 0.5, 1.0, 900_000), ("syn", 0.5, 2.0, 100_000))
    built = allocate("phase2", 1_000_000, plans, on_short="scale")
    assert built == 400_000
    assert [p.tokens for p in plans] == [200_000, 200_000]
    assert plans[1].epochs == pytest.approx(2.0)


def test_weights_must_sum_to_one_and_keys_are_checked(tmp_path):
    base = {
        "name": "m",
        "stages": {
            "dedup": {"input": [str(tmp_path / "x.parquet")]},
            "mixture": {
                "phases": [
                    {
                        "name": "p1",
                        "tokens": "10k",
                        "sources": [
                            {"name": "a", "input": "@dedup", "weight": 0.6},
                            {"name": "b", "input": "@dedup", "weight": 0.3},
                        ],
                    }
                ]
            },
        },
    }
    with pytest.raises(ConfigError, match="sum to 0.9"):
        load_recipe(raw=base, check_inputs=False)
    base["stages"]["mixture"]["phases"][0]["sources"][1]["weight"] = 0.4
    base["stages"]["mixture"]["phases"][0]["sources"][1]["max_epoch"] = 2
    with pytest.raises(ConfigError, match="max_epoch.*did you mean 'max_epochs'"):
        load_recipe(raw=base, check_inputs=False)
    del base["stages"]["mixture"]["phases"][0]["sources"][1]["max_epoch"]
    base["stages"]["mixture"]["phases"][0]["sources"][1]["input"] = "@nowhere"
    with pytest.raises(ConfigError, match="'@nowhere' refers to no earlier stage"):
        load_recipe(raw=base, check_inputs=False)


def _docs_parquet(path: Path, docs: list[dict], scores: np.ndarray) -> Path:
    table = pa.table(
        {
            "id": [d["id"] for d in docs],
            "text": [d["text"] for d in docs],
            "drop_reason": pa.nulls(len(docs), pa.string()),
            "edu_score": pa.array(scores, pa.float32()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def web_parts(tmp_path_factory) -> list[Path]:
    docs = fineweb_docs(120)
    scores = np.linspace(0.0, 4.0, len(docs))
    folder = tmp_path_factory.mktemp("web")
    return [_docs_parquet(folder / f"part-{i}.parquet", docs[i::3], scores[i::3]) for i in range(3)]


def _config(web: list[Path], p1: int, p2: int, **kw) -> MixtureConfig:
    files = [str(p) for p in web]
    return MixtureConfig.model_validate(
        {
            "seq_len": 64,
            "phases": [
                {
                    "name": "phase1",
                    "tokens": p1,
                    "sources": [{"name": "web", "input": files, "weight": 1.0}],
                },
                {
                    "name": "phase2",
                    "tokens": p2,
                    "sources": [
                        {
                            "name": "web_edu",
                            "input": files,
                            "filter": "edu_score >= 3.8",
                            "weight": 0.6,
                            "max_epochs": 3,
                        },
                        {
                            "name": "web_low",
                            "input": files,
                            "filter": "edu_score < 1",
                            "weight": 0.4,
                            "max_epochs": 3,
                        },
                    ],
                },
            ],
        }
        | kw
    )


def test_mixture_stage_writes_exact_phi3_shards(tmp_path, web_parts, caplog):
    from pipeline.tokens.tokenizer import load_tokenizer

    tok = load_tokenizer("phi3")
    out = tmp_path / "run" / "mixture"
    stats = MixtureStage(_config(web_parts, 30_000, 40_000, shard_max_tokens=12_000)).build(
        [], str(out)
    )
    m = read_json(out / "manifest.json")
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["tokenizer"]["eos_id"] == 32000
    assert stats["tokens"] == {"phase1": 30_000, "phase2": 40_000}
    for phase in m["phases"]:
        # tokens in the shards equal the manifest's, shard by shard and per phase
        shard_tokens = [IndexedDataset(out / s["prefix"]).num_tokens for s in phase["shards"]]
        assert shard_tokens == [s["tokens"] for s in phase["shards"]]
        assert sum(shard_tokens) == phase["tokens"]
        assert sum(s["documents"] for s in phase["sources"]) == phase["documents"]
        for s in phase["sources"]:  # shares within 1% of the phase's tokens (here: exact)
            assert abs(s["tokens"] - s["weight"] * phase["tokens"]) <= 0.01 * phase["tokens"]
            assert s["epochs"] <= s["max_epochs"] + 1e-9
            assert all(len(i["sha256"]) == 64 for i in s["inputs"])
    p1, p2 = m["phases"]
    assert len(p1["shards"]) >= 3  # cut at shard_max_tokens
    assert p1["sources"][0]["epochs"] < 1
    assert p2["sources"][0]["epochs"] > 1  # 6 edu docs upsampled to their share

    # every document in the shards is a real tokenised document (or a cut prefix) + EOS
    texts = {}
    for part in web_parts:
        t = pq.read_table(part)
        for text in t["text"].to_pylist():
            flat, _ = tok.encode_batch([text])
            texts[tuple(flat[:20].tolist())] = flat
    ds = IndexedDataset(out / p1["shards"][0]["prefix"])
    for i in range(len(ds)):
        doc = ds.get(i)
        assert doc[-1] == 32000
        ref = texts[tuple(doc[:20].tolist())]
        n = len(doc) - 1
        assert np.array_equal(doc[:-1], ref[:n])

    # a new budget re-mixes from the token cache without tokenizing again
    caplog.set_level(logging.INFO, logger="primer")
    MixtureStage(_config(web_parts, 20_000, 10_000)).build([], str(out))
    assert "0 input parts to tokenize (9 cached)" in caplog.text  # 3 files x 3 filters
    assert read_json(out / "manifest.json")["phases"][0]["tokens"] == 20_000


def test_mixture_fails_clearly_when_a_source_is_short(tmp_path, web_parts):
    with pytest.raises(MixtureError, match=r"(?s)phase 'phase2'.*'web_edu'.*short by"):
        MixtureStage(_config(web_parts, 10_000, 400_000)).build([], str(tmp_path / "m"))
    cfg = _config(web_parts, 10_000, 10_000)
    bad = cfg.model_copy(
        update={
            "phases": [
                cfg.phases[0].model_copy(
                    update={
                        "sources": [
                            cfg.phases[0]
                            .sources[0]
                            .model_copy(update={"filter": "no_such_column > 1"})
                        ]
                    }
                )
            ]
        }
    )
    with pytest.raises(MixtureError, match="no_such_column"):
        MixtureStage(bad).build([], str(tmp_path / "m2"))


def test_mixture_in_a_recipe_on_ray(tmp_path, web_parts, ray_session):
    raw = {
        "name": "mix",
        "executor": "ray",
        "stages": {
            "quality": {"input": [str(p) for p in web_parts], "max_drop_fraction": 1.0},
            "mixture": {
                "seq_len": 128,
                "phases": [
                    {
                        "name": "phase1",
                        "tokens": "5k",
                        "sources": [{"name": "web", "input": "@quality", "weight": 1.0}],
                    }
                ],
            },
        },
    }
    summary = run_recipe(load_recipe(raw=raw), output=tmp_path / "run")
    art = summary["artifacts"]["mixture"]
    assert art["phases"][0]["tokens"] == 5_000
    assert art["phases"][0]["sources"][0]["name"] == "web"
    m = read_json(tmp_path / "run" / "mixture" / "manifest.json")
    assert m["phases"][0]["sources"][0]["inputs"][0]["path"].startswith(
        str(tmp_path / "run" / "quality")
    )
