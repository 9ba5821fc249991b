"""Train a tiny Phi-3-architecture model for a few dozen steps on CPU: does the data train?

A mixture can tokenize, shard and load cleanly and still be wrong in ways only training
shows: labels not shifted (the loss sits at ln(vocab) or collapses to 0), token ids past the
model's vocabulary (a tokenizer/model mismatch), windows that are all padding. The smoke
trains `transformers.Phi3ForCausalLM` on the mixture's own batches and fails loudly
(`TrainSmokeError`) if the loss does not fall.

The model is built from `configs/models/<name>.yaml` (pipeline/tokens/phi3.py); the
default, `phi3_tiny`, has the full 32,064-id vocabulary, so real Phi-3 token ids go in
unchanged. Training is fp32 AdamW with a short linear warmup, cosine decay to a tenth and
gradient clipping at 1.0. The loss is computed here from the logits: the loader's labels
are already shifted (labels[t] is the target of position t, -100 ignored), and passing
them to the model would shift them a second time.

    primer train-smoke runs/quickstart --steps 40 --model phi3_tiny --seq-len 256

    from pipeline.tokens.train_smoke import train_smoke_from_mixture
    metrics = train_smoke_from_mixture("runs/quickstart/mixture", out_dir="runs/quickstart/smoke")

Needs the `train` extra (torch, transformers); both import lazily, inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from pipeline.executor import LOCAL, Executor
from pipeline.stage import ArtifactStage, PreflightError, StageConfig, require_path
from pipeline.tokens.phi3 import ModelConfigError, load_model_config, model_config_path

if TYPE_CHECKING:
    import torch
    from transformers import Phi3Config

log = logging.getLogger("primer")

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

LOSS_CHUNK_TOKENS = 128
"""Positions per lm_head + softmax chunk: 128 x 32064 fp32 logits are 16 MB (see _loss)."""

LOSS_WINDOW = 5
"""Steps averaged into `first_loss` and `last_loss`."""

MIN_RELATIVE_DROP = 0.1
"""The loss "fell" when last_loss < first_loss * (1 - MIN_RELATIVE_DROP). From a fresh
init (loss ~ ln 32064 = 10.4) a few dozen steps on real text fall by several nats; a run
that moves less than 10% is not learning."""

# What the metrics record about the architecture.
_ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "sliding_window",
    "tie_word_embeddings",
)


class TrainSmokeError(RuntimeError):
    """The smoke could not train, or trained and the loss did not fall."""


# -- training -------------------------------------------------------------------------------


def _rebatch(items: Iterable[dict], batch_size: int | None) -> Iterator[dict]:
    """Batches as given (batch_size None), or rows of samples/batches regrouped by batch_size."""
    if batch_size is None:
        yield from items
        return
    import torch

    ids: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    rows = 0
    for item in items:
        x, y = item["input_ids"], item["labels"]
        ids.append(x if x.dim() == 2 else x.unsqueeze(0))
        labels.append(y if y.dim() == 2 else y.unsqueeze(0))
        rows += ids[-1].shape[0]
        while rows >= batch_size:
            x, y = torch.cat(ids), torch.cat(labels)
            yield {"input_ids": x[:batch_size], "labels": y[:batch_size]}
            ids, labels = [x[batch_size:]], [y[batch_size:]]
            rows -= batch_size
    if rows:
        yield {"input_ids": torch.cat(ids), "labels": torch.cat(labels)}


def _check_batch(batch: dict, config: Phi3Config, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels of batch `n`, checked against the model before they reach it."""
    import torch

    for key in ("input_ids", "labels"):
        if key not in batch:
            raise TrainSmokeError(f"batch {n} has no {key!r} (keys: {sorted(batch)})")
    x, y = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["labels"])
    if x.dim() != 2 or x.shape != y.shape:
        raise TrainSmokeError(
            f"batch {n}: input_ids {tuple(x.shape)} and labels {tuple(y.shape)} must both be "
            "[batch, seq_len]"
        )
    if x.shape[1] > config.max_position_embeddings:
        raise TrainSmokeError(
            f"batch {n}: seq_len {x.shape[1]} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}; use a shorter --seq-len"
        )
    vocab = config.vocab_size
    targets = y[y != IGNORE_INDEX]
    top = max(int(x.max()), int(targets.max()) if targets.numel() else -1)
    bottom = min(int(x.min()), int(targets.min()) if targets.numel() else 0)
    if top >= vocab or bottom < 0:
        raise TrainSmokeError(
            f"batch {n}: token id {top if top >= vocab else bottom} is outside the model's "
            f"vocabulary [0, {vocab}): the tokenizer and the model do not match (the mixture's "
            "tokenizer must be Phi-3's, or give a model config with a larger vocab_size)"
        )
    if not targets.numel():
        raise TrainSmokeError(
            f"batch {n} has no target tokens (every label is {IGNORE_INDEX}); the loader padded "
            "whole windows, which is a bug in the mixture or the loader"
        )
    return x.long(), y.long()


def _loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the labels that are not -100, labels taken as already shifted.

    The lm_head and the softmax run LOSS_CHUNK_TOKENS positions at a time rather than on one
    [tokens, 32064] logits tensor: each chunk's buffers stay under glibc's 32 MB mmap cap and
    are reused from the heap, where a full-size tensor is mapped and page-faulted afresh
    every step: fewer page faults, less CPU time a step and a lower peak. The loss equals
    the unchunked one up to fp32 summation order.
    """
    import torch.nn.functional as F

    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state.flatten(0, 1)
    targets = labels.flatten()
    total = sum(
        F.cross_entropy(
            model.lm_head(hidden[i : i + LOSS_CHUNK_TOKENS]).float(),
            targets[i : i + LOSS_CHUNK_TOKENS],
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        for i in range(0, targets.numel(), LOSS_CHUNK_TOKENS)
    )
    return total / (targets != IGNORE_INDEX).sum()


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_smoke(
    batches: Iterable[dict],
    config: Phi3Config,
    steps: int = 40,
    lr: float = 3e-3,
    batch_size: int | None = None,
    threads: int = 2,
    seed: int = 0,
    log_every: int = 5,
    on_step: Callable[[int, float], None] | None = None,
    restart: Callable[[], Iterable[dict]] | None = None,
) -> dict[str, Any]:
    """Train a fresh `Phi3ForCausalLM(config)` for `steps` steps and report its losses.

    Args:
        batches: dicts with `input_ids` and `labels`, LongTensor[B, L] (or [L] with
            `batch_size`); labels are already shifted, -100 is ignored. Other keys are ignored.
        batch_size: None uses the batches as they come; a number regroups their rows into
            batches of that many.
        threads: torch CPU threads for the run (restored afterwards).
        seed: seeds the weights; the same seed and batches give the same losses.
        on_step: called as on_step(step, loss) after every step.
        restart: when `batches` runs out before `steps`, a new iterable from `restart()`
            continues the run; without it the run stops there and reports the steps done.

    Returns metrics: steps, losses, first_loss and last_loss (means of the first and last
    5 steps), loss_fell, tokens, target_tokens, seconds, tokens_per_s, parameters, config
    (the architecture) and train (the hyperparameters).
    """
    import torch
    from transformers import Phi3ForCausalLM

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    warmup = max(1, steps // 10)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config).float().train()
        parameters = sum(p.numel() for p in model.parameters())
        # Phi-3-style AdamW: decay the matrices, not the norms.
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=(0.9, 0.95),
            eps=1e-8,
            fused=True,  # one kernel per tensor instead of a dozen elementwise ops; cheaper on CPU
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _lr_factor(s, steps, warmup)
        )
        log.info(
            "train-smoke: Phi3ForCausalLM %d layers x %d, %s parameters; %d steps, lr %g, "
            "%d threads",
            config.num_hidden_layers,
            config.hidden_size,
            f"{parameters:,}",
            steps,
            lr,
            threads,
        )

        source = _rebatch(batches, batch_size)
        losses: list[float] = []
        tokens = target_tokens = passes = 0
        shape: tuple[int, ...] = ()
        start = time.perf_counter()
        for step in range(steps):
            batch = next(source, None)
            if batch is None and restart is not None:
                passes += 1
                source = _rebatch(restart(), batch_size)
                batch = next(source, None)
                if batch is None:
                    raise TrainSmokeError("restart() gave no batches; the data is empty")
            if batch is None:
                log.warning("train-smoke: the batches ran out after %d of %d steps", step, steps)
                break
            input_ids, labels = _check_batch(batch, config, step)
            shape = tuple(input_ids.shape)

            loss = _loss(model, input_ids, labels)
            if not torch.isfinite(loss):
                raise TrainSmokeError(
                    f"loss is {loss.item()} at step {step} (lr {lr}); the run diverged"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()

            losses.append(loss.item())
            tokens += input_ids.numel()
            target_tokens += int((labels != IGNORE_INDEX).sum())
            if on_step is not None:
                on_step(step, losses[-1])
            done = step + 1
            if log_every and (done % log_every == 0 or done == steps):
                elapsed = time.perf_counter() - start
                log.info(
                    "train-smoke step %d/%d  loss %.4f  %s tokens/s  ETA %s",
                    done,
                    steps,
                    losses[-1],
                    f"{tokens / elapsed:,.0f}",
                    timedelta(seconds=round(elapsed / done * (steps - done))),
                )
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(saved_threads)

    if not losses:
        raise TrainSmokeError("no batches to train on; the data is empty")
    window = max(1, min(LOSS_WINDOW, len(losses) // 2))  # first and last never overlap
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    return {
        "steps": len(losses),
        "losses": losses,
        "first_loss": first,
        "last_loss": last,
        "loss_fell": last < first * (1 - MIN_RELATIVE_DROP),
        "tokens": tokens,
        "target_tokens": target_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "parameters": parameters,
        "config": {k: getattr(config, k) for k in _ARCH_KEYS},
        "train": {
            "steps_requested": steps,
            "batch_shape": list(shape),
            "lr": lr,
            "warmup_steps": warmup,
            "schedule": "linear warmup, cosine to 0.1 x lr",
            "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1 on matrices), clip 1.0",
            "dtype": "float32",
            "threads": threads,
            "seed": seed,
            "restarts": passes,
        },
    }


def check_loss_fell(metrics: dict[str, Any]) -> None:
    """Raise TrainSmokeError unless the metrics of `train_smoke` show the loss falling."""
    if metrics["loss_fell"]:
        return
    raise TrainSmokeError(
        f"the loss did not fall: first {metrics['first_loss']:.4f} -> last "
        f"{metrics['last_loss']:.4f} over {metrics['steps']} steps (needs a drop of at least "
        f"{MIN_RELATIVE_DROP:.0%}, lr {metrics['train']['lr']}). Check that labels are the "
        "input_ids shifted by one and not mostly -100, that the windows hold text rather than "
        "padding, and that lr > 0; or run more --steps"
    )


def train_smoke_from_mixture(
    mixture_dir: str | Path,
    model: str | Path = "phi3_tiny",
    steps: int = 40,
    batch_size: int = 4,
    seq_len: int | None = 256,
    lr: float = 3e-3,
    threads: int = 2,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train the smoke on a mixture's shards; raise TrainSmokeError if the loss did not fall.

    `model` is a config name (configs/models/) or a YAML path. `seq_len` re-windows the
    shards (None: the manifest's seq_len; a full-length window makes CPU steps slow).
    The data cycles from the start if it runs out before `steps`. With `out_dir`,
    `out_dir/metrics.json` is written (atomically) before any loss check, so a failed run
    leaves its losses behind too.
    """
    import torch

    from pipeline.io import write_json_atomic
    from pipeline.tokens.loader import PhasedTokenDataset

    config = load_model_config(model)
    dataset = PhasedTokenDataset(mixture_dir, seq_len=seq_len, seed=seed, block=batch_size)
    manifest = json.loads(dataset.manifest_path.read_text())
    tokenizer = manifest.get("tokenizer", {})
    if int(tokenizer.get("vocab_size", 0)) > config.vocab_size:
        raise TrainSmokeError(
            f"{dataset.manifest_path}: the mixture's tokenizer {tokenizer.get('name')!r} has "
            f"{tokenizer['vocab_size']} ids but model {model!r} has vocab_size "
            f"{config.vocab_size}: the tokenizer and the model do not match"
        )
    if len(dataset) == 0:
        raise TrainSmokeError(f"{dataset.manifest_path}: the mixture has no samples to train on")

    def loader() -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)

    phase_names = [p["name"] for p in manifest["phases"]]
    trained: Counter[int] = Counter()  # samples trained on, by phase index

    def counted(batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            trained.update(batch["phase"].tolist())
            yield batch

    log.info(
        "train-smoke: %s, %d samples of %d tokens, model %s",
        dataset.manifest_path.parent,
        len(dataset),
        dataset.seq_len,
        model,
    )
    metrics = train_smoke(
        counted(loader()),
        config,
        steps=steps,
        lr=lr,
        threads=threads,
        seed=seed,
        restart=lambda: counted(loader()),
    )
    metrics["model"] = str(model)
    metrics["mixture"] = {
        "path": str(dataset.manifest_path.parent),
        "manifest_sha256": dataset.manifest_sha256,
        "tokenizer": tokenizer.get("name"),
        "seq_len": dataset.seq_len,
        "samples": len(dataset),
        "samples_trained_per_phase": {phase_names[i]: n for i, n in sorted(trained.items())},
    }
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    check_loss_fell(metrics)
    return metrics


class TrainSmokeConfig(StageConfig):
    mixture: str
    """The mixture folder (in a recipe: "@mixture")."""
    model: str = "phi3_tiny"
    """A config name in configs/models/ or a model YAML (transformers Phi3Config keys)."""
    steps: int = Field(40, ge=LOSS_WINDOW * 2)
    batch_size: int = Field(4, ge=1)
    seq_len: int | None = Field(256, ge=8)
    """Window length; None reads the manifest's (4,096 makes CPU steps slow)."""
    lr: float = Field(3e-3, gt=0.0)
    threads: int = Field(2, ge=1)
    seed: int = 0


class TrainSmokeStage(ArtifactStage):
    """A tiny Phi-3-architecture model trained on the mixture's shards; fails unless the loss falls."""

    name: ClassVar[str] = "train_smoke"
    Config: ClassVar[type[StageConfig]] = TrainSmokeConfig
    config: TrainSmokeConfig

    def preflight(self) -> None:
        try:
            model_config_path(self.config.model)
        except ModelConfigError as e:
            raise PreflightError("model", str(e)) from None
        require_path("mixture", self.config.mixture, "dir")

    def train(self, out_dir: str | Path) -> dict[str, Any]:
        """Run the smoke with this config (the stage and `primer train-smoke` both do)."""
        cfg = self.config
        return train_smoke_from_mixture(
            cfg.mixture,
            model=cfg.model,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            lr=cfg.lr,
            threads=cfg.threads,
            seed=cfg.seed,
            out_dir=out_dir,
        )

    def build(
        self, inputs: Sequence[str], out_dir: str, executor: Executor = LOCAL
    ) -> dict[str, Any]:
        cfg = self.config
        m = self.train(out_dir)
        return {"rows_in": m["steps"] * cfg.batch_size} | {
            k: m[k]
            for k in (
                "steps",
                "first_loss",
                "last_loss",
                "loss_fell",
                "tokens",
                "tokens_per_s",
                "parameters",
            )
        }
