"""The `edu_train` stage: fastText learns educational-value ratings -> model.bin + metrics.

An ArtifactStage. It trains on ratings from any mix of sources: `annotations` (an
`edu_annotate` output), `label_files` (JSONL/Parquet/HF datasets with a score and either the
text or an id joined against this stage's input documents, e.g. FineWeb-Edu's Llama-3
annotations or data/annotations/), and DCLM-style proxy labels (`proxy_positive` reference
text as high, a hash sample of the input as low). It writes `model.bin` and
`metrics.json`: held-out binary F1 at `binary_threshold`, macro F1, the confusion matrix,
ROC AUC, Spearman against the ratings, the same for document length as a baseline, a k-fold
cross-validation of both, the training-data hash and every hyperparameter.

Defaults were chosen by 5-fold cross-validation on the rated FineWeb documents of
data/annotations/ (softmax, 60 epochs, lr 0.5, dim 32, word bigrams, lower-cased first
3,000 characters; README.md has the resulting metrics); fewer epochs underfit badly on a
few hundred documents.

    stages:
      edu_train: {annotations: "@edu_annotate", label_files: [data/annotations/fineweb_edu.jsonl]}
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
from pydantic import Field, model_validator

from filters.edu.metrics import evaluate, expected_scores, sample_key
from filters.fasttext_scorer import Scorer, fasttext_lines, load_fasttext, make_scorer
from pipeline.executor import LOCAL, Executor
from pipeline.io import expand_inputs, iter_documents, write_json_atomic
from pipeline.readers import is_saved_dataset
from pipeline.stage import ArtifactStage, PreflightError, StageConfig, is_ref, require_path

log = logging.getLogger("primer.edu")

LabelSource = Literal["files", "annotations", "proxy"]


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

    proxy_positive: list[str] = []
    """DCLM-style proxy labels: reference text (any reader format) labelled
    `proxy_positive_label`; as many input documents (a hash sample) labelled
    `proxy_negative_label` x `proxy_negative_ratio`."""
    proxy_positive_label: int = Field(5, ge=0, le=5)
    proxy_negative_label: int = Field(0, ge=0, le=5)
    proxy_negative_ratio: float = Field(1.0, gt=0)

    prefer: list[LabelSource] = ["files", "annotations", "proxy"]
    """When a document has labels from several sources, the first source here wins."""

    binary_threshold: int = Field(3, ge=1, le=5)
    """"Educational" for binary F1 and ROC AUC: rating >= this (FineWeb-Edu uses 3)."""

    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    cv_folds: int = Field(5, ge=0)
    """k-fold cross-validation of model and length baseline over all labels (0: off)."""
    seed: int = 0

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

    @model_validator(mode="after")
    def _some_labels(self) -> EduTrainConfig:
        if not (self.annotations or self.label_files or self.proxy_positive):
            raise ValueError("edu_train needs annotations, label_files or proxy_positive")
        return self

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "loss": "softmax", "epoch": self.epoch, "lr": self.lr, "dim": self.dim,
            "wordNgrams": self.word_ngrams, "minCount": self.min_count, "bucket": self.bucket,
            "thread": self.thread, "seed": self.seed,
        }  # fmt: skip


_LABEL_FORMAT = re.compile(r"\.(?:parquet|jsonl?(?:\.gz)?)$")


def _require_sources(key: str, values: Sequence[str], label_files: bool) -> None:
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
    """A label file as (id, text, score) with nulls where the file has no such column."""
    cols = [cfg.score_column, cfg.text_column, cfg.id_column]
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


class EduTrainStage(ArtifactStage):
    """fastText on educational-value labels -> model.bin + metrics.json; see the module."""

    name: ClassVar[str] = "edu_train"
    # 2: fasttext-community 0.11.9, which initialises the whole input matrix; the same data
    # and seed give another (still reproducible) model than fastText 0.9.x did.
    version: ClassVar[int] = 2
    Config: ClassVar[type[StageConfig]] = EduTrainConfig
    needs: ClassVar[tuple[str, ...]] = ("id", "text")

    config: EduTrainConfig

    def preflight(self) -> None:
        cfg = self.config
        if cfg.annotations and not is_ref(cfg.annotations):
            require_path("annotations", cfg.annotations, "any")
        _require_sources("label_files", cfg.label_files, label_files=True)
        _require_sources("proxy_positive", cfg.proxy_positive, label_files=False)

    def collect(self, inputs: Sequence[str | pa.Table]) -> tuple[pa.Table, dict[str, Any]]:
        """All labelled examples (id, text, label, source), one per document."""
        cfg = self.config
        found: dict[str, list[tuple[str, str, int]]] = {}  # source -> (id, text, label)
        report: dict[str, Any] = {}

        if cfg.label_files:
            rows, by_id, rejected = [], {}, 0
            sources = [
                f for src in cfg.label_files
                for f in ([src] if src.startswith("hf:") or is_saved_dataset(src) else expand_inputs([src]))
            ]  # fmt: skip
            for f in sources:
                t = _read_label_table(f, cfg)
                score = t["score"].to_numpy(zero_copy_only=False)
                for i, text, s in zip(
                    t["id"].to_pylist(), t["text"].to_pylist(), score, strict=True
                ):
                    if s is None or not np.isfinite(s) or not -0.5 < s < 5.5:
                        rejected += 1
                        continue
                    label = int(np.clip(np.rint(s), 0, 5))
                    if text:
                        rows.append((i or _text_id(text), text, label))
                    elif i:
                        by_id[i] = label
                    else:
                        rejected += 1
            if by_id:
                for t in iter_documents(inputs, cfg.batch_rows, columns=("id", "text")):
                    hit = t.filter(pc.is_in(t["id"], value_set=pa.array(list(by_id), pa.string())))
                    for i, text in zip(hit["id"].to_pylist(), hit["text"].to_pylist(), strict=True):
                        if text:
                            rows.append((i, text, by_id.pop(i)))
            found["files"] = rows
            report["files"] = {
                "labels": len(rows),
                "ids_not_in_input": len(by_id),
                "rejected": rejected,
            }

        if cfg.annotations:
            rows = []
            for t in iter_documents(_stage_files(cfg.annotations), cfg.batch_rows,
                                    columns=("id", "text", "edu_label")):  # fmt: skip
                if "edu_label" not in t.column_names:
                    raise ValueError(
                        f"edu_train.annotations: {cfg.annotations} has no edu_label column"
                    )
                t = t.filter(pc.is_valid(t["edu_label"]))
                rows += zip(
                    t["id"].to_pylist(),
                    t["text"].to_pylist(),
                    t["edu_label"].to_pylist(),
                    strict=True,
                )
            found["annotations"] = rows
            report["annotations"] = {"labels": len(rows)}

        if cfg.proxy_positive:
            pos = [
                (i, text, cfg.proxy_positive_label)
                for t in iter_documents(expand_inputs(cfg.proxy_positive), cfg.batch_rows)
                for i, text in zip(t["id"].to_pylist(), t["text"].to_pylist(), strict=True)
                if text
            ]
            want = int(round(len(pos) * cfg.proxy_negative_ratio))
            cand: list[tuple[int, str, str]] = []
            for t in iter_documents(inputs, cfg.batch_rows, columns=("id", "text")):
                keys = sample_key(t["id"].to_pylist(), cfg.seed + 1)
                cand += zip(keys.tolist(), t["id"].to_pylist(), t["text"].to_pylist(), strict=True)
                cand = sorted(c for c in cand if c[2])[:want]
            neg = [(i, text, cfg.proxy_negative_label) for _, i, text in cand]
            found["proxy"] = pos + neg
            report["proxy"] = {"positives": len(pos), "negatives": len(neg)}

        seen: dict[str, tuple[str, int, str]] = {}
        for source in cfg.prefer:
            for i, text, label in found.get(source, []):
                seen.setdefault(i, (text, int(label), source))
        ids = sorted(seen)
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "text": pa.array([seen[i][0] for i in ids], pa.large_string()),
                "label": pa.array([seen[i][1] for i in ids], pa.int8()),
                "source": pa.array([seen[i][2] for i in ids], pa.string()),
            }
        )
        return table, report

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

    def _predict(self, scorer: Scorer, table: pa.Table) -> np.ndarray:
        cfg = self.config
        return expected_scores(scorer, table["text"], cfg.lowercase, cfg.max_chars)

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
        key = sample_key(data["id"].to_pylist(), cfg.seed)
        is_test = (key / 2.0**64) < cfg.test_fraction
        train, test = data.filter(pa.array(~is_test)), data.filter(pa.array(is_test))
        lengths = pc.utf8_length(data["text"]).to_numpy(zero_copy_only=False)
        labels = data["label"].to_numpy()

        model = self._train(train, out)
        scorer = make_scorer(model)
        lr_used = self.lr_used
        held_out = evaluate(
            labels[is_test], self._predict(scorer, test), lengths[is_test], cfg.binary_threshold
        )
        per_source = {
            s: evaluate(labels[is_test & m], self._predict(scorer, test.filter(pa.array(m[is_test]))),
                        lengths[is_test & m], cfg.binary_threshold)
            for s in sorted(set(data["source"].to_pylist()))
            if (m := np.asarray(pc.equal(data["source"], s))).any() and (is_test & m).sum() >= 2
        }  # fmt: skip
        cv = None
        if cfg.cv_folds >= 2:
            fold = (key % np.uint64(cfg.cv_folds)).astype(int)
            pred = np.zeros(len(data))
            for k in range(cfg.cv_folds):
                m = fold == k
                if m.any() and (~m).any():
                    fm = make_scorer(self._train(data.filter(pa.array(~m)), out))
                    pred[m] = self._predict(fm, data.filter(pa.array(m)))
            cv = {"folds": cfg.cv_folds, **evaluate(labels, pred, lengths, cfg.binary_threshold)}

        digest = hashlib.sha256()
        for i, text, label in zip(
            data["id"].to_pylist(), data["text"].to_pylist(), labels.tolist(), strict=True
        ):
            digest.update(f"{i}\t{label}\t{xxhash.xxh64_hexdigest(text.encode())}\n".encode())
        tmp = out / f".model.bin.tmp-{os.getpid()}"
        model.save_model(str(tmp))
        os.replace(tmp, out / "model.bin")
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
            "held_out": held_out,
            "held_out_by_source": per_source,
            "cross_validation": cv,
            "seconds": round(time.monotonic() - t0, 2),
        }
        write_json_atomic(out / "metrics.json", metrics)
        log.info(
            "edu_train: %d labelled docs; held-out spearman %s (length %s), ROC AUC %s (length %s)%s",
            len(data), held_out["spearman"], held_out["baseline_length"]["spearman"],
            held_out["roc_auc"], held_out["baseline_length"]["roc_auc"],
            f"; {cfg.cv_folds}-fold CV spearman {cv['spearman']} vs length {cv['baseline_length']['spearman']}" if cv else "",
        )  # fmt: skip
        return {"rows_in": len(data), "rows_out": len(data), "documents": len(data),
                "train": len(train), "test": len(test), "held_out_spearman": held_out["spearman"]}  # fmt: skip


def _text_id(text: str) -> str:
    return "text:" + xxhash.xxh64_hexdigest(text.encode())
