"""The `vllm` teacher backend: offline batch inference on GPUs through Ray Data LLM.

`ray.data.llm`'s `build_processor(vLLMEngineProcessorConfig(...), preprocess,
postprocess)` returns a Processor that maps a Ray Dataset through chat templating,
tokenisation, vLLM engine replicas (each `tensor_parallel_size` GPUs, `concurrency`
replicas) and detokenisation. This module supplies the two ends:

- `vllm_processor(cfg, to_request, keep_columns)`: that processor as a `Dataset ->
  Dataset` callable. `to_request(row) -> ChatRequest` builds the prompt from a row; the
  output rows carry the `Completion` fields (optionally prefixed) plus `keep_columns`.
- `VLLMTeacher`: the processor behind the `Teacher` protocol, over a list of ChatRequests.
  This is how the teacher stages use vLLM: `edu_annotate` and `generate` send their
  requests through `run_checkpointed` (checkpoint.py), one `complete()` per request
  batch, and each `complete()` runs one Ray Data job, which starts the engines again; a
  large `request_batch` amortises that. No stage calls `vllm_processor` directly.

Rows that fail inside the engine do not stop the job (`should_continue_on_error=True`); Ray
Data LLM then skips our postprocess for them, so a final map (`finisher`) turns them into
Completion rows with `error = "engine: ..."`. Answers are checked like every other
backend's (`check_answer`: empty, invalid JSON, schema mismatch). Structured output uses
vLLM's `sampling_params.structured_outputs = {"json": <schema>}` (Ray >= 2.50, vLLM >=
0.11). The schema travels as a JSON string so Arrow never has to unify differently shaped
schemas. `finish_reason` is inferred ("length" when the answer used all of max_tokens,
else "stop"): Ray Data LLM's engine output does not carry vLLM's own finish reason.

The only module besides pipeline/executor.py that imports Ray: ray.data.llm is its engine.
Those imports are lazy, so this module imports on a CPU box, and everything except the
engine (config mapping, row conversion, checks, a Ray Data run with a stand-in engine) is
tested there. The real engine needs the `gpu` extra (`pip install -e '.[gpu]'`) and a GPU:

    .venv/bin/pytest tests/generators -m gpu    # PRIMER_VLLM_TEST_MODEL=<hub id or path>
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from generators.teacher.base import (
    ChatRequest,
    Completion,
    TeacherBase,
    check_answer,
    sampling,
    summarize,
)
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


def _plain(value: Any) -> Any:
    """Arrow hands lists back as numpy arrays; make them lists again (recursively)."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def vllm_processor(
    cfg: TeacherConfig,
    to_request: Callable[[dict[str, Any]], ChatRequest],
    keep_columns: Sequence[str] = (),
    prefix: str = "",
) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    """A `Dataset -> Dataset` that asks the teacher about every row.

    Output rows: the Completion fields (names prefixed with `prefix`) and `keep_columns`
    copied from the input row, one output row per input row, failures included.
    Needs Ray Data LLM and vLLM on the workers; building it loads the tokenizer.
    """
    from ray.data.llm import build_processor

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

    processor = build_processor(engine_config(cfg), preprocess=preprocess, postprocess=postprocess)
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


def request_row(i: int, req: ChatRequest) -> dict[str, Any]:
    """Request `i` as a plain row of a Ray Dataset (VLLMTeacher's input)."""
    return {
        "teacher_index": i,
        "id": req.id,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "json_schema": json.dumps(req.json_schema) if req.json_schema is not None else None,
    }


def row_request(row: dict[str, Any]) -> ChatRequest:
    """The ChatRequest a `request_row` row holds (VLLMTeacher's `to_request`)."""

    def opt(name: str, kind: type) -> Any:
        v = row.get(name)
        return None if v is None else kind(v)

    return ChatRequest(
        id=str(row["id"]),
        messages=[{"role": m["role"], "content": m["content"]} for m in _plain(row["messages"])],
        max_tokens=opt("max_tokens", int),
        temperature=opt("temperature", float),
        top_p=opt("top_p", float),
        seed=opt("seed", int),
        json_schema=json.loads(row["json_schema"]) if row.get("json_schema") else None,
    )


class VLLMTeacher(TeacherBase):
    """The `vllm` backend behind the Teacher protocol (one Ray Data job per call)."""

    backend = "vllm"

    def __init__(self, cfg: TeacherConfig) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(
                "the vllm teacher backend needs vLLM and a GPU: `pip install -e '.[gpu]'` on a "
                "GPU machine, or use teacher.backend 'openai' / 'local'"
            )
        engine_config(cfg)  # validate now, not on the first batch
        self.cfg = cfg
        self._run: Callable[[ray.data.Dataset], ray.data.Dataset] | None = None

    def __repr__(self) -> str:
        v = self.cfg.vllm
        return (
            f"VLLMTeacher({model_source(self.cfg)!r}, tp={v.tensor_parallel_size}, "
            f"concurrency={v.concurrency})"
        )

    def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        import ray.data

        reqs = list(requests)
        if not reqs:
            return []
        t0 = time.monotonic()
        if self._run is None:
            self._run = vllm_processor(
                self.cfg, row_request, keep_columns=("teacher_index",), prefix="c_"
            )
        rows = self._run(ray.data.from_items([request_row(i, r) for i, r in enumerate(reqs)]))
        got: dict[int, Completion] = {}
        for row in rows.take_all():
            values = {c: row.get("c_" + c) for c in COMPLETION_COLUMNS}
            got[int(row["teacher_index"])] = Completion(**values)
        out = []
        for i, req in enumerate(reqs):  # never a silently missing row
            out.append(
                got.get(i)
                or Completion(
                    id=req.id,
                    text=None,
                    prompt_tokens=None,
                    completion_tokens=None,
                    finish_reason=None,
                    error="engine: the row did not come back from the Ray Data job",
                    raw=None,
                    latency_s=time.monotonic() - t0,
                    model=self.cfg.model or model_source(self.cfg),
                    backend=self.backend,
                )
            )
        log.info("teacher vllm: %s", summarize(out))
        return out

    def close(self) -> None:
        self._run = None
