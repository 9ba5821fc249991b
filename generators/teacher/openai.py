"""The `openai` teacher backend: any OpenAI-compatible chat-completions server over HTTP.

vLLM serve, llama.cpp's server, SGLang or a hosted API: plain httpx in a bounded thread
pool, a per-request timeout, retries with exponential backoff and jitter on connection
errors, timeouts, 408, 429 and 5xx (a Retry-After header is honoured up to the same cap).
The `local` backend (local.py) drives the server it starts with this same client.

Why httpx and not the openai SDK: we need the raw body of every answer (kept for failed
rows), our own error classes per row, and attempt counts; the SDK hides the first two
behind typed exceptions and pydantic models and adds four packages for a single POST.

The API key is read from the environment variable named by `api_key_env` and lives only in
the Authorization header: never in the config, a repr, a log line or a recorded error
(every error text and kept answer is scrubbed of it). Per-row problems become
`Completion.error` ("timeout: ...", "connection: ...", "http_503: ...", "bad_response:
...", "empty: ...", "invalid_json: ..."), with what the server sent in `Completion.raw`.

Structured output: a request with `json_schema` asks the server to constrain decoding
(`response_format: {"type": "json_schema", ...}`, which llama.cpp, vLLM and SGLang accept);
if the server rejects that field the request is re-sent once without it and the answer is
still parsed strictly (`check_answer`: `json.loads` plus full JSON-schema validation).

    with OpenAITeacher(TeacherConfig(backend="openai", base_url=URL)) as teacher:
        [c] = teacher.complete([ChatRequest("q1", [{"role": "user", "content": "Hi"}])])
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from generators.teacher.base import (
    ChatRequest,
    Completion,
    TeacherBase,
    check_answer,
    sampling,
    summarize,
)
from generators.teacher.config import TeacherConfig, check_base_url
from pipeline.secrets import MASK, scrub

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("primer.teacher")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses worth another attempt: overload, rate limits, gateway hiccups."""
_MAX_BACKOFF_S = 60.0
_RAW_LIMIT = 65_536  # characters of a bad answer kept in Completion.raw


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


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class OpenAITeacher(TeacherBase):
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
