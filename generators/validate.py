"""The `validate` stage: checks of synthetic documents before they join the corpus.

Each generation (a `generate` output row) is checked for what a teacher gets wrong: empty
or outside word bounds, cut off at max_tokens, refusals and stock openings ("As an AI...",
"Certainly! Here is..."); then the web path's own signals run over it: Gopher repetition
(the `quality` stage), language (`langid`) and, with `edu_model`, the educational-value
classifier (`edu_score`). Those stages are built through `pipeline.registry.get`, as a
recipe names them, so generators/ imports nothing from filters/. Rejected rows are kept
with their reason (`validate:*`, `quality:*`, `langid:*`, `edu_score:*`).

    stages:
      validate: {min_words: 60, edu_model: "@edu_train/model.bin", min_edu_score: 1.5}
"""

from __future__ import annotations

import re
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.registry import get
from pipeline.schema import FIELDS
from pipeline.stage import (
    PreflightError,
    Stage,
    StageConfig,
    is_ref,
    mark_dropped,
    require_path,
    set_column,
)

REFUSALS = [
    r"\bas an ai\b", r"\bas a language model\b", r"\bi(?:'m| am) (?:sorry|unable|not able)\b",
    r"\bi can(?:no|')t (?:help|assist|provide|write|do)\b", r"\bi (?:cannot|won't) (?:help|comply)\b",
]  # fmt: skip
STOCK_OPENINGS = [
    r"^\s*(?:certainly|sure|of course|absolutely)[!,.]", r"^\s*here(?:'s| is) (?:a|an|the|your)\b",
    r"^\s*great question", r"^\s*i(?:'d| would) be (?:happy|glad) to",
]  # fmt: skip


class ValidateConfig(StageConfig):
    """Settings of the `validate` stage."""

    min_words: int = Field(60, ge=0)
    max_words: int = Field(5_000, ge=1)
    drop_truncated: bool = True
    """Drop generations cut off at max_tokens (finish_reason "length")."""
    refusal_patterns: list[str] = REFUSALS
    """Case-insensitive regexes anywhere in the first 300 characters: a refusal."""
    stock_openings: list[str] = STOCK_OPENINGS
    """Case-insensitive regexes at the start: a chatty stock opening."""
    repetition: bool = True
    """Gopher repetition rules (the web path's thresholds, the `quality` stage)."""
    languages: list[str] = ["en"]
    min_lang_score: float = Field(0.65, ge=0, le=1)
    edu_model: str | None = None
    """An edu_train model ("@edu_train/model.bin"); with it, `edu_score` is added and rows
    under `min_edu_score` are dropped."""
    min_edu_score: float = Field(1.5, ge=0, le=5)


class ValidateStage(Stage):
    """Checks of synthetic documents; see the module docstring."""

    name: ClassVar[str] = "validate"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = ValidateConfig
    needs: ClassVar[tuple[str, ...]] = ("text",)
    adds: ClassVar[tuple[str, ...]] = (
        "n_chars", "lang", "lang_score", "edu_score", "edu_int", "edu_phase1", "edu_phase2",
    )  # fmt: skip
    uses_model: ClassVar[bool] = True

    config: ValidateConfig

    def preflight(self) -> None:
        require_path("edu_model", self.config.edu_model, "file")
        try:
            get("langid")(languages=self.config.languages).preflight()
        except PreflightError as e:
            raise PreflightError("languages", e.message) from None

    def _edu_stage(self) -> Stage:
        cfg = self.config
        return get("edu_score")(
            model=cfg.edu_model, phase1_min_score=cfg.min_edu_score,
            phase2_min_score=max(cfg.min_edu_score, 2.5),
        )  # fmt: skip

    def content_fingerprint(self) -> dict[str, str]:
        """The size and hash of `edu_model` given as a file path (as `edu_score` takes
        them); an "@edu_train/..." model chains in through edu_train's fingerprint."""
        model = self.config.edu_model
        if model is None or is_ref(model):
            return {}
        return {f"edu_model.{k}": v for k, v in self._edu_stage().content_fingerprint().items()}

    def setup(self) -> None:
        cfg = self.config
        self._refusal = re.compile("|".join(f"(?:{p})" for p in cfg.refusal_patterns), re.I)
        self._stock = re.compile("|".join(f"(?:{p})" for p in cfg.stock_openings), re.I)
        self._langid = get("langid")(languages=cfg.languages, min_score=cfg.min_lang_score)
        self._quality = (
            get("quality")(gopher_quality=False, c4=False, fineweb=False)
            if cfg.repetition
            else None
        )
        self._edu = self._edu_stage() if cfg.edu_model else None

    def process(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        text = pc.fill_null(table["text"], "")
        words = pc.list_value_length(pc.utf8_split_whitespace(text))
        head = pc.utf8_slice_codeunits(text, 0, 300).to_pylist()
        refusal = pa.array([bool(self._refusal.search(h)) for h in head], pa.bool_())
        stock = pa.array([bool(self._stock.search(h)) for h in head], pa.bool_())
        rules = [
            ("empty", pc.equal(words, 0)),
            ("too_short", pc.less(words, cfg.min_words)),
            ("too_long", pc.greater(words, cfg.max_words)),
            ("refusal", refusal),
            ("stock_opening", stock),
        ]
        if cfg.drop_truncated and "finish_reason" in table.column_names:
            rules.append(
                ("truncated", pc.equal(pc.fill_null(table["finish_reason"], ""), "length"))
            )
        table = set_column(table, "n_chars", pc.utf8_length(text))
        table = mark_dropped(table, self.name, rules)
        table = self._langid(table)
        if self._quality is not None:
            table = self._quality(table)
        if self._edu is not None:
            table = self._edu(table)
        for name in self.adds:  # declared columns are present, null without an edu model
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(len(table), FIELDS[name].type))
        return table
