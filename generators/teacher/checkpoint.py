"""Send many chat requests to a teacher and keep every answer: a store keyed by request id.

Both teacher-LLM stages (`edu_annotate`, `generate`) run their requests through
`run_checkpointed`. Completions land in `ckpt_dir`, one Parquet file per `batch_size`
answers, written to a temp file and renamed, so a file is whole or absent even when the run
is killed. A later attempt reads the store by request id: whatever was answered, in any
earlier batch size, is reused; only ids without an answer, and ids whose answer failed
(timeout, dead server, garbage), are sent. Failed rows are stored with their error and raw
answer and sent again `retry_rounds` times within a run and once more on every attempt
that runs, so a flaky teacher costs retries, never rows. The teacher starts only if there
is something left to ask.

How the requests travel depends on the backend. A `StreamingTeacher` (vllm) gets every
pending request in one `stream()` call, one Ray Data job, so its engines load once per
replica per attempt; answers are committed as they come back, and each retry round is one
more job over the failed rows only. The other backends (openai, local) get one
`complete()` per batch, its failed rows retried before the batch is committed.

Store layout: `g<generation>-<batch>.parquet` (both 6 digits; an attempt takes the next
generation, so its files never overwrite an earlier attempt's), plus `<batch>.parquet`
from the older position-keyed layout, read as generation 0. An id in several files
resolves to its newest usable answer, else its newest failure: a stored answer is never
replaced by a failure.

The store never decides by itself that it is stale: it lives in the stage's `_state/`,
which the runner (pipeline/stage_runner.py) deletes with the stage folder when the stage's
fingerprint changes (model, sampling, templates through `content_fingerprint()`, inputs).
A stage that asks through the store adds `TRANSPORT_KEYS` to its `transport_keys`, so
batching, retry and transport settings stay out of that fingerprint and changing them
re-sends nothing. `--retry-failed` goes through `reopen_failed` and `answers_revision`.

    table, stats = run_checkpointed(requests, Path("state/completions"), TeacherConfig())
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from generators.teacher.base import (
    COMPLETION_SCHEMA,
    ChatRequest,
    Completion,
    StreamingTeacher,
    Teacher,
    completions_table,
    retry_failed,
)
from generators.teacher.base import table_completions as table_completions
from generators.teacher.config import TeacherConfig, teacher_transport_keys
from generators.teacher.factory import make_teacher
from pipeline.progress import Progress

log = logging.getLogger("primer.teacher")

DONE_FILE = "_DONE"

TRANSPORT_KEYS: frozenset[str] = frozenset(
    {"request_batch", "retry_rounds", "batch_rows", *teacher_transport_keys("teacher")}
)
"""`transport_keys` of a stage that asks its teacher through `run_checkpointed`: the
batching and retry settings (the store is keyed by id, so a new batch size reuses it) and
the teacher's transport keys."""

_GENERATION = re.compile(r"g(\d+)-\d+\.parquet")
_FAILED = pa.schema([("id", pa.string()), ("attempts", pa.int32())])


def _store_files(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files, oldest first: legacy "<batch>.parquet" names sort before "g..."."""
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(p for p in Path(ckpt_dir).glob("*.parquet") if not p.name.startswith("."))


def _read(path: Path, columns: list[str] | None = None) -> pa.Table | None:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        # Renamed into place whole, so this is damage from outside: its ids are asked again.
        log.warning("teacher store: cannot read %s (%s); its requests count as unanswered", path, e)
        return None


def _resolve(table: pa.Table) -> pa.Table:
    """One row per id: the newest usable answer, else the newest failure."""
    if not len(table):
        return table
    n = len(table)
    table = table.append_column("_ok", pc.is_null(table["error"]))
    table = table.append_column("_order", pa.array(np.arange(n, dtype=np.int64)))
    table = table.sort_by([("id", "ascending"), ("_ok", "descending"), ("_order", "descending")])
    ids = table["id"].combine_chunks()
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(first)).drop_columns(["_ok", "_order"])


def load_checkpoints(ckpt_dir: Path) -> pa.Table:
    """Every stored completion, one row per request id (sorted by id)."""
    tables = [t for f in _store_files(ckpt_dir) if (t := _read(f)) is not None]
    stored = pa.concat_tables([COMPLETION_SCHEMA.empty_table(), *tables])
    return _resolve(stored)


def answered_ids(ckpt_dir: Path) -> tuple[pa.Array, pa.Array]:
    """(ids with a usable answer, ids whose every stored answer failed), each sorted and
    distinct; reads only the id and error columns."""
    tables = [t for f in _store_files(ckpt_dir) if (t := _read(f, ["id", "error"])) is not None]
    empty = pa.schema([("id", pa.string()), ("error", pa.string())]).empty_table()
    stored = pa.concat_tables([empty, *tables])
    ok = pc.unique(stored.filter(pc.is_null(stored["error"]))["id"].combine_chunks())
    bad = pc.unique(stored.filter(pc.is_valid(stored["error"]))["id"].combine_chunks())
    bad = bad.filter(pc.invert(pc.is_in(bad, value_set=ok)))
    return ok.take(pc.array_sort_indices(ok)), bad.take(pc.array_sort_indices(bad))


def answers_revision(ckpt_dir: Path) -> str:
    """A digest of the ids with a usable answer: it changes exactly when an answer is added
    (a stored answer never changes), e.g. when a retry recovers failed rows."""
    ok, _ = answered_ids(ckpt_dir)
    digest = hashlib.blake2b(digest_size=8)
    digest.update("\n".join(ok.to_pylist()).encode())
    return f"{len(ok)}-{digest.hexdigest()}"


def reopen_failed(state_dir: Path, ckpt_dir: Path) -> int:
    """`--retry-failed`: the number of ids whose stored answers all failed; when there are
    any, `state_dir/_DONE` goes so that the stage's next prepare() runs `run_checkpointed`
    again, which sends exactly those (the stored answers stay)."""
    _, failed = answered_ids(ckpt_dir)
    if len(failed):
        (Path(state_dir) / DONE_FILE).unlink(missing_ok=True)
    return len(failed)


def _next_generation(ckpt_dir: Path) -> int:
    gens = [int(m[1]) for f in _store_files(ckpt_dir) if (m := _GENERATION.fullmatch(f.name))]
    return max(gens, default=0) + 1


class _Commits:
    """One attempt's files in the store, `g<gen>-<n>.parquet`, each whole or absent."""

    def __init__(self, ckpt_dir: Path, generation: int, progress: Progress) -> None:
        self.dir, self.generation, self.progress = ckpt_dir, generation, progress
        self.files = self.tokens = 0

    def write(self, table: pa.Table) -> None:
        name = f"g{self.generation:06d}-{self.files:06d}.parquet"
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, self.dir / name)
        self.files += 1
        self.tokens += int(pc.sum(table["completion_tokens"]).as_py() or 0)
        self.progress.update(parts=1, rows=len(table))


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
    """Completions of `requests` (same order), from the store where they are answered.

    An id must name the same request on every attempt: the runner discards the store (with
    the stage's `_state/`) when what decides the answers changes. A repeated id is asked
    once.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)  # left by a killed attempt: never a finished batch
    n = len(requests)
    ids = pa.array([r.id for r in requests], pa.string())
    store = load_checkpoints(ckpt_dir)
    pos = pc.index_in(ids, value_set=store["id"])
    first = pc.index_in(ids, value_set=ids).to_numpy(zero_copy_only=False) == np.arange(n)
    stored = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    errors = store["error"].take(pos)
    failed_before = first & stored & pc.is_valid(errors).to_numpy(zero_copy_only=False)
    todo = np.flatnonzero(first & (~stored | failed_before))
    if (~first).any():
        log.warning("%s: %d requests repeat an earlier id; each id is asked once", label,
                    int((~first).sum()))  # fmt: skip
    prior = pc.fill_null(store["attempts"].take(pos), 0).to_numpy(zero_copy_only=False)
    del store  # the answers are read again at the end, with this attempt's

    progress = Progress(label, -(-len(todo) // batch_size))
    t0 = time.monotonic()
    commits = _Commits(ckpt_dir, _next_generation(ckpt_dir), progress)
    if len(todo):
        own = teacher is None
        teacher = teacher or make_teacher(teacher_cfg)
        try:
            if isinstance(teacher, StreamingTeacher):
                # Attempts of earlier runs add up, as they do within a run.
                earlier = pa.table(
                    {"id": ids.filter(pa.array(failed_before)),
                     "attempts": pa.array(prior[failed_before], pa.int32())},
                    schema=_FAILED,
                )  # fmt: skip
                _ask_streaming(teacher, requests, todo, earlier, batch_size, retry_rounds,
                               commits, label)  # fmt: skip
            else:
                _ask_in_batches(teacher, requests, todo, failed_before, prior, batch_size,
                                retry_rounds, commits)  # fmt: skip
        finally:
            if own:
                teacher.close()
        progress.close()
    seconds = time.monotonic() - t0
    asked, tokens = len(todo), commits.tokens
    store = load_checkpoints(ckpt_dir)
    table = store.take(pc.index_in(ids, value_set=store["id"]))
    usable = pc.and_(pc.is_valid(table["id"]), pc.is_null(table["error"]))
    ok = int(pc.sum(usable).as_py() or 0)
    still = pc.invert(usable).to_numpy(zero_copy_only=False)
    stats = {
        "requests": n,
        "ok": ok,
        "failed": n - ok,
        "reused": int((stored & ~failed_before & first).sum()),
        "asked_this_attempt": asked,
        "failed_before": int(failed_before.sum()),
        "recovered": int((failed_before & ~still).sum()),
        "seconds": round(seconds, 2),
        "requests_per_minute": round(60 * asked / seconds, 1) if asked else None,
        "completion_tokens_per_s": round(tokens / seconds, 1) if asked else None,
    }
    if n - ok:
        log.warning("%s: the teacher failed on %d of %d requests", label, n - ok, n)
    return table, stats


def _ask_in_batches(
    teacher: Teacher,
    requests: Sequence[ChatRequest],
    todo: np.ndarray,
    failed_before: np.ndarray,
    prior: np.ndarray,
    batch_size: int,
    retry_rounds: int,
    commits: _Commits,
) -> None:
    """One `complete()` per batch, its failed rows retried, then the batch committed."""
    for lo in range(0, len(todo), batch_size):
        idx = todo[lo : lo + batch_size]
        chunk = [requests[i] for i in idx]
        out = teacher.complete(chunk)
        # Attempts of earlier runs add up, as they do within a run.
        out = [
            c if not failed_before[i] else _with_attempts(c, int(prior[i]))
            for c, i in zip(out, idx, strict=True)
        ]
        for _ in range(retry_rounds):
            if all(c.ok for c in out):
                break
            out = retry_failed(teacher, chunk, out)
        commits.write(completions_table(out))


def _ask_streaming(
    teacher: StreamingTeacher,
    requests: Sequence[ChatRequest],
    todo: np.ndarray,
    earlier: pa.Table,
    batch_size: int,
    retry_rounds: int,
    commits: _Commits,
    label: str,
) -> None:
    """Every pending request in one `stream()`, its answers committed as they come back;
    then one more `stream()` of the failed rows per retry round (none when none failed).
    The driver holds, beyond the requests, one batch of answers and the failed ids."""
    pending = todo
    for round_ in range(retry_rounds + 1):
        failed = [_FAILED.empty_table()]
        for table in teacher.stream([requests[i] for i in pending], batch_size):
            if table.schema != COMPLETION_SCHEMA:
                table = table.select(COMPLETION_SCHEMA.names).cast(COMPLETION_SCHEMA)
            table = _add_attempts(table, earlier)
            commits.write(table)
            failed.append(table.filter(pc.is_valid(table["error"])).select(_FAILED.names))
        earlier = pa.concat_tables(failed)
        if not len(earlier) or round_ == retry_rounds:
            return
        log.info("%s: retry round %d of %d: %d failed requests", label, round_ + 1,
                 retry_rounds, len(earlier))  # fmt: skip
        asked = pa.array([requests[i].id for i in pending], pa.string())
        where = pc.drop_null(pc.index_in(earlier["id"], value_set=asked))
        pending = pending[where.to_numpy(zero_copy_only=False)]
        commits.progress.total += -(-len(pending) // batch_size)


def _add_attempts(table: pa.Table, earlier: pa.Table) -> pa.Table:
    """`attempts` plus those of the same id in `earlier` (a retried row's first tries)."""
    if not len(earlier):
        return table
    before = pc.fill_null(earlier["attempts"].take(pc.index_in(table["id"], earlier["id"])), 0)
    attempts = pc.add(table["attempts"], before).cast(pa.int32())
    return table.set_column(table.schema.get_field_index("attempts"), "attempts", attempts)


def _with_attempts(c: Completion, earlier: int) -> Completion:
    return replace(c, attempts=c.attempts + earlier)
