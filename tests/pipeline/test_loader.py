"""The trainer feed: packing without loss, phase order, rank sharding, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.tokens.loader import PhasedTokenDataset  # noqa: E402
from pipeline.tokens.shards import IndexedDatasetWriter  # noqa: E402

torch.set_num_threads(1)

EOS = 32000
SEQ_LEN = 16
SEED = 1234


def phase_docs(rng: np.random.Generator, n_docs: int, total: int | None) -> list[np.ndarray]:
    """EOS-terminated documents, one longer than two windows; `total` fixes the token count."""
    lengths = rng.integers(1, 30, size=n_docs)
    lengths[3] = 2 * SEQ_LEN + 5
    if total is not None:
        lengths[-1] = total - lengths[:-1].sum()
        assert lengths[-1] >= 1
    return [np.append(rng.integers(0, EOS, size=n - 1), EOS) for n in lengths]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Two phases over uneven shards; phase1's stream is an exact fit (N - 1 = 70 * L)."""
    root = tmp_path_factory.mktemp("run") / "mixture"
    rng = np.random.default_rng(7)
    plan = {"phase1": (60, 70 * SEQ_LEN + 1, [17, 1, 25, 17]), "phase2": (30, None, [12, 18])}
    phases, streams = [], {}
    for name, (n_docs, total, split) in plan.items():
        docs = phase_docs(rng, n_docs, total)
        streams[name] = np.concatenate(docs)
        shards, lo = [], 0
        for j, n in enumerate(split):
            prefix = f"{name}/shard-{j:05d}"
            with IndexedDatasetWriter(root / prefix) as w:
                w.add_documents(
                    np.concatenate(docs[lo : lo + n]), [len(d) for d in docs[lo : lo + n]]
                )
            shards.append({"prefix": prefix, "documents": n, "tokens": w.result["tokens"]})
            lo += n
        tokens = int(streams[name].size)
        phases.append(
            {
                "name": name,
                "tokens": tokens,
                "documents": n_docs,
                "shards": shards,
                "sources": [{"name": "web", "documents": n_docs, "tokens": tokens, "epochs": 1.0}],
            }
        )
    manifest = {
        "format": "primer-mixture/1",
        "seq_len": SEQ_LEN,
        "seed": SEED,
        "dtype": "uint16",
        "tokenizer": {"name": "phi3", "sha256": "0" * 64, "eos_id": EOS, "vocab_size": 32011},
        "phases": phases,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, streams


def collect(samples) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    return [
        (int(s["phase"]), tuple(s["input_ids"].tolist()), tuple(s["labels"].tolist()))
        for s in samples
    ]


def collect_batches(loader) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    out = []
    for b in loader:
        for p, x, y in zip(b["phase"], b["input_ids"], b["labels"], strict=True):
            out.append((int(p), tuple(x.tolist()), tuple(y.tolist())))
    return out


def check_packing(ds: PhasedTokenDataset, streams: dict[str, np.ndarray], seed: int) -> None:
    """Every token is an input exactly once and a label exactly once, window by window."""
    samples = collect(ds)
    L = ds.seq_len
    g = 0
    for p, (name, stream) in enumerate(streams.items()):
        W = -(-(stream.size - 1) // L)
        assert ds.samples_per_phase()[name] == W
        mine = samples[g : g + W]
        assert {s[0] for s in mine} == {p}  # phase 1 plays entirely before phase 2
        order = np.random.default_rng([seed, p]).permutation(W)
        inputs = np.full(W * L, -1)
        labels = np.full(W * L, -1)
        for (_, x, y), k in zip(mine, order, strict=True):
            inputs[k * L : k * L + L] = x
            labels[k * L : k * L + L] = y
        n_in = min(stream.size, W * L)
        np.testing.assert_array_equal(inputs[:n_in], stream[:n_in])
        assert (inputs[n_in:] == EOS).all()  # padding of the last window
        np.testing.assert_array_equal(labels[: stream.size - 1], stream[1:])
        assert (labels[stream.size - 1 :] == -100).all()
        g += W
    assert g == len(samples)


def test_windows_use_every_token_once_and_phases_play_in_order(mixture):
    root, streams = mixture
    ds = PhasedTokenDataset(root)
    assert ds.samples_per_phase() == {
        "phase1": 70,
        "phase2": -(-(streams["phase2"].size - 1) // 16),
    }
    check_packing(ds, streams, SEED)


def test_another_seq_len_rewindows_the_same_shards(mixture):
    root, streams = mixture
    check_packing(PhasedTokenDataset(root / "manifest.json", seq_len=7), streams, SEED)


def test_order_follows_the_seed(mixture):
    root, streams = mixture
    a = collect(PhasedTokenDataset(root))
    assert a == collect(PhasedTokenDataset(root, seed=SEED))
    b = collect(PhasedTokenDataset(root, seed=SEED + 1))
    assert a != b and sorted(a) == sorted(b)
    check_packing(PhasedTokenDataset(root, seed=SEED + 1), streams, SEED + 1)


def test_a_phase_subset_keeps_its_own_order(mixture):
    root, _ = mixture
    full = collect(PhasedTokenDataset(root))
    only2 = collect(PhasedTokenDataset(root, phases=["phase2"]))
    assert only2 == [s for s in full if s[0] == 1]
    with pytest.raises(ValueError, match=r"no phase named \['phase3'\]"):
        PhasedTokenDataset(root, phases=["phase3"])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_partition_the_samples(mixture, world_size):
    root, _ = mixture
    full = collect(PhasedTokenDataset(root))
    per_rank = [
        collect(PhasedTokenDataset(root, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    for r, samples in enumerate(per_rank):
        assert samples == full[r::world_size]
        assert len(samples) == PhasedTokenDataset(root, rank=r, world_size=world_size).num_samples()
    assert sum(len(s) for s in per_rank) == len(full)


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_continues_exactly(mixture, world_size):
    root, _ = mixture
    rank = world_size - 1
    ds = PhasedTokenDataset(root, rank=rank, world_size=world_size)
    full = collect(ds)
    for consumed in (0, 5, len(full) - 1, len(full)):
        state = json.loads(json.dumps(ds.state_dict(consumed)))  # as a checkpoint stores it
        resumed = PhasedTokenDataset.from_state(root, state, world_size=world_size, seed=SEED)
        assert len(resumed) == len(full) - consumed
        assert collect(resumed) == full[consumed:]


def test_dataloader_workers_reproduce_the_single_process_order_and_resume(mixture):
    root, _ = mixture
    batch = 3
    single = collect(PhasedTokenDataset(root, rank=1, world_size=2))

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=2)

    ds = PhasedTokenDataset(root, rank=1, world_size=2, block=batch)
    assert collect_batches(loader(ds)) == single
    # stop after 4 batches, checkpoint, restart with a fresh loader
    state = ds.state_dict(consumed=4 * batch)
    resumed = PhasedTokenDataset.from_state(root, state, block=batch)
    assert collect_batches(loader(resumed)) == single[4 * batch :]
    # a resume point that is not a whole number of batches works too
    resumed = PhasedTokenDataset.from_state(root, ds.state_dict(consumed=7), block=batch)
    assert collect_batches(loader(resumed)) == single[7:]


def test_mismatched_resume_is_refused(mixture, tmp_path):
    root, _ = mixture
    state = PhasedTokenDataset(root, world_size=2).state_dict(consumed=3)
    with pytest.raises(ValueError, match="state has seed=1234 but seed=99 was asked for"):
        PhasedTokenDataset.from_state(root, state, seed=99)
    with pytest.raises(ValueError, match="state has world_size=2 but world_size=4"):
        PhasedTokenDataset.from_state(root, state, world_size=4)
    with pytest.raises(ValueError, match="state has seq_len=16 but seq_len=32"):
        PhasedTokenDataset.from_state(root, state, seq_len=32)
    # the same shards under an edited manifest
    edited = json.loads((root / "manifest.json").read_text())
    edited["seed"] = 5
    for phase in edited["phases"]:
        for shard in phase["shards"]:
            shard["prefix"] = str(root / shard["prefix"])
    other = tmp_path / "manifest.json"
    other.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"manifest\.json changed since the checkpoint"):
        PhasedTokenDataset.from_state(other, state)


def test_manifest_that_disagrees_with_its_shards_is_refused(mixture, tmp_path):
    root, _ = mixture
    edited = json.loads((root / "manifest.json").read_text())
    for phase in edited["phases"]:
        for shard in phase["shards"]:
            shard["prefix"] = str(root / shard["prefix"])
    edited["phases"][1]["shards"][0]["tokens"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(
        ValueError, match=r"phase 'phase2' shards\[0\] lists .* rebuild the mixture"
    ):
        PhasedTokenDataset(tmp_path)
