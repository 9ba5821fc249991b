"""What every teacher backend shares: requests, completions, the `Teacher` protocol.

`Teacher.complete(requests) -> completions` is the whole interface (same length, same
order, always; per-row failures are recorded in `Completion.error`, never raised). A
backend whose engine loads once per job (vllm: one Ray Data job starts every replica) is
also a `StreamingTeacher`: `stream(units, requests, batch_rows)` answers a whole stage's
requests in one job, each unit's requests built where the job runs (`REQUEST_SCHEMA` rows),
and hands the answers back as they finish, as `COMPLETION_SCHEMA` tables, so the store
(checkpoint.py) commits them while the engines keep working. `REQUEST_SCHEMA` is a request
as an Arrow row, the form requests travel in. `TeacherBase` gives a backend its
context-manager plumbing; `check_answer` is the one
strict check every backend applies to an answer (empty text, JSON that is not one value
matching the requested schema); `derive_seed` and `sampling` fill a request's sampling
parameters from the config so runs are reproducible; `retry_failed` sends the failed rows
of a batch again. The backends (openai.py, local.py, vllm.py) import this module and
config.py only; generators/teacher/factory.py picks one.

    req = ChatRequest("q1", [{"role": "user", "content": "Hi"}], json_schema=None)
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from generators.teacher.config import TeacherConfig

ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completion request. Sampling fields left at None take the config's value."""

    id: str
    """Caller's key for this row (a document id, a seed id); echoed in the Completion."""
    messages: list[dict[str, Any]]
    """OpenAI chat format: [{"role": "system" | "user" | "assistant", "content": str}, ...]."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    """None: a seed derived from `TeacherConfig.seed` and `id`, so runs are reproducible
    and two requests do not share one random stream."""
    json_schema: dict[str, Any] | None = None
    """Constrain the answer to this JSON schema; the text is then validated against it."""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"ChatRequest.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.messages, list) or not self.messages:
            raise ValueError(f"ChatRequest {self.id!r}: messages must be a non-empty list")
        for i, m in enumerate(self.messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ROLES
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"ChatRequest {self.id!r}: messages[{i}] must be "
                    '{"role": "system"|"user"|"assistant", "content": str}, '
                    f"got {str(m)[:120]!r}"
                )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"ChatRequest {self.id!r}: max_tokens must be >= 1")
        if self.json_schema is not None:
            try:
                _validator(_canonical(self.json_schema))
            except Exception as e:
                raise ValueError(
                    f"ChatRequest {self.id!r}: json_schema is not a valid JSON schema: {e}"
                ) from None


@dataclass
class Completion:
    """The answer to one ChatRequest. `error` is None exactly when `text` can be used."""

    id: str
    text: str | None
    """The answer; None when `error` is set (the answer, if any, is then in `raw`)."""
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    """"stop", "length" (hit max_tokens), ... as the server said; None without an answer."""
    error: str | None
    """"<kind>: <message>", kind in timeout, connection, http_<status>, bad_response,
    empty, invalid_json, engine, internal. None on success."""
    raw: str | None
    """On failure, what came back: the model's text, or the HTTP body. None on success."""
    latency_s: float
    """Wall time of this row, all attempts and backoff included."""
    model: str | None
    """The model that answered, as the server names it (else the configured name)."""
    backend: str
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def error_kind(self) -> str | None:
        """The machine-readable prefix of `error` ("timeout", "http_503", ...)."""
        return None if self.error is None else self.error.split(":", 1)[0]

    def json(self) -> Any:
        """The parsed answer of a structured-output request (already validated)."""
        if self.text is None:
            raise ValueError(f"completion {self.id!r} failed: {self.error}")
        return json.loads(self.text)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Teacher(Protocol):
    """What the annotation stage and the generators need from a teacher LLM."""

    backend: str

    def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """One Completion per request, same order; per-row failures are recorded, not raised."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Teacher: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class StreamingTeacher(Teacher, Protocol):
    """A teacher that answers many requests in one job (its engines load once per job)."""

    def stream(
        self,
        units: Sequence[Any],
        requests: Callable[[Any], pa.Table],
        batch_rows: int,
        carry: Sequence[str] = (),
    ) -> Iterator[pa.Table]:
        """One job over the requests that `requests(unit)` builds, for each of `units`, where
        the job runs: `REQUEST_SCHEMA` rows plus the columns named in `carry`, all with or
        all without a JSON schema. The answers come back as they finish, in any order, as
        tables of about `batch_rows` rows: `COMPLETION_SCHEMA` columns and the `carry`
        columns of their requests; failures are recorded, never raised. A request the job
        loses does not come back: the caller counts what it expected."""
        ...


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
"""`Completion` as Arrow: the checkpoint store's files and `StreamingTeacher.stream`."""


LOST = "engine: the row did not come back from the Ray Data job"
"""The error of a request a teacher's job did not hand back."""

REQUEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", pa.large_string()),  # JSON: one Arrow type whatever the messages
        ("max_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),
        ("json_schema", pa.large_string()),
    ]
)
"""`ChatRequest` as Arrow: requests built where they are sent (a Ray Data job's workers, a
part at a time in the driver) travel as rows of this schema."""


def requests_table(requests: Sequence[ChatRequest]) -> pa.Table:
    """`requests` as `REQUEST_SCHEMA` rows."""
    return pa.table(
        {
            "id": [r.id for r in requests],
            "messages": [json.dumps(r.messages) for r in requests],
            "max_tokens": [r.max_tokens for r in requests],
            "temperature": [r.temperature for r in requests],
            "top_p": [r.top_p for r in requests],
            "seed": [r.seed for r in requests],
            "json_schema": [
                json.dumps(r.json_schema) if r.json_schema is not None else None for r in requests
            ],
        },
        schema=REQUEST_SCHEMA,
    )


def row_request(row: dict[str, Any]) -> ChatRequest:
    """The ChatRequest a `REQUEST_SCHEMA` row holds."""

    def opt(name: str, kind: type) -> Any:
        v = row.get(name)
        return None if v is None else kind(v)

    messages = row["messages"]
    messages = json.loads(messages) if isinstance(messages, str) else _plain(messages)
    return ChatRequest(
        id=str(row["id"]),
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        max_tokens=opt("max_tokens", int),
        temperature=opt("temperature", float),
        top_p=opt("top_p", float),
        seed=opt("seed", int),
        json_schema=json.loads(row["json_schema"]) if row.get("json_schema") else None,
    )


def _plain(value: Any) -> Any:
    """Arrow hands lists back as numpy arrays; make them lists again (recursively)."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def completions_table(completions: Sequence[Completion]) -> pa.Table:
    return pa.Table.from_pylist([c.to_dict() for c in completions], schema=COMPLETION_SCHEMA)


def table_completions(table: pa.Table) -> list[Completion]:
    return [Completion(**row) for row in table.select(COMPLETION_SCHEMA.names).to_pylist()]


class TeacherBase:
    """Context-manager plumbing shared by the backends: `with make_teacher(cfg) as t:`
    closes the teacher (and stops a server it started) on the way out."""

    backend: str = "?"

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def retry_failed(
    teacher: Teacher, requests: Sequence[ChatRequest], completions: Sequence[Completion]
) -> list[Completion]:
    """Send the failed rows of an earlier `complete()` again; keep the rows that succeeded.

    `requests[i]` must be the request of `completions[i]`. The attempts of both rounds add
    up in `Completion.attempts`.
    """
    if len(requests) != len(completions):
        raise ValueError(f"{len(requests)} requests but {len(completions)} completions")
    todo = [i for i, c in enumerate(completions) if not c.ok]
    out = list(completions)
    if not todo:
        return out
    again = teacher.complete([requests[i] for i in todo])
    for i, c in zip(todo, again, strict=True):
        out[i] = replace(c, attempts=c.attempts + completions[i].attempts)
    return out


# --- shared helpers ------------------------------------------------------------------------


def derive_seed(base: int, request_id: str) -> int:
    """A per-request seed, stable across runs and machines (31 bits: every server takes it)."""
    h = hashlib.blake2b(f"{base}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def sampling(req: ChatRequest, cfg: TeacherConfig) -> dict[str, Any]:
    """The request's sampling parameters with the config's defaults filled in."""
    return {
        "max_tokens": req.max_tokens if req.max_tokens is not None else cfg.max_tokens,
        "temperature": req.temperature if req.temperature is not None else cfg.temperature,
        "top_p": req.top_p if req.top_p is not None else cfg.top_p,
        "seed": req.seed if req.seed is not None else derive_seed(cfg.seed, req.id),
    }


def _canonical(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> Any:
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def check_answer(
    text: str | None, json_schema: dict[str, Any] | None, finish_reason: str | None = None
) -> str | None:
    """The error for an answer that cannot be used, or None: empty text, or (with a schema)
    text that is not one JSON value matching it. Strict: no NaN/Infinity, no trailing text,
    no Markdown fences."""
    if text is None or not text.strip():
        return "empty: the model returned no text"
    if json_schema is None:
        return None
    cut = " (cut off at max_tokens)" if finish_reason == "length" else ""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        return f"invalid_json: not JSON{cut}: {e}"
    errors = sorted(_validator(_canonical(json_schema)).iter_errors(value), key=str)
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
        return f"invalid_json: schema mismatch at {where}: {errors[0].message[:200]}"
    return None


def summarize(completions: Sequence[Completion]) -> str:
    """One line for logs: counts of successes and of each error kind."""
    kinds = Counter(c.error_kind for c in completions if not c.ok)
    failed = ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
    ok = len(completions) - sum(kinds.values())
    return f"{len(completions)} requests, {ok} ok" + (f", failed ({failed})" if failed else "")
