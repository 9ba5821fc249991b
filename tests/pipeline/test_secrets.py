"""Secrets stay out of what Primer writes: secret-named keys are masked, credential-shaped
values are masked anywhere, counts such as max_tokens are not."""

from __future__ import annotations

import pytest

from pipeline.recipe import ConfigError, load_recipe
from pipeline.secrets import MASK, is_secret_key, looks_like_secret, mask, scrub
from tests.conftest import SAMPLE


@pytest.mark.parametrize(
    "key, secret",
    [
        ("api_key", True), ("api_key_env", True), ("hf_token", True), ("password", True),
        ("aws_secret_access_key", True), ("Authorization", True), ("max_tokens", False),
        ("tokenizer", False), ("dry_run_tokens_per_s", False), ("max_answer_tokens", False),
        ("keywords", False), ("model", False),
    ],
)  # fmt: skip
def test_secret_keys(key, secret):
    assert is_secret_key(key) is secret


def test_credential_shaped_values():
    for v in ("sk-live-abc", "hf_AbCdEf0123456789", "ghp_0123456789abcdefABCDEF", "AKIAIOSFODNN7EXAMPLE",
              "xoxb-123-456", "Zm9vYmFyQmF6UXV4MTIzNDU2Nzg5MA9xYz"):  # fmt: skip
        assert looks_like_secret(v), v
    for v in ("OPENAI_API_KEY", "microsoft/Phi-3-mini-4k-instruct", "runs/quickstart/model.bin",
              "3f2a9c1e-7b4d-4e8a-9c2b-1a2b3c4d5e6f", "fineweb-1-a1b2c3d4", "en", 12):  # fmt: skip
        assert not looks_like_secret(v), v


def test_mask_nested_and_scrub_commands():
    cfg = {"teacher": {"api_key_env": "X", "max_tokens": 16, "extra": ["hf_AbCdEf0123456789"]}}
    assert mask(cfg) == {"teacher": {"api_key_env": MASK, "max_tokens": 16, "extra": [MASK]}}
    cmd = "primer run r.yaml --set stages.edu_annotate.teacher.api_key_env=sk-live-x --set a.b=3"
    assert scrub(cmd) == (
        "primer run r.yaml --set stages.edu_annotate.teacher.api_key_env=*** --set a.b=3"
    )


def test_config_errors_never_echo_a_secret():
    secret = "sk_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    raw = {
        "name": "x",
        "stages": {
            "quality": {"input": [str(SAMPLE / "fineweb-1.jsonl.gz")], "api_key": secret},
        },
    }
    with pytest.raises(ConfigError) as e:
        load_recipe(raw=raw)
    assert secret not in str(e.value) and "api_key" in str(e.value)
