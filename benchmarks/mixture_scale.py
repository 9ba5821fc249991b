"""Driver memory of the mixture stage as documents grow: this tree against an older one.

What: peak RSS (VmHWM) of the process that runs `MixtureStage.build` (the driver) and its
wall time, at `--docs` short generated documents, for this tree ("new") and for the
mixture of git revision `--old` ("old", exported read-only with `git archive`). The work
fans out to `ProcessExecutor(--workers)` processes, whose memory is not the driver's.

Why: the driver must hold per-source and per-part state only. The old mixture held a few
integers per drawn document on the driver (lengths, the drawn order) and wrote every shard
in one driver loop, so its memory and time grew with the corpus; the new one keeps per
part counts and per key-bucket token counts, and the workers draw, route and write.

How: documents of 5-40 random words (a fixed 2,000-word vocabulary, seeded) in Parquet
parts of 100,000 rows shaped like a stage output (id, text, drop_reason, bucket), cached
under `.bench/mixture_scale/`. One phase takes 60% of the tokens from two sources over
the same parts: `bulk` (bucket < 8, ~80% of the documents, weight 0.6: a fractional
epoch) and `rare` (bucket >= 8, weight 0.4: upsampled past one epoch), in shards of at most
`--shard-max-tokens` (10M: several shards at 1M documents). Each variant runs
twice in fresh subprocesses: the first tokenizes into its token cache (untimed), the
second re-mixes from the cache; its VmHWM and wall are the figures.

Run:
    .venv/bin/python -m benchmarks.mixture_scale                       # 100k and 1M docs
    .venv/bin/python -m benchmarks.mixture_scale --docs 100000 --old 544af0d
Results are also written to `.bench/mixture_scale.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".bench" / "mixture_scale"
PART_ROWS = 100_000


def prepare_input(n: int) -> list[str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = WORK / f"docs-{n}"
    if not (folder / "_DONE").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        vocab = np.array([f"w{i}" for i in range(2000)])
        for lo in range(0, n, PART_ROWS):
            m = min(PART_ROWS, n - lo)
            counts = rng.integers(5, 41, size=m)
            words = vocab[rng.integers(0, len(vocab), size=int(counts.sum()))]
            splits = np.split(words, np.cumsum(counts)[:-1])
            table = pa.table(
                {
                    "id": [f"doc-{lo + i}" for i in range(m)],
                    "text": [" ".join(s) for s in splits],
                    "drop_reason": pa.nulls(m, pa.string()),
                    "bucket": pa.array(rng.integers(0, 10, size=m), pa.int32()),
                }
            )
            pq.write_table(table, folder / f"part-{lo // PART_ROWS:05d}.parquet")
        (folder / "_DONE").write_text("ok\n")
    return sorted(str(p) for p in folder.glob("part-*.parquet"))


def old_tree(rev: str) -> Path:
    """The `pipeline` package of `rev`, exported once (git archive: no repository change)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    folder = WORK / f"tree-{sha}"
    if not (folder / "_DONE").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", sha, "pipeline"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
        (folder / "_DONE").write_text(sha + "\n")
    return folder


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_main(spec: dict[str, Any]) -> None:
    sys.path.insert(0, spec["tree"])  # ahead of the working directory's `pipeline`
    from pipeline.executor import ProcessExecutor
    from pipeline.tokens.mixture import MixtureStage

    paths = spec["paths"]
    stage = MixtureStage(
        seq_len=2048,
        seed=1,
        shard_max_tokens=spec["shard_max_tokens"],
        phases=[
            {
                "name": "phase",
                "tokens": spec["tokens"],
                "sources": [
                    {"name": "bulk", "input": paths, "filter": "bucket < 8", "weight": 0.6},
                    {
                        "name": "rare",
                        "input": paths,
                        "filter": "bucket >= 8",
                        "weight": 0.4,
                        "max_epochs": 4,
                    },
                ],  # fmt: skip
            }
        ],
    )
    executor = ProcessExecutor(spec["workers"])
    t0 = time.perf_counter()
    stats = stage.build(paths, spec["out"], executor)
    wall = time.perf_counter() - t0
    getattr(executor, "close", lambda: None)()  # an older tree's executor has none
    m = json.loads((Path(spec["out"]) / "manifest.json").read_text())
    print(
        "RESULT "
        + json.dumps(
            {
                "wall_s": round(wall, 2),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
                "tokens": m["phases"][0]["tokens"],
                "documents": m["phases"][0]["documents"],
                "shards": len(m["phases"][0]["shards"]),
                "seconds": stats.get("seconds"),
            }
        )
    )


def run_child(spec: dict[str, Any], tree: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{ROOT}", POLARS_MAX_THREADS="1")
    spec = spec | {"tree": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.mixture_scale", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{spec['variant']} failed:\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument(
        "--old", default="544af0d", help="git revision of the old mixture (the last one before it)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-max-tokens", type=int, default=10_000_000)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    trees = {"old": old_tree(args.old), "new": ROOT}
    results: dict[str, dict[str, Any]] = {}
    for n in args.docs:
        paths = prepare_input(n)
        for variant, tree in trees.items():
            out = WORK / f"out-{variant}-{n}" / "mixture"
            shutil.rmtree(out.parent, ignore_errors=True)
            spec = {
                "variant": variant,
                "paths": paths,
                "out": str(out),
                "workers": args.workers,
                "shard_max_tokens": args.shard_max_tokens,
            }
            first = run_child(spec | {"tokens": "1k"}, tree)  # fills the token cache
            probe = json.loads((out / "manifest.json").read_text())["phases"][0]["sources"]
            available = sum(s["available_tokens"] for s in probe)
            r = run_child(spec | {"tokens": int(0.6 * available)}, tree)
            r["tokenize_run_wall_s"] = first["wall_s"]
            results.setdefault(str(n), {})[variant] = r
            shutil.rmtree(out.parent, ignore_errors=True)
            print(f"{n:>10,} {variant:<4} {json.dumps(r)}", flush=True)

    print(f"\nmixture driver, re-mix from the token cache, {args.workers} worker processes")
    print(f"{'docs':>10} {'variant':<8}{'peak MB':>9}{'wall s':>8}{'drawn docs':>12}{'shards':>7}")
    for n, rows in results.items():
        for variant, r in rows.items():
            print(
                f"{int(n):>10,} {variant:<8}{r['peak_rss_mb']:>9.0f}{r['wall_s']:>8.1f}"
                f"{r['documents']:>12,}{r['shards']:>7}"
            )
    (ROOT / ".bench" / "mixture_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
