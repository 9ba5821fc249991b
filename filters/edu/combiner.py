"""A small calibrated combiner: the text model's score, document length and quality signals
in one logistic regression.

What: `fit_combiner(features, positive)` fits P(rating >= binary_threshold) on a few
standardised features (numpy Newton steps with an L2 penalty, no scipy); `Combiner.predict`
gives that probability; `combiner_features(names, fasttext_score, text, table)` builds the
feature matrix the same way for training and for scoring. `edu_train` fits it on
out-of-fold fastText scores of its training split (scores of documents the fastText model
did not see, so the combiner learns how far to trust the text model) and writes it beside
the model as `combiner.json`; `edu_score` applies it when that file is there.

Why: a bag-of-words model trained on proxy or weak labels learns topic and genre words but
not how long or how clean a document is, and on web text document length alone is a strong
baseline. A calibrated mix of the two beats either alone on held-out web domains (README.md
has the numbers), and costs one dot product per document.

Features (names in `combiner.json`):
- `fasttext`: the text model's expected rating, 0-5;
- `log_length`: log(1 + UTF-8 bytes);
- any `q_*` column of `pipeline.schema` (filters/quality/signals.py): taken from the input
  when present, computed from the text otherwise.

    c = fit_combiner(combiner_features(["fasttext", "log_length"], ft, text), labels >= 3)
    p = c.predict(combiner_features(c.features, ft_new, text_new))
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

COMBINER_FILE = "combiner.json"
BASE_FEATURES = ("fasttext", "log_length")


def quality_feature_names() -> tuple[str, ...]:
    """The numeric `q_*` columns a combiner may use."""
    from pipeline.schema import FIELDS

    return tuple(
        name
        for name, f in FIELDS.items()
        if name.startswith("q_") and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
    )


def combiner_features(
    names: list[str] | tuple[str, ...],
    fasttext_score: np.ndarray,
    text: pa.Array | pa.ChunkedArray,
    table: pa.Table | None = None,
) -> np.ndarray:
    """The (n, len(names)) feature matrix; `q_*` features from `table` when it has them,
    else computed from `text` (once for all of them)."""
    cols: list[np.ndarray] = []
    signals: pa.Table | None = None
    for name in names:
        if name == "fasttext":
            cols.append(np.asarray(fasttext_score, np.float64))
        elif name == "log_length":
            # UTF-8 bytes, read off the offsets: counting characters would scan the text
            n = pc.binary_length(text).to_numpy(zero_copy_only=False)
            cols.append(np.log1p(np.asarray(n, np.float64)))
        elif name.startswith("q_"):
            if table is not None and name in table.column_names:
                col = table[name]
            else:
                if signals is None:
                    from filters.quality.signals import compute_quality_signals

                    signals = compute_quality_signals(text)
                col = signals[name]
            values = pc.fill_null(pc.cast(col, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
            cols.append(np.nan_to_num(np.asarray(values, np.float64)))
        else:
            raise ValueError(f"combiner: unknown feature {name!r}")
    return np.column_stack(cols) if cols else np.zeros((len(text), 0))


@dataclass(frozen=True)
class Combiner:
    """Logistic regression over standardised features: P = sigmoid(bias + w . (x - mean) / std)."""

    features: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    l2: float
    binary_threshold: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return _sigmoid(z @ np.asarray(self.weights) + self.bias)

    def save(self, path: str | Path) -> None:
        from pipeline.io import write_json_atomic

        write_json_atomic(Path(path), {"kind": "logistic_v1", **asdict(self)})

    @classmethod
    def load(cls, path: str | Path) -> Combiner:
        data = json.loads(Path(path).read_text())
        if data.pop("kind", None) != "logistic_v1":
            raise ValueError(f"{path}: not a combiner file Primer writes (kind logistic_v1)")
        return cls(**data)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def fit_combiner(
    x: np.ndarray,
    positive: np.ndarray,
    features: list[str],
    binary_threshold: int,
    l2: float = 1.0,
    iterations: int = 50,
) -> Combiner:
    """L2-penalised logistic regression by Newton's method (the bias is not penalised); a
    few features and thousands of rows converge in a handful of steps."""
    y = np.asarray(positive, np.float64)
    if y.min() == y.max():
        raise ValueError("combiner: the labels have one class only; nothing to fit")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    z = np.column_stack([np.ones(len(x)), (x - mean) / std])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(iterations):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return Combiner(
        features=list(features),
        mean=mean.tolist(),
        std=std.tolist(),
        weights=w[1:].tolist(),
        bias=float(w[0]),
        l2=l2,
        binary_threshold=binary_threshold,
    )


def describe(c: Combiner) -> dict[str, Any]:
    """The combiner's standardised weights by feature name, for metrics.json."""
    return {name: round(w, 4) for name, w in zip(c.features, c.weights, strict=True)}
