"""Scale: generated web-like documents at 100k, 1M (and 10M where time allows) through
read -> quality -> dedup -> mixture on a local Ray, per stage docs/s per core and the
driver's peak memory.

What it shows: whether the driver holds per-document state (its peak RSS would grow with
the corpus) and whether a stage's per-core rate holds as the corpus grows. The issue's
targets: the driver's peak at 1M documents at most 1.2x that at 100k in every stage, and
docs/s per core within 10% from 100k to 1M.

How:
- Documents: sentences drawn from a seeded vocabulary with English stop words, 60-240 words
  in 3-9 lines, so that most pass the quality filters; 10% are near-duplicates of an
  earlier document (a few words changed) and 3% exact copies, so dedup has clusters to
  build. Written once per scale as Parquet files of `--part-rows` rows under
  `.bench/scale/<n>/input/` (ids "g<n>", text), by a child process, so the driver's
  baseline memory is the same at every scale.
- One recipe per scale: quality (raw Parquet in), dedup, mixture (phi3 tokenizer, one phase
  taking half the tokens that dedup keeps). Each stage runs as its own `run_recipe` call on
  the same local Ray (`--ray-cpus`), so a thread in this process samples this process's
  RSS (the driver alone, every 50 ms) for that stage: the peak minus the RSS before the
  stage started is the stage's driver growth. Each scale runs in a fresh driver process,
  so the scales' peaks compare.
- docs/s per core = rows in / wall / CPUs, Ray's start-up excluded (Ray starts once, before
  the first stage).

Run:
    .venv/bin/python -m benchmarks.scale                        # 100k and 1M, ~30 min
    .venv/bin/python -m benchmarks.scale --scales 100000 1000000 10000000
Results are also written to `.bench/scale.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH = ROOT / ".bench"
WORK = BENCH / "scale"
STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "for"]


def generate(n: int, folder: Path, part_rows: int, seed: int = 0) -> list[str]:
    """`n` web-like documents as Parquet files in `folder` (reused when complete)."""
    done = folder / "_DONE"
    if done.is_file():
        return sorted(str(p) for p in folder.glob("*.parquet"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(20_000)]
    words = np.array(vocab + STOP_WORDS * 400)
    recent: list[str] = []
    for start in range(0, n, part_rows):
        ids, texts = [], []
        for i in range(start, min(n, start + part_rows)):
            r = rng.random()
            if recent and r < 0.03:
                text = recent[rng.integers(len(recent))]
            elif recent and r < 0.13:
                toks = recent[rng.integers(len(recent))].split(" ")
                for j in rng.integers(0, len(toks), 3):
                    toks[j] = str(words[rng.integers(len(words))])
                text = " ".join(toks)
            else:
                lines = []
                for _ in range(rng.integers(3, 10)):
                    w = words[rng.integers(0, len(words), rng.integers(20, 27))]
                    lines.append(" ".join(w).capitalize() + ".")
                text = "\n".join(lines)
            ids.append(f"g{i}")
            texts.append(text)
            if len(recent) < 2000:
                recent.append(text)
            elif rng.random() < 0.01:
                recent[rng.integers(len(recent))] = text
        pq.write_table(
            pa.table({"id": ids, "text": texts}), folder / f"part-{start // part_rows:05d}.parquet"
        )
    done.write_text(str(n))
    return sorted(str(p) for p in folder.glob("*.parquet"))


class RssSampler:
    """Peak RSS of this process, sampled every `every` seconds on a thread."""

    def __init__(self, every: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self.every = every
        self.peak = self.start = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def recipe(files: list[str], out: Path, tokens: int) -> dict[str, Any]:
    return {
        "name": "scale",
        "output": str(out),
        "executor": "ray",
        "stages": {
            "quality": {"input": files, "max_drop_fraction": 1.0},
            "dedup": {"max_drop_fraction": 1.0},
            "mixture": {
                "tokenizer": "phi3",
                "seed": 1,
                "on_short": "scale",
                "phases": [
                    {
                        "name": "phase1",
                        "tokens": tokens,
                        "sources": [{"name": "web", "input": "@dedup", "weight": 1.0}],
                    }
                ],
            },
        },
    }


def run_scale(n: int, cpus: int, part_rows: int) -> list[dict[str, Any]]:
    # generated in a child process, so the documents' Python objects never inflate the
    # driver's RSS that the stages are measured against
    import multiprocessing

    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        files = pool.apply(generate, (n, WORK / str(n) / "input", part_rows))
    out = WORK / str(n) / "run"
    shutil.rmtree(out, ignore_errors=True)
    # A generous budget: the mixture scales it down to what dedup kept (on_short: scale).
    raw = recipe(files, out, tokens=n * 400)
    rows = []
    for stage in ("quality", "dedup", "mixture"):
        loaded = load_recipe(raw=raw)
        with RssSampler() as rss:
            t0 = time.monotonic()
            run_recipe(loaded, only=[stage])
            wall = time.monotonic() - t0
        m = json.loads((out / stage / "_manifest.json").read_text())
        docs = m["rows_in"]  # the mixture's: documents its sources offered
        rows.append(
            {
                "docs": n,
                "stage": stage,
                "rows_in": docs,
                "wall_s": round(wall, 2),
                "docs_per_core_s": round(docs / wall / cpus, 1) if docs else None,
                "driver_peak_mb": round(rss.peak / 2**20, 1),
                "driver_growth_mb": round((rss.peak - rss.start) / 2**20, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    scales = sorted({r["docs"] for r in rows})
    lines = [
        f"{'stage':<10}{'docs':>12}{'docs/s/core':>14}{'driver peak MB':>16}{'growth MB':>11}",
    ]
    for r in rows:
        rate = "-" if r["docs_per_core_s"] is None else f"{r['docs_per_core_s']:,.0f}"
        lines.append(
            f"{r['stage']:<10}{r['docs']:>12,}{rate:>14}{r['driver_peak_mb']:>16,.0f}"
            f"{r['driver_growth_mb']:>11,.0f}"
        )
    if len(scales) >= 2:
        lo, hi = scales[0], scales[-1]
        lines.append("")
        for stage in ("quality", "dedup", "mixture"):
            a = next(r for r in rows if r["stage"] == stage and r["docs"] == lo)
            b = next(r for r in rows if r["stage"] == stage and r["docs"] == hi)
            slope = (b["driver_peak_mb"] - a["driver_peak_mb"]) * 2**20 / (hi - lo)
            ratio = b["driver_peak_mb"] / a["driver_peak_mb"]
            rate = (
                b["docs_per_core_s"] / a["docs_per_core_s"]
                if a["docs_per_core_s"] and b["docs_per_core_s"]
                else float("nan")
            )
            lines.append(
                f"{stage:<10} driver peak {hi:,} / {lo:,}: {ratio:.2f}x (target <= 1.2x), "
                f"{slope:+.1f} bytes/doc; docs/s per core {rate:.2f}x (target 0.9-1.1x)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--part-rows", type=int, default=50_000)
    p.add_argument("--rows-out", help=argparse.SUPPRESS)  # one scale, rows as JSON (a child)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.rows_out:
        from pipeline.executor import init_ray

        init_ray(num_cpus=args.ray_cpus)
        rows = [r for n in args.scales for r in run_scale(n, args.ray_cpus, args.part_rows)]
        Path(args.rows_out).write_text(json.dumps(rows))
        return 0
    # Each scale in a fresh driver process: what one stage leaves in the driver's heap (and
    # the allocator keeps) must not count against the next scale's stages.
    rows = []
    BENCH.mkdir(exist_ok=True)
    for n in args.scales:
        out = BENCH / f"scale-{n}.json"
        cmd = [sys.executable, "-m", "benchmarks.scale", "--scales", str(n), "--rows-out",
               str(out), "--ray-cpus", str(args.ray_cpus), "--part-rows", str(args.part_rows)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT)
        rows += json.loads(out.read_text())
    text = report(rows)
    print("\n" + text)
    (BENCH / "scale.json").write_text(json.dumps({"rows": rows, "report": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
