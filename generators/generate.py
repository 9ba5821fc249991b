"""The `generate` stage: synthetic documents from the teacher, one per seed prompt.

`generate` (a GlobalStage) sends every prompt of its input (the `seeds` output) to the
teacher (generators/teacher/: `local`, `openai` or `vllm`) through `ask_parts`
(generators/teacher/checkpoint.py), a seeds part at a time: `GenerateRequests` builds one
part's requests wherever it runs (a plan task, a task of the vllm job, or the driver for
the other backends), so no process holds every prompt. Answers are stored by row id in
`_state/completions/<part>/`, the part named by the rows' source_path (the seeds stage
writes it), a request batch at a time: a run killed mid-way and started again generates
only what is missing; nothing is generated twice or lost. `process()` of a part reads that
part's folder only (`PartAnswers`), and `setup()` reads nothing. With `vllm`, every
pending prompt goes through one Ray Data job, so each engine replica loads the model once
per run (once more per retry round with failures). A store from before the part folders
is moved into them once. The runner discards the stored answers with the stage folder
when what decides them changes (model, sampling, budgets, seed, the input, which chains the `seeds`
stage's template and its hash); transport settings (`request_batch`, the teacher's URL,
timeouts, retries, concurrency) are `transport_keys` and may change freely.

Sampling parameters and per-style token budgets come from config; each row records them
with the teacher model, backend, token counts and finish reason. A failed request
(timeout, dead server, garbage) is a row with `teacher_error`, its raw answer and reason
`generate:teacher_error`; `primer run --retry-failed` asks exactly those again. A row that
cannot be asked is recorded too: `generate:no_template` (its template is not in
configs/prompts/) or `generate:empty_prompt`.

`dry_run: true` stops before the teacher starts and prints the number of prompts, the
estimated prompt and completion tokens and the hours at `dry_run_tokens_per_s`. The
generations are then checked by `validate` (generators/validate.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ConfigDict, Field

from generators.prompts import Template, load_template
from generators.teacher import checkpoint
from generators.teacher.base import REQUEST_SCHEMA, derive_seed
from generators.teacher.config import TeacherConfig
from generators.teacher.factory import preflight_teacher
from generators.teacher.store import PART, PartAnswers, file_source, row_keys
from pipeline.executor import LOCAL, Executor
from pipeline.io import iter_documents, write_json_atomic
from pipeline.stage import DryRun, GlobalStage, StageConfig, mark_dropped, set_column

log = logging.getLogger("primer.generate")

DONE_FILE = checkpoint.DONE_FILE
COMPLETIONS_DIR = "completions"
ADDS = (
    "text", "teacher_model", "teacher_backend", "teacher_answer", "teacher_error",
    "prompt_tokens", "completion_tokens", "finish_reason", "temperature", "top_p",
    "max_tokens", "sample_seed",
)  # fmt: skip


class GenerateConfig(StageConfig):
    """Settings of the `generate` stage."""

    # A key pasted as teacher.api_key_env must not be echoed by an error of this model.
    model_config = ConfigDict(hide_input_in_errors=True)

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    max_tokens: int = Field(512, ge=16)
    """Completion budget of a style without its own entry in `style_max_tokens`."""
    style_max_tokens: dict[str, int] = {
        "textbook": 768, "worked_examples": 768, "exercises": 640,
        "socratic_dialogue": 640, "story": 512, "howto": 512,
    }  # fmt: skip
    """Per-style completion budgets (tokens)."""
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0
    """Per-request sampling seeds derive from this and the row id."""
    request_batch: int = Field(16, ge=1)
    """Answers per checkpoint file, and requests per teacher call (openai, local; vllm
    sends every pending request in one job); answers are stored by id, so it may change
    between attempts without generating anything again."""
    retry_rounds: int = Field(1, ge=0)
    """Times the failed rows are sent again within a run (vllm: one more job each, over
    the failed rows only)."""
    dry_run: bool = False
    dry_run_tokens_per_s: float = Field(2_000.0, gt=0)
    """Aggregate completion tokens/s assumed for the dry run's time estimate."""


def _template(name: str | None) -> Template | str:
    """The template a seed row names, or why it cannot be used."""
    if name is None:
        return "template: the row names no template (template_id, template_version are null)"
    try:
        return load_template(name)
    except Exception as e:  # missing, misnamed or not compiling: the row is recorded
        return f"template: {e}"


def _template_names(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    return pc.binary_join_element_wise(
        pc.cast(table["template_id"], pa.string()),
        pc.cast(table["template_version"], pa.string()),
        "_v",
    )


def unaskable(table: pa.Table) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Seed rows that cannot become a request, as (no_template mask, empty_prompt mask,
    message per row, null where the row can be asked)."""
    names = _template_names(table)
    distinct = pc.unique(names)
    problems = [t if isinstance(t, str) else None for t in map(_template, distinct.to_pylist())]
    why = pa.array(problems, pa.string()).take(pc.index_in(names, value_set=distinct))
    no_template = pc.is_valid(why)
    prompt = pc.utf8_trim_whitespace(pc.cast(table["prompt"], pa.large_string()))
    empty = pc.and_(pc.invert(no_template), pc.fill_null(pc.equal(pc.utf8_length(prompt), 0), True))
    why = pc.if_else(empty, pa.scalar("prompt: the seed row has an empty prompt"), why)
    return no_template, empty, why


def estimate(
    prompt_chars: int, prompts: int, completion_tokens: int, tokens_per_s: float
) -> dict[str, Any]:
    """Upper-bound token and time estimate for sending `prompts` prompts of `prompt_chars`
    characters in all (prompt tokens ~ chars/4) with `completion_tokens` of budget."""
    hours = completion_tokens / tokens_per_s / 3600
    return {
        "prompts": prompts,
        "prompt_tokens_est": int(prompt_chars / 4),
        "completion_tokens_max": completion_tokens,
        "tokens_per_s": tokens_per_s,
        "hours_at_that_rate": round(hours, 3),
    }


@dataclass(frozen=True)
class GenerateRequests:
    """The requests of one seeds part, built where it is called (a task of the plan step
    or of the vllm job, or the driver for the other backends): `REQUEST_SCHEMA` rows and
    each row's part folder (`store.PART`, from its source_path). Rows that cannot be asked
    are left out (process() records them)."""

    config: GenerateConfig

    def __call__(self, path: str) -> pa.Table:
        cfg = self.config
        cols = ("id", "prompt", "style", "template_id", "template_version", "source_path")
        tables = list(iter_documents([path], cfg.batch_rows, columns=cols))
        t = pa.concat_tables(tables, promote_options="default") if tables else None
        if t is None or not len(t):
            return pa.schema([*REQUEST_SCHEMA, pa.field(PART, pa.string())]).empty_table()
        *_, why = unaskable(t)
        t = t.filter(pc.is_null(why))
        system: dict[str, list[dict[str, str]]] = {}
        for name in pc.unique(_template_names(t)).to_pylist():
            text = load_template(name).system()
            system[name] = [{"role": "system", "content": text}] if text else []
        ids = t["id"].to_pylist()
        messages = [
            json.dumps([*system[name], {"role": "user", "content": prompt}])
            for name, prompt in zip(
                _template_names(t).to_pylist(), t["prompt"].to_pylist(), strict=True
            )
        ]
        n = len(t)
        sources = t["source_path"] if "source_path" in t.column_names else None
        return pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "messages": pa.array(messages, pa.large_string()),
                "max_tokens": pa.array(
                    [self.budget(s) for s in t["style"].to_pylist()], pa.int64()
                ),
                "temperature": pa.array(np.full(n, cfg.temperature), pa.float64()),
                "top_p": pa.array(np.full(n, cfg.top_p), pa.float64()),
                "seed": pa.array([derive_seed(cfg.seed, i) for i in ids], pa.int64()),
                "json_schema": pa.nulls(n, pa.large_string()),
                PART: row_keys(sources, n, file_source(path)),
            }
        )

    def budget(self, style: str | None) -> int:
        return self.config.style_max_tokens.get(style or "", self.config.max_tokens)

    def estimate(self, path: str) -> dict[str, int]:
        """The dry run's counts of one part."""
        t = self(path)
        return {
            "prompts": len(t),
            "prompt_chars": int(pc.sum(pc.utf8_length(t["messages"])).as_py() or 0),
            "completion_tokens": int(pc.sum(t["max_tokens"]).as_py() or 0),
        }


class GenerateStage(GlobalStage):
    """Teacher completions for every seed prompt; see the module docstring."""

    name: ClassVar[str] = "generate"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = GenerateConfig
    needs: ClassVar[tuple[str, ...]] = ("id", "prompt", "style", "template_id", "template_version")
    adds: ClassVar[tuple[str, ...]] = ADDS
    transport_keys = checkpoint.TRANSPORT_KEYS | {"dry_run", "dry_run_tokens_per_s"}
    retryable: ClassVar[bool] = True

    config: GenerateConfig

    def preflight(self) -> None:
        # Templates come from the seed rows, not this config: a row whose template is
        # missing is recorded (generate:no_template), the seeds stage checks its own.
        preflight_teacher(self.config.teacher)

    def budget(self, style: str | None) -> int:
        return self.config.style_max_tokens.get(style or "", self.config.max_tokens)

    def prepare(self, inputs: Sequence[str], state_dir: str, executor: Executor = LOCAL) -> None:
        cfg = self.config
        self.state_dir = str(state_dir)
        state = Path(state_dir)
        build = GenerateRequests(cfg)
        units = [str(p) for p in inputs]
        if cfg.dry_run:
            counts = list(executor.map(build.estimate, units))
            est = estimate(
                sum(c["prompt_chars"] for c in counts), sum(c["prompts"] for c in counts),
                sum(c["completion_tokens"] for c in counts), cfg.dry_run_tokens_per_s,
            )  # fmt: skip
            raise DryRun(f"generate dry run: {json.dumps(est)}")
        state.mkdir(parents=True, exist_ok=True)
        if (state / DONE_FILE).is_file():
            return
        checkpoint.migrate_flat(build, units, state / COMPLETIONS_DIR)
        stats = checkpoint.ask_parts(
            build, units, state / COMPLETIONS_DIR, cfg.teacher, executor=executor,
            batch_size=cfg.request_batch, retry_rounds=cfg.retry_rounds, label=self.name,
        )  # fmt: skip
        log.info("generate: %s", json.dumps(stats))
        write_json_atomic(state / DONE_FILE, stats)

    def reopen_failed(self, state_dir: str) -> int:
        """Prompts whose generation failed; the next prepare() asks exactly those."""
        self.state_dir = str(state_dir)
        return checkpoint.reopen_failed(Path(state_dir), Path(state_dir) / COMPLETIONS_DIR)

    def output_revision(self) -> str:
        if not self.state_dir:
            return ""
        return checkpoint.answers_revision(Path(self.state_dir) / COMPLETIONS_DIR)

    def setup(self) -> None:
        state = Path(self.state_dir or "")
        if not (state / DONE_FILE).is_file():
            raise RuntimeError(
                f"generate: no finished completions in {self.state_dir!r}; run prepare() first"
            )
        # Nothing is read here: process() reads the part folder of the rows in hand.
        self.answers = PartAnswers(state / COMPLETIONS_DIR)

    def process(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        no_template, empty_prompt, why = unaskable(table)
        sources = table["source_path"] if "source_path" in table.column_names else None
        got = self.answers.lookup(sources, table["id"])
        ok = pc.is_null(got["error"])
        table = set_column(
            table, "text", pc.if_else(ok, got["text"], pa.scalar(None, pa.large_string()))
        )
        for dst, src in (
            ("teacher_model", "model"), ("teacher_backend", "backend"),
            ("prompt_tokens", "prompt_tokens"), ("completion_tokens", "completion_tokens"),
            ("finish_reason", "finish_reason"),
        ):  # fmt: skip
            table = set_column(table, dst, got[src])
        table = set_column(table, "teacher_error", pc.coalesce(why, got["error"]))
        table = set_column(table, "teacher_answer", pc.if_else(ok, got["text"], got["raw"]))
        n = len(table)
        styles = table["style"].to_pylist()
        table = set_column(table, "temperature", pa.array(np.full(n, cfg.temperature, np.float32)))
        table = set_column(table, "top_p", pa.array(np.full(n, cfg.top_p, np.float32)))
        table = set_column(
            table, "max_tokens", pa.array([self.budget(s) for s in styles], pa.int32())
        )
        table = set_column(
            table,
            "sample_seed",
            pa.array([derive_seed(cfg.seed, i) for i in table["id"].to_pylist()], pa.int64()),
        )
        missing = pc.is_null(got["id"])
        failed = pc.and_(pc.invert(missing), pc.invert(ok))
        return mark_dropped(
            table, self.name,
            [("no_template", no_template), ("empty_prompt", empty_prompt),
             ("not_generated", missing), ("teacher_error", failed)],
        )  # fmt: skip
