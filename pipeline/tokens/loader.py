"""The trainer's feed: packed, shuffled, rank-sharded windows over a two-phase token mixture.

A mixture directory (`RUN/mixture/`) holds `manifest.json` and Megatron indexed-dataset
shards (`pipeline.tokens.shards`). Each phase's token stream is its shards' documents back to back,
in list order. With L = seq_len, window k of a phase holds

    input_ids = stream[k*L     : k*L + L]
    labels    = stream[k*L + 1 : k*L + L + 1]

so a phase of N tokens gives W = ceil((N - 1) / L) windows and every token is trained on:
a document cut at a window edge simply continues in the next window, and only the last
window is padded (inputs with the EOS id, labels with -100, which the loss ignores).
Why packing without per-document attention masks: for small-model pretraining the EOS token
between documents is the separator Megatron-LM's GPTDataset also relies on.

Order: phase p (its 0-based index in the manifest) plays its windows in the order
`np.random.default_rng([seed, p]).permutation(W_p)`; the global sample sequence is phase 0's
windows, then phase 1's. Rank r of `world_size` takes global samples r, r + world_size, ...
Inside a DataLoader with n workers, worker w takes this rank's samples in blocks of `block`
round-robin; with `block = batch_size` every batch is one block and the DataLoader's in-order
round-robin over workers yields exactly the single-process order.

Resuming is exact: `state_dict(consumed)` records where a rank stands (and what it was
reading), `PhasedTokenDataset.from_state(mixture, state)` starts at the next sample, and the
samples after a restart equal those of the uninterrupted run.

Memory holds only index arrays (shard offsets, one permutation entry per window); tokens
are read per window with positioned reads (`IndexedDataset.read_span`).

Usage (needs the `train` extra, for torch):

    from pipeline.tokens.loader import PhasedTokenDataset
    ds = PhasedTokenDataset("runs/x/mixture", rank=rank, world_size=world, block=batch_size)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=2)
    for step, batch in enumerate(dl):           # input_ids, labels: [B, L]; phase: [B]
        ...
        ckpt["data"] = ds.state_dict(consumed=(step + 1) * batch_size)
    ds = PhasedTokenDataset.from_state("runs/x/mixture", ckpt["data"], block=batch_size)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.tokens.mixture import MANIFEST_FORMAT
from pipeline.tokens.shards import IndexedDataset

STATE_FORMAT = "primer-loader-state/1"
IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index


def manifest_path(mixture: str | Path) -> Path:
    """The manifest of a mixture given as its directory or as the manifest file itself."""
    path = Path(mixture)
    return path / "manifest.json" if path.is_dir() else path


def _require(obj: dict, key: str, where: str, path: Path) -> Any:
    if key not in obj:
        raise ValueError(f"{path}: {where} has no '{key}'; rewrite the mixture manifest")
    return obj[key]


@dataclass
class _Phase:
    """One phase: its shards, where each starts in the phase stream, and its window order."""

    name: str
    index: int  # position in the manifest; seeds the phase's order
    shards: list[IndexedDataset]
    starts: np.ndarray  # int64[len(shards) + 1], token offset of each shard in the stream
    windows: int
    order: np.ndarray  # permutation of range(windows)

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the phase stream from `start`, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            shard = self.shards[s]
            local = start + done - int(self.starts[s])
            n = min(length - done, shard.num_tokens - local)
            out[done : done + n] = shard.read_span(local, n)
            done += n
            s += 1
        return out


class PhasedTokenDataset(torch.utils.data.IterableDataset):
    """Packed `seq_len` windows of a mixture, phase by phase, for one rank.

    Args:
        mixture: the mixture directory or its `manifest.json`.
        seq_len: window length; default the manifest's. Another value re-windows the
            same shards.
        rank, world_size: this rank takes global samples g with g % world_size == rank.
        seed: shuffling seed; default the manifest's.
        start: samples of this rank already consumed; iteration starts after them.
        block: samples per worker turn inside a DataLoader; set it to the batch size.
        phases: names of the phases to play (in manifest order); default all.
    """

    def __init__(
        self,
        mixture: str | Path,
        seq_len: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        start: int = 0,
        block: int = 1,
        phases: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.manifest_path = manifest_path(mixture)
        raw = self.manifest_path.read_bytes()
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        manifest = self._parse(raw)
        self.seq_len = int(seq_len if seq_len is not None else manifest["seq_len"])
        self.seed = int(seed if seed is not None else manifest["seed"])
        self.eos_id = int(
            _require(manifest["tokenizer"], "eos_id", "tokenizer", self.manifest_path)
        )
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if block < 1:
            raise ValueError(f"block must be >= 1 (set it to the batch size), got {block}")
        self.rank, self.world_size, self.block = rank, world_size, block

        available = [p["name"] for p in manifest["phases"]]
        wanted = available if phases is None else list(phases)
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise ValueError(
                f"{self.manifest_path}: no phase named {unknown}; the manifest has {available}"
            )
        self.phase_names = [n for n in available if n in wanted]
        self._phases = [
            self._open_phase(i, manifest["phases"][i], manifest["dtype"])
            for i, name in enumerate(available)
            if name in wanted
        ]
        self._phase_starts = np.cumsum([0] + [p.windows for p in self._phases], dtype=np.int64)
        if not 0 <= start <= self.num_samples():
            raise ValueError(
                f"start={start} is outside [0, {self.num_samples()}], the samples of rank "
                f"{rank}/{world_size} in {self.manifest_path}"
            )
        self.start = start

    def _parse(self, raw: bytes) -> dict:
        path = self.manifest_path
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"{path}: format {manifest.get('format')!r}, this loader reads {MANIFEST_FORMAT!r}"
            )
        for key in ("seq_len", "seed", "dtype", "tokenizer", "phases"):
            _require(manifest, key, "the manifest", path)
        for i, phase in enumerate(manifest["phases"]):
            _require(phase, "name", f"phases[{i}]", path)
            for j, shard in enumerate(_require(phase, "shards", f"phases[{i}]", path)):
                _require(shard, "prefix", f"phases[{i}].shards[{j}]", path)
        return manifest

    def _open_phase(self, index: int, phase: dict, dtype: str) -> _Phase:
        path, name = self.manifest_path, phase["name"]
        shards = []
        for j, entry in enumerate(phase["shards"]):
            shard = IndexedDataset(path.parent / entry["prefix"])
            if shard.dtype != np.dtype(dtype):
                raise ValueError(
                    f"{shard.prefix}: tokens are {shard.dtype.name} but {path} says {dtype}"
                )
            for key, have in (("documents", len(shard)), ("tokens", shard.num_tokens)):
                if key in entry and entry[key] != have:
                    raise ValueError(
                        f"{path}: phase {name!r} shards[{j}] lists {entry[key]} {key} but "
                        f"{shard.prefix} holds {have}; the shard was rewritten after the "
                        "manifest, rebuild the mixture"
                    )
            shards.append(shard)
        starts = np.cumsum([0] + [s.num_tokens for s in shards], dtype=np.int64)
        if "tokens" in phase and phase["tokens"] != int(starts[-1]):
            raise ValueError(
                f"{path}: phase {name!r} lists {phase['tokens']} tokens but its shards hold "
                f"{int(starts[-1])}; rebuild the mixture"
            )
        windows = max(0, math.ceil((int(starts[-1]) - 1) / self.seq_len))
        order = np.random.default_rng([self.seed, index]).permutation(windows)
        if windows < 2**32:
            order = order.astype(np.uint32)  # half the memory, same values
        return _Phase(name, index, shards, starts, windows, order)

    # -- sizes ----------------------------------------------------------------------------

    def total_samples(self) -> int:
        """Samples (windows) of all selected phases, over all ranks."""
        return int(self._phase_starts[-1])

    def num_samples(self) -> int:
        """Samples this rank plays in the whole run (consumed ones included)."""
        return len(range(self.rank, self.total_samples(), self.world_size))

    def __len__(self) -> int:
        return self.num_samples() - self.start

    def samples_per_phase(self) -> dict[str, int]:
        """Windows per phase over all ranks, in play order: phase boundaries in global samples."""
        return {p.name: p.windows for p in self._phases}

    def tokens_per_phase(self) -> dict[str, int]:
        return {p.name: p.tokens for p in self._phases}

    # -- samples --------------------------------------------------------------------------

    def sample(self, g: int) -> dict[str, Any]:
        """Global sample `g` (any rank's): its window, phase and padding."""
        if not 0 <= g < self.total_samples():
            raise IndexError(f"sample {g} outside [0, {self.total_samples()})")
        p = int(np.searchsorted(self._phase_starts, g, side="right")) - 1
        phase = self._phases[p]
        k = int(phase.order[g - int(self._phase_starts[p])])
        L = self.seq_len
        lo = k * L
        span = phase.read(lo, min(L + 1, phase.tokens - lo))
        input_ids = np.full(L, self.eos_id, dtype=np.int64)
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        n_in = min(L, span.size)
        input_ids[:n_in] = span[:n_in]
        labels[: span.size - 1] = span[1:]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "phase": phase.index,
        }

    def _local_indices(self, worker: int, workers: int) -> Iterator[int]:
        """This rank's sample indices (from `start`) that belong to `worker`, in order."""
        end = self.num_samples()
        step = workers * self.block
        for lo in range(self.start + worker * self.block, end, step):
            yield from range(lo, min(lo + self.block, end))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for i in self._local_indices(worker, workers):
            yield self.sample(self.rank + i * self.world_size)

    # -- resuming -------------------------------------------------------------------------

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """Where this rank stands after `consumed` of its samples (counted from the run's start)."""
        if not 0 <= consumed <= self.num_samples():
            raise ValueError(f"consumed={consumed} outside [0, {self.num_samples()}]")
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "phases": list(self.phase_names),
            "consumed": consumed,
            "manifest_sha256": self.manifest_sha256,
        }

    @classmethod
    def from_state(
        cls,
        mixture: str | Path,
        state: dict[str, Any],
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int | None = None,
        seq_len: int | None = None,
        block: int = 1,
    ) -> PhasedTokenDataset:
        """Resume from `state_dict()`; arguments given must agree with the saved state."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r}, want {STATE_FORMAT!r}")
        path = manifest_path(mixture)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        if sha != state["manifest_sha256"]:
            raise ValueError(
                f"{path} changed since the checkpoint was saved (sha256 {sha[:12]}..., the "
                f"state has {state['manifest_sha256'][:12]}...); resume with the mixture the "
                "run started with"
            )
        for key, given in (
            ("rank", rank),
            ("world_size", world_size),
            ("seed", seed),
            ("seq_len", seq_len),
        ):
            if given is not None and given != state[key]:
                raise ValueError(
                    f"cannot resume: the checkpoint's loader state has {key}={state[key]} but "
                    f"{key}={given} was asked for; the sample order would change. Resume with "
                    f"{key}={state[key]} or restart the data from the beginning"
                )
        return cls(
            path,
            seq_len=state["seq_len"],
            rank=state["rank"],
            world_size=state["world_size"],
            seed=state["seed"],
            start=state["consumed"],
            block=block,
            phases=state["phases"],
        )
