"""Phi-3 model configs: `configs/models/<name>.yaml` -> `transformers.Phi3Config`, and parameter counts.

A model YAML holds `Phi3Config` kwargs. `load_model_config` checks them (an unknown key is
an error naming the closest valid one, where Phi3Config itself would keep a misspelt kwarg
and build the default model), and `count_parameters` counts `Phi3ForCausalLM`'s parameters
on the meta device, never allocating the weights, checked against the analytic formula of
`phi3_parameter_breakdown` so a change in transformers' Phi-3 layout is caught.
`phi3_mini` is the real Phi-3-mini-4k architecture; `phi3_tiny` the same family at
2 layers x 128 wide with the full vocabulary, for the CPU training smoke
(pipeline/tokens/train_smoke.py).

    from pipeline.tokens.phi3 import count_parameters, load_model_config
    count_parameters(load_model_config("phi3_mini"))
    load_model_config("phi3_tiny", num_hidden_layers=4)

Needs the `train` extra (torch, transformers); both import lazily, inside the functions.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from transformers import Phi3Config

MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"

# Phi3Config kwargs that are not dataclass fields: the legacy RoPE keys it converts into
# `rope_parameters`, and `head_dim`, which Phi3Attention reads when present.
_EXTRA_CONFIG_KEYS = frozenset({"rope_theta", "rope_scaling", "partial_rotary_factor", "head_dim"})


class ModelConfigError(ValueError):
    """A model YAML that cannot build a Phi3Config; the message names the file and the key."""


def model_names() -> list[str]:
    """The model configs shipped in configs/models/, by name."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def model_config_path(path_or_name: str | Path) -> Path:
    """`phi3_tiny` -> configs/models/phi3_tiny.yaml; a path is returned as it is."""
    text = str(path_or_name)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        path = MODELS_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ModelConfigError(
                f"no model config named {text!r}; known: {', '.join(model_names())} "
                f"(or give a path to a YAML of Phi3Config kwargs)"
            )
        return path
    path = Path(path_or_name)
    if not path.is_file():
        raise ModelConfigError(f"{path}: model config not found")
    return path


def load_model_config(path_or_name: str | Path, **overrides: Any) -> Phi3Config:
    """A `transformers.Phi3Config` from a model YAML (a name in configs/models/ or a path).

    Unknown keys are an error naming the key and the closest valid one: Phi3Config itself
    keeps a misspelt kwarg as a stray attribute and builds the default model. `overrides`
    replace keys of the file (`load_model_config("phi3_tiny", num_hidden_layers=4)`).
    """
    from transformers import Phi3Config

    path = model_config_path(path_or_name)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: expected a mapping of Phi3Config kwargs")
    raw = {**raw, **overrides}
    known = {f.name for f in dataclasses.fields(Phi3Config)} | _EXTRA_CONFIG_KEYS
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else f"valid keys: {', '.join(sorted(known))}"
            )
            raise ModelConfigError(f"{path}: unknown key {key!r} ({hint})")
    try:
        config = Phi3Config(**raw)
    except Exception as e:  # strict-dataclass type errors, RoPE validation
        raise ModelConfigError(f"{path}: not a valid Phi3Config: {e}") from e
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if "head_dim" not in raw and config.hidden_size % heads:
        raise ModelConfigError(
            f"{path}: hidden_size {config.hidden_size} is not a multiple of "
            f"num_attention_heads {heads}"
        )
    if heads % kv:
        raise ModelConfigError(
            f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )
    return config


def phi3_parameter_breakdown(config: Phi3Config) -> dict[str, int]:
    """Parameters of Phi3ForCausalLM by tensor kind, from the config alone (no biases)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    embed = config.vocab_size * h
    return {
        "embed_tokens": embed,
        "qkv_proj": layers * h * (q + 2 * kv),
        "o_proj": layers * q * h,
        "gate_up_proj": layers * h * 2 * inter,
        "down_proj": layers * inter * h,
        "layer_norms": layers * 2 * h,  # input_layernorm, post_attention_layernorm
        "final_norm": h,
        "lm_head": 0 if config.tie_word_embeddings else embed,
    }


def expected_phi3_parameters(config: Phi3Config) -> int:
    """The analytic parameter count of Phi3ForCausalLM(config); see phi3_parameter_breakdown."""
    return sum(phi3_parameter_breakdown(config).values())


def count_parameters(config: Phi3Config) -> int:
    """Parameters of Phi3ForCausalLM(config), counted on the meta device (no weights allocated).

    Raises if the count disagrees with `expected_phi3_parameters`, i.e. if transformers'
    Phi-3 changed shape under us.
    """
    import torch
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    counted = sum(p.numel() for p in model.parameters())  # tied weights are listed once
    expected = expected_phi3_parameters(config)
    if counted != expected:
        raise RuntimeError(
            f"Phi3ForCausalLM has {counted:,} parameters but the Phi-3 formula gives "
            f"{expected:,} ({phi3_parameter_breakdown(config)}); transformers' Phi-3 layout "
            "changed, update phi3_parameter_breakdown"
        )
    return counted
