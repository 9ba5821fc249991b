"""The `seeds` stage: prompts for synthetic data, diverse by construction and deterministic.

Base seeds come from two places: curated topics (configs/seeds/taxonomy_v1.yaml: school and
university subjects and skills) and extracts of high-educational-value web documents (the
stage's input, e.g. `@edu_score`, kept rows with `edu_score >= web_min_edu_score`, as
Cosmopedia seeded from web samples). Each prompt crosses one base seed with an audience, a
style and, for a share of prompts, a persona; `per_style` sets how many prompts each style
gets. Draws come from a PCG64 stream keyed by (seed, style), so the same config gives the
same prompts on any machine; rendered prompts that repeat are removed.

Every row carries its lineage: `seed_id` (a hash of source, seed text, audience, style,
persona and template), `seed_text`, `seed_source` ("taxonomy:<subject>" or "web:<doc id>"),
`audience`, `style`, `persona`, `template_id`, `template_version` and the rendered `prompt`.
The output is Parquet parts (`seeds-NNNNN.parquet`) that `generate` reads; each row's
`source_path` names its part ("<stage folder>/seeds-NNNNN.parquet"), which `generate` finds
the row's stored answers by, so a worker reads one part's answers, not every one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
import yaml
from pydantic import Field, field_validator

from generators.prompts import PROMPTS_DIR, load_template, require_template
from pipeline.executor import LOCAL, Executor
from pipeline.io import iter_documents
from pipeline.schema import schema_for
from pipeline.stage import ArtifactStage, PreflightError, StageConfig, require_path

log = logging.getLogger("primer.seeds")

AUDIENCES = ("young_children", "middle_school", "high_school", "university", "professional")
STYLES = ("textbook", "worked_examples", "exercises", "socratic_dialogue", "story", "howto")
DEFAULT_TAXONOMY = PROMPTS_DIR.parent / "seeds" / "taxonomy_v1.yaml"
SEED_COLUMNS = (
    "id", "text", "drop_reason", "seed_id", "seed_text", "seed_source", "audience", "style",
    "persona", "template_id", "template_version", "prompt",
)  # fmt: skip


class SeedsConfig(StageConfig):
    """Settings of the `seeds` stage."""

    taxonomy: str | None = None
    """Curated topics (YAML `subjects: {subject: [topic, ...]}`); None: the bundled
    configs/seeds/taxonomy_v1.yaml. Empty string: no curated topics."""

    web_min_edu_score: float = Field(2.5, ge=0, le=5)
    """Input documents at or above this `edu_score` become web seeds (when the input has
    the column; otherwise every kept input document qualifies)."""

    web_max_seeds: int = Field(1_000, ge=0)
    """At most this many web documents (those with the smallest hash of seed:id)."""

    web_extract_chars: int = Field(1_200, ge=100)
    """Characters of a web document quoted in its prompt."""

    web_share: float = Field(0.5, ge=0, le=1)
    """Share of each style's prompts seeded from the web (when there are web seeds)."""

    per_style: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(STYLES, 10))
    """Prompts per style: the style mix of the synthetic set."""

    audiences: list[str] = list(AUDIENCES)
    personas: list[str] = [
        "a patient primary-school teacher",
        "a university professor who loves clear examples",
        "a practising engineer",
        "a science journalist",
    ]
    persona_share: float = Field(0.3, ge=0, le=1)
    """Share of prompts written in a persona's voice."""

    template: str = "synth_v1"
    seed: int = 0
    part_rows: int = Field(256, ge=1)
    """Rows per output part."""

    @field_validator("per_style")
    @classmethod
    def _styles(cls, v: dict[str, int]) -> dict[str, int]:
        unknown = set(v) - set(STYLES)
        if unknown:
            raise ValueError(f"unknown styles {sorted(unknown)}; styles: {', '.join(STYLES)}")
        if any(n < 0 for n in v.values()):
            raise ValueError("per_style counts must be >= 0")
        return v

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, v: list[str]) -> list[str]:
        unknown = set(v) - set(AUDIENCES)
        if unknown or not v:
            raise ValueError(f"audiences must be a non-empty subset of {', '.join(AUDIENCES)}")
        return v


def load_taxonomy(path: str | Path) -> list[tuple[str, str]]:
    """(subject, topic) pairs of a taxonomy file, in file order."""
    data = yaml.safe_load(Path(os.path.expandvars(str(path))).expanduser().read_text()) or {}
    subjects = data.get("subjects")
    if not isinstance(subjects, dict) or not subjects:
        raise ValueError(f"{path}: expected `subjects: {{subject: [topic, ...]}}`")
    out = []
    for subject, topics in subjects.items():
        if not isinstance(topics, list) or not all(isinstance(t, str) and t for t in topics):
            raise ValueError(f"{path}: subjects.{subject} must be a list of topic strings")
        out += [(str(subject), t) for t in topics]
    return out


def _web_seeds(inputs: Sequence[str], cfg: SeedsConfig) -> list[tuple[str, str]]:
    """(source, extract) of the qualifying web documents, the `web_max_seeds` with the
    smallest keys; memory holds at most that many extracts."""
    if not inputs or cfg.web_max_seeds == 0:
        return []
    best: list[tuple[int, str, str]] = []
    prefix = f"{cfg.seed}:".encode()
    for t in iter_documents(inputs, cfg.batch_rows, columns=("id", "text", "edu_score")):
        if "edu_score" in t.column_names:
            t = t.filter(
                pc.fill_null(pc.greater_equal(t["edu_score"], cfg.web_min_edu_score), False)
            )
        cut = pc.utf8_slice_codeunits(pc.fill_null(t["text"], ""), 0, cfg.web_extract_chars)
        for i, text in zip(t["id"].to_pylist(), cut.to_pylist(), strict=True):
            if text.strip():
                best.append((xxhash.xxh64_intdigest(prefix + i.encode()), f"web:{i}", text.strip()))
        best = sorted(best)[: cfg.web_max_seeds]
    return [(src, text) for _, src, text in best]


def draw(cfg: SeedsConfig, topics: list[tuple[str, str]], web: list[tuple[str, str]]) -> list[dict]:
    """The prompts' lineage rows (before rendering), deterministic in `cfg.seed`."""
    rows: list[dict] = []
    for style in STYLES:
        n = cfg.per_style.get(style, 0)
        if not n:
            continue
        rng = np.random.Generator(
            np.random.PCG64([cfg.seed, xxhash.xxh32_intdigest(style.encode())])
        )
        n_web = round(n * cfg.web_share) if web and topics else (n if web else 0)
        plan = [("web", n_web), ("topic", n - n_web)]
        for kind, count in plan:
            pool = web if kind == "web" else [(f"taxonomy:{s}", t) for s, t in topics]
            if not pool or not count:
                continue
            seen: set[tuple[int, int, int]] = set()
            space = len(pool) * len(cfg.audiences) * (len(cfg.personas) + 1)
            while len(seen) < min(count, space):
                i = int(rng.integers(len(pool)))
                a = int(rng.integers(len(cfg.audiences)))
                use_persona = cfg.personas and rng.random() < cfg.persona_share
                p = int(rng.integers(len(cfg.personas))) + 1 if use_persona else 0
                if (i, a, p) in seen:
                    continue
                seen.add((i, a, p))
                source, text = pool[i]
                rows.append(
                    {
                        "seed_source": source,
                        "seed_text": text,
                        "seed_kind": kind,
                        "audience": cfg.audiences[a],
                        "style": style,
                        "persona": cfg.personas[p - 1] if p else "",
                    }
                )
    return rows


class SeedsStage(ArtifactStage):
    """Deterministic, diverse prompts for `generate`; see the module docstring."""

    name: ClassVar[str] = "seeds"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = SeedsConfig

    config: SeedsConfig

    def preflight(self) -> None:
        cfg = self.config
        require_template("template", cfg.template)
        if cfg.taxonomy:
            require_path("taxonomy", cfg.taxonomy, "file")
            try:  # a small config file, not data: a malformed one is found now
                load_taxonomy(cfg.taxonomy)
            except (ValueError, yaml.YAMLError) as e:
                raise PreflightError("taxonomy", str(e)) from None

    def content_fingerprint(self) -> dict[str, str]:
        """The template's and the taxonomy's sha256: editing either draws the prompts
        again, and `generate`, which asks with that template, chains this in."""
        cfg = self.config
        out = {f"template.{cfg.template}": load_template(cfg.template).sha256}
        tax = cfg.taxonomy if cfg.taxonomy is not None else str(DEFAULT_TAXONOMY)
        if tax:
            path = Path(os.path.expandvars(tax)).expanduser()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
            out["taxonomy"] = digest
        return out

    def rows(self, inputs: Sequence[str]) -> pa.Table:
        cfg = self.config
        template = load_template(cfg.template)
        tax = cfg.taxonomy if cfg.taxonomy is not None else str(DEFAULT_TAXONOMY)
        topics = load_taxonomy(tax) if tax else []
        web = _web_seeds(inputs, cfg)
        drawn = draw(cfg, topics, web)
        out: dict[str, list[Any]] = {c: [] for c in SEED_COLUMNS}
        seen_prompts: set[int] = set()
        for r in drawn:
            messages = template.messages(
                seed_text=r["seed_text"], seed_kind=r["seed_kind"], audience=r["audience"],
                style=r["style"], persona=r["persona"],
            )  # fmt: skip
            prompt = messages[-1]["content"]
            h = xxhash.xxh64_intdigest(prompt.encode())
            if h in seen_prompts:
                continue
            seen_prompts.add(h)
            key = "\x1f".join(
                [
                    r["seed_source"],
                    r["seed_text"],
                    r["audience"],
                    r["style"],
                    r["persona"],
                    template.name,
                ]
            )
            seed_id = xxhash.xxh64_hexdigest(key.encode())
            for c, v in (
                ("id", f"synth-{seed_id}"), ("text", None), ("drop_reason", None),
                ("seed_id", seed_id), ("seed_text", r["seed_text"]),
                ("seed_source", r["seed_source"]), ("audience", r["audience"]),
                ("style", r["style"]), ("persona", r["persona"] or None),
                ("template_id", template.template_id), ("template_version", template.version),
                ("prompt", prompt),
            ):  # fmt: skip
                out[c].append(v)
        log.info(
            "seeds: %d prompts (%d topics, %d web documents available; %d repeated prompts removed)",
            len(out["id"]), len(topics), len(web), len(drawn) - len(out["id"]),
        )  # fmt: skip
        return pa.table(out, schema=schema_for(SEED_COLUMNS))

    def build(
        self, inputs: Sequence[str], out_dir: str, executor: Executor = LOCAL
    ) -> dict[str, Any]:
        table = self.rows(inputs)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = []
        schema = schema_for((*SEED_COLUMNS, "source_path"))
        for k, lo in enumerate(range(0, max(len(table), 1), self.config.part_rows)):
            name = f"seeds-{k:05d}"
            part = table.slice(lo, self.config.part_rows)
            # The part each row comes from: what `generate` finds a row's answers by.
            source = pa.repeat(pa.scalar(f"{out.name}/{name}.parquet"), len(part))
            part = part.append_column("source_path", source).select(schema.names).cast(schema)
            tmp = out / f".{name}.parquet.tmp-{os.getpid()}"
            pq.write_table(part, tmp)
            os.replace(tmp, out / f"{name}.parquet")
            names.append(name)
        styles = pc.value_counts(table["style"]).to_pylist() if len(table) else []
        return {
            "rows_in": len(table),
            "rows_out": len(table),
            "part_names": names,
            "per_style": {s["values"]: s["counts"] for s in styles},
        }
