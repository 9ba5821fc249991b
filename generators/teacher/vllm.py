"""The `vllm` teacher backend: offline batch inference on GPUs through Ray Data LLM.

`ray.data.llm`'s `build_processor(vLLMEngineProcessorConfig(...), preprocess,
postprocess)` returns a Processor that maps a Ray Dataset through chat templating,
tokenisation, vLLM engine replicas (each `tensor_parallel_size` GPUs, `concurrency`
replicas, an actor pool) and detokenisation. An engine loads when its actor starts, so it
loads once per replica per Ray Data job. This module supplies the two ends:

- `vllm_processor(cfg, to_request, keep_columns)`: that processor as a `Dataset ->
  Dataset` callable. `to_request(row) -> ChatRequest` builds the prompt from a row; the
  output rows carry the `Completion` fields (optionally prefixed) plus `keep_columns`.
- `VLLMTeacher`: the processor behind the `StreamingTeacher` protocol. `stream(units,
  requests, batch_rows)` runs ONE job: its first step builds each unit's requests on the
  workers (`requests(unit)`, `REQUEST_SCHEMA` rows, a block per unit), the processor
  answers them, and the answers come back as they finish, `batch_rows` at a time. The
  teacher stages call it through `ask_parts` (checkpoint.py) with every pending unit of a
  stage run, so each replica loads the model once per run, plus once per retry round when
  rows failed, and the driver never holds the requests. One call's requests are all with
  or all without a JSON schema (see `stream`). `complete()` (the plain `Teacher`
  protocol) is the same over one call's requests, a job per kind; a request the job did
  not hand back becomes a failed row ("engine: ...").

Rows that fail inside the engine do not stop the job (`should_continue_on_error=True`); Ray
Data LLM then skips our postprocess for them, so a final map (`finisher`) turns them into
Completion rows with `error = "engine: ..."`. Answers are checked like every other
backend's (`check_answer`: empty, invalid JSON, schema mismatch). Structured output uses
vLLM's `sampling_params.structured_outputs = {"json": <schema>}` (Ray >= 2.50, vLLM >=
0.11). The schema travels as a JSON string so Arrow never has to unify differently shaped
schemas. `finish_reason` is inferred ("length" when the answer used all of max_tokens,
else "stop"): Ray Data LLM's engine output does not carry vLLM's own finish reason.

`BUILD_PROCESSOR` is where the processor is built: Ray Data LLM's `build_processor`. It is
the one seam for a stand-in engine, since vLLM runs only on GPUs: tests put a builder with
the same signature there that composes Ray Data LLM's real `Processor` around a stand-in
engine stage (tests/generators/standin_engine.py).

The only module besides pipeline/executor.py that imports Ray: ray.data.llm is its engine.
Those imports are lazy, so this module imports on a CPU box, and everything except the
engine (config mapping, row conversion, checks, whole stage runs with a stand-in engine) is
tested there. The real engine needs the `gpu` extra (`pip install -e '.[gpu]'`) and a GPU:

    .venv/bin/pytest tests/generators -m gpu    # PRIMER_VLLM_TEST_MODEL=<hub id or path>
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from generators.teacher.base import (
    COMPLETION_SCHEMA,
    LOST,
    ChatRequest,
    Completion,
    TeacherBase,
    check_answer,
    row_request,
    sampling,
    table_completions,
)
from generators.teacher.base import requests_table as base_requests_table
from generators.teacher.config import TeacherConfig

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("primer.teacher")

COMPLETION_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Completion))
# Our bookkeeping columns, carried through the processor next to Ray's own.
_ID = "teacher_request_id"
_SCHEMA = "teacher_json_schema"
_MAX_TOKENS = "teacher_max_tokens"
ENGINE_ERROR = "__inference_error__"  # Ray Data LLM's column for rows the engine failed
_NAMED_ENGINE_KWARGS = ("tensor_parallel_size", "max_model_len", "gpu_memory_utilization")
INDEX = "teacher_index"  # a request's position in its job, carried through the processor
_PREFIX = "c_"

Processor = Callable[["ray.data.Dataset"], "ray.data.Dataset"]


def ray_data_llm(config: Any, *, preprocess: Callable, postprocess: Callable) -> Processor:
    """Ray Data LLM's `build_processor`: the vLLM processor for an engine config."""
    from ray.data.llm import build_processor

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


BUILD_PROCESSOR: Callable[..., Processor] = ray_data_llm
"""`(engine_config(cfg), *, preprocess, postprocess) -> Processor`, read when a VLLMTeacher
is made: Ray Data LLM's `build_processor`, or a stand-in engine in tests."""


def model_source(cfg: TeacherConfig) -> str:
    source = cfg.vllm.model_source or cfg.model
    if not source:
        raise ValueError("backend 'vllm' needs teacher.model or teacher.vllm.model_source")
    return source


def engine_config(cfg: TeacherConfig) -> Any:
    """The `ray.data.llm.vLLMEngineProcessorConfig` for `cfg` (no GPU or vLLM needed)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = cfg.vllm
    clash = sorted(set(v.engine_kwargs) & {*_NAMED_ENGINE_KWARGS, "model"})
    if clash:
        raise ValueError(
            f"teacher.vllm.engine_kwargs repeats {clash}; set them as teacher.vllm.<key> "
            "(and the model as teacher.model / teacher.vllm.model_source)"
        )
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        **v.engine_kwargs,
    }
    if v.max_model_len is not None:
        engine_kwargs["max_model_len"] = v.max_model_len
    return vLLMEngineProcessorConfig(
        model_source=model_source(cfg),
        engine_kwargs=engine_kwargs,
        concurrency=v.concurrency,
        batch_size=v.batch_size,
        accelerator_type=v.accelerator_type,
        should_continue_on_error=True,  # one bad row is a recorded failure, not a dead job
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=True,
    )


def engine_inputs(req: ChatRequest, cfg: TeacherConfig) -> dict[str, Any]:
    """A ChatRequest as the columns the processor's stages read, plus our bookkeeping."""
    params = sampling(req, cfg)
    schema = json.dumps(req.json_schema) if req.json_schema is not None else None
    return {
        "messages": [{"role": m["role"], "content": m["content"]} for m in req.messages],
        "sampling_params": {
            **params,
            # Always present (None without a schema) so every row has one Arrow type.
            "structured_outputs": {"json": schema} if schema is not None else None,
            "detokenize": False,  # the detokenize stage does it, as Ray's docs configure
        },
        _ID: req.id,
        _SCHEMA: schema,
        _MAX_TOKENS: params["max_tokens"],
    }


def completion_row(row: dict[str, Any], model: str, prefix: str = "") -> dict[str, Any]:
    """A processor output row (success or engine error) as Completion fields."""
    engine_error = row.get(ENGINE_ERROR) or None
    schema = json.loads(row[_SCHEMA]) if row.get(_SCHEMA) else None
    text = row.get("generated_text")
    n_out = row.get("num_generated_tokens")
    n_in = row.get("num_input_tokens")
    latency = row.get("time_taken_llm")
    if engine_error:
        error: str | None = f"engine: {str(engine_error)[:500]}"
        finish = None
    else:
        max_tokens = row.get(_MAX_TOKENS)
        finish = "length" if n_out is not None and max_tokens and n_out >= max_tokens else "stop"
        error = check_answer(text, schema, finish)
    c = Completion(
        id=str(row[_ID]),
        text=None if error else text,
        prompt_tokens=int(n_in) if n_in is not None and not engine_error else None,
        completion_tokens=int(n_out) if n_out is not None and not engine_error else None,
        finish_reason=finish,
        error=error,
        raw=(text or None) if error else None,
        latency_s=float(latency) if latency is not None and latency >= 0 else 0.0,
        model=model,
        backend="vllm",
    )
    return {prefix + k: v for k, v in c.to_dict().items()}


def vllm_processor(
    cfg: TeacherConfig,
    to_request: Callable[[dict[str, Any]], ChatRequest],
    keep_columns: Sequence[str] = (),
    prefix: str = "",
    build: Callable[..., Processor] | None = None,
) -> Processor:
    """A `Dataset -> Dataset` that asks the teacher about every row.

    Output rows: the Completion fields (names prefixed with `prefix`) and `keep_columns`
    copied from the input row, one output row per input row, failures included.
    Needs Ray Data LLM and vLLM on the workers; building it loads the tokenizer. `build`:
    the processor builder (default `BUILD_PROCESSOR`).
    """
    keep = tuple(keep_columns)
    clash = sorted({prefix + c for c in COMPLETION_COLUMNS} & set(keep))
    if clash:
        raise ValueError(f"keep_columns {clash} collide with the completion columns; set prefix")
    model = cfg.model or model_source(cfg)

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return engine_inputs(to_request(row), cfg)

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = completion_row(row, model, prefix)
        out.update({c: row.get(c) for c in keep})
        return out

    build = build or BUILD_PROCESSOR
    processor = build(engine_config(cfg), preprocess=preprocess, postprocess=postprocess)
    finish = finisher(model, keep, prefix)

    def run(ds: ray.data.Dataset) -> ray.data.Dataset:
        return processor(ds).map(finish)

    return run


def finisher(model: str, keep: tuple[str, ...], prefix: str) -> Callable[[dict], dict]:
    """Engine-error rows bypass postprocess and arrive raw: give them the same columns."""
    columns = [prefix + c for c in COMPLETION_COLUMNS]

    def finish(row: dict[str, Any]) -> dict[str, Any]:
        if row.get(ENGINE_ERROR):
            out = completion_row(row, model, prefix)
            out.update({c: row.get(c) for c in keep})
            return out
        return {c: row.get(c) for c in (*columns, *keep)}

    return finish


def requests_table(requests: Sequence[ChatRequest], index: Sequence[int] | np.ndarray) -> pa.Table:
    """Requests as `REQUEST_SCHEMA` rows with their `teacher_index`: `index[i]` is that of
    `requests[i]` (what `complete()` sends)."""
    table = base_requests_table(requests)
    return table.add_column(0, INDEX, pa.array(np.asarray(index, dtype=np.int64)))


def request_row(i: int, req: ChatRequest) -> dict[str, Any]:
    """Request `i` as a plain row of a Ray Dataset (the rows of `requests_table`)."""
    return requests_table([req], [i]).to_pylist()[0]


def _answers(batch: pa.Table, carry: Sequence[str]) -> pa.Table:
    """A batch of processor output as COMPLETION_SCHEMA columns plus the `carry` columns."""
    columns = [batch[_PREFIX + f.name].cast(f.type) for f in COMPLETION_SCHEMA]
    return pa.Table.from_arrays(
        [*columns, *(batch[c] for c in carry)], names=[*COMPLETION_SCHEMA.names, *carry]
    )


class _BuildRequests:
    """The job's first step, on its workers: the requests of a unit (`requests(unit)`),
    as REQUEST_SCHEMA rows plus the carried columns."""

    def __init__(self, units: Sequence[Any], requests: Callable[[Any], pa.Table]) -> None:
        self.units, self.requests = list(units), requests

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([self.requests(self.units[i]) for i in batch["unit"].to_pylist()])


class VLLMTeacher(TeacherBase):
    """The `vllm` backend: a `StreamingTeacher` (one Ray Data job per `stream()` call)."""

    backend = "vllm"

    def __init__(self, cfg: TeacherConfig) -> None:
        self._build = BUILD_PROCESSOR
        if self._build is ray_data_llm and importlib.util.find_spec("vllm") is None:
            raise ImportError(
                "the vllm teacher backend needs vLLM and a GPU: `pip install -e '.[gpu]'` on a "
                "GPU machine, or use teacher.backend 'openai' / 'local'"
            )
        engine_config(cfg)  # validate now, not on the first batch
        self.cfg = cfg
        self._runs: dict[tuple[str, ...], Processor] = {}

    @property
    def block_rows(self) -> int:
        """Requests per block of a job's input that keep every replica busy: an engine
        batch (a caller cuts its units into blocks of at least this)."""
        return self.cfg.vllm.batch_size

    def __repr__(self) -> str:
        v = self.cfg.vllm
        return (
            f"VLLMTeacher({model_source(self.cfg)!r}, tp={v.tensor_parallel_size}, "
            f"concurrency={v.concurrency})"
        )

    def stream(
        self,
        units: Sequence[Any],
        requests: Callable[[Any], pa.Table],
        batch_rows: int,
        carry: Sequence[str] = (),
    ) -> Iterator[pa.Table]:
        """One Ray Data job: each unit's requests are built by a task of the job (the driver
        never holds them), then every engine replica, loaded once, answers them. Every
        row's `structured_outputs` must have one Arrow type: a batch where it is all null
        does not merge with one where it is a struct (ray-project/ray#61656), so one call's
        requests are all with or all without a JSON schema (a teacher stage's are)."""
        import ray.data

        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        if not units:
            return
        carry = tuple(carry)
        t0 = time.monotonic()
        run = self._runs.get(carry)
        if run is None:
            run = self._runs[carry] = vllm_processor(
                self.cfg, row_request, keep_columns=carry, prefix=_PREFIX, build=self._build
            )
        # A block per unit: the replicas pull blocks as they free up (Ray Data merges what
        # one task yields into one block, so a caller cuts large units into several).
        build = _BuildRequests(units, requests)
        ds = ray.data.from_items(
            [{"unit": i} for i in range(len(units))], override_num_blocks=len(units)
        ).map_batches(build, batch_size=1, batch_format="pyarrow")
        n = ok = 0
        for batch in run(ds).iter_batches(batch_size=batch_rows, batch_format="pyarrow"):
            table = _answers(batch, carry)
            n += len(table)
            ok += table["error"].null_count
            yield table
        log.info("teacher vllm: one job over %d units, %d answers, %d ok, %.1f s", len(units),
                 n, ok, time.monotonic() - t0)  # fmt: skip

    def _lost(self, reqs: list[ChatRequest], index: np.ndarray, seconds: float) -> pa.Table:
        n = len(reqs)
        model = self.cfg.model or model_source(self.cfg)
        return pa.table(
            {
                "id": pa.array([r.id for r in reqs], pa.string()),
                "text": pa.nulls(n, pa.large_string()),
                "prompt_tokens": pa.nulls(n, pa.int32()),
                "completion_tokens": pa.nulls(n, pa.int32()),
                "finish_reason": pa.nulls(n, pa.string()),
                "error": pa.array([LOST] * n, pa.string()),
                "raw": pa.nulls(n, pa.large_string()),
                "latency_s": pa.array(np.full(n, seconds), pa.float64()),
                "model": pa.array([model] * n, pa.string()),
                "backend": pa.array([self.backend] * n, pa.string()),
                "attempts": pa.array(np.ones(n, dtype=np.int32)),
                INDEX: pa.array(index, pa.int64()),
            }
        )

    def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """The plain `Teacher` protocol: one job per kind of request (with and without a
        JSON schema); a request the job lost is a failed completion."""
        reqs = list(requests)
        out: list[Completion | None] = [None] * len(reqs)
        t0 = time.monotonic()
        structured = np.array([r.json_schema is not None for r in reqs], dtype=bool)
        for kind in (structured, ~structured):
            index = np.flatnonzero(kind)
            if not len(index):
                continue
            table = requests_table([reqs[i] for i in index], index)
            for answers in self.stream([table], _itself, self.cfg.vllm.batch_size, (INDEX,)):
                self._place(answers, out)
        lost = np.array([i for i, c in enumerate(out) if c is None], dtype=np.int64)
        if len(lost):
            log.warning("teacher vllm: %d of %d requests did not come back from the job; "
                        "recorded as failed", len(lost), len(reqs))  # fmt: skip
            self._place(self._lost([reqs[i] for i in lost], lost, time.monotonic() - t0), out)
        return out  # type: ignore[return-value]

    @staticmethod
    def _place(answers: pa.Table, out: list[Completion | None]) -> None:
        where = answers[INDEX].to_pylist()
        for i, c in zip(where, table_completions(answers), strict=True):
            out[i] = c

    def close(self) -> None:
        self._runs.clear()


def _itself(table: pa.Table) -> pa.Table:
    return table
