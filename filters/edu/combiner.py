"""A small calibrated combiner: the text model's score, document length and quality signals
in one logistic regression.

What: `fit_combiner(features, positive)` fits P(rating >= binary_threshold) on a few
standardised features (numpy Newton steps with an L2 penalty, no scipy); `Combiner.predict`
gives that probability. `fit_graded(features, ratings, thresholds)` fits one such head per
rating threshold k on the same features; 5x `GradedCombiner.predict` is the expected rating
when each band between thresholds counts as its top rating: with thresholds 1 and 3,
2 P(rating >= 1) + 3 P(rating >= 3), i.e. junk 0, plain text 2, educational text 5, so
its low end says "junk or not" and its high end "educational or not", and edu_score's
phase thresholds (1.5, 2.5) fall between junk and plain and between plain and
educational. `combiner_features(names, fasttext_score, text,
table, probs, values)` builds the feature matrix the same way for training and for scoring.
`edu_train` fits it on out-of-fold fastText scores of its training split (scores of
documents the fastText model did not see, so the combiner learns how far to trust the text
model) and writes it beside the model as `combiner.json`; `edu_score` applies it
(`load_combiner`) when that file is there.

Why: a bag-of-words model trained on proxy or weak labels learns topic and genre words but
not how long or how clean a document is, and on web text document length alone is a strong
baseline. A calibrated mix of the two beats either alone on held-out web domains (README.md
has the numbers), and costs one dot product per document.

Features (names in `combiner.json`):
- `fasttext`: the text model's expected rating, 0-5;
- `fasttext_logit`: the same as log-odds, log(s / (5 - s)): a logistic head is linear in it,
  and the model's confident ends are not squashed against 0 and 5;
- `fasttext_ge1` ... `fasttext_ge5`: log-odds of the model's P(rating >= k), from its class
  probabilities (`fasttext_ge1`: "not junk", the mass off the 0 class);
- `log_length`: log(1 + UTF-8 bytes);
- any `q_*` column of `pipeline.schema` (filters/quality/signals.py): taken from the input
  when present, computed from the text otherwise.

    c = fit_combiner(combiner_features(["fasttext", "log_length"], ft, text), labels >= 3)
    p = c.predict(combiner_features(c.features, ft_new, text_new))
    names = ["fasttext_logit", "fasttext_ge1", "log_length"]  # class_probs: (n, 6), ratings 0-5
    x = combiner_features(names, ft, text, probs=class_probs, values=np.arange(6.0))
    g = fit_graded(x, labels, [1, 3], names)                    # 5 * g.predict(x): 0-5
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
BASE_FEATURES = ("fasttext", "fasttext_logit", "log_length")
RATING_FEATURES = tuple(f"fasttext_ge{k}" for k in range(1, 6))
"""Features read off the model's class probabilities (`probs` and `values` needed)."""
_EPS = 1e-5


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


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
    probs: np.ndarray | None = None,
    values: np.ndarray | None = None,
) -> np.ndarray:
    """The (n, len(names)) feature matrix; `q_*` features from `table` when it has them,
    else computed from `text` (once for all of them); `fasttext_ge*` from `probs` (n,
    classes), the model's class probabilities, and `values`, the rating of each class."""
    cols: list[np.ndarray] = []
    signals: pa.Table | None = None
    for name in names:
        if name == "fasttext":
            cols.append(np.asarray(fasttext_score, np.float64))
        elif name == "fasttext_logit":
            cols.append(_log_odds(np.asarray(fasttext_score, np.float64) / 5.0))
        elif name in RATING_FEATURES:
            if probs is None or values is None:
                raise ValueError(f"combiner: {name!r} needs the model's class probabilities")
            at_least = np.asarray(values) >= int(name[len("fasttext_ge") :])
            cols.append(_log_odds(np.asarray(probs, np.float64)[:, at_least].sum(axis=1)))
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


@dataclass(frozen=True)
class GradedCombiner:
    """One logistic head per rating threshold k_1 < ... < k_n on the same features.

    `predict` is sum_i w_i P(rating >= k_i) / sum_i w_i with w_i = k_{i+1} - k_i (k_{n+1} = 6),
    between 0 and 1 like a single head's: 5x it is the expected rating with each band
    [k_i, k_{i+1}) counted as its top rating (thresholds 1..5: exactly the expected rating;
    1 and 3: 2 P(>= 1) + 3 P(>= 3), junk 0, plain 2, educational 5)."""

    heads: list[Combiner]

    @property
    def features(self) -> list[str]:
        return self.heads[0].features

    @property
    def thresholds(self) -> list[int]:
        return [h.binary_threshold for h in self.heads]

    @property
    def head_weights(self) -> np.ndarray:
        w = np.diff(np.asarray([*self.thresholds, 6], np.float64))
        return w / w.sum()

    def predict(self, x: np.ndarray) -> np.ndarray:
        return sum(w * h.predict(x) for w, h in zip(self.head_weights, self.heads, strict=True))

    def save(self, path: str | Path) -> None:
        from pipeline.io import write_json_atomic

        write_json_atomic(
            Path(path), {"kind": "graded_v1", "heads": [asdict(h) for h in self.heads]}
        )

    @classmethod
    def load(cls, path: str | Path) -> GradedCombiner:
        data = json.loads(Path(path).read_text())
        if data.get("kind") != "graded_v1":
            raise ValueError(f"{path}: not a graded combiner file (kind graded_v1)")
        return cls([Combiner(**h) for h in data["heads"]])


def load_combiner(path: str | Path) -> Combiner | GradedCombiner:
    """A `combiner.json` of either kind."""
    kind = json.loads(Path(path).read_text()).get("kind")
    return GradedCombiner.load(path) if kind == "graded_v1" else Combiner.load(path)


def fit_graded(
    x: np.ndarray,
    ratings: np.ndarray,
    thresholds: list[int],
    features: list[str],
    l2: float = 1.0,
) -> GradedCombiner:
    """One `fit_combiner` head per threshold k (positive: rating >= k)."""
    ratings = np.asarray(ratings)
    return GradedCombiner(
        [fit_combiner(x, ratings >= k, features, int(k), l2) for k in sorted(set(thresholds))]
    )


def describe(c: Combiner | GradedCombiner) -> dict[str, Any]:
    """The combiner's standardised weights by feature name (by threshold for a graded one),
    for metrics.json."""
    if isinstance(c, GradedCombiner):
        return {f">={h.binary_threshold}": describe(h) for h in c.heads}
    return {name: round(w, 4) for name, w in zip(c.features, c.weights, strict=True)}
