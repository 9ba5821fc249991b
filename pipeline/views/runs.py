"""Open a run folder with polars: funnel, score distributions, samples, lineage, mixture.

    from pipeline.views.runs import open_run
    run = open_run("runs/quickstart")            # or open_run(): $PRIMER_RUN, else runs/quickstart
    run.funnel()                                 # rows in / kept / dropped per stage, per reason
    run.stage("quality", kept_only=True).select("id", "q_n_words").collect()
    run.edu_scores().collect()                   # id, edu_score, edu_int, ..., drop_reason, kept
    run.samples_per_edu_bucket(n=2, chars=300)   # a few documents per edu_int, text cut short
    run.synthetic(text=200).collect()            # synthetic rows with their lineage
    run.mixture()                                # tokens per phase and source
    run.why("DOC_ID")                            # every stage the document went through

Why: the notebooks in notebooks/ and the run report (pipeline/views/report.py) read a run the
same way, so the loading lives here once and both stay short. The module is over 500 lines
because it is one class, `Run`, whose methods are that shared API; what is not a method
lives beside it (pipeline/views/frames.py: sample picks and histograms; why.py: the "why
was this document dropped?" answer and command line).

Cheap by construction. Counts (funnel, drop reasons) come from `run_summary.json` and the
stages' `_manifest.json`, never from a scan, so they also include rows a stage counts but
does not write (`edu_annotate:not_sampled`). Everything per document is a `pl.LazyFrame`
over the stage's committed Parquet parts: nothing is read until `.collect()`, and then only
the columns selected, so a score histogram never touches the text. Text is loaded only
where asked for (`samples_per_edu_bucket`, `synthetic(text=...)`).

A run may lack stages (a web-only recipe has no edu_score, synthetic path or mixture):
`run.has("edu_score")` says so, and a helper whose stage is absent raises `MissingData`
with a message naming what is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.io import column_base
from pipeline.views.frames import pick, spread

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUN = "runs/quickstart"

LINEAGE = [
    "teacher_model",
    "teacher_backend",
    "template_id",
    "template_version",
    "seed_id",
    "seed_source",
    "style",
    "audience",
    "persona",
    "temperature",
    "top_p",
    "max_tokens",
    "sample_seed",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
]
EDU_COLUMNS = ["edu_score", "edu_int", "edu_phase1", "edu_phase2"]
# What `why` reads of every part: a missing column (older parts have no `error`) is null
WHY_SCAN = {"id": pl.String, "drop_reason": pl.String, "error": pl.String}
WHY_SCHEMA = {"stage": pl.String, "part": pl.String, "drop_reason": pl.String, "error": pl.String}

_REASONS = pl.List(pl.Struct({"reason": pl.String, "count": pl.Int64}))
_FUNNEL_SCHEMA = {
    "stage": pl.String,
    "uses": pl.String,
    "kind": pl.String,
    "parts": pl.Int64,
    "rows_in": pl.Int64,
    "kept": pl.Int64,
    "dropped": pl.Int64,
    "drop_fraction": pl.Float64,
    "wall_seconds": pl.Float64,
    "attempts": pl.Int64,
    "guardrail_exceeded": pl.Boolean,
    "reasons": _REASONS,
}


class MissingData(LookupError):
    """The run has no output for what was asked (a stage not in its recipe, or not run)."""


def resolve_run_dir(path: str | os.PathLike | None = None) -> Path:
    """`path`, else $PRIMER_RUN, else runs/quickstart; a relative path that is not under the
    working directory is taken from the repository root (so a notebook run from notebooks/
    finds runs/quickstart)."""
    p = Path(path if path is not None else os.environ.get("PRIMER_RUN") or DEFAULT_RUN)
    p = p.expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    return p


def open_run(path: str | os.PathLike | None = None) -> Run:
    """Open a run folder (what `primer run` wrote); see `resolve_run_dir` for the default."""
    return Run(resolve_run_dir(path))


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _scan_part(path: Path) -> pl.LazyFrame:
    """One stage part, lazily; a column part side by side with its base's kept rows (the
    readers in pipeline/io.py also check the ids row by row; this view trusts the base's
    recorded size, checked when the part is opened)."""
    found = column_base(path)
    if found is None:
        return pl.scan_parquet(path)
    own = pl.scan_parquet(path)
    # its drop_reason and error (and any column it recomputes) replace the base's
    theirs = [c for c in own.collect_schema().names() if c != "id"]
    base = _scan_part(found[0]).filter(pl.col("drop_reason").is_null()).drop(theirs, strict=False)
    return pl.concat([base, own.drop("id")], how="horizontal")


class Run:
    """One run folder. Cheap to create: files are read on first use and cached."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"{self.path} is not a run folder; run `primer run RECIPE.yaml` first, "
                f"or set PRIMER_RUN to a run's output folder"
            )

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, stages={self.stages})"

    # --- manifests and the summary ---------------------------------------------------------
    @cached_property
    def manifests(self) -> dict[str, dict[str, Any]]:
        """Every stage folder's `_manifest.json`, by stage name."""
        out = {}
        for m in sorted(self.path.glob("*/_manifest.json")):
            try:
                out[m.parent.name] = _read_json(m)
            except (OSError, ValueError):
                continue  # a foreign or half-copied file: the stage counts as absent
        return out

    @cached_property
    def summary(self) -> dict[str, Any]:
        """`run_summary.json`, or the same shape rebuilt from the manifests (a run that was
        stopped before its summary), stages ordered by when they first ran."""
        path = self.path / "run_summary.json"
        if path.is_file():
            return _read_json(path)
        keys = ("stage", "parts", "rows_in", "rows_out", "dropped", "bytes")
        keys += ("work_seconds", "wall_seconds", "guardrail")
        ms = sorted(
            self.manifests.values(),
            key=lambda m: (m.get("attempts") or [{}])[0].get("started", ""),
        )
        stages = [
            {k: m.get(k) for k in keys} | {"attempts": len(m.get("attempts", []))} for m in ms
        ]
        return {
            "recipe": None,
            "recipe_path": None,
            "output": str(self.path),
            "runs": [],
            "wall_seconds_all_runs": None,
            "stages": stages,
            "artifacts": {},
        }

    @property
    def stages(self) -> list[str]:
        """Stage names in run order."""
        return [s["stage"] for s in self.summary["stages"]]

    def uses(self, stage: str) -> str:
        """The stage class a stage name runs (`synth_dedup` uses `dedup`)."""
        return self.manifests.get(stage, {}).get("uses", stage)

    def kind(self, stage: str) -> str:
        """Either "rows" (a stage that writes documents) or "artifact" (one that builds a
        file: edu_train, seeds, mixture, train_smoke)."""
        return self.manifests.get(stage, {}).get("kind", "rows")

    def find(self, uses: str) -> str | None:
        """The first stage named `uses`, else the first that runs that stage class."""
        if uses in self.stages:
            return uses
        return next((s for s in self.stages if self.uses(s) == uses), None)

    def has(self, what: str) -> bool:
        """Whether the run has data for `what`: a stage name or class, or "synthetic"."""
        if what == "synthetic":
            return self.synthetic_stage() is not None
        if what == "mixture":
            return self._mixture_manifest_path() is not None
        if what == "train_smoke":
            return self._train_smoke_metrics_path() is not None
        stage = self.find(what)
        return stage is not None and (self.kind(stage) == "artifact" or bool(self.files(stage)))

    def require(self, uses: str, stage: str | None = None) -> str:
        """`stage` if given, else the stage that runs `uses`; MissingData when the run has
        no such stage."""
        name = stage or self.find(uses)
        if name is None or name not in self.stages:
            raise MissingData(
                f"{self.path} has no {stage or uses!r} stage output (stages: "
                f"{', '.join(self.stages) or 'none'}); add it to the recipe and run it"
            )
        return name

    def header(self) -> dict[str, Any]:
        """Recipe, invocations, attempts and wall time, for a report's first lines."""
        s = self.summary
        runs = s.get("runs") or []
        return {
            "recipe": s.get("recipe"),
            "recipe_path": s.get("recipe_path"),
            "output": s.get("output") or str(self.path),
            "runs": len(runs),
            "attempts": sum(st.get("attempts", 0) or 0 for st in s["stages"]),
            "first_started": runs[0]["started"] if runs else None,
            "last_finished": runs[-1]["finished"] if runs else None,
            "wall_seconds": s.get("wall_seconds_all_runs"),
            "stages": len(s["stages"]),
        }

    # --- counts ----------------------------------------------------------------------------
    def funnel(self) -> pl.DataFrame:
        """One row per stage: rows in, kept, dropped (with the drop reasons as a list of
        {reason, count}), timings, attempts and the guardrail, from the summary; no scan.
        `kind` is "artifact" for stages that build a file (their rows are not a funnel)."""
        rows = []
        for s in self.summary["stages"]:
            reasons = sorted((s.get("dropped") or {}).items(), key=lambda kv: -kv[1])
            dropped = sum(c for _, c in reasons)
            rows_in = s.get("rows_in") or 0
            rows.append(
                {
                    "stage": s["stage"],
                    "uses": self.uses(s["stage"]),
                    "kind": self.kind(s["stage"]),
                    "parts": s.get("parts"),
                    "rows_in": rows_in,
                    "kept": s.get("rows_out"),
                    "dropped": dropped,
                    "drop_fraction": dropped / rows_in if rows_in else 0.0,
                    "wall_seconds": s.get("wall_seconds"),
                    "attempts": s.get("attempts"),
                    "guardrail_exceeded": bool((s.get("guardrail") or {}).get("exceeded")),
                    "reasons": [{"reason": r, "count": c} for r, c in reasons],
                }
            )
        return pl.DataFrame(rows, schema=_FUNNEL_SCHEMA)

    def drop_reasons(self, stage: str | None = None) -> pl.DataFrame:
        """stage, reason, count and share of the stage's input, most frequent first; all
        stages when `stage` is None (stages that dropped nothing have no rows)."""
        f = self.funnel()
        if stage is not None:
            self.require(stage, stage)
            f = f.filter(pl.col("stage") == stage)
        return (
            f.select("stage", "rows_in", "reasons")
            .explode("reasons")
            .drop_nulls("reasons")
            .unnest("reasons")
            .select(
                "stage",
                "reason",
                "count",
                share=pl.when(pl.col("rows_in") > 0)
                .then(pl.col("count") / pl.col("rows_in"))
                .otherwise(0.0),
            )
        )  # in run order, each stage's reasons most frequent first (as the funnel has them)

    # --- per-document data -----------------------------------------------------------------
    def files(self, stage: str) -> list[Path]:
        """The stage's committed Parquet parts (the manifest's part names), else every
        visible *.parquet in its folder (a stage still running)."""
        folder = self.path / stage
        names = self.manifests.get(stage, {}).get("part_names")
        if names is not None:
            return [p for p in (folder / f"{n}.parquet" for n in names) if p.is_file()]
        return sorted(folder.glob("[!._]*.parquet"))

    def stage(
        self,
        name: str,
        kept_only: bool = False,
        columns: Sequence[str] | None = None,
        max_parts: int | None = None,
    ) -> pl.LazyFrame:
        """A LazyFrame over a stage's parts: kept AND dropped rows (`drop_reason` null =
        kept) unless `kept_only`. `columns` selects early; `max_parts` reads at most that
        many parts, evenly spread (a quick look at a huge run)."""
        files = self.files(self.require(name, name))
        if not files:
            raise MissingData(
                f"{self.path / name} has no Parquet parts (stage kind: {self.kind(name)})"
            )
        files = spread(files, max_parts)
        if any(column_base(f) for f in files):  # column parts: each joined with its base
            lf = pl.concat([_scan_part(f) for f in files], how="diagonal_relaxed")
        else:
            lf = pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore")
        if kept_only:
            lf = lf.filter(pl.col("drop_reason").is_null())
        if columns is not None:
            missing = [c for c in columns if c not in lf.collect_schema()]
            if missing:
                raise MissingData(f"stage {name!r} has no column(s) {missing}")
            lf = lf.select(columns)
        return lf

    def columns(self, stage: str) -> list[str]:
        return self.stage(stage).collect_schema().names()

    def _scores(self, uses: str, wanted: Sequence[str], stage: str | None, max_parts: int | None):
        lf = self.stage(self.require(uses, stage), max_parts=max_parts)
        have = lf.collect_schema().names()
        cols = [c for c in ("id", *wanted, "drop_reason") if c in have]
        return lf.select(cols).with_columns(kept=pl.col("drop_reason").is_null())

    def edu_scores(self, stage: str | None = None, max_parts: int | None = None) -> pl.LazyFrame:
        """id, edu_score, edu_int, edu_phase1, edu_phase2, drop_reason, kept: every document
        the edu_score stage scored (those below phase 1 included)."""
        return self._scores("edu_score", EDU_COLUMNS, stage, max_parts)

    def lang_scores(self, stage: str | None = None, max_parts: int | None = None) -> pl.LazyFrame:
        """id, lang, lang_score, drop_reason, kept from the langid stage."""
        return self._scores("langid", ["lang", "lang_score"], stage, max_parts)

    def quality_signals(
        self,
        columns: Sequence[str] | None = None,
        stage: str | None = None,
        max_parts: int | None = None,
    ) -> pl.LazyFrame:
        """id, the `q_*` signals (all, or `columns`), drop_reason, kept, from the quality stage
        (documents it dropped included: their signals say why)."""
        name = self.require("quality", stage)
        have = self.stage(name).collect_schema().names()
        signals = list(columns) if columns is not None else [c for c in have if c.startswith("q_")]
        missing = [c for c in signals if c not in have]
        if missing:
            raise MissingData(f"stage {name!r} has no column(s) {missing}")
        return self._scores("quality", signals, name, max_parts)

    def samples_per_edu_bucket(
        self,
        n: int = 2,
        chars: int = 300,
        stage: str | None = None,
        max_parts: int | None = None,
    ) -> pl.DataFrame:
        """Up to `n` documents per edu_int (0-5), picked by `frames.sample_key` of the id
        (the same ones every time, on every polars version), with the first `chars`
        characters of their text. The pick reads only id and edu_int; text is then read for the picked
        ids alone."""
        lf = self.stage(self.require("edu_score", stage), max_parts=max_parts)
        scored = (
            lf.select("id", "edu_int")
            .drop_nulls("edu_int")
            .unique("id", keep="first", maintain_order=True)
            .collect()
        )
        picked = pick(scored, "edu_int", n)
        if picked.is_empty():
            return pl.DataFrame(schema={"edu_int": pl.Int8, "id": pl.String, "text": pl.String})
        have = lf.collect_schema().names()
        meta = [c for c in ("url", "title", "edu_score", "drop_reason") if c in have]
        docs = (
            lf.filter(pl.col("id").is_in(picked["id"].implode()))
            .select(
                "id",
                *meta,
                n_chars=pl.col("text").str.len_chars(),
                text=pl.col("text").str.slice(0, chars),
            )
            .unique("id", keep="first", maintain_order=True)
            .collect()
        )
        return (
            picked.select("id", "edu_int")
            .join(docs, on="id", how="inner")
            .with_columns(truncated=pl.col("n_chars") > chars)
            .sort(["edu_int", "edu_score" if "edu_score" in meta else "id"])
        )

    def synthetic_stage(self) -> str | None:
        """The last document stage whose rows carry synthetic lineage (a seed and sampling)."""
        for name in reversed(self.stages):
            if self.kind(name) == "artifact" or not self.files(name):
                continue
            have = set(_scan_part(self.files(name)[0]).collect_schema().names())
            if {"teacher_model", "seed_id", "sample_seed"} <= have:
                return name
        return None

    def synthetic(
        self,
        lineage: bool = True,
        text: bool | int = False,
        stage: str | None = None,
        kept_only: bool = False,
        max_parts: int | None = None,
    ) -> pl.LazyFrame:
        """Synthetic rows of the last synthetic stage (decontaminate in the quickstart), or
        of `stage`: id, drop_reason, kept, the lineage columns when `lineage`, and `text`
        (the whole text for True, the first N characters for an int N)."""
        name = stage or self.synthetic_stage()
        if name is None:
            raise MissingData(
                f"{self.path} has no synthetic data (no stage with teacher lineage); "
                f"run seeds -> generate -> validate"
            )
        lf = self.stage(self.require(name, name), kept_only=kept_only, max_parts=max_parts)
        have = lf.collect_schema().names()
        cols = [pl.col("id"), pl.col("drop_reason")]
        if lineage:
            cols += [pl.col(c) for c in LINEAGE if c in have]
        if text is True:
            cols.append(pl.col("text"))
        elif text:
            cols.append(pl.col("text").str.slice(0, int(text)))
        return lf.select(cols).with_columns(kept=pl.col("drop_reason").is_null())

    def synthetic_samples(
        self,
        per_style: int = 1,
        chars: int = 400,
        kept_only: bool = True,
        stage: str | None = None,
        max_parts: int | None = None,
    ) -> pl.DataFrame:
        """Up to `per_style` synthetic documents per style (kept ones unless `kept_only` is
        False), picked by `frames.sample_key` of the id, with their lineage and first `chars`
        characters."""
        lf = self.synthetic(stage=stage, kept_only=kept_only, max_parts=max_parts)
        group = "style" if "style" in lf.collect_schema().names() else "template_id"
        rows = lf.select("id", group).unique("id", keep="first", maintain_order=True).collect()
        picked = pick(rows, group, per_style)
        full = self.synthetic(stage=stage, text=True, kept_only=kept_only, max_parts=max_parts)
        return (
            full.filter(pl.col("id").is_in(picked["id"].implode()))
            .with_columns(
                n_chars=pl.col("text").str.len_chars(), text=pl.col("text").str.slice(0, chars)
            )
            .unique("id", keep="first", maintain_order=True)
            .collect()
            .with_columns(truncated=pl.col("n_chars") > chars)
            .sort([group, "id"])
        )

    # --- one document ----------------------------------------------------------------------
    def why(self, doc_id: str) -> pl.DataFrame:
        """stage, part, drop_reason, error: one row per stage (in run order) whose committed
        parts hold `doc_id`. Stages write the rows they drop and pass on only the kept ones,
        so the first row with a drop_reason is the stage that dropped it
        (`pipeline.views.why.dropped_by`); none: every stage it reached kept it. An id in no
        stage gives an empty frame.

        Reads only id, drop_reason and error, with the id filter applied while scanning,
        so it costs a pass over three columns, never the text."""
        found = []
        for name in self.stages:
            files = self.files(name)
            if not files:
                continue  # an artifact stage (edu_train, mixture) or no output yet
            lf = (
                pl.scan_parquet(
                    [str(f) for f in files],
                    schema=WHY_SCAN,
                    missing_columns="insert",
                    extra_columns="ignore",
                    include_file_paths="_path",
                )
                .filter(pl.col("id") == doc_id)
                .select(
                    stage=pl.lit(name, pl.String),
                    part=pl.col("_path").str.extract(r"([^/\\]+)\.parquet$"),
                    drop_reason="drop_reason",
                    error="error",
                )
            )
            try:
                found.append(lf.collect())
            except Exception as e:  # say which stage's parts could not be read
                raise RuntimeError(
                    f"why {doc_id!r}: cannot read id/drop_reason/error from the parts of "
                    f"{self.path / name}: {type(e).__name__}: {e}"
                ) from e
        return pl.concat(found) if found else pl.DataFrame(schema=WHY_SCHEMA)

    # --- artifacts -------------------------------------------------------------------------
    def _mixture_manifest_path(self) -> Path | None:
        name = self.find("mixture")
        candidates = [name] if name else []
        candidates += [s for s in self.stages if self.uses(s) == "mixture" and s != name]
        for s in candidates:
            if (self.path / s / "manifest.json").is_file():
                return self.path / s / "manifest.json"
        return None

    def mixture_manifest(self) -> dict[str, Any]:
        """The mixture's `manifest.json` as written (tokenizer, seq_len, seed, phases)."""
        path = self._mixture_manifest_path()
        if path is None:
            raise MissingData(f"{self.path} has no mixture (no <mixture stage>/manifest.json)")
        return _read_json(path)

    def mixture(self) -> pl.DataFrame:
        """One row per phase and source: tokens, share of the phase, weight, documents,
        epochs, max_epochs, available tokens and the source's filter."""
        rows = []
        for p in self.mixture_manifest()["phases"]:
            for src in p["sources"]:
                rows.append(
                    {
                        "phase": p["name"],
                        "source": src["name"],
                        "tokens": src["tokens"],
                        "share": src["tokens"] / p["tokens"] if p["tokens"] else 0.0,
                        "weight": src.get("weight"),
                        "documents": src["documents"],
                        "epochs": src.get("epochs"),
                        "max_epochs": src.get("max_epochs"),
                        "available_tokens": src.get("available_tokens"),
                        "filter": src.get("filter"),
                        "phase_tokens": p["tokens"],
                        "phase_budget": p.get("budget_tokens"),
                    }
                )
        schema = {
            "phase": pl.String,
            "source": pl.String,
            "tokens": pl.Int64,
            "share": pl.Float64,
            "weight": pl.Float64,
            "documents": pl.Int64,
            "epochs": pl.Float64,
            "max_epochs": pl.Float64,
            "available_tokens": pl.Int64,
            "filter": pl.String,
            "phase_tokens": pl.Int64,
            "phase_budget": pl.Int64,
        }
        return pl.DataFrame(rows, schema=schema)

    def _train_smoke_metrics_path(self) -> Path | None:
        names = [s for s in self.stages if self.uses(s) == "train_smoke"]
        for s in names or ["train_smoke"]:
            if (self.path / s / "metrics.json").is_file():
                return self.path / s / "metrics.json"
        return None

    def metrics(self, stage: str) -> dict[str, Any]:
        """A stage's `metrics.json` (edu_train: held-out and cross-validated scores;
        train_smoke: losses, tokens/s)."""
        path = self.path / stage / "metrics.json"
        if not path.is_file() and stage == "train_smoke":
            path = self._train_smoke_metrics_path() or path
        if not path.is_file():
            raise MissingData(f"{self.path} has no {stage}/metrics.json")
        return _read_json(path)

    def train_smoke(self) -> pl.DataFrame:
        """step, loss of the smoke train."""
        m = self.metrics("train_smoke")
        losses = m.get("losses") or []
        return pl.DataFrame(
            {"step": list(range(1, len(losses) + 1)), "loss": losses},
            schema={"step": pl.Int64, "loss": pl.Float64},
        )
