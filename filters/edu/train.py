"""The `edu_train` stage: fastText learns educational-value ratings -> model.bin + metrics.

An ArtifactStage. It trains on labels from any mix of sources, combined by config:
- `annotations`: an `edu_annotate` output (a teacher's 0-5 ratings);
- `label_files`: JSONL/Parquet/HF datasets with a score and either the text or an id joined
  against this stage's input documents (e.g. FineWeb-Edu's Llama-3 annotations);
- `format_labels`: weak labels from document-type annotations, each format mapped to a
  rating by `format_scores` (WebOrganizer's formats by default: Academic Writing, Tutorial...
  high; Spam / Ads, Product Page, Content Listing... low; filters/edu/labels.py);
- DCLM-style proxy labels: `proxy_positive` reference text (textbooks, instruction data) as
  high against web text as low: `proxy_negative` files, else a hash sample of the input;
  with `proxy_shuffled`, word-shuffled copies of those texts as lower still (synthetic
  junk: the right words, no sentences; trained on, never evaluated).
Every labelled text is checked against benchmark test sets first (`decontam_benchmarks`,
the `decontaminate` stage's n-gram rule) and dropped when it overlaps one. `format_caps`
caps format labels by another column (an adult-topic page rates 0 whatever its format).

Evaluation is honest about generalisation: the held-out split keeps whole groups (a web
domain, an OpenStax book, a source file; `group_columns`), so no test document shares a
source or a domain with a training document. `metrics.json` has, on that split, ROC AUC,
Spearman and binary F1 beside document length's, per label source too, and a k-fold
cross-validation by group. A small calibrated combiner (filters/edu/combiner.py: logistic
regression on the fastText score and log length, `combiner`; with `combiner_thresholds`
one head per rating threshold, e.g. "not junk" and "educational") is fitted on
out-of-fold fastText scores of the training split and written beside the model as
`combiner.json`; `edu_score` applies it. The stage fails like a guardrail (exit 1, no
manifest, so nothing downstream reads the model) when the deployed score does not beat
document length on the held-out split (`min_margin_over_length`, `on_weak_model`).

Defaults for ratings were chosen by 5-fold cross-validation on the rated FineWeb documents
of data/annotations/ (softmax, 60 epochs, lr 0.5, dim 32, word bigrams, lower-cased first
3,000 characters); fewer epochs underfit badly on a few hundred documents. Recipes with
thousands of proxy or format labels use far fewer (configs/edu_classifier.yaml).

    stages:
      edu_train: {annotations: "@edu_annotate", label_files: [data/annotations/fineweb_edu.jsonl]}
      edu_train: {proxy_positive: ["${PRIMER_EDU_DATA:-data/edu}/openstax*.jsonl.gz"],
                  format_labels: [weborganizer.jsonl.gz], decontam_benchmarks: [data/benchmarks]}

Path values expand `$VAR`, `${VAR}` and `${VAR:-default}` when the config is loaded.

The module is over 500 lines: one stage whose steps (assembling labels, the group split,
training, evaluation, the guardrail) all read its config; reading label files lives in
filters/edu/labels.py, the combiner in combiner.py, the metrics in metrics.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import Field, field_validator, model_validator

from filters.edu.combiner import (
    COMBINER_FILE,
    combiner_features,
    describe,
    fit_combiner,
    fit_graded,
)
from filters.edu.labels import (
    WEBORGANIZER_FORMATS,
    decontaminate_rows,
    format_rows,
    group_of,
    read_text_rows,
    text_id,
)
from filters.edu.metrics import (
    best_f1_threshold,
    evaluate,
    label_values,
    sample_key,
)
from filters.fasttext_scorer import Scorer, fasttext_lines, load_fasttext, make_scorer
from pipeline.executor import LOCAL, Executor
from pipeline.io import expand_inputs, iter_documents, write_json_atomic
from pipeline.readers import is_saved_dataset
from pipeline.stage import ArtifactStage, PreflightError, StageConfig, is_ref, require_path

log = logging.getLogger("primer.edu")

LabelSource = Literal["files", "annotations", "formats", "proxy"]
RATINGS = np.arange(6, dtype=np.float64)  # the classes edu_train trains: ratings 0-5
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")


def expand_path(value: str) -> str:
    """`${VAR:-default}` (the default when VAR is unset or empty), then `$VAR` / `${VAR}`;
    a variable left unset is an error naming it."""
    value = _VAR.sub(lambda m: os.environ.get(m.group(1)) or m.group(2), value)
    expanded = os.path.expandvars(value)
    left = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if left:
        raise ValueError(
            f"{value!r} uses ${left[0]}, which is not set in the environment; export it or "
            f"give a default as ${{{left[0]}:-path}}"
        )
    return expanded


def _check_ratings(v: dict[str, int]) -> dict[str, int]:
    bad = {k: r for k, r in v.items() if not 0 <= r <= 5}
    if bad:
        raise ValueError(f"ratings must be 0-5; got {bad}")
    return v


class EduTrainConfig(StageConfig):
    """Settings of the `edu_train` stage."""

    annotations: str | None = None
    """An `edu_annotate` output folder (in a recipe: "@edu_annotate"); its rated rows."""

    label_files: list[str] = []
    """Imported ratings: JSONL(.gz)/Parquet files, folders, HF `save_to_disk` folders or
    "hf:NAME[:SPLIT]" hub datasets, with a score column and a text column or an id column
    (ids are joined against this stage's input documents). Scores are rounded and clipped
    to 0-5."""

    score_column: str = "score"
    text_column: str = "text"
    id_column: str = "id"

    format_labels: list[str] = []
    """Weak labels from document-type annotations: JSONL(.gz)/Parquet files (or folders,
    globs) with a text column and `format_column`; each row is rated `format_scores[format]`
    and rows whose format is not in `format_scores` are left out."""
    format_column: str = "format"
    format_scores: dict[str, int] = dict(WEBORGANIZER_FORMATS)
    """Format -> rating 0-5. The default rates WebOrganizer's 24 formats (Academic Writing,
    Knowledge Article, Tutorial 5 ... Spam / Ads, Product Page, Content Listing 0); see
    filters/edu/labels.py."""
    format_caps: dict[str, dict[str, int]] = {}
    """Caps on format labels by another column of the same files: {column: {value: max
    rating}}, e.g. {topic: {Adult: 0}} (WebOrganizer's topic labels): an adult page is
    rated 0 whatever its format, as the rubric (teaching value for school) rates it. Files
    without the column are not capped."""

    proxy_positive: list[str] = []
    """DCLM-style proxy labels: reference text (any reader format) labelled
    `proxy_positive_label`, against `proxy_negative_ratio` x as many web documents
    labelled `proxy_negative_label`."""
    proxy_negative: list[str] = []
    """The web text proxy negatives are drawn from (a hash sample; any reader format);
    empty: this stage's input documents."""
    proxy_positive_label: int = Field(5, ge=0, le=5)
    proxy_negative_label: int = Field(0, ge=0, le=5)
    proxy_negative_ratio: float = Field(1.0, gt=0)
    proxy_shuffled: float = Field(0.0, ge=0.0, le=1.0)
    """Share of the proxy texts (positives and negatives, a hash sample) that also go in
    with their words shuffled, labelled `proxy_shuffled_label`: the same vocabulary with no
    sentences, so the model cannot rate a text by its topic words alone and has to learn
    what running text looks like (word n-grams). Synthetic: trained on, never evaluated
    (each copy stays in its source's group, so a held-out book's copies are held out too).
    0: off."""
    proxy_shuffled_label: int = Field(0, ge=0, le=5)

    allow_missing: bool = False
    """Entries of label_files, format_labels, proxy_positive and proxy_negative that match no
    file are skipped (logged, and listed in metrics.json under data.sources.missing) instead
    of failing preflight: for a recipe whose data folder ($PRIMER_EDU_DATA) holds only some
    of them."""

    decontam_benchmarks: list[str] = []
    """Benchmark test sets (as the `decontaminate` stage's `benchmarks`: a folder like
    data/benchmarks, files, "hf:NAME[:CONFIG]:SPLIT"); a labelled text sharing a word
    `decontam_ngram`-gram with a test item is dropped before training. Empty: off."""
    decontam_ngram: int = Field(13, ge=4, le=64)

    prefer: list[LabelSource] = ["files", "annotations", "formats", "proxy"]
    """When a document has labels from several sources, the first source here wins."""

    group_columns: list[str] = ["url", "book", "source"]
    """What the held-out split and the cross-validation folds keep whole: the web domain
    of `url` (host without `www.`), else the first of the other columns a row has (an
    OpenStax `book`, a Dolly `source` file), else the file (or, for input documents, the
    document) it came from. No group is both in training and in the held-out split."""

    binary_threshold: int = Field(3, ge=1, le=5)
    """"Educational" for binary F1 and ROC AUC: rating >= this (FineWeb-Edu uses 3)."""

    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of groups (not of documents) held out."""
    cv_folds: int = Field(5, ge=0)
    """k-fold cross-validation of model and length baseline over all labels, folds by
    group (0: off)."""
    seed: int = 0

    combiner: list[str] = ["fasttext", "log_length"]
    """Features of the calibrated combiner written beside the model (combiner.json):
    "fasttext" (the model's expected rating), "fasttext_logit" (the same as log-odds),
    "fasttext_ge1".."fasttext_ge5" (log-odds of the model's P(rating >= k)), "log_length",
    any `q_*` quality signal (from the input's columns when present, else computed from the
    text). Empty: no combiner, edu_score is fastText's expected rating."""
    combiner_thresholds: list[int] = []
    """The ratings k whose P(rating >= k) the combiner predicts, one logistic head each;
    edu_score is then an expected rating (filters/edu/combiner.py GradedCombiner). [1, 3]:
    2 P(rating >= 1) + 3 P(rating >= 3): junk 0, plain text 2, educational text 5, so
    edu_score's phase thresholds fall between them (1.5 drops likely junk, 2.5 keeps text
    with a real chance of being educational). Empty: one head, edu_score = 5 P(rating >=
    binary_threshold)."""
    combiner_folds: int = Field(3, ge=2)
    """Folds (by group) of the training split whose out-of-fold fastText scores the
    combiner is fitted on."""
    combiner_l2: float = Field(1.0, ge=0)
    combiner_sources: list[LabelSource] = ["files", "annotations", "formats"]
    """Label sources the combiner is fitted on: labels of natural web documents, whose
    length means something (a proxy positive is as long as the reference text happens to
    be, so proxy labels would teach the length feature an accident). With no such labels of
    both classes in the training split, no combiner is written."""

    min_margin_over_length: float | None = 0.0
    """Guardrail: the deployed score (the combiner's, else fastText's) must beat document
    length on the held-out split by more than this in `guardrail_metric`; None: off."""
    guardrail_metric: Literal["roc_auc", "spearman", "binary_f1"] = "roc_auc"
    guardrail_source: LabelSource | None = None
    """Judge only the held-out documents of this label source (e.g. "formats": web pages
    only); None: the whole held-out split."""
    on_weak_model: Literal["fail", "warn"] = "fail"
    """fail: the stage stops (exit 1, no manifest, model.bin and metrics.json left for
    inspection); warn: a loud warning and the run goes on."""

    lowercase: bool = True
    max_chars: int | None = Field(3_000, ge=100)
    """Characters of a document the model reads (the teacher saw the beginning too)."""

    epoch: int = Field(60, ge=1)
    lr: float = Field(0.5, gt=0)
    dim: int = Field(32, ge=2)
    word_ngrams: int = Field(2, ge=1)
    min_count: int = Field(1, ge=1)
    bucket: int = Field(200_000, ge=0)
    """Hash buckets for word n-grams; the model file is about bucket x dim x 4 bytes."""
    thread: int = Field(1, ge=1)
    """fastText is deterministic with one thread only."""

    @field_validator(
        "annotations", "label_files", "format_labels", "proxy_positive", "proxy_negative",
        "decontam_benchmarks", mode="before",
    )  # fmt: skip
    @classmethod
    def _expand_vars(cls, v: Any) -> Any:
        if isinstance(v, str):
            return expand_path(v)
        if isinstance(v, list):
            return [expand_path(x) if isinstance(x, str) else x for x in v]
        return v

    @field_validator("format_scores")
    @classmethod
    def _ratings(cls, v: dict[str, int]) -> dict[str, int]:
        return _check_ratings(v)

    @field_validator("format_caps")
    @classmethod
    def _caps(cls, v: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for column, limits in v.items():
            _check_ratings(limits)
            if column in {"text", "id"}:
                raise ValueError(f"format_caps: {column!r} is not a label column")
        return v

    @field_validator("combiner")
    @classmethod
    def _features(cls, v: list[str]) -> list[str]:
        from filters.edu.combiner import BASE_FEATURES, RATING_FEATURES, quality_feature_names

        known = {*BASE_FEATURES, *RATING_FEATURES, *quality_feature_names()}
        bad = [f for f in v if f not in known]
        if bad:
            raise ValueError(
                f"unknown feature {bad[0]!r}; use fasttext, fasttext_logit, fasttext_ge1..5, "
                "log_length or a q_* column"
            )
        if v and not any(f.startswith("fasttext") for f in v):
            raise ValueError("the combiner needs a fastText feature ('fasttext', ...)")
        return v

    @field_validator("combiner_thresholds")
    @classmethod
    def _thresholds(cls, v: list[int]) -> list[int]:
        if any(not 1 <= k <= 5 for k in v):
            raise ValueError(f"combiner_thresholds are ratings 1-5; got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _some_labels(self) -> EduTrainConfig:
        if not (self.annotations or self.label_files or self.proxy_positive or self.format_labels):
            raise ValueError(
                "edu_train needs annotations, label_files, format_labels or proxy_positive"
            )
        return self

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "loss": "softmax", "epoch": self.epoch, "lr": self.lr, "dim": self.dim,
            "wordNgrams": self.word_ngrams, "minCount": self.min_count, "bucket": self.bucket,
            "thread": self.thread, "seed": self.seed,
        }  # fmt: skip


_LABEL_FORMAT = re.compile(r"\.(?:parquet|jsonl?(?:\.gz)?)$")


def _require_sources(
    key: str, values: Sequence[str], label_files: bool, allow_missing: bool
) -> None:
    """Preflight: each entry (a file, folder or glob; "@stage" and "hf:" are checked when
    read) names at least one file, and a label file is one `_read_label_table` reads."""
    for i, value in enumerate(values):
        where = f"{key}.{i}"
        if is_ref(value) or value.startswith("hf:"):
            continue
        path = os.path.expandvars(value)
        if label_files and is_saved_dataset(path):
            continue
        try:
            files = expand_inputs([path])
        except FileNotFoundError:
            if allow_missing:
                continue
            hint = "" if Path(path).is_absolute() else f" (relative to {os.getcwd()})"
            raise PreflightError(where, f"{value!r} matches no file{hint}") from None
        unreadable = [f for f in files if label_files and not _LABEL_FORMAT.search(f)]
        if unreadable:
            raise PreflightError(
                where,
                f"{unreadable[0]!r} is not a label file edu_train reads (JSONL, JSONL.gz, "
                "Parquet or an HF save_to_disk folder); move other files out of the folder",
            )


def _read_label_table(source: str, cfg: EduTrainConfig) -> pa.Table:
    """A label file as (id, text, score, group) with nulls where the file has no such
    column (group: see `EduTrainConfig.group_columns`)."""
    cols = [cfg.score_column, cfg.text_column, cfg.id_column, *cfg.group_columns]
    if source.startswith("hf:"):
        import datasets

        name, _, split = source[3:].partition(":")
        table = datasets.load_dataset(name, split=split or "train").data.table
    elif is_saved_dataset(source):
        import datasets

        table = datasets.load_from_disk(source).data.table
    elif source.endswith(".parquet"):
        table = pq.read_table(
            source, columns=[c for c in cols if c in pq.read_schema(source).names]
        )
    elif re.search(r"\.jsonl?(\.gz)?$", source):
        import polars as pl

        table = pl.read_ndjson(source).to_arrow()
    else:
        raise ValueError(f"edu_train.label_files: cannot read {source} (JSONL, Parquet, HF)")
    names = table.column_names
    if cfg.score_column not in names or not ({cfg.text_column, cfg.id_column} & set(names)):
        raise ValueError(
            f"edu_train.label_files: {source} needs a {cfg.score_column!r} column and a "
            f"{cfg.text_column!r} or {cfg.id_column!r} column; it has {names}"
        )
    n = len(table)

    def col(name: str, typ: pa.DataType) -> Any:
        return pc.cast(table[name], typ) if name in names else pa.nulls(n, typ)

    return pa.table(
        {
            "id": col(cfg.id_column, pa.string()),
            "text": col(cfg.text_column, pa.large_string()),
            "score": col(cfg.score_column, pa.float64()),
            "group": pc.cast(group_of(table, cfg.group_columns, ""), pa.string()),
        }
    )


def _stage_files(path: str) -> list[str]:
    from pipeline.stage_runner import output_files

    p = Path(path)
    if (p / "_manifest.json").is_file():
        return output_files(p)
    return expand_inputs([path])


def fit_fasttext(train_path: str, params: dict[str, Any], model_path: str) -> float:
    """Train and save a supervised fastText model; returns the learning rate used. A run that
    diverges ("Encountered NaN") is retried at half the learning rate, up to 3 times."""
    import fasttext

    params = dict(params)
    for _ in range(4):
        try:
            fasttext.train_supervised(train_path, verbose=0, **params).save_model(model_path)
            return params["lr"]
        except RuntimeError as e:
            if "NaN" not in str(e):
                raise
            params["lr"] /= 2
    raise RuntimeError(
        f"edu_train: fastText diverged down to lr {params['lr'] * 2}; lower edu_train.lr"
    )


def _group_keys(groups: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """The 64-bit sampling key of each row's group (computed once per distinct group)."""
    if isinstance(groups, pa.ChunkedArray):
        groups = groups.combine_chunks()
    enc = pc.dictionary_encode(groups)
    keys = sample_key(enc.dictionary.to_pylist(), seed)
    return keys[enc.indices.to_numpy(zero_copy_only=False)]


class EduTrainStage(ArtifactStage):
    """fastText on educational-value labels -> model.bin + metrics.json; see the module."""

    name: ClassVar[str] = "edu_train"
    # 3: held-out split and folds by group (domain / book / file), format labels, proxy
    # negatives from files, decontamination, the combiner and the length guardrail.
    # 4: the combiner can read the model's class probabilities and fit one head per
    # rating threshold (combiner_thresholds).
    version: ClassVar[int] = 4
    Config: ClassVar[type[StageConfig]] = EduTrainConfig
    needs: ClassVar[tuple[str, ...]] = ("id", "text")

    config: EduTrainConfig

    def preflight(self) -> None:
        cfg = self.config
        if cfg.annotations and not is_ref(cfg.annotations):
            require_path("annotations", cfg.annotations, "any")
        _require_sources("label_files", cfg.label_files, True, cfg.allow_missing)
        _require_sources("format_labels", cfg.format_labels, True, cfg.allow_missing)
        _require_sources("proxy_positive", cfg.proxy_positive, False, cfg.allow_missing)
        _require_sources("proxy_negative", cfg.proxy_negative, False, cfg.allow_missing)
        for i, b in enumerate(cfg.decontam_benchmarks):
            if not (b.startswith("hf:") or is_ref(b)):
                require_path(f"decontam_benchmarks.{i}", b, "any")

    def _files(self, patterns: Sequence[str], missing: list[str]) -> list[str]:
        """`patterns` expanded; with `allow_missing`, those that match nothing are noted."""
        files: list[str] = []
        for p in patterns:
            try:
                files += expand_inputs([p])
            except FileNotFoundError:
                if not self.config.allow_missing:
                    raise
                log.warning("edu_train: %r matches no file; skipped (allow_missing)", p)
                missing.append(p)
        return sorted(dict.fromkeys(files))

    def collect(self, inputs: Sequence[str | pa.Table]) -> tuple[pa.Table, dict[str, Any]]:
        """All labelled examples (id, text, label, source, group), one per document."""
        cfg = self.config
        found: dict[str, list[tuple[str, str, int, str]]] = {}  # source -> (id, text, label, group)
        report: dict[str, Any] = {}
        missing: list[str] = []

        if cfg.label_files:
            rows, by_id, rejected = [], {}, 0
            sources = [
                f for src in cfg.label_files
                for f in ([src] if src.startswith("hf:") or is_saved_dataset(src) else self._files([src], missing))
            ]  # fmt: skip
            for f in sources:
                t = _read_label_table(f, cfg)
                score = t["score"].to_numpy(zero_copy_only=False)
                for i, text, s, g in zip(
                    t["id"].to_pylist(), t["text"].to_pylist(), score, t["group"].to_pylist(),
                    strict=True,
                ):  # fmt: skip
                    if s is None or not np.isfinite(s) or not -0.5 < s < 5.5:
                        rejected += 1
                        continue
                    label = int(np.clip(np.rint(s), 0, 5))
                    if text:
                        i = i or text_id(text)
                        rows.append((i, text, label, g or f"id:{i}"))
                    elif i:
                        by_id[i] = label
                    else:
                        rejected += 1
            if by_id:
                for t in iter_documents(inputs, cfg.batch_rows, columns=("id", "text", "url")):
                    hit = t.filter(pc.is_in(t["id"], value_set=pa.array(list(by_id), pa.string())))
                    groups = group_of(hit, cfg.group_columns, "").to_pylist()
                    for i, text, g in zip(hit["id"].to_pylist(), hit["text"].to_pylist(), groups, strict=True):  # fmt: skip
                        if text:
                            rows.append((i, text, by_id.pop(i), g or f"id:{i}"))
            found["files"] = rows
            report["files"] = {
                "labels": len(rows),
                "ids_not_in_input": len(by_id),
                "rejected": rejected,
            }

        if cfg.annotations:
            rows = []
            for t in iter_documents(_stage_files(cfg.annotations), cfg.batch_rows,
                                    columns=("id", "text", "edu_label", "url")):  # fmt: skip
                if "edu_label" not in t.column_names:
                    raise ValueError(
                        f"edu_train.annotations: {cfg.annotations} has no edu_label column"
                    )
                t = t.filter(pc.is_valid(t["edu_label"]))
                groups = group_of(t, cfg.group_columns, "").to_pylist()
                rows += [
                    (i, text, label, g or f"id:{i}")
                    for i, text, label, g in zip(
                        t["id"].to_pylist(), t["text"].to_pylist(), t["edu_label"].to_pylist(),
                        groups, strict=True,
                    )
                ]  # fmt: skip
            found["annotations"] = rows
            report["annotations"] = {"labels": len(rows)}

        if cfg.format_labels:
            rows, unmapped, capped, per_label = [], 0, 0, np.zeros(6, int)
            for f in self._files(cfg.format_labels, missing):
                t = read_text_rows(f, cfg.text_column, cfg.id_column, cfg.group_columns,
                                   extra=(cfg.format_column,), optional=tuple(cfg.format_caps))  # fmt: skip
                t, left_out = format_rows(t, cfg.format_scores, cfg.format_column, cfg.format_caps)
                unmapped += left_out
                capped += int(pc.sum(t["capped"]).as_py() or 0)
                labels = t["label"].to_numpy()
                np.add.at(per_label, labels, 1)
                rows += zip(t["id"].to_pylist(), t["text"].to_pylist(), labels.tolist(),
                            t["group"].to_pylist(), strict=True)  # fmt: skip
            found["formats"] = rows
            report["formats"] = {
                "labels": len(rows),
                "unmapped_formats": unmapped,
                **({"capped": capped} if cfg.format_caps else {}),
                "label_counts": {str(k): int(c) for k, c in enumerate(per_label) if c},
            }

        if cfg.proxy_positive:
            pos: list[tuple[str, str, int, str]] = []
            for f in self._files(cfg.proxy_positive, missing):
                t = read_text_rows(f, cfg.text_column, cfg.id_column, cfg.group_columns)
                pos += [(i, text, cfg.proxy_positive_label, g) for i, text, g in zip(
                    t["id"].to_pylist(), t["text"].to_pylist(), t["group"].to_pylist(), strict=True)]  # fmt: skip
            want = int(round(len(pos) * cfg.proxy_negative_ratio))
            if cfg.proxy_negative:
                neg_files = self._files(cfg.proxy_negative, missing)
                tables = (read_text_rows(f, cfg.text_column, cfg.id_column, cfg.group_columns)
                          for f in neg_files)  # fmt: skip
            else:
                tables = (
                    t.append_column("group", group_of(t, cfg.group_columns, ""))
                    for t in iter_documents(inputs, cfg.batch_rows, columns=("id", "text", "url"))
                )
            cand: list[tuple[int, str, str, str]] = []
            for t in tables:
                keys = sample_key(t["id"].to_pylist(), cfg.seed + 1)
                cand += zip(keys.tolist(), t["id"].to_pylist(), t["text"].to_pylist(),
                            t["group"].to_pylist(), strict=True)  # fmt: skip
                cand = sorted(c for c in cand if c[2])[:want]
            neg = [(i, text, cfg.proxy_negative_label, g or f"id:{i}") for _, i, text, g in cand]
            found["proxy"] = pos + neg
            report["proxy"] = {"positives": len(pos), "negatives": len(neg)}
        if missing:
            report["missing"] = missing

        seen: dict[str, tuple[str, int, str, str]] = {}
        for source in cfg.prefer:
            for i, text, label, group in found.get(source, []):
                seen.setdefault(i, (text, int(label), source, group))
        ids = sorted(seen)
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "text": pa.array([seen[i][0] for i in ids], pa.large_string()),
                "label": pa.array([seen[i][1] for i in ids], pa.int8()),
                "source": pa.array([seen[i][2] for i in ids], pa.string()),
                "group": pa.array([seen[i][3] for i in ids], pa.string()),
            }
        )
        if cfg.decontam_benchmarks and len(table):
            hit, contam = decontaminate_rows(table, cfg.decontam_benchmarks, cfg.decontam_ngram)
            contam["by_source"] = {
                s: int(c) for s, c in zip(*np.unique(
                    table["source"].filter(pa.array(hit)).to_numpy(zero_copy_only=False),
                    return_counts=True), strict=True)
            }  # fmt: skip
            report["decontamination"] = contam
            table = table.filter(pa.array(~hit))
        table = table.append_column("synthetic", pa.array(np.zeros(len(table), bool)))
        if cfg.proxy_shuffled > 0 and len(table):
            shuffled = self._shuffled_copies(table.filter(pc.equal(table["source"], "proxy")))
            report.setdefault("proxy", {})["shuffled"] = len(shuffled)
            table = pa.concat_tables([table, shuffled]).sort_by("id")
        return table, report

    def _shuffled_copies(self, proxy: pa.Table) -> pa.Table:
        """Word-shuffled copies of a hash sample (`proxy_shuffled`) of the proxy rows, each
        in its source's group, labelled `proxy_shuffled_label`."""
        cfg = self.config
        keys = sample_key(proxy["id"].to_pylist(), cfg.seed + 4)
        proxy = proxy.filter(pa.array(keys / 2.0**64 < cfg.proxy_shuffled))
        ids, texts = [], []
        for i, text, k in zip(proxy["id"].to_pylist(), proxy["text"].to_pylist(),
                              sample_key(proxy["id"].to_pylist(), cfg.seed + 5).tolist(), strict=True):  # fmt: skip
            words = text[: cfg.max_chars].split() if cfg.max_chars else text.split()
            np.random.default_rng(k).shuffle(words)
            ids.append(f"shuffled:{i}")
            texts.append(" ".join(words))
        n = len(ids)
        return pa.table({
            "id": pa.array(ids, pa.string()),
            "text": pa.array(texts, pa.large_string()),
            "label": pa.array(np.full(n, cfg.proxy_shuffled_label), pa.int8()),
            "source": pa.array(["proxy"] * n, pa.string()),
            "group": proxy["group"],
            "synthetic": pa.array(np.ones(n, bool)),
        })  # fmt: skip

    def _train(self, table: pa.Table, work: Path) -> Any:
        """fastText on `table` (text, label), trained in a fresh spawned process.

        fastText 0.9.x's `DenseMatrix::uniform` left most of the input matrix as the
        allocator handed it over (garbage, and NaN, in a long-lived process);
        fasttext-community fixed that, so a model is reproducible in any process. Training
        stays in a spawned process anyway: it keeps the C++ heap out of the driver and
        makes a crash in the trainer a clear error, not a dead run.
        """
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        cfg = self.config
        # fastText reads its file in order, every epoch: rows in a fixed pseudo-random order
        # (a hash of id and seed), not grouped by source as ids sort (web, OpenStax, ...),
        # so no source is always learnt last, at the lowest learning rate
        table = table.take(pa.array(np.argsort(sample_key(table["id"].to_pylist(), cfg.seed + 6))))
        lines = fasttext_lines(table["text"], cfg.lowercase, cfg.max_chars)
        path = work / f".train-{os.getpid()}.txt"
        model_path = work / f".model-{os.getpid()}.bin"
        with open(path, "w", encoding="utf-8") as f:
            for label, line in zip(table["label"].to_pylist(), lines, strict=True):
                f.write(f"__label__{label} {line}\n")
        try:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                self.lr_used = pool.submit(
                    fit_fasttext, str(path), cfg.hyperparameters(), str(model_path)
                ).result()
            return load_fasttext(model_path)
        finally:
            path.unlink(missing_ok=True)
            model_path.unlink(missing_ok=True)

    def _predict_probs(self, scorer: Scorer, table: pa.Table) -> np.ndarray:
        """(n, 6): P(rating r) for r = 0..5 (0 for a rating the model never saw)."""
        cfg = self.config
        p = scorer.probs(table["text"], cfg.lowercase, cfg.max_chars)
        out = np.zeros((len(table), len(RATINGS)))
        out[:, label_values(scorer.labels).astype(int)] = np.nan_to_num(p)
        return out

    def _out_of_fold(self, table: pa.Table, fold: np.ndarray, k: int, work: Path) -> np.ndarray:
        """(n, 6) class probabilities of each row from a model trained on the other folds."""
        pred = np.zeros((len(table), len(RATINGS)))
        for f in range(k):
            m = fold == f
            if m.any() and (~m).any():
                scorer = make_scorer(self._train(table.filter(pa.array(~m)), work))
                pred[m] = self._predict_probs(scorer, table.filter(pa.array(m)))
        return pred

    def build(
        self, inputs: Sequence[str], out_dir: str, executor: Executor = LOCAL
    ) -> dict[str, Any]:
        cfg = self.config
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        data, report = self.collect(inputs)
        if len(data) < 10 or len(set(data["label"].to_pylist())) < 2:
            raise ValueError(
                f"edu_train: {len(data)} labelled documents with labels "
                f"{sorted(set(data['label'].to_pylist()))}: too few to train on; sources: {report}"
            )
        key = _group_keys(data["group"], cfg.seed)
        in_train = (key / 2.0**64) >= cfg.test_fraction
        synthetic = data["synthetic"].to_numpy(zero_copy_only=False)
        is_test = ~in_train & ~synthetic  # synthetic rows of held-out groups: in neither
        train, test = data.filter(pa.array(in_train)), data.filter(pa.array(is_test))
        lengths = pc.utf8_length(data["text"]).to_numpy(zero_copy_only=False)
        labels = data["label"].to_numpy()
        positive = labels >= cfg.binary_threshold
        # Length's binary F1 at the length threshold best on the training split.
        len_cut = best_f1_threshold(lengths[in_train], positive[in_train])

        model = self._train(train, out)
        scorer = make_scorer(model)
        lr_used = self.lr_used
        probs_test = self._predict_probs(scorer, test)
        ft_test = probs_test @ RATINGS

        deployed = ft_test
        comb = combiner_info = None
        if cfg.combiner:
            usable = np.isin(train["source"].to_numpy(zero_copy_only=False), cfg.combiner_sources)
            pos_train = positive[in_train]
            if usable.any() and 0 < pos_train[usable].sum() < usable.sum():
                fold = (
                    _group_keys(train["group"], cfg.seed + 3) % np.uint64(cfg.combiner_folds)
                ).astype(int)
                oof = self._out_of_fold(train, fold, cfg.combiner_folds, out)[usable]
                fit_rows = train.filter(pa.array(usable))
                x_train = combiner_features(cfg.combiner, oof @ RATINGS, fit_rows["text"],
                                            probs=oof, values=RATINGS)  # fmt: skip
                ratings_train = fit_rows["label"].to_numpy()
                # a threshold with labels on one side only has nothing to fit (the
                # binary_threshold's both sides are there: checked above)
                heads = [k for k in cfg.combiner_thresholds
                         if 0 < (ratings_train >= k).sum() < len(ratings_train)] or [cfg.binary_threshold]  # fmt: skip
                if cfg.combiner_thresholds:
                    comb = fit_graded(x_train, ratings_train, heads, cfg.combiner,
                                      cfg.combiner_l2)  # fmt: skip
                else:
                    comb = fit_combiner(x_train, pos_train[usable], cfg.combiner,
                                        cfg.binary_threshold, cfg.combiner_l2)  # fmt: skip
                deployed = 5.0 * comb.predict(
                    combiner_features(
                        cfg.combiner, ft_test, test["text"], probs=probs_test, values=RATINGS
                    )  # fmt: skip
                )
                combiner_info = {"file": COMBINER_FILE, "features": cfg.combiner,
                                 "thresholds": heads,
                                 "standardised_weights": describe(comb),
                                 "bias": ([round(h.bias, 4) for h in comb.heads]
                                          if cfg.combiner_thresholds else round(comb.bias, 4)),
                                 "fitted_on": "out-of-fold fastText scores of the training split",
                                 "sources": cfg.combiner_sources, "rows": int(usable.sum()),
                                 "folds": cfg.combiner_folds}  # fmt: skip
            else:
                combiner_info = {"skipped": "no labels of both classes from "
                                 f"{cfg.combiner_sources} in the training split"}  # fmt: skip
                log.warning("edu_train: no combiner: %s", combiner_info["skipped"])

        def held(scores: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
            m = np.ones(int(is_test.sum()), bool) if mask is None else mask
            return evaluate(labels[is_test][m], scores[m], lengths[is_test][m],
                            cfg.binary_threshold, length_threshold=len_cut)  # fmt: skip

        sources_test = test["source"].to_numpy(zero_copy_only=False)
        held_out = held(ft_test)
        per_source = {
            s: held(ft_test, sources_test == s)
            for s in sorted(set(sources_test.tolist())) if (sources_test == s).sum() >= 2
        }  # fmt: skip
        combined = combined_by_source = None
        if comb is not None:
            combined = held(deployed)
            combined_by_source = {
                s: held(deployed, sources_test == s)
                for s in sorted(set(sources_test.tolist())) if (sources_test == s).sum() >= 2
            }  # fmt: skip

        cv = None
        if cfg.cv_folds >= 2:
            fold = (_group_keys(data["group"], cfg.seed + 2) % np.uint64(cfg.cv_folds)).astype(int)
            pred = self._out_of_fold(data, fold, cfg.cv_folds, out) @ RATINGS
            real = ~synthetic
            cv = {"folds": cfg.cv_folds, "by": "group",
                  **evaluate(labels[real], pred[real], lengths[real], cfg.binary_threshold)}  # fmt: skip

        guard = self._guardrail(
            combined if comb is not None else held_out,
            combined_by_source if comb is not None else per_source,
        )

        digest = hashlib.sha256()
        for i, text, label in zip(
            data["id"].to_pylist(), data["text"].to_pylist(), labels.tolist(), strict=True
        ):
            digest.update(f"{i}\t{label}\t{xxhash.xxh64_hexdigest(text.encode())}\n".encode())
        tmp = out / f".model.bin.tmp-{os.getpid()}"
        model.save_model(str(tmp))
        os.replace(tmp, out / "model.bin")
        if comb is not None:
            comb.save(out / COMBINER_FILE)
        else:
            (out / COMBINER_FILE).unlink(missing_ok=True)  # a stale one would be applied
        test_groups = set(test["group"].to_pylist())
        metrics = {
            "model": "model.bin",
            "labels": sorted(int(lbl[len("__label__") :]) for lbl in model.get_labels()),
            "preprocess": {"lowercase": cfg.lowercase, "max_chars": cfg.max_chars},
            "hyperparameters": {**cfg.hyperparameters(), "lr_used": lr_used},
            "data": {
                "sha256": digest.hexdigest(),
                "documents": len(data),
                "train": len(train),
                "test": len(test),
                "test_fraction": cfg.test_fraction,
                "split": {
                    "by": "group (" + ", ".join(cfg.group_columns) + ", else file or document)",
                    "train_groups": len(set(train["group"].to_pylist())),
                    "test_groups": len(test_groups),
                    "shared_groups": len(test_groups & set(train["group"].to_pylist())),
                },
                "sources": report,
                "label_source_counts": {
                    s: int(c)
                    for s, c in zip(
                        *np.unique(
                            data["source"].to_numpy(zero_copy_only=False), return_counts=True
                        ),
                        strict=True,
                    )
                },
            },  # fmt: skip
            "score": "combiner" if comb is not None else "fasttext",
            "held_out": held_out,
            "held_out_by_source": per_source,
            "held_out_combined": combined,
            "held_out_combined_by_source": combined_by_source,
            "combiner": combiner_info,
            "cross_validation": cv,
            "guardrail": guard,
            "seconds": round(time.monotonic() - t0, 2),
        }
        write_json_atomic(out / "metrics.json", metrics)
        log.info(
            "edu_train: %d labelled docs; held-out (unseen groups) ROC AUC %s, combined %s "
            "(length %s); spearman %s (length %s)%s",
            len(data), held_out["roc_auc"], combined and combined["roc_auc"],
            held_out["baseline_length"]["roc_auc"], held_out["spearman"],
            held_out["baseline_length"]["spearman"],
            f"; {cfg.cv_folds}-fold CV spearman {cv['spearman']} vs length {cv['baseline_length']['spearman']}" if cv else "",
        )  # fmt: skip
        if guard["passed"] is False:
            if cfg.on_weak_model == "fail":
                from pipeline.stage_runner import GuardrailError

                raise GuardrailError(guard["message"])
            log.warning("%s", guard["message"])
        return {"rows_in": len(data), "rows_out": len(data), "documents": len(data),
                "train": len(train), "test": len(test), "held_out_spearman": held_out["spearman"],
                "held_out_roc_auc": (combined or held_out)["roc_auc"]}  # fmt: skip

    def _guardrail(
        self, held_out: dict[str, Any], by_source: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Does the deployed score beat document length on the held-out split?"""
        cfg = self.config
        metric, margin = cfg.guardrail_metric, cfg.min_margin_over_length
        judged = held_out if cfg.guardrail_source is None else by_source.get(cfg.guardrail_source)
        where = "the held-out split" if cfg.guardrail_source is None else (
            f"the held-out {cfg.guardrail_source!r} labels")  # fmt: skip
        out: dict[str, Any] = {"metric": metric, "min_margin_over_length": margin,
                               "judged_on": cfg.guardrail_source or "all", "passed": None}  # fmt: skip
        if margin is None:
            out["message"] = "off"
            return out
        model = judged and judged.get(metric)
        length = judged and judged["baseline_length"].get(metric)
        if model is None or length is None:
            out["message"] = (
                f"edu_train: cannot judge the model against length on {where} (it needs both "
                "classes there); add labels or raise test_fraction"
            )
            log.warning("%s", out["message"])
            return out
        out.update(model=model, length=length, passed=bool(model > length + margin))
        if out["passed"]:
            out["message"] = f"the model's {metric} {model} beats length's {length} on {where}"
            return out
        out["message"] = (
            f"GUARDRAIL: stage 'edu_train': the model's {metric} on {where} (documents from "
            f"sources and web domains it never saw) is {model}, document length alone gets "
            f"{length}: it does not beat length by more than {margin}. The model and "
            f"metrics.json are left in the stage folder; add diverse labels (format_labels, "
            f"proxy_positive/proxy_negative), or set stages.edu_train.on_weak_model: warn "
            f"(or min_margin_over_length: null) to accept it, then run again."
        )
        return out
