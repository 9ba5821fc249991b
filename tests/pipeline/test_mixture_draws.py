"""The mixture's per-document decisions, computed part by part: exact cuts, whole epochs,
an order that spreads every source over the phase, shards within their token limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.tokens.draws import (
    PartRef,
    Route,
    RouteJob,
    cut_fractional,
    doc_keys,
    drawn,
    plan_draw,
)
from pipeline.tokens.shard_writer import ORIGIN, expand_bucket, plan_shards, read_range
from pipeline.tokens.shards import IndexedDatasetWriter
from pipeline.tokens.token_cache import ids_path

SEED = 7


def _parts(folder: Path, source: str, si: int, sizes: list[int], seed: int) -> list[PartRef]:
    """Token-cache parts with random document lengths (ids and tokens are placeholders)."""
    rng = np.random.default_rng(seed)
    refs = []
    for j, n in enumerate(sizes):
        lengths = rng.integers(1, 300, size=n)
        prefix = str(folder / f"{source}-{j}")
        with IndexedDatasetWriter(prefix) as w:
            w.add_documents(np.arange(int(lengths.sum())) % 1000, lengths)
        with (
            pa.OSFile(ids_path(prefix), "wb") as sink,
            pa.ipc.new_file(sink, pa.schema([("id", pa.string())])) as f,
        ):
            f.write_table(pa.table({"id": [f"{source}/{j}/{i}" for i in range(n)]}))
        refs.append(
            PartRef(
                "p",
                0,
                source,
                si,
                j,
                prefix,
                f"{source}-{j}.parquet",
                f"{j:064d}",
                n,
                int(lengths.sum()),
            )  # fmt: skip
        )
    return refs


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> list[PartRef]:
    return _parts(tmp_path_factory.mktemp("cache"), "web", 0, [700, 0, 1300, 500], 1)


def _reference_selection(refs: list[PartRef], epoch: int, rest: int) -> set[tuple[int, int]]:
    """The fractional epoch computed in one place: every select key sorted at once."""
    keys, part, doc, lengths = [], [], [], []
    for r in refs:
        n = r.documents
        keys.append(doc_keys(r.base(SEED, epoch, "select"), np.arange(n)))
        part.append(np.full(n, r.part))
        doc.append(np.arange(n))
        lengths.append(r.lengths())
    keys, part, doc, lengths = map(np.concatenate, (keys, part, doc, lengths))
    order = np.lexsort((doc, part, keys))
    k = int(np.searchsorted(np.cumsum(lengths[order]), rest))
    return {(int(part[i]), int(doc[i])) for i in order[: k + 1]}


@pytest.mark.parametrize("share", [1e-6, 0.37, 1.0, 2.5])
def test_draws_are_exact_whole_epochs_repeat_and_the_cut_matches_a_full_sort(web, share):
    total = sum(r.tokens for r in web)
    tokens = max(1, int(share * total))
    draw = cut_fractional(SEED, {"web": (plan_draw(total, tokens), web)}).get(
        "web", plan_draw(total, tokens)
    )
    rows = [(r, *drawn(r, draw, SEED)) for r in web]
    assert sum(int(take.sum()) for *_, take in rows) == tokens  # exact to the token
    cut = 0
    for r, docs, epochs, take in rows:
        lengths = r.lengths()
        counts = np.bincount(docs, minlength=r.documents)
        assert counts.min(initial=draw.full) >= draw.full
        assert counts.max(initial=0) <= draw.full + 1
        assert (take[epochs < draw.full] == lengths[docs[epochs < draw.full]]).all()
        cut += int((take < lengths[docs]).sum())
    assert cut <= 1
    if draw.rest:
        got = {(r.part, int(d)) for r, docs, epochs, _ in rows for d in docs[epochs == draw.full]}
        assert got == _reference_selection(web, draw.full, draw.rest)


def test_the_seed_decides_the_cut(web):
    total = sum(r.tokens for r in web)
    sources = {("p", 0): (plan_draw(total, total // 3), web)}
    assert cut_fractional(SEED, sources) == cut_fractional(SEED, sources)
    assert cut_fractional(SEED + 1, sources) != cut_fractional(SEED, sources)


def test_a_fractional_source_spreads_over_the_whole_phase(tmp_path, web):
    """Select and order keys are independent: the documents a fractional epoch keeps (the
    lowest select keys) are not the ones at the start of the phase's order."""
    full = _parts(tmp_path, "book", 1, [3000], 2)
    draws = [plan_draw(sum(r.tokens for r in web), sum(r.tokens for r in web) // 4)]
    draws = [
        cut_fractional(SEED, {0: (draws[0], web)})[0],
        plan_draw(full[0].tokens, full[0].tokens),
    ]
    route = Route(SEED)
    parts = []
    for r in [*web, *full]:
        if r.documents:
            path = str(tmp_path / "route" / f"{r.source}-{r.part}")
            route(RouteJob(r, draws[r.source_index], path, 4))
            parts.append((r, path))
    rows = read_range(parts, ORIGIN, None)
    rank = np.flatnonzero(rows["source"] == 0) / len(rows["source"])
    assert 0.4 < rank.mean() < 0.6  # all in the first quarter if the keys were the same


def test_shards_stay_within_their_limit(tmp_path, web):
    total = sum(r.tokens for r in web)
    draw = cut_fractional(SEED, {0: (plan_draw(total, total + total // 2), web)})[0]
    parts, bits = [], 3  # few buckets: several are over the limit and split by documents
    buckets = np.zeros(1 << bits, np.int64)
    for r in web:
        if r.documents:
            path = str(tmp_path / f"route-{r.part}")
            res = Route(SEED)(RouteJob(r, draw, path, bits))
            buckets[res.buckets] += res.bucket_tokens
            parts.append((r, path))
    limit = 5_000
    starts = plan_shards(buckets, bits, limit, lambda b: expand_bucket(parts, b, bits))
    ranges = [read_range(parts, lo, hi) for lo, hi in zip(starts, [*starts[1:], None], strict=True)]
    assert len(ranges) > (1 << bits)  # buckets were split
    for rows in ranges:
        assert len(rows["take"]) >= 1
        assert rows["take"].sum() <= limit or len(rows["take"]) == 1
    everything = read_range(parts, ORIGIN, None)
    for col in ("key", "source", "part", "doc", "epoch", "take"):
        assert np.array_equal(np.concatenate([r[col] for r in ranges]), everything[col])
    assert everything["take"].sum() == total + total // 2
