"""Send many chat requests to a teacher, a checkpoint per batch: resumable, nothing asked twice.

Both teacher-LLM stages (`edu_annotate`, `generate`) run their requests through
`run_checkpointed`: the requests are cut into fixed batches in a fixed order, each batch's
completions land atomically in `ckpt_dir/<batch>.parquet`, and a resumed run skips every
finished batch. Rows that failed (timeout, dead server, garbage) are stored with their error
and raw answer; they are sent again `retry_rounds` times within a run and once more on every
resume, so a flaky teacher costs retries, never rows. The teacher starts only if there is
something left to ask.

    table, stats = run_checkpointed(requests, Path("state/completions"), TeacherConfig())
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from generators.teacher import ChatRequest, Completion, Teacher, TeacherConfig, retry_failed
from pipeline.progress import Progress

log = logging.getLogger("primer.teacher")

COMPLETION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.large_string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
        ("raw", pa.large_string()),
        ("latency_s", pa.float64()),
        ("model", pa.string()),
        ("backend", pa.string()),
        ("attempts", pa.int32()),
    ]
)


def completions_table(completions: Sequence[Completion]) -> pa.Table:
    return pa.Table.from_pylist([c.to_dict() for c in completions], schema=COMPLETION_SCHEMA)


def table_completions(table: pa.Table) -> list[Completion]:
    return [Completion(**row) for row in table.to_pylist()]


def load_checkpoints(ckpt_dir: Path) -> pa.Table:
    """Every stored completion, in request order."""
    files = sorted(Path(ckpt_dir).glob("[0-9]*.parquet"))
    return pa.concat_tables([COMPLETION_SCHEMA.empty_table(), *(pq.read_table(f) for f in files)])


def run_checkpointed(
    requests: Sequence[ChatRequest],
    ckpt_dir: Path,
    teacher_cfg: TeacherConfig,
    *,
    batch_size: int = 32,
    retry_rounds: int = 1,
    label: str = "teacher",
    teacher: Teacher | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Completions of `requests` (same order), from checkpoints where they exist.

    `requests` must be the same list, in the same order, on every attempt (the caller
    derives it deterministically); a batch is identified by its position.
    """
    from generators.teacher import make_teacher

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
    n = len(requests)
    batches = [(b, lo, min(lo + batch_size, n)) for b, lo in enumerate(range(0, n, batch_size))]
    todo: list[tuple[int, int, int, list[Completion] | None]] = []
    for b, lo, hi in batches:
        path = ckpt_dir / f"{b:06d}.parquet"
        if not path.is_file():
            todo.append((b, lo, hi, None))
            continue
        done = table_completions(pq.read_table(path))
        if [c.id for c in done] != [r.id for r in requests[lo:hi]]:
            raise RuntimeError(
                f"{path} holds other requests than this run asks for; the checkpoints belong "
                "to different settings: delete the folder to start over"
            )
        if not all(c.ok for c in done):
            todo.append((b, lo, hi, done))  # resume: send its failed rows again

    progress = Progress(label, len(batches))
    progress.parts = len(batches) - len(todo)
    t0, asked, tokens = time.monotonic(), 0, 0
    if todo:
        own = teacher is None
        teacher = teacher or make_teacher(teacher_cfg)
        try:
            for b, lo, hi, done in todo:
                chunk = list(requests[lo:hi])
                if done is None:
                    out = teacher.complete(chunk)
                else:
                    out = retry_failed(teacher, chunk, done)
                for _ in range(retry_rounds):
                    if all(c.ok for c in out):
                        break
                    out = retry_failed(teacher, chunk, out)
                tmp = ckpt_dir / f".{b:06d}.parquet.tmp-{os.getpid()}"
                pq.write_table(completions_table(out), tmp)
                os.replace(tmp, ckpt_dir / f"{b:06d}.parquet")
                asked += len(chunk)
                tokens += sum(c.completion_tokens or 0 for c in out)
                progress.update(parts=1, rows=len(chunk))
        finally:
            if own:
                teacher.close()
        progress.close()
    seconds = time.monotonic() - t0
    table = load_checkpoints(ckpt_dir)
    failed = len(table) - table["error"].null_count
    stats = {
        "requests": n,
        "ok": n - failed,
        "failed": failed,
        "asked_this_attempt": asked,
        "seconds": round(seconds, 2),
        "requests_per_minute": round(60 * asked / seconds, 1) if asked else None,
        "completion_tokens_per_s": round(tokens / seconds, 1) if asked else None,
    }
    if failed:
        log.warning("%s: the teacher failed on %d of %d requests", label, failed, n)
    return table, stats
