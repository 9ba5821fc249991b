"""Send a stage's requests to a teacher, part by part, and keep every answer by request id.

Both teacher-LLM stages (`edu_annotate`, `generate`) ask through `ask_parts(build, units,
root, ...)`: `build(unit)` makes the requests of one unit of input (a seeds part, a chunk
of edu_annotate's sample) as `REQUEST_SCHEMA` rows with the part folder of each
(`store.PART`); answers land in that folder of the store (generators/teacher/store.py), a
file per commit, written whole, so a killed run keeps what it committed. Nothing holds a
stage's requests at once:
- a plan step (`executor.map` over the units) reads each unit's requests and its part
  folders' ids and returns counts: requests, answered, failed before, pending;
- a `StreamingTeacher` (vllm) gets every pending unit in one `stream()` call, one Ray Data
  job whose tasks build the requests (`Pending`: a unit's requests less those answered),
  so its engines load once per replica per attempt; answers are committed as they come
  back, and each retry round is one more job over the units with failed or lost rows;
- the other backends (openai, local) get one `complete()` per `batch_size` requests,
  built in the driver a unit at a time, each batch's failed rows retried before it is
  committed;
- a last plan step over the units asked counts what failed and what was recovered.
The driver holds counts per unit, one unit's requests and one batch of answers.

Only ids without a usable answer are sent: never asked, or failed (timeout, dead server,
garbage), sent again `retry_rounds` times within a run and once more on every attempt that
runs, their attempts adding up. The teacher starts only if something is pending.
`run_checkpointed(requests, folder, ...)` is the same for one list of requests and a
single-folder store, its answers returned in request order.

The store never decides by itself that it is stale: it lives in the stage's `_state/`,
which the runner (pipeline/stage_runner.py) deletes with the stage folder when the stage's
fingerprint changes. A stage that asks through here adds `TRANSPORT_KEYS` to its
`transport_keys`, so batching, retry and transport settings never invalidate its answers.
`--retry-failed` goes through `reopen_failed` and `answers_revision`.

    stats = ask_parts(build, seed_parts, Path("state/completions"), TeacherConfig(), executor=ex)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from generators.teacher.base import (
    LOST,
    REQUEST_SCHEMA,
    ChatRequest,
    StreamingTeacher,
    Teacher,
    completions_table,
    requests_table,
    retry_failed,
    row_request,
)
from generators.teacher.base import table_completions as table_completions
from generators.teacher.config import TeacherConfig, teacher_transport_keys
from generators.teacher.factory import make_teacher
from generators.teacher.store import (
    PART,
    STATUS_SCHEMA,
    Commits,
    failed_count,
    load_checkpoints,
    next_generation,
    remove_temp_files,
    status,
    store_files,
)
from generators.teacher.store import answered_ids as answered_ids
from generators.teacher.store import answers_revision as answers_revision
from pipeline.executor import LOCAL, Executor
from pipeline.progress import Progress

log = logging.getLogger("primer.teacher")

DONE_FILE = "_DONE"

TRANSPORT_KEYS: frozenset[str] = frozenset(
    {"request_batch", "retry_rounds", "batch_rows", *teacher_transport_keys("teacher")}
)
"""`transport_keys` of a stage that asks its teacher through this module: the batching and
retry settings (the store is keyed by id, so a new batch size reuses it) and the teacher's
transport keys."""

UNIT, PRIOR, EARLY, LAST_GEN = "teacher_unit", "teacher_prior", "teacher_early", "teacher_last_gen"
_CARRY = (UNIT, PRIOR, EARLY)


def reopen_failed(state_dir: Path, root: Path) -> int:
    """`--retry-failed`: the number of ids whose stored answers all failed; when there are
    any, `state_dir/_DONE` goes so that the stage's next prepare() asks again, which sends
    exactly those (the stored answers stay)."""
    failed = failed_count(Path(root))
    if failed:
        (Path(state_dir) / DONE_FILE).unlink(missing_ok=True)
    return failed


@dataclass(frozen=True)
class Pending:
    """The requests of one unit still to ask, built wherever it is called (a task of the
    plan step or of the teacher's job, or the driver): `build(unit)`, less ids answered in
    their part folder, each id once, with its attempts so far (`teacher_prior`), whether
    it failed in an earlier attempt (`teacher_early`), its unit's index (`teacher_unit`)
    and the newest generation that stored it (`teacher_last_gen`). Picklable when `build`
    is. `structured`: only the requests with (True) or without (False) a JSON schema."""

    build: Callable[[Any], pa.Table]
    root: str
    generation: int
    flat: bool = False
    structured: bool | None = None

    def requests(self, item: tuple[int, Any]) -> pa.Table:
        """Every request of the unit, each id once, with its status columns."""
        index, unit = item
        table = self.build(unit)
        if self.structured is not None:
            has = pc.is_valid(table["json_schema"])
            table = table.filter(has if self.structured else pc.invert(has))
        both = table["id"] if self.flat else pc.binary_join_element_wise(
            table[PART], table["id"], "\x1f"
        )  # fmt: skip
        first = pc.equal(pc.index_in(both, value_set=both), pa.array(np.arange(len(table))))
        table = table.filter(first)
        found = self._status(table)
        columns = {c: table[c] for c in [*REQUEST_SCHEMA.names, *([] if self.flat else [PART])]}
        return pa.table(
            columns
            | {
                "ok": pc.fill_null(found["ok"], False),
                UNIT: pa.repeat(pa.scalar(index, pa.int32()), len(table)),
                PRIOR: pc.fill_null(found["prior"], 0),
                EARLY: pc.fill_null(found["early"], False),
                LAST_GEN: pc.fill_null(found["last_gen"], -1),
            }
        )

    def _status(self, table: pa.Table) -> pa.Table:
        """Each request's `store.status` row (nulls where its id is not stored), reading
        the folders of the unit's parts (usually one)."""
        root, ids = Path(self.root), table["id"]
        if self.flat:
            st = status(root, self.generation)
            return st.take(pc.index_in(ids, value_set=st["id"]))
        keys = table[PART]
        tables, pos, offset = [STATUS_SCHEMA.empty_table()], pa.nulls(len(ids), pa.int64()), 0
        for key in pc.unique(keys).to_pylist():
            st = status(root / key, self.generation)
            where = pc.add(pc.index_in(ids, value_set=st["id"]).cast(pa.int64()), offset)
            pos = pc.if_else(pc.equal(keys, key), where, pos)
            tables.append(st)
            offset += len(st)
        return pa.concat_tables(tables).take(pos)

    def __call__(self, item: tuple[int, Any]) -> pa.Table:
        """The unit's pending requests (its ids without a usable answer)."""
        table = self.requests(item)
        return table.filter(pc.invert(table["ok"])).drop_columns(["ok", LAST_GEN])

    def plan(self, item: tuple[int, Any]) -> dict[str, int]:
        """Counts of the unit: requests, answered, failed before, pending (with a schema)."""
        t = self.requests(item)
        ok, early = t["ok"].to_numpy(zero_copy_only=False), t[EARLY].to_numpy(zero_copy_only=False)
        structured = pc.is_valid(t["json_schema"]).to_numpy(zero_copy_only=False)
        return {
            "unit": item[0],
            "requests": len(t),
            "requests_structured": int(structured.sum()),
            "reused": int(ok.sum()),
            "failed_before": int((~ok & early).sum()),
            "pending": int((~ok).sum()),
            "structured": int((~ok & structured).sum()),
            "recovered": int((ok & early).sum()),
        }


def migrate_flat(build: Callable[[Any], pa.Table], units: Sequence[Any], root: Path) -> None:
    """Move a store from before the partitioning (answer files directly under `root`) into
    part folders, by the ids `build(unit)` puts in each part; answers no unit asks for
    are dropped. Reads the old store whole, once, as the code that wrote it did."""
    root = Path(root)
    legacy = store_files(root)
    if not legacy:
        return
    marker = root / "_MIGRATED"
    if not marker.is_file():
        old = load_checkpoints(root)
        log.info("teacher store: moving %d answers of %s into part folders", len(old), root)
        for i, unit in enumerate(units):
            table = build(unit)
            pos = pc.index_in(table["id"], value_set=old["id"])
            got = pc.is_valid(pos)
            rows = old.take(pos.filter(got)).append_column(PART, table[PART].filter(got))
            commits = Commits(root, 0)
            commits.files = {k: i for k in pc.unique(rows[PART]).to_pylist()}
            if len(rows):
                commits.write(rows)
        marker.write_text("the files directly in this folder are moved; delete them\n")
    for f in legacy:
        f.unlink(missing_ok=True)
    marker.unlink()


def ask_parts(
    build: Callable[[Any], pa.Table],
    units: Sequence[Any],
    root: Path,
    teacher_cfg: TeacherConfig,
    *,
    executor: Executor = LOCAL,
    batch_size: int = 32,
    retry_rounds: int = 1,
    label: str = "teacher",
    teacher: Teacher | None = None,
    flat: bool = False,
) -> dict[str, Any]:
    """Ask the teacher every request of `units` without a usable answer in the store at
    `root` (see the module docstring); returns the counts of the attempt. `flat`: a
    single-folder store (`build` gives no part column)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_temp_files(root)
    generation = next_generation(root)
    pending = Pending(build, str(root), generation, flat)
    items = list(enumerate(units))
    before = sorted(executor.map(pending.plan, items), key=lambda p: p["unit"])
    todo = [p for p in before if p["pending"]]
    n_todo = sum(p["pending"] for p in todo)
    progress = Progress(label, -(-n_todo // batch_size))
    commits = Commits(root, generation, progress)
    t0 = time.monotonic()
    if todo:
        own = teacher is None
        teacher = teacher or make_teacher(teacher_cfg)
        try:
            if isinstance(teacher, StreamingTeacher):
                _ask_streaming(teacher, pending, todo, items, batch_size, retry_rounds,
                               commits, label)  # fmt: skip
            else:
                _ask_in_batches(teacher, pending, todo, items, batch_size, retry_rounds, commits)
        finally:
            if own:
                teacher.close()
        progress.close()
    seconds = time.monotonic() - t0
    after = list(executor.map(pending.plan, [items[p["unit"]] for p in todo]))
    failed = sum(p["pending"] for p in after)
    requests = sum(p["requests"] for p in before)
    stats = {
        "requests": requests,
        "ok": requests - failed,
        "failed": failed,
        "reused": sum(p["reused"] for p in before),
        "asked_this_attempt": n_todo,
        "failed_before": sum(p["failed_before"] for p in before),
        "recovered": sum(p["recovered"] for p in after) - sum(p["recovered"] for p in todo),
        "units": len(units),
        "units_asked": len(todo),
        "seconds": round(seconds, 2),
        "requests_per_minute": round(60 * n_todo / seconds, 1) if n_todo else None,
        "completion_tokens_per_s": round(commits.tokens / seconds, 1) if n_todo else None,
    }
    if failed:
        log.warning("%s: the teacher failed on %d of %d requests", label, failed, requests)
    return stats


def _ask_in_batches(
    teacher: Teacher,
    pending: Pending,
    todo: list[dict[str, int]],
    items: list[tuple[int, Any]],
    batch_size: int,
    retry_rounds: int,
    commits: Commits,
) -> None:
    """One `complete()` per `batch_size` requests, built here a unit at a time; each
    batch's failed rows retried, then the batch committed."""
    buffered: list[pa.Table] = []
    n = 0
    for plan in todo:
        table = pending(items[plan["unit"]])
        buffered.append(table)
        n += len(table)
        while n >= batch_size:
            rows = pa.concat_tables(buffered)
            _ask_batch(teacher, rows.slice(0, batch_size), retry_rounds, commits)
            buffered, n = [rows.slice(batch_size)], n - batch_size
    if n:
        _ask_batch(teacher, pa.concat_tables(buffered), retry_rounds, commits)


def _ask_batch(teacher: Teacher, batch: pa.Table, retry_rounds: int, commits: Commits) -> None:
    reqs = [row_request(r) for r in batch.select(REQUEST_SCHEMA.names).to_pylist()]
    out = teacher.complete(reqs)
    # Attempts of earlier runs add up, as they do within a run.
    prior = batch[PRIOR].to_pylist()
    out = [replace(c, attempts=c.attempts + p) if p else c for c, p in zip(out, prior, strict=True)]
    for _ in range(retry_rounds):
        if all(c.ok for c in out):
            break
        out = retry_failed(teacher, reqs, out)
    table = completions_table(out)
    if PART in batch.column_names:
        table = table.append_column(PART, batch[PART])
    commits.write(table)


def _ask_streaming(
    teacher: StreamingTeacher,
    pending: Pending,
    todo: list[dict[str, int]],
    items: list[tuple[int, Any]],
    batch_size: int,
    retry_rounds: int,
    commits: Commits,
    label: str,
) -> None:
    """Every pending unit in one `stream()` per kind of request (with and without a JSON
    schema: one Arrow type per job), its answers committed as they come back; then one
    more `stream()` per retry round over the units with failed or lost rows. A row still
    lost after the last round is stored as failed, so `--retry-failed` asks it again."""
    carry = (*_CARRY, *([] if pending.flat else [PART]))
    # A unit's requests go in blocks of one engine batch or more, so the replicas share a
    # large unit (a job's task merges what it makes into one block).
    block = max(batch_size, getattr(teacher, "block_rows", 1))
    expected: Counter[tuple[int, bool]] = Counter()
    size: dict[tuple[int, bool], int] = {}
    for p in todo:
        expected[(p["unit"], True)] = p["structured"]
        expected[(p["unit"], False)] = p["pending"] - p["structured"]
        size[(p["unit"], True)] = p["requests_structured"]
        size[(p["unit"], False)] = p["requests"] - p["requests_structured"]
    lost: Counter[tuple[int, bool]] = Counter()
    for round_ in range(retry_rounds + 1):
        got: Counter[tuple[int, bool]] = Counter()
        failed: Counter[tuple[int, bool]] = Counter()
        for kind in (True, False):
            units = sorted(u for (u, k), n in expected.items() if k == kind and n > 0)
            if not units:
                continue
            job = _Slices(replace(pending, structured=kind))
            cuts = [
                (*items[u], lo, lo + block if lo + block < size[(u, kind)] else None)
                for u in units
                for lo in range(0, size[(u, kind)], block)
            ]
            for table in teacher.stream(cuts, job, batch_size, carry):
                attempts = pc.add(table["attempts"], table[PRIOR]).cast(pa.int32())
                table = table.set_column(table.schema.get_field_index("attempts"), "attempts",
                                         attempts)  # fmt: skip
                commits.write(table.drop_columns(list(_CARRY)))
                unit = table[UNIT].to_numpy(zero_copy_only=False)
                bad = pc.is_valid(table["error"]).to_numpy(zero_copy_only=False)
                got.update({(int(u), kind): int(c) for u, c in zip(*np.unique(unit, return_counts=True), strict=True)})  # fmt: skip
                failed.update({(int(u), kind): int(c) for u, c in zip(*np.unique(unit[bad], return_counts=True), strict=True)})  # fmt: skip
        lost = Counter({k: n - got[k] for k, n in expected.items() if n > got[k]})
        expected = failed + lost
        if not expected or round_ == retry_rounds:
            break
        log.info("%s: retry round %d of %d: %d failed and %d lost requests", label, round_ + 1,
                 retry_rounds, sum(failed.values()), sum(lost.values()))  # fmt: skip
        commits.progress.total += -(-sum(expected.values()) // batch_size)
    for unit, kind in sorted(lost):
        rows = replace(pending, structured=kind).requests(items[unit])
        rows = rows.filter(pc.and_(pc.invert(rows["ok"]), pc.less(rows[LAST_GEN], pending.generation)))  # fmt: skip
        if len(rows):
            log.warning("%s: %d requests did not come back from the job; recorded as failed",
                        label, len(rows))  # fmt: skip
            commits.write(_lost_rows(rows, teacher))


@dataclass(frozen=True)
class _Slices:
    """`Pending` of a slice of a unit, item (index, unit, lo, hi): the pending requests
    among its requests lo to hi (None: to the end). The slice is cut from all of the
    unit's requests, which do not change while its answers come in, so no request falls
    between two slices built at different times."""

    pending: Pending

    def __call__(self, item: tuple[int, Any, int, int | None]) -> pa.Table:
        index, unit, lo, hi = item
        table = self.pending.requests((index, unit))
        table = table.slice(lo, None if hi is None else hi - lo)
        return table.filter(pc.invert(table["ok"])).drop_columns(["ok", LAST_GEN])


def _lost_rows(rows: pa.Table, teacher: StreamingTeacher) -> pa.Table:
    n = len(rows)
    cfg = getattr(teacher, "cfg", None)
    model = (cfg.model or cfg.vllm.model_source) if isinstance(cfg, TeacherConfig) else None
    table = pa.table(
        {
            "id": rows["id"], "text": pa.nulls(n, pa.large_string()),
            "prompt_tokens": pa.nulls(n, pa.int32()), "completion_tokens": pa.nulls(n, pa.int32()),
            "finish_reason": pa.nulls(n, pa.string()), "error": pa.array([LOST] * n, pa.string()),
            "raw": pa.nulls(n, pa.large_string()), "latency_s": pa.array(np.zeros(n)),
            "model": pa.array([model] * n, pa.string()),
            "backend": pa.array([teacher.backend] * n, pa.string()),
            "attempts": pc.add(rows[PRIOR], 1).cast(pa.int32()),
        }
    )  # fmt: skip
    return table.append_column(PART, rows[PART]) if PART in rows.column_names else table


@dataclass(frozen=True)
class _Fixed:
    """`build` of `run_checkpointed`: its one unit is the given requests."""

    table: pa.Table

    def __call__(self, unit: Any) -> pa.Table:
        return self.table


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
    """Completions of `requests` (same order), stored in the single folder `ckpt_dir`, from
    the store where they are answered. An id must name the same request on every attempt;
    a repeated id is asked once."""
    table = requests_table(requests)
    stats = ask_parts(_Fixed(table), [0], Path(ckpt_dir), teacher_cfg, batch_size=batch_size,
                      retry_rounds=retry_rounds, label=label, teacher=teacher, flat=True)  # fmt: skip
    store = load_checkpoints(Path(ckpt_dir))
    out = store.take(pc.index_in(table["id"], value_set=store["id"]))
    ok = int(pc.sum(pc.and_(pc.is_valid(out["id"]), pc.is_null(out["error"]))).as_py() or 0)
    n = len(requests)
    if len(set(table["id"].to_pylist())) < n:
        log.warning("%s: %d requests repeat an earlier id; each id is asked once", label,
                    n - len(set(table["id"].to_pylist())))  # fmt: skip
    return out, stats | {"requests": n, "ok": ok, "failed": n - ok}
