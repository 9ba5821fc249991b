"""The `edu_score` stage: every document's expected educational-value rating, and phases.

`edu_score` (the expected rating over the classifier's class probabilities, 0-5), `edu_int`
(rounded), and the `edu_phase1` / `edu_phase2` flags from config thresholds. When edu_train
wrote a calibrated combiner beside the model (`combiner.json`, filters/edu/combiner.py),
`edu_score` is 5 x the combiner's P(rating >= its binary threshold), from the fastText
score (and class probabilities), the document's length and any quality signals it was
fitted on, so 2.5 is the even-odds line; a graded combiner (one head per rating threshold,
`combiner_thresholds`) gives an expected rating instead, 2 P(>= 1) + 3 P(>= 3) with
thresholds 1 and 3 (`use_combiner: false` keeps fastText's expected rating); rows under the
phase-1 threshold are dropped (`edu_score:below_phase1`) unless `drop_below_phase1` is off.
The model loads once per worker (`setup`) and scores a whole batch in one call, through
filters/fasttext_scorer.py (a fused numba kernel equal to fastText's predict to about 1e-5;
`engine: fasttext` runs fastText's own). A model given as a file path is part of the
stage's fingerprint by size and hash (`content_fingerprint`), so replacing the file
rescores; "@edu_train/model.bin" chains in through edu_train's fingerprint.

    .venv/bin/primer stage edu_score --input docs.jsonl --output runs/scored \
        --set model=runs/quickstart/edu_train/model.bin
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from filters.edu.combiner import COMBINER_FILE, combiner_features, load_combiner
from filters.edu.metrics import label_values
from filters.fasttext_scorer import Engine, load_fasttext, make_scorer
from pipeline.stage import Stage, StageConfig, is_ref, mark_dropped, require_path, set_column


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{size}:{h.hexdigest()}"


def _file_digest(path: Path) -> str:
    """The file's "<size>:<sha256>" ("missing" when it is not a file), cached while its
    size and mtime stay the same: a run takes fingerprints more than once."""
    try:
        st = path.stat()
    except OSError:
        return "missing"
    if not path.is_file():
        return "missing"
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


class EduScoreConfig(StageConfig):
    """Settings of the `edu_score` stage."""

    model: str | None = None
    """The fastText model (.bin); in a recipe "@edu_train/model.bin". Its metrics.json,
    when beside it, gives the text preprocessing it was trained with."""

    phase1_min_score: float = Field(1.5, ge=0, le=5)
    """edu_score at or above this -> edu_phase1 (the lighter web set; FineWeb-Edu-score-2
    keeps int_score >= 2, i.e. edu_score >= 1.5)."""

    phase2_min_score: float = Field(2.5, ge=0, le=5)
    """edu_score at or above this -> edu_phase2 (the strict set; FineWeb-Edu keeps
    int_score >= 3, i.e. edu_score >= 2.5)."""

    drop_below_phase1: bool = True
    """Mark rows under the phase-1 threshold `edu_score:below_phase1`."""

    lowercase: bool | None = None
    max_chars: int | None = None
    """Preprocessing overrides; None: from the model's metrics.json (else: as-is, whole text)."""

    label_values: dict[str, float] | None = None
    """For a model whose labels are not ratings (`__label__hq`): label name -> rating."""

    use_combiner: bool = True
    """Apply the calibrated combiner edu_train wrote beside the model (combiner.json), when
    there is one."""

    engine: Engine = "auto"
    """How the model is run (filters/fasttext_scorer.py): "fused" (Primer's numba kernel,
    faster than fastText's predict, equal to about 1e-5), "fasttext" (its own predict), or
    "auto": fused where the model allows (softmax, no subwords, not quantized)."""

    @model_validator(mode="after")
    def _phases(self) -> EduScoreConfig:
        if self.model is None:
            raise ValueError(
                "edu_score.model is required (a fastText .bin, e.g. @edu_train/model.bin)"
            )
        if self.phase2_min_score < self.phase1_min_score:
            raise ValueError("phase2_min_score must be >= phase1_min_score (phase 2 is stricter)")
        return self


class EduScoreStage(Stage):
    """Classifier score for every row, phase flags from thresholds; see the module."""

    name: ClassVar[str] = "edu_score"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = EduScoreConfig
    needs: ClassVar[tuple[str, ...]] = ("text",)
    adds: ClassVar[tuple[str, ...]] = ("edu_score", "edu_int", "edu_phase1", "edu_phase2")
    uses_model: ClassVar[bool] = True
    annotates: ClassVar[bool] = True
    # The phase flags and the drop are thresholds over the stored edu_score: changing them
    # marks the column parts again without loading the model.
    threshold_keys: ClassVar[frozenset[str]] = frozenset(
        {"phase1_min_score", "phase2_min_score", "drop_below_phase1"}
    )

    config: EduScoreConfig

    def preflight(self) -> None:
        require_path("model", self.config.model, "file")

    def content_fingerprint(self) -> dict[str, str]:
        """Size and sha256 of `model` given as a file path, and of the metrics.json (the
        preprocessing) and combiner.json beside it; none for an "@edu_train/..." model."""
        model = self.config.model
        if model is None or is_ref(model):
            return {}
        path = Path(model).expanduser()
        out = {"model": _file_digest(path)}
        for name in ("metrics.json", COMBINER_FILE):
            sidecar = path.parent / name
            if sidecar.is_file():
                out[name] = _file_digest(sidecar)
        return out

    def setup(self) -> None:
        cfg = self.config
        path = Path(cfg.model or "").expanduser()
        self._scorer = make_scorer(load_fasttext(path), cfg.engine)
        prep = {"lowercase": False, "max_chars": None}
        sidecar = path.parent / "metrics.json"
        if sidecar.is_file():
            prep.update(json.loads(sidecar.read_text()).get("preprocess", {}))
        if cfg.lowercase is not None:
            prep["lowercase"] = cfg.lowercase
        if cfg.max_chars is not None:
            prep["max_chars"] = cfg.max_chars
        self._prep = prep
        self._values = label_values(self._scorer.labels, cfg.label_values)  # fail now
        combiner = path.parent / COMBINER_FILE
        self._combiner = (
            load_combiner(combiner) if cfg.use_combiner and combiner.is_file() else None
        )

    def score(self, table: pa.Table) -> pa.Table:
        probs = self._scorer.probs(table["text"], self._prep["lowercase"], self._prep["max_chars"])
        score = probs @ self._values  # the expected rating
        if self._combiner is not None:
            x = combiner_features(self._combiner.features, score, table["text"], table,
                                  probs=probs, values=self._values)  # fmt: skip
            score = 5.0 * self._combiner.predict(x)
        score = score.astype(np.float32)
        table = set_column(table, "edu_score", pa.array(score, pa.float32()))
        return set_column(table, "edu_int", pa.array(np.clip(np.rint(score), 0, 5).astype(np.int8)))

    def mark(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        score = table["edu_score"]
        table = set_column(table, "edu_phase1", pc.greater_equal(score, cfg.phase1_min_score))
        table = set_column(table, "edu_phase2", pc.greater_equal(score, cfg.phase2_min_score))
        rules = [("below_phase1", pc.invert(table["edu_phase1"]))] if cfg.drop_below_phase1 else []
        return mark_dropped(table, self.name, rules)
