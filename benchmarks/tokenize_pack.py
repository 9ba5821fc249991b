"""Tokenize + pack (the `mixture` stage) against the raw HF fast tokenizer's `encode_batch`.

What: Phi-3 tokens/second per core of the mixture stage (filter, tokenize, EOS, draw, route,
Megatron shards and sidecars, manifest) against the floor: `tokenizers.Tokenizer.encode_batch`
over the same texts with the same vocabulary, one thread. Target from the issue: the whole
stage as the recipe runs it on Ray reaches >= 0.9 of the floor per core at 10x the sample,
with peak memory at 10x no higher than at 1x.

How:
- Input: the 500-document FineWeb sample (../shared/data/web_text/fineweb_sample),
  replicated to `scale x 500` documents (ids suffixed `/k`), written as Parquet parts of
  500 rows shaped like a previous stage's output (id, text, drop_reason null), cached
  under `.bench/tokenize_pack/`.
- Rows, each in its own subprocess with every thread pool at one thread:
  - `raw`: the floor, pinned to one core; texts read untimed, then
    `encode_batch(texts, add_special_tokens=False)` per 1,000 rows, timed, best of 3 passes.
  - `stage-local`: `MixtureStage.build()` (in this process), pinned to one core, one phase
    taking every token of the input (on_short: scale), token cache emptied first; timed
    from the call to the manifest (reading, tokenizing, shards; the driver's tokenizer
    load before the clock). Peak RSS (VmHWM) of the process is the memory figure.
  - `stage-ray`: as a recipe runs it: a local Ray with `--ray-cpus` CPUs, warmed as a
    recipe's earlier stages leave it (ray.init and one trivial map, untimed), then
    `run_stage(MixtureStage, RayExecutor())` timed; per core = tokens / wall / CPUs.
    Worker imports and the tokenizer load per worker are included.
  - `stage-ray-cold`: the same on a Ray that has run nothing yet (Ray Data's first dataset
    starts its own actors, every worker imports Primer).
  Each stage row also reports the seconds spent inside the tokenize calls summed over
  parts ("in parts"): a row's wall x cores minus that is start-up, scheduling and the
  steps after tokenizing.
- Tokens are the documents' own tokens (the EOS Primer appends is not counted), so every
  row counts the same tokens.

Run:
    .venv/bin/python -m benchmarks.tokenize_pack                   # scales 1 and 10, ~2 min
    .venv/bin/python -m benchmarks.tokenize_pack --scales 1 10 40
Results are also written to `.bench/tokenize_pack.json`.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.web_stages import (  # noqa: E402
    BENCH,
    FINEWEB,
    ONE_THREAD,
    _fineweb_sample,
    _peak_rss_mb,
    _replicate,
)

WORK = BENCH / "tokenize_pack"
PART_ROWS = 500
TARGET = 0.9


def prepare_input(scale: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = WORK / f"x{scale}"
    done = folder / "_DONE"
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        base = _fineweb_sample().select(["id", "text"])
        table = _replicate(base, scale * len(base))
        table = table.append_column("drop_reason", pa.nulls(len(table), pa.string()))
        for i in range(0, len(table), PART_ROWS):
            pq.write_table(table.slice(i, PART_ROWS), folder / f"part-{i // PART_ROWS:05d}.parquet")
        done.write_text("ok\n")
    return sorted(str(p) for p in folder.glob("part-*.parquet"))


def _stage(paths: list[str]) -> Any:
    from pipeline.tokens.mixture import MixtureStage

    return MixtureStage(
        on_short="scale",
        phases=[
            {
                "name": "all",
                "tokens": "1T",
                "sources": [{"name": "fineweb", "input": paths, "weight": 1.0}],
            }
        ],
    )


def _tokens(out: Path, stats: dict) -> tuple[int, int, dict]:
    m = json.loads((out / "mixture" / "manifest.json").read_text())
    phase = m["phases"][0]
    seconds = stats["seconds"]  # the build's timings (the manifest holds none)
    # Seconds spent inside the tokenize calls, summed over parts: the rest of a row's
    # wall x cores is start-up, scheduling and the steps after tokenizing.
    in_parts = sum(
        json.loads(p.read_text())["seconds"] for p in (out / "_cache" / "tokens").glob("*.json")
    )
    split = {
        "tokenize_s": seconds["tokenize"],
        "build_s": seconds["total"],
        "in_parts_s": round(in_parts, 3),
    }
    return phase["tokens"] - phase["documents"], phase["documents"], split  # EOS not counted


def raw(paths: list[str], spec: dict) -> dict:
    import pyarrow.parquet as pq
    import tokenizers

    from pipeline.tokens.tokenizer import phi3_tokenizer_json

    tok = tokenizers.Tokenizer.from_file(str(phi3_tokenizer_json()))
    batches = [pq.read_table(p, columns=["text"])["text"].to_pylist() for p in paths]
    tok.encode_batch(batches[0][:8], add_special_tokens=False)  # warm-up
    best = None
    for _ in range(3):
        t0, n = time.perf_counter(), 0
        for texts in batches:
            n += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        wall = time.perf_counter() - t0
        best = wall if best is None else min(best, wall)
    return {"tokens": n, "wall_s": best, "cores": 1, "peak_rss_mb": _peak_rss_mb()}


def stage_local(paths: list[str], spec: dict) -> dict:
    out = WORK / "out-local"
    shutil.rmtree(out, ignore_errors=True)
    stage = _stage(paths)
    t0 = time.perf_counter()
    stats = stage.build(paths, str(out / "mixture"))
    wall = time.perf_counter() - t0
    tokens, docs, split = _tokens(out, stats)
    return {
        "tokens": tokens,
        "docs": docs,
        "wall_s": wall,
        "cores": 1,
        "peak_rss_mb": _peak_rss_mb(),
    } | split


def stage_ray(paths: list[str], spec: dict) -> dict:
    import ray

    from pipeline.executor import RayExecutor, init_ray
    from pipeline.stage_runner import run_stage

    out = WORK / "out-ray"
    shutil.rmtree(out, ignore_errors=True)
    executor = init_ray(num_cpus=spec["ray_cpus"])
    if spec["row"] == "stage-ray":
        # As in a recipe, where earlier stages ran on this Ray: Ray Data's own actors are up
        # and the workers have imported Primer (untimed, like ray.init).
        list(executor.map(abs, list(range(-spec["ray_cpus"], 0))))
    t0 = time.perf_counter()
    manifest = run_stage(_stage(paths), paths, out, RayExecutor())
    wall = time.perf_counter() - t0
    ray.shutdown()
    tokens, docs, split = _tokens(out, manifest["artifact"])
    return {
        "tokens": tokens,
        "docs": docs,
        "wall_s": wall,
        "cores": spec["ray_cpus"],
        "peak_rss_mb": _peak_rss_mb(),  # the driver only
    } | split


ROWS = {"raw": raw, "stage-local": stage_local, "stage-ray": stage_ray, "stage-ray-cold": stage_ray}


def child_main(spec: dict) -> None:
    if spec.get("pin", True):
        os.sched_setaffinity(0, {0})
    result = ROWS[spec["row"]](spec["paths"], spec)
    print("RESULT " + json.dumps(result))


def run_row(row: str, paths: list[str], args: argparse.Namespace) -> dict:
    spec = {
        "row": row,
        "paths": paths,
        "ray_cpus": args.ray_cpus,
        "pin": not row.startswith("stage-ray"),
    }
    env = dict(os.environ, **ONE_THREAD, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.tokenize_pack", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=args.timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{row} failed:\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--rows", nargs="+", default=list(ROWS)[1:], choices=list(ROWS)[1:])
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    if not FINEWEB.is_dir():
        raise SystemExit(f"no FineWeb sample at {FINEWEB}")

    from pipeline.tokens.tokenizer import load_tokenizer

    load_tokenizer("phi3")  # fetch + convert once, outside every timing
    results: dict[str, dict[str, dict]] = {}
    for scale in args.scales:
        paths = prepare_input(scale)
        results[str(scale)] = {row: run_row(row, paths, args) for row in ["raw", *args.rows]}

    print(f"\ntokenize + pack, Phi-3 vocabulary, FineWeb sample x scale ({PART_ROWS}-row parts)")
    print(
        f"{'scale':>6} {'row':<14}{'tokens':>12}{'wall s':>9}{'tok/s/core':>13}{'x floor':>9}{'peak MB':>9}"
    )
    verdicts = []
    for scale, rows in results.items():
        floor = rows["raw"]["tokens"] / rows["raw"]["wall_s"]
        for row, r in rows.items():
            rate = r["tokens"] / r["wall_s"] / r["cores"]
            r["tokens_per_s_per_core"], r["ratio"] = rate, rate / floor
            print(
                f"{scale:>6} {row:<14}{r['tokens']:>12,}{r['wall_s']:>9.2f}{rate:>13,.0f}"
                f"{rate / floor:>9.2f}{r['peak_rss_mb']:>9.0f}"
                + (
                    f"  tokenize {r['tokenize_s']:.1f} s of {r['build_s']:.1f} s,"
                    f" in parts {r['in_parts_s']:.1f} core-s"
                    if "build_s" in r
                    else ""
                )
            )
        for row in [r for r in ("stage-local", "stage-ray", "stage-ray-cold") if r in rows]:
            ok = rows[row]["ratio"] >= TARGET
            verdicts.append(
                f"x{scale} {row}: {rows[row]['ratio']:.2f} of floor ({'PASS' if ok else 'FAIL'} >= {TARGET})"
            )
    scales = list(results)
    if len(scales) > 1 and "stage-local" in results[scales[0]]:
        lo, hi = results[scales[0]]["stage-local"], results[scales[-1]]["stage-local"]
        ok = hi["peak_rss_mb"] <= lo["peak_rss_mb"] * 1.05
        verdicts.append(
            f"peak RSS in-process x{scales[-1]} {hi['peak_rss_mb']:.0f} MB vs x{scales[0]} "
            f"{lo['peak_rss_mb']:.0f} MB ({'PASS' if ok else 'FAIL'}: no higher, 5% noise allowed)"
        )
    print("\n" + "\n".join(verdicts))
    (BENCH / "tokenize_pack.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
