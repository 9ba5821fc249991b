"""What the three educational-value stages share: the sampling key, scores, metrics.

`sample_key` orders documents by a hash of `seed:id` (edu_annotate's sample, edu_train's
held-out split); `expected_scores` turns a classifier's class probabilities into the
expected 0-5 rating (edu_train's evaluation, edu_score's column); `evaluate` gives the
held-out metrics edu_train writes to metrics.json (binary and macro F1, the confusion
matrix, ROC AUC, Spearman), each beside document length as the baseline a useful model
must beat. Pure numpy, no scipy.

    evaluate(labels, expected_scores(scorer, texts, True, 3000), lengths, binary_threshold=3)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from filters.fasttext_scorer import Scorer

_LABEL = re.compile(r"__label__(\d+(?:\.\d+)?)")


def sample_key(ids: Iterable[str], seed: int) -> np.ndarray:
    """A uniform 64-bit key per id, fixed by `seed`: the sampling and split order."""
    prefix = f"{seed}:".encode()
    digest = xxhash.xxh64_intdigest
    return np.fromiter((digest(prefix + i.encode()) for i in ids), np.uint64)


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e - 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation; None when either side is constant."""
    ra, rb = _rank(a), _rank(b)
    if len(a) < 2 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U); None without both classes."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    r = _rank(score)
    return float((r[positive].sum() + n_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def best_f1_threshold(values: np.ndarray, positive: np.ndarray) -> float | None:
    """The cut `values >= cut` with the best binary F1 against `positive` (None without
    positives): how length would be used as a classifier, fitted on training data."""
    values, positive = np.asarray(values, np.float64), np.asarray(positive, bool)
    n_pos = int(positive.sum())
    if not n_pos or len(values) == 0:
        return None
    order = np.argsort(-values, kind="mergesort")
    v, tp = values[order], np.cumsum(positive[order])
    last = np.r_[v[1:] != v[:-1], True]  # cut after each distinct value
    k = np.arange(1, len(v) + 1)
    f1 = 2 * tp / (k + n_pos)
    f1[~last] = -1
    return float(v[int(np.argmax(f1))])


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    lengths: np.ndarray,
    binary_threshold: int,
    length_threshold: float | None = None,
) -> dict[str, Any]:
    """Held-out metrics of `scores` (expected ratings) against teacher `labels`, with
    document length as the baseline a useful model must beat (its binary F1 at
    `length_threshold`, a cut chosen on training data, when given)."""
    labels = np.asarray(labels, int)
    pred = np.clip(np.rint(scores), 0, 5).astype(int)
    confusion = np.zeros((6, 6), int)
    np.add.at(confusion, (labels, pred), 1)
    present = sorted(set(labels.tolist()) | set(pred.tolist()))
    per_class = {
        str(k): round(
            _f1(
                int(confusion[k, k]),
                int(confusion[:, k].sum() - confusion[k, k]),
                int(confusion[k, :].sum() - confusion[k, k]),
            ),
            4,
        )
        for k in present
    }
    pos, hit = labels >= binary_threshold, pred >= binary_threshold
    tp, fp, fn = int((pos & hit).sum()), int((~pos & hit).sum()), int((pos & ~hit).sum())

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    baseline: dict[str, Any] = {
        "roc_auc": r(roc_auc(lengths, pos)),
        "roc_auc_ge2": r(roc_auc(lengths, labels >= 2)),
        "spearman": r(spearman(lengths, labels)),
    }
    if length_threshold is not None:
        long = np.asarray(lengths) >= length_threshold
        baseline["binary_f1"] = round(
            _f1(int((pos & long).sum()), int((~pos & long).sum()), int((pos & ~long).sum())), 4
        )
        baseline["binary_min_chars"] = int(length_threshold)

    return {
        "n": len(labels),
        "label_counts": {str(k): int((labels == k).sum()) for k in range(6)},
        "binary_threshold": binary_threshold,
        "binary_f1": round(_f1(tp, fp, fn), 4),
        "binary_precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "binary_recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "macro_f1": round(float(np.mean(list(per_class.values()))), 4),
        "per_class_f1": per_class,
        "accuracy": round(float((pred == labels).mean()), 4) if len(labels) else None,
        "confusion": {
            "rows": "teacher label 0-5",
            "cols": "edu_int 0-5",
            "matrix": confusion.tolist(),
        },
        "roc_auc": r(roc_auc(scores, pos)),
        "roc_auc_ge2": r(roc_auc(scores, labels >= 2)),
        "spearman": r(spearman(scores, labels)),
        "baseline_length": baseline,
    }


def label_values(labels: Sequence[str], mapping: dict[str, float] | None = None) -> np.ndarray:
    """The rating each fastText label stands for: `__label__3` -> 3.0, or `mapping`."""
    out = []
    for lbl in labels:
        name = lbl[len("__label__") :] if lbl.startswith("__label__") else lbl
        if mapping is not None and name in mapping:
            out.append(float(mapping[name]))
        elif _LABEL.fullmatch(lbl):
            out.append(float(name))
        else:
            raise ValueError(
                f"edu_score: the model's label {lbl!r} is not a number; set "
                "edu_score.label_values to map each label to a rating"
            )
    return np.asarray(out)


def expected_scores(
    scorer: Scorer,
    text: pa.Array | pa.ChunkedArray,
    lowercase: bool,
    max_chars: int | None,
    mapping: dict[str, float] | None = None,
) -> np.ndarray:
    """Expected rating of each document over the classifier's class probabilities."""
    return scorer.probs(text, lowercase, max_chars) @ label_values(scorer.labels, mapping)
