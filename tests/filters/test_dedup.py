"""Tests of filters/dedup/ and filters/text.py: normalisation, stable hashes and
signatures, LSH clusters, the in-driver and fanned-out prepare passes agreeing (in this
process, in local processes, on Ray), the distributed connected components against
union-find on random graphs, the per-source cluster files, a killed prepare starting again,
the runner reusing or recomputing the state, and the stage marking the right rows.

Run: .venv/bin/pytest tests/filters/test_dedup.py  (most of the time is Ray's start-up;
everything else is in-process on synthetic text; `-m slow` adds the fan-out over 1 and 3
local processes, slow only because each map step starts its processes)
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import xxhash
from pydantic import ValidationError

import filters.dedup.cluster_files as cluster_files
from filters.dedup.cluster_files import write_source_files
from filters.dedup.clusters import clusters_from_edges, connected_components, unique_edges
from filters.dedup.config import DedupConfig
from filters.dedup.dedup import DedupStage, fans_out
from filters.dedup.edges import route_edges
from filters.dedup.fanout import clusters_from_routed_edges
from filters.dedup.keys import DuplicateRowError, source_prefix
from filters.dedup.minhash import jaccard_estimate, minhash, text_hash
from filters.dedup.ranks import choose_splitters, node_sample
from filters.normalise import normalise
from pipeline.executor import LOCAL, Executor, LocalExecutor, ProcessExecutor, RayExecutor
from pipeline.stage_runner import run_stage

_SYLLABLES = ["ka", "lo", "mi", "ner", "tus", "va", "pe", "ri", "zon", "dal", "ush", "eb", "fo"]
_VOCAB = sorted(
    {"".join(np.random.default_rng(i).choice(_SYLLABLES, size=2 + i % 3)) for i in range(4000)}
)


def doc(seed: int, n_words: int = 300) -> str:
    """Deterministic pseudo-English: sentences of random words from a fixed vocabulary."""
    rng = np.random.default_rng(seed)
    words = [str(w) for w in rng.choice(_VOCAB, size=n_words)]
    for i in range(0, n_words, 12):
        words[i] = words[i].capitalize()
        words[min(i + 11, n_words - 1)] += "."
    return " ".join(words)


def edit(text: str, positions: list[int], seed: int = 99) -> str:
    """`text` with the words at `positions` replaced by other words."""
    rng = np.random.default_rng(seed)
    words = text.split(" ")
    for p in positions:
        words[p] = str(rng.choice(_VOCAB)) + "x"
    return " ".join(words)


def shingles(text: str, n: int = 5) -> set[str]:
    words = normalise(pa.array([text]))[0].as_py().split(" ")
    return {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def cluster_files_in(folder: Path) -> dict[str, pa.Table]:
    """The cluster table's files (one per source) by name."""
    return {f.name: pq.read_table(f) for f in sorted(folder.iterdir())}


def read_clusters(state: Path | str) -> pa.Table:
    """The whole cluster table of a state folder, sorted by (id, source_path)."""
    files = list(cluster_files_in(Path(state) / "clusters").values())
    table = pa.concat_tables(files) if files else pa.table({"id": pa.array([], pa.string())})
    if not len(table):
        return table
    keys = [("id", "ascending"), ("source_path", "ascending")]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def clusters_of(texts: dict[str, str | None], **config) -> dict[str, tuple[str, int, str]]:
    """prepare() in-process over one table -> {id: (dup_cluster, size, dup_kind)}."""
    table = pa.table({"id": list(texts), "text": pa.array(list(texts.values()), pa.large_string())})
    with tempfile.TemporaryDirectory() as state:
        DedupStage(**config).prepare([table], state)
        out = read_clusters(state).to_pylist()
    return {r["id"]: (r["dup_cluster"], r["dup_cluster_size"], r["dup_kind"]) for r in out}


@pytest.fixture(scope="session")
def ray_ctx(ray_session):
    """The session's local Ray (tests/conftest.py)."""
    return ray_session


# --- normalisation and hashes --------------------------------------------------------------


def test_normalise_folds_case_whitespace_punctuation_and_accents():
    got = normalise(
        pa.array(
            ["  Hello,\n\tWORLD!! ", "Café — naïve\u00a0façade", "x\u2028y\u3000z", "!!!", None]
        )
    ).to_pylist()
    assert got == ["hello world", "cafe naive facade", "x y z", "", None]


def test_normalise_flags_turn_each_folding_off():
    text = pa.array(["Café, ﬁne  DAY!"])
    assert normalise(text, strip_accents=False)[0].as_py() == "café fine day"  # NFKC
    assert normalise(text, lowercase=False)[0].as_py() == "Cafe fine DAY"
    assert normalise(text, strip_punct=False)[0].as_py() == "cafe, fine day!"


def test_text_hash_is_xxh64_of_the_normalised_text():
    # A documented, pinned value: stored states stay valid across processes and versions.
    h = text_hash(pa.array(["Hello,  World!", "hello world", None])).to_pylist()
    assert h == [xxhash.xxh64_intdigest(b"hello world")] * 2 + [None]
    assert h[0] == 5020219685658847592


def test_signatures_are_identical_across_calls_and_processes():
    texts = pa.array([doc(1), doc(2, 3)])
    first = minhash(texts)
    assert first.shape == (2, 112) and first.dtype == np.uint32
    assert np.array_equal(first, minhash(texts))
    code = (
        "import json, pyarrow as pa; from filters.dedup.minhash import minhash; "
        "print(json.dumps(minhash(pa.array(['the quick brown fox jumps over the lazy dog']))"
        "[0].tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    sig = json.loads(out.stdout)
    assert sig == minhash(pa.array(["the quick brown fox jumps over the lazy dog"]))[0].tolist()
    assert sig[:4] == [96209328, 575674953, 2437310353, 591379358]  # pinned


def test_signatures_do_not_depend_on_batching():
    texts = [doc(i, n) for i, n in enumerate([300, 2, 0, 40, 700, 5, 1, 300])] + ["", "a b c"]
    alone = np.stack([minhash(pa.array([t]))[0] for t in texts])
    assert np.array_equal(minhash(pa.array(texts)), alone)
    chunked = pa.chunked_array([pa.array(texts[:3]), pa.array(texts[3:])])
    assert np.array_equal(minhash(chunked), alone)
    assert np.array_equal(minhash(pa.array(texts).slice(3)), alone[3:])
    empty = alone[[2, 8]]
    assert (empty == np.iinfo(np.uint32).max).all()  # no shingles, left out of LSH


def test_short_documents_get_one_shingle_of_all_their_words():
    sigs = minhash(pa.array(["red fox", "Red, fox!", "fox red", "red fox jumps"]))
    assert np.array_equal(sigs[0], sigs[1])
    assert jaccard_estimate(sigs[0], sigs[2]) < 0.1
    assert jaccard_estimate(sigs[0], sigs[3]) < 0.1


def test_jaccard_estimate_is_close_to_the_true_jaccard():
    a = doc(7, 400)
    b = " ".join(a.split(" ")[:300] + doc(8, 100).split(" "))
    sa, sb = shingles(a), shingles(b)
    true = len(sa & sb) / len(sa | sb)
    sig = minhash(pa.array([a, b]))
    assert 0.5 < true < 0.7
    # 112 permutations: standard error sqrt(J(1-J)/112) ~ 0.05.
    assert abs(jaccard_estimate(sig[0], sig[1]) - true) < 0.15


# --- clusters ------------------------------------------------------------------------------


def test_near_duplicates_cluster_and_unrelated_texts_do_not():
    base = doc(1)
    got = clusters_of(
        {
            "b-orig": base,
            "a-edit": edit(base, [50, 150, 250]),  # 3 words of 300 changed
            "c-other": doc(2),
            "d-other": doc(3),
        }
    )
    assert got == {
        "a-edit": ("a-edit", 2, "kept"),  # the smallest id is kept
        "b-orig": ("a-edit", 2, "near_duplicate"),
    }


def test_exact_duplicates_differ_only_in_case_whitespace_and_punctuation():
    base = doc(4)
    got = clusters_of(
        {
            "k": base,
            "j": base.upper(),
            "m": "  " + base.replace(" ", "\n\n").replace(".", " ;") + "\t",
            "z": doc(5),
        },
        near=False,
    )
    assert got == {
        "j": ("j", 3, "kept"),
        "k": ("j", 3, "exact_duplicate"),
        "m": ("j", 3, "exact_duplicate"),
    }


def test_exact_copies_of_a_near_duplicate_join_its_cluster():
    base = doc(6)
    near = edit(base, [10, 200])
    got = clusters_of({"a": base, "m": near, "z": near.upper(), "q": None, "r": doc(9)})
    assert got == {
        "a": ("a", 3, "kept"),
        "m": ("a", 3, "near_duplicate"),  # nothing exactly like it is kept
        "z": ("a", 3, "exact_duplicate"),  # "m" has exactly its text
    }


def test_connected_components_link_a_long_chain_to_its_smallest_node():
    n = 1000
    perm = np.random.default_rng(0).permutation(n)
    src, dst = perm[:-1], perm[1:]  # one path visiting every node in random order
    extra = np.array([n, n + 1])  # plus a separate pair
    root = connected_components(np.r_[src, extra[:1]], np.r_[dst, extra[1:]], n + 2)
    assert (root[:n] == 0).all() and (root[n:] == n).all()


# --- prepare: in-process and on Ray ----------------------------------------------------------


def _write_parts(folder: Path) -> tuple[list[str], dict[str, str | None]]:
    """Three stage-output parts with exact and near duplicates across parts, a dropped row,
    a null text and two texts that normalise to nothing."""
    base, other = doc(10), doc(11)
    rows = {
        "d-base": base,
        "a-near": edit(base, [20, 120]),
        "x-exact": base.lower(),
        "e-other": other,
        "f-other-near": edit(other, [5, 100, 290]),
        "g-unique": doc(12),
        "h-unique": doc(13, 4),
        "i-punct": "!!!",
        "j-punct": "?? ...",
        "k-null": None,
        "b-dropped": base,  # an earlier stage dropped it: not a candidate
    }
    dropped = {"b-dropped": "quality:too_short"}
    ids = list(rows)
    paths = []
    for p in range(3):
        part = ids[p::3]
        table = pa.table(
            {
                "id": part,
                "text": pa.array([rows[i] for i in part], pa.large_string()),
                "drop_reason": pa.array([dropped.get(i) for i in part], pa.string()),
            }
        )
        path = folder / f"part-{p}.parquet"
        pq.write_table(table, path)
        paths.append(str(path))
    return paths, rows


EXPECTED = {
    "a-near": ("a-near", 3, "kept"),
    "d-base": ("a-near", 3, "near_duplicate"),
    "x-exact": ("a-near", 3, "exact_duplicate"),
    "e-other": ("e-other", 2, "kept"),
    "f-other-near": ("e-other", 2, "near_duplicate"),
    "i-punct": ("i-punct", 2, "kept"),
    "j-punct": ("i-punct", 2, "exact_duplicate"),
}


class HereAsOnACluster(LocalExecutor):
    """An executor that says it runs work on a cluster and runs it here, in item order:
    dedup fans out over it exactly as over Ray, without Ray's start-up."""

    uses_ray = True


def test_small_inputs_are_not_fanned_out(tmp_path, caplog):
    paths, _ = _write_parts(tmp_path)
    caplog.set_level("INFO", logger="primer")
    DedupStage().prepare(paths, str(tmp_path / "state"), HereAsOnACluster())
    assert "clusters computed in the driver" in caplog.text
    assert json.loads((tmp_path / "state" / "_DONE").read_text())["fanned_out"] is False


def test_fanned_out_prepare_gives_the_in_driver_clusters_and_cleans_up(tmp_path):
    paths, _ = _write_parts(tmp_path)
    paths += _shards(tmp_path)  # raw JSONL inputs, read by each map task as the runner would
    files = {}
    for fan_out, partitions in ((False, 1), (True, 1), (True, 4), (True, 11)):
        state = tmp_path / f"state-{fan_out}-{partitions}"
        executor = HereAsOnACluster() if fan_out else LOCAL
        # 11: more partitions than clusters, so some partitions are empty.
        stage = DedupStage(num_partitions=partitions, ray_min_rows=0 if fan_out else 10**9)
        stage.prepare(paths, str(state), executor)
        assert json.loads((state / "_DONE").read_text())["fanned_out"] is fan_out
        assert sorted(p.name for p in state.iterdir()) == ["_DONE", "clusters"]
        files[fan_out, partitions] = cluster_files_in(state / "clusters")
    first = files[False, 1]
    assert len(first) == 3  # one file per source: the parts' rows (no source_path), a, b
    for other in files.values():
        assert other.keys() == first.keys()
        assert all(other[name].equals(first[name]) for name in first)
    assert sum(map(len, first.values())) == len(EXPECTED) + len(SHARD_LABELS) - 1


def test_fan_out_is_chosen_by_input_rows_on_any_executor(tmp_path):
    paths, _ = _write_parts(tmp_path)  # 11 rows of stage output in all
    shards = _shards(tmp_path)  # raw inputs: rows unknown without reading them
    here = DedupConfig(ray_min_rows=11)
    assert fans_out(paths, here, LOCAL) and fans_out(paths, here, ProcessExecutor(3))
    assert not fans_out(paths, DedupConfig(ray_min_rows=12), HereAsOnACluster())
    assert not fans_out(shards, here, LOCAL) and fans_out(shards, here, HereAsOnACluster())
    assert fans_out(shards, DedupConfig(ray_min_rows=0), LOCAL)
    assert not fans_out(
        [pa.table({"id": ["a"], "text": ["x"]})], DedupConfig(ray_min_rows=0), LOCAL
    )
    DedupStage(ray_min_rows=11, num_partitions=2).prepare(paths, str(tmp_path / "s"), LOCAL)
    assert json.loads((tmp_path / "s" / "_DONE").read_text())["fanned_out"] is True


# --- distributed connected components against union-find ---------------------------------

_PATHS = ["", "s/a.jsonl", "s/b.jsonl", "s/c.jsonl"]  # "": rows without a source_path
_SOURCES = pa.table({"prefix": [source_prefix(p) for p in _PATHS], "source_path": _PATHS})


def random_graph(seed: int, chain: int = 80, n: int = 480) -> pa.Table:
    """Bucket-like edges (src, dst, exact), dst the smaller node as in `bucket_edges`: one
    chain of `chain` nodes in random order, paths, stars and exact groups (stars around
    their smallest node, each node in at most one), random links between them. Ids come
    from a small range, so the same id recurs across sources."""
    rng = np.random.default_rng(seed)
    prefixes = _SOURCES["prefix"].to_pylist()
    pool = sorted({prefixes[rng.integers(4)] + str(rng.integers(300)) for _ in range(3 * n)})
    nodes = [pool[i] for i in rng.permutation(len(pool))[:n]]
    edges: list[tuple[str, str, int]] = []

    def link(a: str, b: str, exact: int = 0) -> None:
        edges.append((max(a, b), min(a, b), exact))

    for a, b in zip(nodes[: chain - 1], nodes[1:chain], strict=True):
        link(a, b)
    i = chain
    while i < n - 8:
        group, shape = nodes[i : i + int(rng.integers(2, 8))], rng.integers(3)
        i += len(group)
        if shape == 0:
            for a, b in zip(group, group[1:], strict=False):
                link(a, b)
        else:
            hub = group[0] if shape == 1 else min(group)
            for b in group:
                if b != hub:
                    link(b, hub, int(shape == 2))
    for _ in range(n // 12):
        a, b = rng.choice(nodes, 2, replace=False)
        link(str(a), str(b))
    src, dst, exact = zip(*edges, strict=True)
    return pa.table({"src": src, "dst": dst, "exact": pa.array(exact, pa.int8())})


def check_against_union_find(
    edges: pa.Table, folder: Path, partitions: int, executor: Executor, seed: int = 0
) -> dict:
    """The fanned-out steps from routed edges to cluster files give union-find's files.
    Edges are routed by 3 writers, some by two of them (as pairs linked in several bands)."""
    want, scratch, out = folder / "want", folder / "scratch", folder / "out"
    for d in (want, scratch, out):
        d.mkdir()
    write_source_files(clusters_from_edges(unique_edges(edges), _SOURCES), want)
    pq.write_table(_SOURCES, scratch / "sources.parquet")
    nodes = pa.concat_arrays([edges["src"].combine_chunks(), edges["dst"].combine_chunks()])
    splitters = choose_splitters(node_sample(nodes, 16 * partitions), _SOURCES, partitions)
    rng = np.random.default_rng(seed)
    writer, again = rng.integers(3, size=len(edges)), rng.random(len(edges)) < 0.1
    for w in range(3):
        mine = pa.array((writer == w) | again)
        route_edges(edges.filter(mine), str(scratch), w, _SOURCES, splitters, partitions)
    sources_file = str(scratch / "sources.parquet")
    info = clusters_from_routed_edges(str(scratch), sources_file, partitions, str(out), executor)
    got, expected = cluster_files_in(out), cluster_files_in(want)
    assert got.keys() == expected.keys()
    for name, table in expected.items():
        assert got[name].equals(table), name
    return info


@pytest.mark.parametrize(("seed", "partitions"), [(0, 1), (1, 3), (2, 6)])
def test_distributed_components_give_union_finds_clusters(tmp_path, seed, partitions):
    info = check_against_union_find(random_graph(seed), tmp_path, partitions, LOCAL, seed)
    assert info["kept"] < info["near_duplicate"] and info["exact_duplicate"] > 0
    assert info["files"] == 4


def test_a_long_chain_converges_to_its_smallest_node(tmp_path):
    # Nodes in rank order along the chain: the slowest case for the star steps.
    prefix = source_prefix("s/a.jsonl")
    nodes = [f"{prefix}{i:04d}" for i in range(300)]
    edges = pa.table(
        {"src": nodes[1:], "dst": nodes[:-1], "exact": pa.array(np.zeros(299, np.int8))}
    )
    info = check_against_union_find(edges, tmp_path, 3, LOCAL)
    assert info == {
        "documents_in_clusters": 300,
        "files": 1,
        "components_steps": info["components_steps"],
        "kept": 1,
        "exact_duplicate": 0,
        "near_duplicate": 299,
    }
    assert 4 < info["components_steps"] < 40


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 3])
def test_distributed_components_in_local_processes(tmp_path, workers):
    check_against_union_find(
        random_graph(5, chain=30, n=120), tmp_path, 4, ProcessExecutor(workers)
    )


def test_fanned_out_prepare_checks_repeated_rows(tmp_path):
    # The same source file reaching dedup twice would repeat all of its documents.
    src = pa.array(["shard.jsonl"] * 2)
    one = tmp_path / "one.parquet"
    pq.write_table(
        pa.table({"id": ["1", "2"], "text": [doc(32), doc(33)], "source_path": src}), one
    )
    with pytest.raises(DuplicateRowError, match="come in through 2 inputs"):
        DedupStage(ray_min_rows=0).prepare([str(one)] * 2, str(tmp_path / "s2"), HereAsOnACluster())


class KilledAfter(LocalExecutor):
    """Runs `maps` map steps, then fails in the middle of the next one, as a killed driver
    would stop: its partition files, half a step and no `_DONE` are left behind."""

    def __init__(self, maps: int) -> None:
        self.left = maps

    def map(self, fn, items, **kwargs):
        self.left -= 1
        for i, result in enumerate(super().map(fn, items, **kwargs)):
            if self.left < 0 and i == len(items) // 2:
                raise KeyboardInterrupt("killed")
            yield result


def test_a_killed_prepare_starts_again_cleanly(tmp_path):
    paths, _ = _write_parts(tmp_path)
    paths += _shards(tmp_path)
    stage = DedupStage(num_partitions=3, ray_min_rows=0)
    stage.prepare(paths, str(tmp_path / "clean"), LOCAL)
    want = cluster_files_in(tmp_path / "clean" / "clusters")
    state = tmp_path / "state"
    # Killed in the edges step, in the first components step, writing the cluster files.
    for maps in (1, 4, 7):
        with pytest.raises(KeyboardInterrupt):
            stage.prepare(paths, str(state), KilledAfter(maps))
        assert not (state / "_DONE").exists() and (state / "partitions").is_dir()
    stage.prepare(paths, str(state), LOCAL)
    assert sorted(p.name for p in state.iterdir()) == ["_DONE", "clusters"]
    got = cluster_files_in(state / "clusters")
    assert got.keys() == want.keys() and all(got[k].equals(want[k]) for k in want)


@pytest.mark.slow
def test_fanned_out_prepare_in_one_or_three_local_processes(tmp_path):
    paths, _ = _write_parts(tmp_path)
    paths += _shards(tmp_path)
    files = []
    for executor in (LOCAL, ProcessExecutor(1), ProcessExecutor(3)):
        state = tmp_path / f"state-{len(files)}"
        DedupStage(num_partitions=4, ray_min_rows=0).prepare(paths, str(state), executor)
        files.append(cluster_files_in(state / "clusters"))
    for other in files[1:]:
        assert other.keys() == files[0].keys()
        assert all(other[k].equals(files[0][k]) for k in files[0])


def test_stage_marks_duplicates_in_every_part(tmp_path):
    paths, rows = _write_parts(tmp_path)
    stage = DedupStage()
    stage.prepare(paths, str(tmp_path / "state"))
    stage = pickle.loads(pickle.dumps(stage))  # as Ray ships it: config and state_dir
    outs = [stage(pq.read_table(p)) for p in paths]
    # A part's rows come from one source (here: none), and only its file was loaded.
    assert list(stage._lookup._cache) == [source_prefix("")]
    out = pa.concat_tables(outs).to_pylist()
    by_id = {r["id"]: r for r in out}

    assert len(out) == len(rows)  # nothing removed: kept + dropped == input
    kept = [r for r in out if r["drop_reason"] is None]
    dropped = [r for r in out if r["drop_reason"] is not None]
    assert len(kept) + len(dropped) == len(rows)
    assert {r["id"]: r["drop_reason"] for r in dropped} == {
        "d-base": "dedup:near_duplicate",
        "x-exact": "dedup:exact_duplicate",
        "f-other-near": "dedup:near_duplicate",
        "j-punct": "dedup:exact_duplicate",
        "b-dropped": "quality:too_short",  # an earlier reason is never overwritten
    }
    for i, (cluster, size, _) in EXPECTED.items():
        assert (by_id[i]["dup_cluster"], by_id[i]["dup_cluster_size"]) == (cluster, size)
    for i in ("g-unique", "h-unique", "k-null", "b-dropped"):
        assert (by_id[i]["dup_cluster"], by_id[i]["dup_cluster_size"]) == (i, 1)
    assert by_id["x-exact"]["text_hash"] == by_id["d-base"]["text_hash"]
    assert by_id["k-null"]["text_hash"] is None
    assert outs[0].schema.field("text_hash").type == pa.uint64()


def test_prepare_reuses_a_finished_state_as_it_is(tmp_path):
    paths, _ = _write_parts(tmp_path)
    state = tmp_path / "state"
    DedupStage().prepare(paths, str(state))
    first = {f.name: f.read_bytes() for f in (state / "clusters").iterdir()}
    # Deciding whether a state is stale is the runner's job (it deletes the folder).
    DedupStage(near=False).prepare(paths[:1], str(state))
    assert {f.name: f.read_bytes() for f in (state / "clusters").iterdir()} == first


def test_a_state_of_an_older_dedup_says_what_to_do(tmp_path):
    (tmp_path / "_DONE").write_text("{}")
    (tmp_path / "clusters.parquet").write_bytes(b"")
    stage = DedupStage()
    stage.state_dir = str(tmp_path)
    with pytest.raises(RuntimeError, match="older dedup.*delete the state folder"):
        stage(pa.table({"id": ["a"], "text": ["x"]}))


def test_the_runner_recomputes_the_state_only_when_the_config_changes(tmp_path):
    paths, _ = _write_parts(tmp_path)
    out = tmp_path / "out"
    state = out / "dedup" / "_state"

    def kinds() -> list[str]:
        return sorted(pc.unique(read_clusters(state)["dup_kind"]).to_pylist())

    run_stage(DedupStage(), paths, out)
    assert kinds() == ["exact_duplicate", "kept", "near_duplicate"]
    (state / "marker").write_text("the state of the first run")
    run_stage(DedupStage(), paths, out)
    # Where the clusters are computed (transport keys) changes nothing either.
    run_stage(DedupStage(num_partitions=3, ray_min_rows=10), paths, out)
    assert (state / "marker").is_file()
    m = run_stage(DedupStage(near=False), paths, out)
    assert not (state / "marker").exists()
    assert kinds() == ["exact_duplicate", "kept"]
    assert m["dropped"] == {"dedup:exact_duplicate": 2}


def test_process_before_prepare_says_what_to_do(tmp_path):
    stage = DedupStage()
    stage.state_dir = str(tmp_path)
    with pytest.raises(RuntimeError, match="call prepare"):
        stage(pa.table({"id": ["a"], "text": ["x"]}))


def test_config_needs_exact_or_near():
    with pytest.raises(ValidationError, match="enable at least one"):
        DedupConfig(exact=False, near=False)
    with pytest.raises(ValidationError, match="bands"):
        DedupConfig(bands=0)


def test_normalise_takes_batches_that_start_with_empty_or_punctuation_only_text():
    got = normalise(pa.array(["", "a"])).to_pylist()
    assert got == ["", "a"]
    assert normalise(pa.array([None, "A  b"])).to_pylist() == [None, "a b"]
    assert normalise(pa.array(["!!!", "a   b", ""])).to_pylist() == ["", "a b", ""]


# --- the same id in different parts ------------------------------------------------------------


def _shards(folder: Path) -> list[str]:
    """Two JSONL shards that both number their rows from 0, as independent dumps do; ids
    7 (a number) and "7" (a string) both read as "7"."""
    base, other = doc(20), doc(21)
    shards = {
        "a.jsonl": [
            {"id": 0, "text": base},
            {"id": 1, "text": doc(22)},
            {"id": 7, "text": other},
        ],
        "b.jsonl": [
            {"id": 0, "text": base.upper()},  # the same text as a.jsonl's 0: one is kept
            {"id": 1, "text": doc(23)},  # the same id as a.jsonl's 1, another text
            {"id": "7", "text": other},
            {"id": 2, "text": edit(doc(22), [30, 200])},  # near a.jsonl's 1
        ],
    }
    paths = []
    for name, rows in shards.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(folder / name))
    return paths


def _labels(stage: DedupStage, paths: list[str]) -> dict[tuple[str, str], tuple]:
    from pipeline.readers import iter_batches

    out = pa.concat_tables(stage(t) for p in paths for t in iter_batches(p))
    return {
        (Path(r["source_path"]).name, r["id"]): (r["drop_reason"], r["dup_cluster"])
        for r in out.to_pylist()
    }


SHARD_LABELS = {
    ("a.jsonl", "0"): (None, "0"),  # id "0" twice: a.jsonl sorts first, so it is kept
    ("b.jsonl", "0"): ("dedup:exact_duplicate", "0"),
    ("a.jsonl", "1"): (None, "1"),
    ("b.jsonl", "1"): (None, "1"),  # same id, different text: no cluster at all
    ("b.jsonl", "2"): ("dedup:near_duplicate", "1"),
    ("a.jsonl", "7"): (None, "7"),
    ("b.jsonl", "7"): ("dedup:exact_duplicate", "7"),
}


def test_the_same_id_in_two_shards_is_two_documents(tmp_path):
    paths = _shards(tmp_path)
    stage = DedupStage()
    stage.prepare(paths, str(tmp_path / "state"))
    assert _labels(stage, paths) == SHARD_LABELS
    clusters = read_clusters(tmp_path / "state").to_pylist()
    assert [(Path(r["source_path"]).name, r["id"], r["dup_cluster_size"]) for r in clusters] == [
        ("a.jsonl", "0", 2), ("b.jsonl", "0", 2), ("a.jsonl", "1", 2), ("b.jsonl", "2", 2),
        ("a.jsonl", "7", 2), ("b.jsonl", "7", 2),
    ]  # fmt: skip
    # The kept document does not depend on the order the inputs come in.
    again = DedupStage()
    again.prepare(paths[::-1], str(tmp_path / "state-reversed"))
    assert _labels(again, paths) == SHARD_LABELS


def test_in_driver_and_ray_prepare_give_identical_clusters(tmp_path, ray_ctx):
    from pipeline.readers import iter_batches

    # Stage parts without source_path, and parts of two shards that repeat each other's ids
    # carrying their rows' source_path (as the runner hands them on): one fan-out on Ray.
    paths, _ = _write_parts(tmp_path)
    (tmp_path / "raw").mkdir()
    for i, shard in enumerate(_shards(tmp_path / "raw")):
        paths.append(str(tmp_path / f"shard-{i}.parquet"))
        pq.write_table(pa.concat_tables(iter_batches(shard)), paths[-1])
    tables = {}
    for use_ray in (False, True):
        state = tmp_path / f"state-{use_ray}"
        executor = RayExecutor() if use_ray else LOCAL
        # ray_min_rows=0: fanned out over Ray even for this small input
        stage = DedupStage(num_partitions=2, ray_min_rows=0 if use_ray else 10**9)
        stage.prepare(paths, str(state), executor)
        assert json.loads((state / "_DONE").read_text())["fanned_out"] is use_ray
        assert not (state / "partitions").exists()
        tables[use_ray] = read_clusters(state)
    assert tables[False].equals(tables[True])
    rows = tables[True].to_pylist()
    got = {
        r["id"]: (r["dup_cluster"], r["dup_cluster_size"], r["dup_kind"])
        for r in rows
        if r["source_path"] is None
    }
    assert got == EXPECTED
    shards = {
        (Path(r["source_path"]).name, r["id"]): (r["dup_cluster"], r["dup_kind"])
        for r in rows
        if r["source_path"] is not None
    }
    assert shards == {
        ("a.jsonl", "0"): ("0", "kept"),
        ("b.jsonl", "0"): ("0", "exact_duplicate"),
        ("a.jsonl", "1"): ("1", "kept"),
        ("b.jsonl", "2"): ("1", "near_duplicate"),
        ("a.jsonl", "7"): ("7", "kept"),
        ("b.jsonl", "7"): ("7", "exact_duplicate"),
    }


def test_rows_that_share_source_and_id_are_an_error_not_a_silent_keep(tmp_path):
    twice = pa.table({"id": ["7", "7", "8"], "text": [doc(30), doc(30), doc(31)]})
    with pytest.raises(DuplicateRowError, match=r"id '7' from source_path ''"):
        DedupStage().prepare([twice], str(tmp_path / "s1"))
    # Across inputs too: rows without a source_path must have ids unique among them all.
    one, other = twice.slice(0, 1), twice.slice(1)
    with pytest.raises(DuplicateRowError, match="more than one kept row of the inputs"):
        DedupStage().prepare([one, other], str(tmp_path / "s2"))
    # The same source file reaching dedup twice would repeat all of its documents.
    src = pa.array(["shard.jsonl"] * 2)
    a = pa.table({"id": ["1", "2"], "text": [doc(32), doc(33)], "source_path": src})
    b = pa.table({"id": ["3", "4"], "text": [doc(34), doc(35)], "source_path": src})
    with pytest.raises(DuplicateRowError, match="'shard.jsonl' come in through 2 inputs"):
        DedupStage().prepare([a, b], str(tmp_path / "s3"))
    pq.write_table(a.append_column("drop_reason", pa.nulls(2, pa.string())), tmp_path / "a.parquet")
    with pytest.raises(DuplicateRowError, match="come in through 2 inputs"):
        DedupStage().prepare([str(tmp_path / "a.parquet")] * 2, str(tmp_path / "s5"))
    # process() over a batch with such rows says so too, whatever the state holds.
    stage = DedupStage()
    stage.prepare([twice.slice(1)], str(tmp_path / "s4"))
    with pytest.raises(DuplicateRowError, match="this batch"):
        stage(twice)
    # A row dropped earlier is not judged, so it may repeat a kept row's pair.
    dropped = twice.append_column("drop_reason", pa.array([None, "quality:x", None]))
    assert stage(dropped)["drop_reason"].to_pylist() == [None, "quality:x", None]


def test_rows_whose_keys_share_a_64_bit_hash_are_still_told_apart(tmp_path, monkeypatch):
    paths = _shards(tmp_path)
    stage = DedupStage()
    stage.prepare(paths, str(tmp_path / "state"))
    # Every node hashing alike: the lookup must compare the nodes themselves.
    monkeypatch.setattr(cluster_files, "node_hash", lambda nodes: np.zeros(len(nodes), np.uint64))
    assert _labels(stage, paths) == SHARD_LABELS
