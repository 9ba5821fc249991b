"""The two-phase pretraining mixture: token budgets, Phi-3 tokens, Megatron shards, a manifest.

A mixture is data (YAML in the recipe): phases, each with a token budget and sources; a
source names a stage output (or files), an optional filter over its columns (a polars SQL
expression such as `edu_score >= 2.5`), a weight (its share of the phase's tokens) and a cap
on epochs. The stage runs in four steps, each fanned out through the executor:

1. tokenize (pipeline/tokens/token_cache.py): every input part of every source is filtered
   and tokenized once (the tokenizer loaded once per worker) into a cache under
   `RUN/_cache/tokens/` (tokens and document ids) that a killed run or a re-mix reuses.
2. allocate (pipeline/tokens/allocation.py, here): from per-part counts only, each source
   gets exactly `weight x budget` tokens; a source that cannot supply its share within
   `max_epochs` fails the stage with a message naming it and the shortfall (or, with
   `on_short: scale`, shrinks the phase budget until every source fits, keeping the
   weights). Whole epochs repeat every document; a fractional epoch takes documents in a
   seeded order and cuts the last one so the source's tokens are exact.
3. draw and route (pipeline/tokens/draws.py): every per-document decision is a function of
   (seed, phase, source, part, document, epoch); the fractional epoch's cut is a
   distributed quantile, and each part's drawn rows go, sorted by a seeded order key, to a
   route file under `RUN/mixture/_route/` (deleted at the end).
4. write (pipeline/tokens/shard_writer.py): contiguous ranges of that order become
   `RUN/mixture/<phase>/shard-NNNNN.bin/.idx` (Megatron-LM's format; uint16 ids, each
   document ending with EOS), at most `shard_max_tokens` each, written in parallel, each
   with its provenance sidecar `shard-NNNNN.docs.parquet` (source, input part, document
   id, epoch, tokens, offset, cut: the columns are described in shard_writer.py).
   `RUN/mixture/manifest.json` records per phase and source the documents, tokens and
   epochs, the tokenizer id and hash, seq_len, the seed and the inputs' hashes; timings go
   to the stage's `_manifest.json`, so the same inputs and seed give the same bytes
   (shards, sidecars, manifest) whatever the number of workers. Windows of seq_len (+1 for
   the shifted label) are cut by the loader (pipeline/tokens/loader.py), so no document is
   lost at a window edge and any seq_len can be read from the same shards.

Memory: the driver holds per part and per source counts, and per order-key bucket (at
most 2**20 per phase) a token count; never one entry per document.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.executor import LOCAL, Executor
from pipeline.io import expand_inputs, read_json, write_json_atomic
from pipeline.progress import Progress
from pipeline.stage import ArtifactStage, PreflightError, StageConfig, is_ref
from pipeline.tokens.allocation import MixtureError, SourcePlan, allocate, parse_tokens
from pipeline.tokens.draws import (
    KEY_VERSION,
    PartRef,
    Route,
    RouteJob,
    SourceDraw,
    cut_fractional,
    plan_draw,
)
from pipeline.tokens.shard_writer import (
    ShardJob,
    WriteShard,
    bucket_bits,
    expand_bucket,
    plan_shards,
    sidecar_path,
    write_parts,
)
from pipeline.tokens.token_cache import TokenizeJob, TokenizeTask, cache_key, is_cached

log = logging.getLogger("primer")

MANIFEST_FORMAT = "primer-mixture/1"


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
        pending = [j for j in jobs.values() if not is_cached(j.prefix)]
        log.info(
            "mixture: %d input parts to tokenize (%d cached) with %s (sha256 %s)",
            len(pending), len(jobs) - len(pending), tokenizer.name, tokenizer.sha256[:12],
        )  # fmt: skip
        cache.mkdir(parents=True, exist_ok=True)
        self._tokenize(pending, executor)
        t_tok = time.monotonic() - t0
        stats = {p: read_json(f"{p}.json") for p in jobs}

        # -- 2. allocate: counts per part and source only ---------------------------------
        phases = [self._allocate(pi, phase, parts, stats) for pi, phase in enumerate(cfg.phases)]

        # -- 3. cut each fractional epoch, route every drawn row by its order key --------
        route_dir = out / "_route"
        shutil.rmtree(route_dir, ignore_errors=True)
        self._cut_fractional(phases, executor)
        self._route(phases, route_dir, executor)
        t_plan = time.monotonic() - t0 - t_tok

        # -- 4. group key buckets into shards, write them in parallel ---------------------
        shard_jobs = []
        for ph in phases:
            folder = out / ph.config.name
            shutil.rmtree(folder, ignore_errors=True)  # a killed attempt's shards
            folder.mkdir(parents=True)
            ph.shard_jobs = self._plan_shards(ph, route_dir, folder, tokenizer.eos_id)
            shard_jobs += ph.shard_jobs
        self._write(phases, shard_jobs, executor)
        shutil.rmtree(route_dir, ignore_errors=True)

        phases_out = [self._phase_entry(ph) for ph in phases]
        for p in phases_out:
            self._log_phase(p)
        manifest = {
            "format": MANIFEST_FORMAT,
            "seq_len": cfg.seq_len,
            "seed": cfg.seed,
            "dtype": "uint16",
            "order": KEY_VERSION,
            "tokenizer": {
                "name": tokenizer.name,
                "sha256": tokenizer.sha256,
                "eos_id": int(tokenizer.eos_id),
                "vocab_size": int(tokenizer.vocab_size),
            },
            "phases": phases_out,
        }
        write_json_atomic(out / "manifest.json", manifest)
        rows_in = sum(p.available_documents for ph in phases for p in ph.plans)
        used = sum(u for ph in phases for u in ph.used)
        return {
            "rows_in": rows_in,
            "rows_out": used,
            "dropped": {"mixture:not_drawn": rows_in - used} if rows_in > used else {},
            "tokens": {p["name"]: p["tokens"] for p in phases_out},
            "tokens_per_source": {
                p["name"]: {s["name"]: s["tokens"] for s in p["sources"]} for p in phases_out
            },
            "manifest": str(out / "manifest.json"),
            "seconds": {
                "tokenize": round(t_tok, 3),
                "plan": round(t_plan, 3),
                "write": round(time.monotonic() - t0 - t_tok - t_plan, 3),
                "total": round(time.monotonic() - t0, 3),
            },
        }

    def _tokenize(self, jobs: list[TokenizeJob], executor: Executor) -> None:
        if not jobs:
            return
        cfg = self.config
        progress = Progress("mixture:tokenize", len(jobs))
        task = TokenizeTask(cfg.tokenizer, cfg.tokenize_batch_rows)
        # Plain tasks, not an actor pool: the tokenizer is kept per worker process
        # (token_cache.process_tokenizer), and tasks start on Ray's idle workers at once.
        for s in executor.map(task, jobs):
            progress.update(parts=1, rows=s["documents"])
        progress.close()

    def _allocate(
        self,
        pi: int,
        phase: PhaseConfig,
        parts: dict[tuple[str, str], list[TokenizeJob]],
        stats: dict[str, dict[str, Any]],
    ) -> _Phase:
        refs = [
            [
                PartRef.of(phase.name, pi, src.name, si, j, job, stats[job.prefix])
                for j, job in enumerate(parts[(phase.name, src.name)])
            ]
            for si, src in enumerate(phase.sources)
        ]
        plans = [
            SourcePlan(src.name, src.weight, src.max_epochs, *PartRef.totals(rs))
            for src, rs in zip(phase.sources, refs, strict=True)
        ]
        budget = allocate(phase.name, phase.tokens, plans, self.config.on_short)
        bits = bucket_bits(budget, self.config.shard_max_tokens)
        draws = [plan_draw(p.available_tokens, p.tokens) for p in plans]
        zeros = [0] * len(plans)
        return _Phase(
            pi,
            phase,
            refs,
            plans,
            budget,
            draws,
            bits,
            np.zeros(1 << bits, np.int64),
            zeros,
            zeros[:],
        )

    def _cut_fractional(self, phases: list[_Phase], executor: Executor) -> None:
        cut = cut_fractional(
            self.config.seed,
            {(ph.index, si): (d, ph.refs[si]) for ph in phases for si, d in enumerate(ph.draws)},
            executor,
        )
        for (pi, si), draw in cut.items():
            phases[pi].draws[si] = draw

    def _route(self, phases: list[_Phase], route_dir: Path, executor: Executor) -> None:
        """Every part's drawn rows into its route file (workers); bucket counts summed here."""
        jobs = [
            RouteJob(
                r, ph.draws[si], str(route_dir / ph.config.name / f"{si:04d}-{r.part:07d}"), ph.bits
            )
            for ph in phases
            for si, rs in enumerate(ph.refs)
            for r in rs
            if r.documents and (ph.draws[si].full or ph.draws[si].rest)
        ]
        progress = Progress("mixture:route", len(jobs))
        routed: dict[int, dict[tuple[int, int], RouteJob]] = {ph.index: {} for ph in phases}
        for res in executor.map(Route(self.config.seed), jobs):
            ref = res.job.part
            ph = phases[ref.phase_index]
            ph.bucket_tokens[res.buckets] += res.bucket_tokens
            ph.rows[ref.source_index] += res.rows
            ph.used[ref.source_index] += res.used
            routed[ph.index][(ref.source_index, ref.part)] = res.job
            progress.update(parts=1, rows=res.rows)
        progress.close()
        for ph in phases:  # in (source, part) order, whatever order the workers finished in
            ph.routed = [(j.part, j.path) for _, j in sorted(routed[ph.index].items())]

    def _plan_shards(self, ph: _Phase, route_dir: Path, folder: Path, eos: int) -> list[ShardJob]:
        parts_file = route_dir / ph.config.name / "parts.json"
        write_parts(parts_file, ph.routed)
        starts = plan_shards(
            ph.bucket_tokens,
            ph.bits,
            self.config.shard_max_tokens,
            lambda b: expand_bucket(ph.routed, b, ph.bits),
        )
        ends = [*starts[1:], None]
        return [
            ShardJob(k, str(folder / f"shard-{k:05d}"), str(parts_file), lo, hi, eos)
            for k, (lo, hi) in enumerate(zip(starts, ends, strict=True))
        ]

    def _write(self, phases: list[_Phase], jobs: list[ShardJob], executor: Executor) -> None:
        progress = Progress("mixture:shards", len(jobs))
        by_prefix = {j.prefix: (ph, j) for ph in phases for j in ph.shard_jobs}
        for ph in phases:
            ph.shards = [{} for _ in ph.shard_jobs]
        for res in executor.map(WriteShard(), jobs):
            ph, job = by_prefix[res.pop("prefix")]
            ph.shards[job.index] = res
            progress.update(parts=1, rows=res["tokens"])
        progress.close()

    @staticmethod
    def _phase_entry(ph: _Phase) -> dict[str, Any]:
        name = ph.config.name
        tokens = sum(s["tokens"] for s in ph.shards)
        per_source = np.zeros((len(ph.plans), 2), np.int64)
        for s in ph.shards:
            for si, (docs, toks) in s["sources"].items():
                per_source[int(si)] += (docs, toks)
        planned = [[r, p.tokens] for r, p in zip(ph.rows, ph.plans, strict=True)]
        if tokens != ph.budget or per_source.tolist() != planned:
            raise AssertionError(
                f"phase {name}: wrote {tokens} tokens, (documents, tokens) per source "
                f"{per_source.tolist()}; planned {ph.budget}, {planned}"
            )
        return {
            "name": name,
            "tokens": tokens,
            "documents": int(sum(ph.rows)),
            "budget_tokens": ph.config.tokens,
            "shards": [
                {
                    "prefix": f"{name}/{Path(j.prefix).name}",
                    "documents": s["documents"],
                    "tokens": s["tokens"],
                    "docs": f"{name}/{Path(sidecar_path(j.prefix)).name}",
                }
                for j, s in zip(ph.shard_jobs, ph.shards, strict=True)
            ],
            "sources": [
                {
                    "name": src.name,
                    "documents": ph.rows[si],
                    "tokens": plan.tokens,
                    "epochs": round(plan.epochs, 4),
                    "weight": src.weight,
                    "max_epochs": src.max_epochs,
                    "available_documents": plan.available_documents,
                    "available_tokens": plan.available_tokens,
                    "filter": src.filter,
                    "inputs": [{"path": r.input, "sha256": r.sha256} for r in ph.refs[si]],
                }
                for si, (src, plan) in enumerate(zip(ph.config.sources, ph.plans, strict=True))
            ],
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


@dataclass
class _Phase:
    """What the driver holds for one phase: per source and per part counts, the draws, and
    per key bucket token counts; never one entry per document."""

    index: int
    config: PhaseConfig
    refs: list[list[PartRef]]  # per source, its parts
    plans: list[SourcePlan]
    budget: int
    draws: list[SourceDraw]
    bits: int  # order-key buckets: 2**bits
    bucket_tokens: np.ndarray
    rows: list[int]  # drawn rows per source
    used: list[int]  # distinct documents drawn per source
    routed: list[tuple[PartRef, str]] = field(default_factory=list)
    shard_jobs: list[ShardJob] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
