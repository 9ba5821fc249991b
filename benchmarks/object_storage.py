"""Reading inputs from an S3-compatible server against local disk, per core.

What it shows: whether Primer's readers keep their speed when the files live in a bucket
(target: Parquet parts read at >= 0.8x the local-disk rate per core). The server is moto's
S3 server in its own process on 127.0.0.1 (so it does not share the reader's core or GIL);
the reader runs pinned to one core. The same files are read through `iter_batches` from
local disk and from the bucket, alternately, best of `--repeat` runs each.

Run:
    .venv/bin/python -m benchmarks.object_storage            # 200k documents, ~1 min
Results are also written to `.bench/object_storage.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH = ROOT / ".bench"
WORK = BENCH / "object_storage"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(n: int, parts: int) -> list[Path]:
    import pyarrow.parquet as pq

    from benchmarks.scale import generate

    folder = WORK / f"input-{n}"
    if not (folder / "_DONE").is_file():
        files = generate(n, WORK / f"gen-{n}", part_rows=max(1, n // parts))
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in files:
            # row groups of 10k rows, like the stage parts Primer writes
            pq.write_table(pq.read_table(f), folder / Path(f).name, row_group_size=10_000)
        (folder / "_DONE").write_text(str(n))
    return sorted(folder.glob("*.parquet"))


def _read_all(paths: list[str]) -> tuple[int, float]:
    from pipeline.readers import iter_batches

    t0 = time.perf_counter()
    rows = 0
    for p in paths:
        for t in iter_batches(p, batch_rows=10_000):
            rows += len(t)
    return rows, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    files = _files(args.docs, args.parts)
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        )
        from pipeline import storage

        for _ in range(100):
            try:
                fs, _ = storage.filesystem("s3://bench")
                fs.mkdir("bench")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        for f in files:
            fs.put(str(f), f"bench/{f.name}")
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {0})  # the reader on one core, the server elsewhere
        local = [str(f) for f in files]
        remote = [f"s3://bench/{f.name}" for f in files]
        size = sum(f.stat().st_size for f in files)
        best = {"local": float("inf"), "s3": float("inf")}
        rows = 0
        for _ in range(args.repeat):
            for name, paths in (("local", local), ("s3", remote)):
                rows, secs = _read_all(paths)
                best[name] = min(best[name], secs)
    finally:
        server.terminate()
        server.wait()
    result = {
        "docs": rows,
        "files": len(files),
        "mb": round(size / 2**20, 1),
        "local_docs_per_core_s": round(rows / best["local"]),
        "s3_docs_per_core_s": round(rows / best["s3"]),
        "ratio": round(best["local"] / best["s3"], 2),
    }
    print(
        f"Parquet, {rows:,} documents in {len(files)} files ({result['mb']} MB), one core:\n"
        f"  local disk     {result['local_docs_per_core_s']:>10,} docs/s\n"
        f"  S3 (moto)      {result['s3_docs_per_core_s']:>10,} docs/s\n"
        f"  S3 / local     {result['ratio']:.2f}x (target >= 0.8x)"
    )
    BENCH.mkdir(exist_ok=True)
    (BENCH / "object_storage.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
