"""The two-phase pretraining mixture: token budgets, Phi-3 tokens, Megatron shards, a manifest.

A mixture is data (YAML in the recipe): phases, each with a token budget and sources; a
source names a stage output (or files), an optional filter over its columns (a polars SQL
expression such as `edu_score >= 2.5`), a weight (its share of the phase's tokens) and a cap
on epochs. The stage runs in three steps:

1. tokenize (pipeline/tokens/token_cache.py): every input part of every source is filtered
   and tokenized once, fanned out through the executor (the tokenizer loaded once per
   worker), into a cache under `RUN/_cache/tokens/` that a killed run or a re-mix reuses.
2. allocate (pipeline/tokens/allocation.py): counts the available tokens per source and
   decides each source's tokens and epochs, `weight x budget`; a source that cannot supply
   its share within `max_epochs` fails the stage with a message naming it and the
   shortfall (or, with `on_short: scale`, shrinks the phase budget until every source
   fits, keeping the weights). Whole epochs repeat every document; a fractional epoch
   takes documents in a seeded order, cutting the last one so the source's tokens are exact.
3. write (here): each phase's documents, in a seeded shuffle across its sources, stream into
   `RUN/mixture/<phase>/shard-NNNNN.bin/.idx` (Megatron-LM's format; uint16 ids, each
   document ending with EOS), and `RUN/mixture/manifest.json` records per phase and source
   the documents, tokens and epochs, the tokenizer id and hash, seq_len, the seed and the
   inputs' hashes. Windows of seq_len (+1 for the shifted label) are cut by the loader
   (pipeline/tokens/loader.py), so no document is lost at a window edge and any seq_len can be
   read from the same shards.

Memory: the driver holds per phase four integers per drawn document (source, part,
document, tokens taken); tokens stream from the cache to the shards in bounded buffers.

    mixture:                  # a recipe's stage (configs/quickstart.yaml has the full one)
      phases:
        - name: phase1
          tokens: 200k
          sources:
            - {name: web, input: "@edu_score", weight: 1.0, max_epochs: 1}
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.executor import LOCAL, Executor
from pipeline.io import expand_inputs, read_json, write_json_atomic
from pipeline.progress import Progress
from pipeline.stage import ArtifactStage, PreflightError, StageConfig, is_ref
from pipeline.tokens.allocation import MixtureError, SourcePlan, allocate, draw, parse_tokens
from pipeline.tokens.token_cache import TokenizeJob, TokenizeTask, cache_key

log = logging.getLogger("primer")

MANIFEST_FORMAT = "primer-mixture/1"
_OPEN_READERS = 128  # token-cache parts kept open while writing a phase (LRU)


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    input: list[str]
    """"@stage" (its kept rows) or files/globs; several are concatenated."""
    filter: str | None = None
    """A polars SQL expression over the input's columns, e.g. `edu_phase2` or
    `edu_score >= 2.5 AND language = 'en'`; rows where it is true are used."""
    weight: float = Field(gt=0.0, le=1.0)
    """Share of the phase's tokens."""
    max_epochs: float = Field(1.0, gt=0.0)
    """Cap on how often the source's tokens may repeat (upsampling) to reach its share."""

    @field_validator("input", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("filter")
    @classmethod
    def _parses(cls, v: str | None) -> str | None:
        if v is not None:
            import polars as pl

            try:
                pl.sql_expr(v)
            except Exception as e:
                raise ValueError(f"filter {v!r} is not a polars SQL expression: {e}") from None
        return v


class PhaseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    tokens: int
    """The phase's token budget (tokens in its shards, EOS included): 400000, "400k", "2.5B"."""
    sources: list[SourceConfig] = Field(min_length=1)

    @field_validator("tokens", mode="before")
    @classmethod
    def _count(cls, v: Any) -> int:
        return parse_tokens(v)

    @model_validator(mode="after")
    def _weights(self) -> PhaseConfig:
        total = sum(s.weight for s in self.sources)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"phase {self.name!r}: source weights sum to {total:g}, not 1 "
                f"({', '.join(f'{s.name}={s.weight:g}' for s in self.sources)})"
            )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"phase {self.name!r}: source names repeat: {names}")
        if self.tokens <= 0:
            raise ValueError(f"phase {self.name!r}: tokens must be > 0")
        return self


class MixtureConfig(StageConfig):
    phases: list[PhaseConfig] = Field(min_length=1)
    tokenizer: str = "phi3"
    """`phi3` (the Phi-3 vocabulary, fetched from the package registry), a tokenizer.json
    path or folder, a .gguf, or a hub id such as microsoft/Phi-3-mini-4k-instruct."""
    seq_len: int = Field(4096, ge=8)
    """Training window recorded in the manifest (the loader's default); shards hold
    documents, so any seq_len can read them."""
    seed: int = 1234
    on_short: Literal["fail", "scale"] = "fail"
    """A source that cannot reach its share within max_epochs: fail the stage (naming it
    and the shortfall), or scale the phase budget down until every source fits."""
    shard_max_tokens: int = Field(1_000_000_000, ge=1)
    """A phase's shards are cut at this many tokens (a file per ~2 GB of uint16)."""
    tokenize_batch_rows: int = Field(1000, ge=1)

    @field_validator("shard_max_tokens", mode="before")
    @classmethod
    def _count(cls, v: Any) -> int:
        return parse_tokens(v)

    @model_validator(mode="after")
    def _unique(self) -> MixtureConfig:
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names repeat: {names}")
        return self


def _input_files(spec: str) -> list[str]:
    """A stage output folder's committed parts, else files/globs."""
    p = Path(spec)
    if (p / "_manifest.json").is_file():
        from pipeline.stage_runner import output_files

        return output_files(p)
    return expand_inputs([spec])


class MixtureStage(ArtifactStage):
    """Budgets, tokens and Megatron shards for each phase, and `manifest.json`.

    In the run summary, rows in are the documents available to the sources (summed over
    sources), kept those drawn at least once, and `mixture:not_drawn` those a budget left out.
    """

    name: ClassVar[str] = "mixture"
    Config: ClassVar[type[StageConfig]] = MixtureConfig
    config: MixtureConfig

    def preflight(self) -> None:
        from pipeline.tokens.tokenizer import check_tokenizer_spec

        try:
            check_tokenizer_spec(self.config.tokenizer)
        except ValueError as e:
            raise PreflightError("tokenizer", str(e)) from None
        for i, phase in enumerate(self.config.phases):
            for j, src in enumerate(phase.sources):
                files = [p for p in src.input if not is_ref(p)]
                try:
                    expand_inputs(files)
                except FileNotFoundError as e:
                    raise PreflightError(f"phases.{i}.sources.{j}.input", str(e)) from None

    def build(
        self, inputs: Sequence[str], out_dir: str, executor: Executor = LOCAL
    ) -> dict[str, Any]:
        from pipeline.tokens.tokenizer import load_tokenizer

        cfg = self.config
        out = Path(out_dir)
        tokenizer = load_tokenizer(cfg.tokenizer)
        cache = out.parent / "_cache" / "tokens"
        t0 = time.monotonic()

        # -- 1. tokenize every (input part, filter) once ---------------------------------
        parts: dict[tuple[str, str], list[TokenizeJob]] = {}
        jobs: dict[str, TokenizeJob] = {}
        for phase in cfg.phases:
            for src in phase.sources:
                files = [f for spec in src.input for f in _input_files(spec)]
                if not files:
                    raise MixtureError(f"phase {phase.name!r} source {src.name!r}: no input files")
                for f in files:
                    prefix = str(cache / cache_key(f, src.filter, tokenizer.sha256))
                    job = jobs.setdefault(prefix, TokenizeJob(f, src.filter, prefix))
                    parts.setdefault((phase.name, src.name), []).append(job)
        pending = [j for j in jobs.values() if not Path(f"{j.prefix}.json").is_file()]
        log.info(
            "mixture: %d input parts to tokenize (%d cached) with %s (sha256 %s)",
            len(pending), len(jobs) - len(pending), tokenizer.name, tokenizer.sha256[:12],
        )  # fmt: skip
        cache.mkdir(parents=True, exist_ok=True)
        self._tokenize(pending, executor)
        t_tok = time.monotonic() - t0
        stats = {p: read_json(f"{p}.json") for p in jobs}

        # -- 2. allocate ----------------------------------------------------------------
        from pipeline.tokens.shards import IndexedDataset

        phases_out, rows_in, used = [], 0, 0  # documents available / drawn at least once
        for pi, phase in enumerate(cfg.phases):
            plans, lengths = [], []
            for src in phase.sources:
                ls = [IndexedDataset(j.prefix).lengths for j in parts[(phase.name, src.name)]]
                flat = np.concatenate(ls) if ls else np.empty(0, np.int32)
                lengths.append(ls)
                plans.append(
                    SourcePlan(src.name, src.weight, src.max_epochs, int(flat.sum()), len(flat))
                )
                rows_in += len(flat)
            budget = allocate(phase.name, phase.tokens, plans, cfg.on_short)

            # -- 3. draw, shuffle across sources, write shards ---------------------------
            rng = np.random.default_rng([cfg.seed, pi])
            picks = []  # (source, part, doc, take) per drawn document
            for si, (plan, ls) in enumerate(zip(plans, lengths, strict=True)):
                offsets = np.cumsum([0, *map(len, ls)])
                flat = np.concatenate(ls) if ls else np.empty(0, np.int32)
                idx, take = draw(flat.astype(np.int64), plan.tokens, rng)
                used += len(np.unique(idx))
                part = np.searchsorted(offsets, idx, side="right") - 1
                picks.append(
                    np.stack([np.full(len(idx), si), part, idx - offsets[part], take], axis=1)
                )
            order = np.concatenate(picks)
            order = order[rng.permutation(len(order))]
            shards = self._write_phase(out / phase.name, order, phase, parts, tokenizer.eos_id)
            tokens = sum(s["tokens"] for s in shards)
            if tokens != budget:
                raise AssertionError(f"phase {phase.name}: wrote {tokens} tokens, planned {budget}")
            phases_out.append(
                {
                    "name": phase.name,
                    "tokens": tokens,
                    "documents": len(order),
                    "budget_tokens": phase.tokens,
                    "shards": shards,
                    "sources": [
                        self._source_entry(src, plan, order[:, 0] == si, parts, stats, phase)
                        for si, (src, plan) in enumerate(zip(phase.sources, plans, strict=True))
                    ],
                }
            )
            self._log_phase(phases_out[-1])

        manifest = {
            "format": MANIFEST_FORMAT,
            "seq_len": cfg.seq_len,
            "seed": cfg.seed,
            "dtype": "uint16",
            "tokenizer": {
                "name": tokenizer.name,
                "sha256": tokenizer.sha256,
                "eos_id": int(tokenizer.eos_id),
                "vocab_size": int(tokenizer.vocab_size),
            },
            "phases": phases_out,
            "tokenize_seconds": round(t_tok, 3),
            "seconds": round(time.monotonic() - t0, 3),
        }
        write_json_atomic(out / "manifest.json", manifest)
        return {
            "rows_in": rows_in,
            "rows_out": used,
            "dropped": {"mixture:not_drawn": rows_in - used} if rows_in > used else {},
            "tokens": {p["name"]: p["tokens"] for p in phases_out},
            "tokens_per_source": {
                p["name"]: {s["name"]: s["tokens"] for s in p["sources"]} for p in phases_out
            },
            "manifest": str(out / "manifest.json"),
        }

    def _tokenize(self, jobs: list[TokenizeJob], executor: Executor) -> None:
        if not jobs:
            return
        cfg = self.config
        progress = Progress("mixture:tokenize", len(jobs))
        task = TokenizeTask(cfg.tokenizer, cfg.tokenize_batch_rows)
        for s in executor.map(task, jobs, uses_model=True):
            progress.update(parts=1, rows=s["documents"])
        progress.close()

    def _write_phase(
        self,
        folder: Path,
        order: np.ndarray,
        phase: PhaseConfig,
        parts: dict[tuple[str, str], list[TokenizeJob]],
        eos: int,
    ) -> list[dict[str, Any]]:
        """Stream the drawn documents into shards of at most shard_max_tokens tokens."""
        from pipeline.tokens.shards import IndexedDataset, IndexedDatasetWriter

        shutil.rmtree(folder, ignore_errors=True)  # a killed attempt's shards and temp files
        folder.mkdir(parents=True)
        readers: OrderedDict[tuple[int, int], Any] = OrderedDict()
        shards: list[dict[str, Any]] = []
        writer, n = None, 0
        progress = Progress(f"mixture:{phase.name} documents", len(order))
        for si, pi, doc, take in order.tolist():
            key = (si, pi)
            if key in readers:
                readers.move_to_end(key)
            else:
                job = parts[(phase.name, phase.sources[si].name)][pi]
                readers[key] = IndexedDataset(job.prefix)
                if len(readers) > _OPEN_READERS:  # bounded open files, however many parts
                    readers.popitem(last=False)
            tokens = readers[key].get(doc)
            if take < len(tokens):  # a fractional epoch's last document, cut to fit
                tokens = np.append(tokens[: take - 1], np.asarray(eos, tokens.dtype))
            if writer is None:
                prefix = folder / f"shard-{len(shards):05d}"
                writer = IndexedDatasetWriter(str(prefix), dtype=np.uint16)
            writer.add_document(tokens)
            n += len(tokens)
            progress.update(parts=1, rows=len(tokens))
            if n >= self.config.shard_max_tokens:
                shards.append(self._close_shard(writer, prefix, folder))
                writer, n = None, 0
        if writer is not None:
            shards.append(self._close_shard(writer, prefix, folder))
        progress.close()
        return shards

    @staticmethod
    def _close_shard(writer: Any, prefix: Path, folder: Path) -> dict[str, Any]:
        info = writer.finalize()
        return {
            "prefix": f"{folder.name}/{prefix.name}",
            "documents": int(info["documents"]),
            "tokens": int(info["tokens"]),
        }

    @staticmethod
    def _source_entry(
        src: SourceConfig,
        plan: SourcePlan,
        rows: np.ndarray,
        parts: dict[tuple[str, str], list[TokenizeJob]],
        stats: dict[str, dict[str, Any]],
        phase: PhaseConfig,
    ) -> dict[str, Any]:
        jobs = parts[(phase.name, src.name)]
        return {
            "name": src.name,
            "documents": int(rows.sum()),
            "tokens": plan.tokens,
            "epochs": round(plan.epochs, 4),
            "weight": src.weight,
            "max_epochs": src.max_epochs,
            "available_documents": plan.available_documents,
            "available_tokens": plan.available_tokens,
            "filter": src.filter,
            "inputs": [{"path": j.path, "sha256": stats[j.prefix]["input_sha256"]} for j in jobs],
        }

    @staticmethod
    def _log_phase(p: dict[str, Any]) -> None:
        lines = [
            f"    {s['name']:<16}{s['tokens']:>14,} tokens {s['tokens'] / max(p['tokens'], 1):>7.1%}"
            f"  {s['documents']:>9,} docs  {s['epochs']:>6.2f} epochs"
            for s in p["sources"]
        ]
        log.info(
            "mixture: %s  %s tokens, %s documents, %d shard(s)\n%s",
            p["name"], f"{p['tokens']:,}", f"{p['documents']:,}", len(p["shards"]), "\n".join(lines),
        )  # fmt: skip
