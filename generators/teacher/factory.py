"""Pick a teacher backend from its config, and check that config before a run starts.

`make_teacher(cfg)` returns the backend `cfg.backend` names, ready to use (the local
llama.cpp server started); `preflight_teacher(cfg)` finds the files a backend needs (the
local GGUF model, a vLLM model given as a local path) before any stage runs. This is the
only module that imports the backends; they import only base.py and config.py (and the
`local` backend the `openai` client it drives), so the package has no import cycle.

    with make_teacher(TeacherConfig(max_tokens=32)) as teacher:   # the local SmolLM2
        [c] = teacher.complete([ChatRequest("q1", [{"role": "user", "content": "Hi"}])])
"""

from __future__ import annotations

from generators.teacher.base import Teacher
from generators.teacher.config import TeacherConfig
from pipeline.stage import PreflightError, require_path


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def preflight_teacher(cfg: TeacherConfig, key: str = "teacher") -> None:
    """Preflight checks of a teacher config under the stage config key `key`: the local
    GGUF file (or the bundled default) and a vllm model given as a local path must exist.
    Reads no model beyond a GGUF file's 4 magic bytes."""
    if cfg.backend == "local":
        from generators.teacher.local import model_path_problem

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


def make_teacher(cfg: TeacherConfig) -> Teacher:
    """The backend `cfg.backend` names, ready to use (the local server is started)."""
    if cfg.backend == "openai":
        from generators.teacher.openai import OpenAITeacher

        return OpenAITeacher(cfg)
    if cfg.backend == "local":
        from generators.teacher.local import LocalTeacher

        return LocalTeacher(cfg)
    if cfg.backend == "vllm":
        from generators.teacher.vllm import VLLMTeacher

        return VLLMTeacher(cfg)
    raise ValueError(f"unknown teacher backend {cfg.backend!r}")  # pragma: no cover
