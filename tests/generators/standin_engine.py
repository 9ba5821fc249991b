"""A stand-in for the vLLM engine inside Ray Data LLM's real `Processor` (vLLM needs a GPU).

`standin_builder(log_dir, ...)` has the signature of `ray.data.llm.build_processor`; tests
put it in `generators.teacher.vllm.BUILD_PROCESSOR`, the seam the backend builds its
processor through. It builds Ray Data LLM's own `Processor` (preprocess and postprocess
wrapping, error rows that bypass postprocess, batching) from the engine config the backend
made (batch size, replicas, `should_continue_on_error`), with one stage in place of chat
template + tokenize + vLLM + detokenize: an engine UDF in an actor pool sized the way Ray
Data LLM sizes the vLLM stage's. The engine
- records each construction (a model load) as a file `load-<pid>-<nanoseconds>` in
  `log_dir`, so loads are counted across actors and processes;
- records the request ids of every batch it answers in an `asked-*` file;
- answers deterministically from the request: `{"score": <0..5>}` when the request has a
  JSON schema, else a text made from the prompt; the first time an id in `fail_once` is
  asked it fails inside the engine (an `__inference_error__` row), an id in `garbage_once`
  gets an answer off the schema; ids in `hang` wait (up to a minute) before answering.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import ray.data
from ray.data.llm import Processor
from ray.llm._internal.batch.stages.base import StatefulStage, StatefulStageUDF

ERROR = "__inference_error__"


def answer(request_id: str, prompt: str, structured: bool) -> str:
    """The stand-in engine's answer to a request (what tests compare against)."""
    if structured:
        score = hashlib.blake2b(request_id.encode(), digest_size=1).digest()[0] % 6
        return json.dumps({"score": score})
    return f"An answer to: {prompt}"


def _first_time(log_dir: Path, kind: str, request_id: str) -> bool:
    try:
        os.close(os.open(log_dir / f"{kind}-{request_id}", os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


class StandInEngineUDF(StatefulStageUDF):
    def __init__(
        self,
        data_column: str,
        expected_input_keys: list[str],
        log_dir: str,
        fail_once: list[str],
        garbage_once: list[str],
        hang: list[str],
    ) -> None:
        super().__init__(data_column, expected_input_keys)
        self.log_dir = Path(log_dir)
        self.fail_once, self.garbage_once, self.hang = set(fail_once), set(garbage_once), set(hang)
        (self.log_dir / f"load-{os.getpid()}-{time.time_ns()}").touch()

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        ids = [str(row["teacher_request_id"]) for row in batch]
        (self.log_dir / f"asked-{uuid.uuid4().hex}").write_text("\n".join(ids))
        for row, rid in zip(batch, ids, strict=True):
            deadline = time.monotonic() + 60
            while rid in self.hang and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            out = {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], ERROR: ""}
            if rid in self.fail_once and _first_time(self.log_dir, "failed", rid):
                yield out | {ERROR: "RuntimeError: stand-in engine failure", "prompt": ""}
                continue
            params = row["sampling_params"]
            structured = bool((params.get("structured_outputs") or {}).get("json"))
            text = answer(rid, row["messages"][-1]["content"], structured)
            if rid in self.garbage_once and _first_time(self.log_dir, "garbage", rid):
                text = "Certainly! I would rate it a 4."
            yield out | {
                "generated_text": text,
                "num_input_tokens": sum(len(m["content"].split()) for m in row["messages"]),
                "num_generated_tokens": len(text.split()),
                "time_taken_llm": 0.001,
            }


class StandInEngineStage(StatefulStage):
    fn: type = StandInEngineUDF


def standin_builder(
    log_dir: Path,
    fail_once: Iterable[str] = (),
    garbage_once: Iterable[str] = (),
    hang: Iterable[str] = (),
) -> Callable[..., Processor]:
    """A `build_processor(config, *, preprocess, postprocess)` with the stand-in engine."""
    log_dir.mkdir(parents=True, exist_ok=True)

    def build(config: Any, *, preprocess: Callable, postprocess: Callable) -> Processor:
        stage = StandInEngineStage(
            fn_constructor_kwargs=dict(
                log_dir=str(log_dir), fail_once=sorted(fail_once),
                garbage_once=sorted(garbage_once), hang=sorted(hang),
            ),
            map_batches_kwargs=dict(
                zero_copy_batch=True,
                compute=ray.data.ActorPoolStrategy(
                    **config.get_concurrency(autoscaling_enabled=True),
                    max_tasks_in_flight_per_actor=config.max_tasks_in_flight_per_actor,
                ),
                max_concurrency=config.max_concurrent_batches,
                num_cpus=0.25,  # the real stage holds GPUs; leave the CPUs to the map tasks
            ),
        )  # fmt: skip
        return Processor(config, [stage], preprocess=preprocess, postprocess=postprocess)

    return build


def loads(log_dir: Path) -> list[str]:
    """One entry per engine construction: its process id."""
    return sorted(p.name.split("-")[1] for p in log_dir.glob("load-*"))


def asked(log_dir: Path) -> Counter[str]:
    """How many times the engine was asked each request id."""
    return Counter(i for p in log_dir.glob("asked-*") for i in p.read_text().split("\n") if i)
