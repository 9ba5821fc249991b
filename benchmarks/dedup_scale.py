"""Dedup's prepare() at scale: driver peak memory and time, in-driver union-find vs fanned out.

What: for generated corpora of `--docs` documents (30% near or exact duplicates of other
documents, spread over `--parts` Parquet parts, each its own source_path), the driver's
peak RSS and the wall time of `DedupStage.prepare()` computed (a) in the driver (the
long form, edges and union-find all in this process), (b) fanned out over local worker
processes (`ProcessExecutor`; the driver holds only per-source and per-partition state),
(c) fanned out with every map step run in the driver process one partition at a time
(`LOCAL`). The cluster files of every mode must be identical; the script checks it.

Why: Primer must dedup billions of documents; the driver must not hold per-document state.
This shows how the driver's memory grows with the corpus on each path.

How: each mode runs in its own Python process (so peaks do not carry over); a thread in
that process samples its own RSS (psutil, every 50 ms; worker processes are not counted)
from before prepare() to after it, and reports the peak above the post-import baseline too.
The corpus is cached under `.bench/dedup_scale/<docs>/`.

Run:
    .venv/bin/python benchmarks/dedup_scale.py --docs 100000 1000000
    .venv/bin/python benchmarks/dedup_scale.py --docs 100000 --modes driver processes
Results are also written to `.bench/dedup_scale.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `pipeline` and `filters` importable
    sys.path.insert(0, str(ROOT))

BENCH = ROOT / ".bench" / "dedup_scale"
WORDS = 100  # per document: one changed word keeps Jaccard ~0.9, found by LSH ~always
VOCAB = 20_000
MODES = ("driver", "processes", "local")


def corpus(n: int, parts: int, dup_share: float = 0.3, seed: int = 0) -> list[str]:
    """Parquet parts of `n` documents: (1 - dup_share) originals, the rest copies of a
    random original with one word changed (near) or re-cased (exact, one in five)."""
    folder = BENCH / str(n)
    paths = [folder / f"part-{i:04d}.parquet" for i in range(parts)]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = pa.array(
        ["".join(rng.choice(letters, size=int(rng.integers(3, 9)))) for _ in range(VOCAB)]
    )
    n_orig = int(n * (1 - dup_share))
    words = rng.integers(VOCAB, size=(n, WORDS), dtype=np.int32)
    copy_of = rng.integers(n_orig, size=n - n_orig)
    words[n_orig:] = words[copy_of]
    near = rng.random(n - n_orig) >= 0.2
    rows = n_orig + np.flatnonzero(near)
    words[rows, rng.integers(WORDS, size=len(rows))] = rng.integers(VOCAB, size=len(rows))
    flat = vocab.take(pa.array(words.ravel()))
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, n * WORDS + 1, WORDS, np.int32)), flat)
    text = pc.binary_join(lists, " ")
    exact = np.zeros(n, bool)
    exact[n_orig:] = ~near
    text = pc.if_else(pa.array(exact), pc.utf8_upper(text), text)
    order = rng.permutation(n)  # duplicates land in other parts than their originals
    for i, chunk in enumerate(np.array_split(order, parts)):
        table = pa.table(
            {
                "id": pa.array([f"doc-{j}" for j in chunk]),
                "text": text.take(pa.array(chunk)),
                "source_path": pa.array(np.full(len(chunk), f"crawl/part-{i:04d}.jsonl.gz")),
            }
        )
        pq.write_table(table, paths[i])
    return [str(p) for p in paths]


def child(mode: str, paths: list[str], state: str, partitions: int, workers: int) -> dict:
    """One prepare() in this process, its RSS sampled every 50 ms."""
    import psutil

    from filters.dedup.dedup import DedupStage
    from pipeline.executor import LOCAL, ProcessExecutor

    me = psutil.Process()
    base = me.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fan = mode != "driver"
    stage = DedupStage(ray_min_rows=0 if fan else 10**15, num_partitions=partitions)
    executor = ProcessExecutor(workers) if mode == "processes" else LOCAL
    t0 = time.perf_counter()
    stage.prepare(paths, state, executor)
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    peak[0] = max(peak[0], me.memory_info().rss)
    done = json.loads((Path(state) / "_DONE").read_text())
    return {"mode": mode, "wall_s": round(wall, 1), "peak_rss_mib": peak[0] >> 20,
            "baseline_rss_mib": base >> 20, "above_baseline_mib": (peak[0] - base) >> 20,
            **done}  # fmt: skip


def cluster_digest(state: Path) -> str:
    """A digest of every cluster file's rows, to check that the modes agree."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((state / "clusters").iterdir()):
        h.update(f.name.encode())
        h.update(json.dumps(pq.read_table(f).to_pydict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--partitions", type=int, default=32, help="dedup's num_partitions")
    ap.add_argument("--workers", type=int, default=2, help="ProcessExecutor workers")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(child(**job)))
        return
    results = []
    for n in args.docs:
        t0 = time.perf_counter()
        paths = corpus(n, args.parts)
        print(f"{n:,} docs in {len(paths)} parts ({time.perf_counter() - t0:.0f} s to make)")
        digests = set()
        for mode in args.modes:
            state = BENCH / f"state-{n}-{mode}"
            subprocess.run(["rm", "-rf", str(state)], check=True)
            job = {"mode": mode, "paths": paths, "state": str(state),
                   "partitions": args.partitions, "workers": args.workers}  # fmt: skip
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(job)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            row = {"docs": n, **json.loads(out.stdout.strip().splitlines()[-1])}
            digests.add(cluster_digest(state))
            subprocess.run(["rm", "-rf", str(state)], check=True)
            results.append(row)
            print(
                f"  {mode:9s} {row['wall_s']:7.1f} s  driver peak RSS {row['peak_rss_mib']:6,} MiB"
                f" ({row['above_baseline_mib']:,} above its {row['baseline_rss_mib']} MiB"
                f" baseline)  in clusters {row['documents_in_clusters']:,}"
                f"  steps {row['components_steps']}"
            )
        if len(digests) != 1:
            raise SystemExit(f"the modes gave different clusters at {n:,} docs: {digests}")
        print("  identical cluster files in every mode")
    (BENCH.parent / "dedup_scale.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
