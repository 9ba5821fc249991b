"""The Phi-3 model configs (pipeline.tokens.phi3) and the CPU training smoke
(pipeline.tokens.train_smoke)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pipeline.tokens.phi3 import (  # noqa: E402
    ModelConfigError,
    count_parameters,
    expected_phi3_parameters,
    load_model_config,
    phi3_parameter_breakdown,
)
from pipeline.tokens.train_smoke import TrainSmokeError, check_loss_fell, train_smoke  # noqa: E402

THREADS = 1
SEQ_LEN = 64
BATCH = 4


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def pattern_batches(n: int, seed: int = 0) -> list[dict]:
    """`n` batches of windows over a repeating 24-token pattern of real-looking Phi-3 ids,
    with labels shifted by one as the loader writes them: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(3, 32000, (24,), generator=g).repeat(40)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH,), generator=g).tolist()
        out.append(
            {
                "input_ids": torch.stack([stream[s : s + SEQ_LEN] for s in starts]),
                "labels": torch.stack([stream[s + 1 : s + SEQ_LEN + 1] for s in starts]),
            }
        )
    return out


@pytest.fixture(scope="module")
def tiny():
    return load_model_config("phi3_tiny")


@pytest.fixture(scope="module")
def learned(tiny):
    return train_smoke(pattern_batches(30), tiny, steps=30, threads=THREADS, seed=0)


def test_phi3_mini_counts_3_8b_parameters_without_allocating_them():
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc to read this process's memory")
    config = load_model_config("phi3_mini")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (32, 3072, 32064)
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.rms_norm_eps == 1e-5 and config.sliding_window == 2047

    before = _status_kib("VmRSS")
    with contextlib.suppress(OSError):  # reset the peak RSS: VmHWM then measures this count
        Path("/proc/self/clear_refs").write_text("5")
    n = count_parameters(config)
    peak = max(_status_kib("VmHWM"), _status_kib("VmRSS"))

    assert n == expected_phi3_parameters(config) == 3_821_079_552
    parts = phi3_parameter_breakdown(config)
    assert parts["embed_tokens"] == parts["lm_head"] == 32064 * 3072  # untied
    assert parts["qkv_proj"] == 32 * 3072 * 3 * 3072
    # 3.8B fp32 weights would need 15 GB; building the model on the meta device needs none.
    assert (peak - before) * 1024 < 1e9, f"RSS grew by {(peak - before) / 1e6:.1f} GB"


def test_phi3_tiny_takes_real_phi3_token_ids(tiny):
    assert tiny.vocab_size == 32064 and tiny.eos_token_id == 32000
    assert count_parameters(tiny) == expected_phi3_parameters(tiny) < 20_000_000


def test_a_typo_in_a_model_yaml_names_the_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("hidden_size: 64\nnum_attention_heads: 4\nnum_hiden_layers: 2\n")
    with pytest.raises(
        ModelConfigError, match=r"typo.yaml: unknown key 'num_hiden_layers'.*'num_hidden_layers'"
    ):
        load_model_config(path)


def test_a_wrong_type_or_unknown_name_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: wide\n")
    with pytest.raises(ModelConfigError, match="bad.yaml.*hidden_size"):
        load_model_config(path)
    with pytest.raises(ModelConfigError, match="phi3_tiny"):
        load_model_config("phi3_tinny")


def test_loss_falls_on_a_learnable_token_stream(learned):
    assert learned["steps"] == 30 and len(learned["losses"]) == 30
    assert learned["first_loss"] > 8.0  # ~ln(32064) = 10.4 at init
    assert learned["last_loss"] < learned["first_loss"] / 2
    assert learned["loss_fell"]
    check_loss_fell(learned)
    assert learned["tokens"] == 30 * BATCH * SEQ_LEN
    assert learned["tokens_per_s"] > 0 and learned["parameters"] == 8_536_704


def test_same_seed_gives_identical_losses(tiny, learned):
    again = train_smoke(pattern_batches(30), tiny, steps=30, threads=THREADS, seed=0)
    assert again["losses"] == learned["losses"]


def test_a_loss_that_does_not_fall_raises(tiny):
    frozen = train_smoke(pattern_batches(6), tiny, steps=6, lr=0.0, threads=THREADS)
    assert not frozen["loss_fell"]
    with pytest.raises(TrainSmokeError, match=r"did not fall: first \d+\.\d+ -> last \d+\.\d+"):
        check_loss_fell(frozen)


def test_batches_running_out_stop_the_run_unless_restart_is_given(tiny):
    batches = pattern_batches(2)
    stopped = train_smoke(batches, tiny, steps=5, threads=THREADS, log_every=0)
    assert stopped["steps"] == 2
    cycled = train_smoke(batches, tiny, steps=5, threads=THREADS, restart=lambda: batches)
    assert cycled["steps"] == 5 and cycled["train"]["restarts"] == 2


def test_samples_are_regrouped_into_batches(tiny):
    rows = [
        {"input_ids": b["input_ids"][i], "labels": b["labels"][i]}
        for b in pattern_batches(1)
        for i in range(BATCH)
    ]
    m = train_smoke(rows, tiny, steps=3, batch_size=2, threads=THREADS)
    assert m["steps"] == 2 and m["train"]["batch_shape"] == [2, SEQ_LEN]


def test_token_ids_past_the_vocabulary_are_a_tokenizer_mismatch(tiny):
    batch = pattern_batches(1)[0]
    batch["input_ids"][0, 5] = 50_000
    with pytest.raises(
        TrainSmokeError, match=r"token id 50000 .*vocabulary \[0, 32064\).*tokenizer"
    ):
        train_smoke([batch], tiny, steps=1, threads=THREADS)


def test_a_batch_without_targets_is_an_error(tiny):
    batch = pattern_batches(1)[0]
    batch["labels"][:] = -100
    with pytest.raises(TrainSmokeError, match="no target tokens"):
        train_smoke([batch], tiny, steps=1, threads=THREADS)
