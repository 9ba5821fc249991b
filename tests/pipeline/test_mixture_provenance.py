"""The mixture's shards: the same bytes whatever the number of workers, and every token
traceable through the shard's sidecar to the row of the stage output it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.executor import LOCAL, ProcessExecutor
from pipeline.io import read_json
from pipeline.tokens.mixture import MixtureConfig, MixtureStage
from pipeline.tokens.shards import IndexedDataset
from tests.conftest import fineweb_docs


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """One mixture built three times from the same inputs and seed: in this process, with
    one worker process and with three (the token cache is shared, so tokenized once)."""
    root = tmp_path_factory.mktemp("mix")
    docs = fineweb_docs(150)
    scores = np.linspace(0.0, 4.0, len(docs))
    files = []
    for i in range(4):
        table = pa.table(
            {
                "id": [d["id"] for d in docs[i::4]],
                "text": [d["text"] for d in docs[i::4]],
                "drop_reason": pa.nulls(len(docs[i::4]), pa.string()),
                "edu_score": pa.array(scores[i::4], pa.float32()),
            }
        )
        pq.write_table(table, root / f"edu_score-{i}.parquet")
        files.append(str(root / f"edu_score-{i}.parquet"))
    config = MixtureConfig.model_validate(
        {
            "seq_len": 64,
            "seed": 11,
            "shard_max_tokens": 9_000,
            "phases": [
                {
                    "name": "phase1",
                    "tokens": 25_000,
                    "sources": [{"name": "web", "input": files, "weight": 1.0}],
                },
                {
                    "name": "phase2",
                    "tokens": 30_000,
                    "sources": [
                        {
                            "name": "edu",
                            "input": files,
                            "filter": "edu_score >= 3.8",
                            "weight": 0.7,
                            "max_epochs": 3,
                        },
                        {"name": "low", "input": files, "filter": "edu_score < 1", "weight": 0.3},
                    ],  # fmt: skip
                },
            ],
        }
    )
    out = {}
    for label, workers in (("local", 0), ("one", 1), ("three", 3)):
        out[label] = root / "run" / f"mixture-{label}"
        if workers:
            with ProcessExecutor(workers) as executor:
                MixtureStage(config).build([], str(out[label]), executor)
        else:
            MixtureStage(config).build([], str(out[label]), LOCAL)
    return out


def test_the_same_seed_gives_the_same_bytes_whatever_the_workers(built):
    files = {
        label: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
        for label, d in built.items()
    }
    names = set(files["local"])
    assert Path("manifest.json") in names
    assert len([n for n in names if n.suffix == ".bin"]) >= 4  # several shards per phase
    assert len([n for n in names if n.name.endswith(".docs.parquet")]) == len(
        [n for n in names if n.suffix == ".bin"]
    )
    assert not [n for n in names if n.parts[0].startswith(("_", "."))]  # no leftovers
    for label in ("one", "three"):
        assert files[label].keys() == names
        assert all(files[label][n] == files["local"][n] for n in names), label


def test_every_token_traces_back_to_its_source_row(built):
    from pipeline.tokens.tokenizer import load_tokenizer

    tok = load_tokenizer("phi3")
    out = built["local"]
    m = read_json(out / "manifest.json")
    rows = {}  # (input, id) -> the row, read from the stage output itself
    rng = np.random.default_rng(0)
    for phase in m["phases"]:
        per_source = {s["name"]: 0 for s in phase["sources"]}
        for shard in phase["shards"]:
            ds = IndexedDataset(out / shard["prefix"])
            docs = pq.read_table(out / shard["docs"])
            offsets = docs["offset"].to_numpy()
            tokens = docs["tokens"].to_numpy()
            assert len(docs) == len(ds) == shard["documents"]
            assert np.array_equal(offsets, np.cumsum(tokens) - tokens)
            assert np.array_equal(tokens, ds.lengths)
            for name, n in zip(docs["source"].to_pylist(), tokens.tolist(), strict=True):
                per_source[name] += n
            for offset in rng.integers(0, ds.num_tokens, size=8).tolist():
                i = int(np.searchsorted(offsets, offset, side="right")) - 1
                d = docs.slice(i, 1).to_pylist()[0]
                if (d["input"], d["id"]) not in rows:
                    t = pq.read_table(d["input"]).to_pylist()
                    rows.update({(d["input"], r["id"]): r for r in t})
                row = rows[(d["input"], d["id"])]
                if d["source"] == "edu":
                    assert row["edu_score"] >= 3.8
                flat, _ = tok.encode_batch([row["text"]])
                want = np.append(flat[: d["tokens"] - 1] if d["cut"] else flat, 32000)
                got = ds.read_span(d["offset"], d["tokens"])
                assert np.array_equal(got, want)
                assert got[offset - d["offset"]] == ds.read_span(offset, 1)[0]
                assert d["cut"] == (d["tokens"] < len(flat) + 1)
        assert per_source == {s["name"]: s["tokens"] for s in phase["sources"]}
    edu = m["phases"][1]["sources"][0]
    assert edu["epochs"] > 1  # upsampled: repeated documents carry their epoch
    docs = pa.concat_tables(pq.read_table(out / s["docs"]) for s in m["phases"][1]["shards"])
    epochs = docs.filter(pa.compute.equal(docs["source"], "edu"))["epoch"].to_numpy()
    assert epochs.max() == int(edu["epochs"])


def test_the_loader_reads_the_new_shards(built):
    from pipeline.tokens.loader import PhasedTokenDataset

    ds = PhasedTokenDataset(built["local"], seq_len=64)
    assert ds.tokens_per_phase() == {"phase1": 25_000, "phase2": 30_000}
    sample = ds.sample(0)
    assert sample["input_ids"].shape == (64,)


@pytest.mark.slow
def test_train_smoke_learns_from_the_new_shards(built, tmp_path):
    from pipeline.tokens.train_smoke import train_smoke_from_mixture

    metrics = train_smoke_from_mixture(built["local"], seq_len=256, out_dir=tmp_path)
    assert set(metrics["mixture"]["samples_trained_per_phase"]) == {"phase1", "phase2"}
