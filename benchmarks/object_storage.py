"""Reading inputs from an S3-compatible server against local disk, per core.

What it shows: whether Primer's readers keep their speed when the files live in a bucket
(target: Parquet parts read at >= 0.8x the local-disk rate per core). The same files are
read through `iter_batches` from local disk and from the bucket, alternately, best of
`--repeat` runs each. The server is moto's S3 server, a stand-in for S3, in its own process
on 127.0.0.1; the reader is pinned to one core and, where the machine has another, the
server to that one.

Two ratios, S3 over local (1.0 = as fast as local disk):
  - wall clock: documents per second of elapsed time. moto is slower than S3 here: it
    copies the whole object for each ranged GET, on one core, so this bounds the reader by
    the server's speed, not its own.
  - reader CPU ("per core", what the target is about): documents per CPU-second of the
    reading process (time.process_time: user + system time of all its threads, the
    read-ahead threads included; the server's time is not counted, but shown beside).

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


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far; NaN without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_all(paths: list[str]) -> tuple[int, float, float]:
    """(documents, wall seconds, CPU seconds of this process) to read `paths`."""
    from pipeline.readers import iter_batches

    wall, cpu = time.perf_counter(), time.process_time()
    rows = 0
    for p in paths:
        for t in iter_batches(p, batch_rows=10_000):
            rows += len(t)
    return rows, time.perf_counter() - wall, time.process_time() - cpu


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
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if cores:
            os.sched_setaffinity(0, {cores[0]})  # the reader on one core
            if len(cores) > 1:
                os.sched_setaffinity(server.pid, set(cores[1:]))  # the server elsewhere
        local = [str(f) for f in files]
        remote = [f"s3://bench/{f.name}" for f in files]
        size = sum(f.stat().st_size for f in files)
        best = {(name, k): float("inf") for name in ("local", "s3") for k in ("wall", "cpu")}
        rows, server_cpu = 0, []
        for _ in range(args.repeat):
            for name, paths in (("local", local), ("s3", remote)):
                before = _cpu_of(server.pid)
                rows, wall, cpu = _read_all(paths)
                best[name, "wall"] = min(best[name, "wall"], wall)
                best[name, "cpu"] = min(best[name, "cpu"], cpu)
                if name == "s3":
                    server_cpu.append(_cpu_of(server.pid) - before)
    finally:
        server.terminate()
        server.wait()
    result = {
        "docs": rows,
        "files": len(files),
        "mb": round(size / 2**20, 1),
        "local_docs_per_s": round(rows / best["local", "wall"]),
        "s3_docs_per_s": round(rows / best["s3", "wall"]),
        "wall_ratio": round(best["local", "wall"] / best["s3", "wall"], 2),
        "local_docs_per_cpu_s": round(rows / best["local", "cpu"]),
        "s3_docs_per_cpu_s": round(rows / best["s3", "cpu"]),
        "cpu_ratio": round(best["local", "cpu"] / best["s3", "cpu"], 2),
        "server_cpu_s": round(min(server_cpu), 2),
    }
    print(
        f"Parquet, {rows:,} documents in {len(files)} files ({result['mb']} MB), the reader "
        f"on one core, best of {args.repeat}:\n"
        f"                 docs/s (wall)   docs per reader CPU-second\n"
        f"  local disk     {result['local_docs_per_s']:>13,}   "
        f"{result['local_docs_per_cpu_s']:>13,}\n"
        f"  S3 (moto)      {result['s3_docs_per_s']:>13,}   {result['s3_docs_per_cpu_s']:>13,}\n"
        f"  S3 / local     {result['wall_ratio']:>12.2f}x   {result['cpu_ratio']:>12.2f}x"
        "   (target: >= 0.8x per core, the CPU column)\n"
        f"  moto's own CPU for one S3 pass: {result['server_cpu_s']:.2f} s (its own process, "
        "not counted above)"
    )
    BENCH.mkdir(exist_ok=True)
    (BENCH / "object_storage.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
