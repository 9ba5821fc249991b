"""Educational value: a teacher LLM rates a sample, fastText learns the ratings, every
document is scored. Three stages, as FineWeb-Edu and Phi-3 built their web filter:

- `edu_annotate` (a GlobalStage): draws a stratified sample of the kept documents (equal
  shares per length stratum, `length_bins`; within a stratum the documents with the
  smallest hash of `seed:id`, so the sample is deterministic and independent of input
  order) and has the teacher rate each 0-5 with the additive rubric of
  configs/prompts/edu_annotate_v1.j2. The document is untrusted text: it sits between
  tags named by a hash of itself (which it therefore cannot contain) and the score is read
  only from a JSON answer validated against `{"score": 0..5}`, so nothing in a document can
  change how its score is parsed. Sampled rows are written with `edu_label`, the model,
  backend, template id and version, the raw answer and token counts; a row the teacher
  failed on (timeout, dead server, garbage) is written with `teacher_error`, its raw
  answer and the reason `edu_annotate:teacher_error`. Rows not in the sample are counted
  (`edu_annotate:not_sampled`) but not written. Ratings are stored by document id under
  `_state/ratings/` (generators/batch.py), a file per request batch: a killed run re-rates
  nothing it finished, rows that failed are sent again (`retry_rounds` within a run, once
  more on every resume, and on `primer run --retry-failed`), and transport settings
  (`request_batch`, the teacher's URL, timeouts, retries, concurrency) can change between
  attempts without re-sending anything; `_state/_stamp.json` holds what decides the
  ratings, and the ratings are discarded only when that changes.
- `edu_train` (an ArtifactStage): fastText trained on ratings from any mix of sources:
  `annotations` (an `edu_annotate` output), `label_files` (JSONL/Parquet/HF datasets with a
  score and either the text or an id joined against this stage's input documents, e.g.
  FineWeb-Edu's Llama-3 annotations or data/annotations/), and DCLM-style proxy labels
  (`proxy_positive` reference text as high, a hash sample of the input as low). It writes
  `model.bin` and `metrics.json`: held-out binary F1 at `binary_threshold`, macro F1, the
  confusion matrix, ROC AUC, Spearman against the ratings, the same for document length as
  a baseline, a k-fold cross-validation of both, the training-data hash and every
  hyperparameter.
- `edu_score`: `edu_score` (the expected rating over the classifier's class
  probabilities, 0-5), `edu_int` (rounded), and the `edu_phase1` / `edu_phase2` flags from
  config thresholds; rows under the phase-1 threshold are dropped (`edu_score:below_phase1`)
  unless `drop_below_phase1` is off. The model loads once per Ray actor and scores a whole
  batch in one call, through filters/fasttext_scorer.py (a fused kernel at about 2.3x
  fastText's predict, equal to it within 1e-5; `engine: fasttext` runs fastText's own).

Defaults were chosen by 5-fold cross-validation on the 500 rated FineWeb documents of
data/annotations/ (softmax, 60 epochs, lr 0.5, dim 32, word bigrams, lower-cased first 3,000
characters): Spearman 0.58 against the ratings where document length reaches 0.16, ROC
AUC for "rating >= 3" 0.80 against length's 0.60. Fewer epochs underfit badly on a few
hundred documents (Spearman below 0).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import ConfigDict, Field, field_validator, model_validator

from filters.fasttext_scorer import Engine, Scorer, fasttext_lines, load_fasttext, make_scorer
from generators import batch
from generators.teacher import ChatRequest, TeacherConfig, preflight_teacher
from pipeline.executor import LOCAL, Executor
from pipeline.io import expand_inputs, iter_documents, write_json_atomic
from pipeline.readers import is_saved_dataset
from pipeline.stage import (
    ArtifactStage,
    GlobalStage,
    PreflightError,
    Stage,
    StageConfig,
    is_ref,
    mark_dropped,
    require_path,
    set_column,
)

log = logging.getLogger("primer.edu")

SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 5}},
    "required": ["score"],
    "additionalProperties": False,
}
"""The only answer edu_annotate accepts; anything else is a recorded `invalid_json` failure."""

DONE_FILE = batch.DONE_FILE
SAMPLE_FILE = "sample.parquet"
RATINGS_DIR = "ratings"
RATING_COLUMNS = (
    "id",
    "edu_label",
    "teacher_model",
    "teacher_backend",
    "template_id",
    "template_version",
    "teacher_answer",
    "teacher_error",
    "prompt_tokens",
    "completion_tokens",
)
_LABEL = re.compile(r"__label__(\d+(?:\.\d+)?)")


# --- shared helpers ----------------------------------------------------------------------------


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


def evaluate(
    labels: np.ndarray, scores: np.ndarray, lengths: np.ndarray, binary_threshold: int
) -> dict[str, Any]:
    """Held-out metrics of `scores` (expected ratings) against teacher `labels`, with
    document length as the baseline a useful model must beat."""
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
        "baseline_length": {
            "roc_auc": r(roc_auc(lengths, pos)),
            "roc_auc_ge2": r(roc_auc(lengths, labels >= 2)),
            "spearman": r(spearman(lengths, labels)),
        },
    }


# --- edu_annotate ------------------------------------------------------------------------------


class EduAnnotateConfig(StageConfig):
    """Settings of the `edu_annotate` stage."""

    # A key pasted as teacher.api_key_env must not be echoed by an error of this model.
    model_config = ConfigDict(hide_input_in_errors=True)

    teacher: TeacherConfig = Field(default_factory=lambda: TeacherConfig(max_tokens=16))
    """The teacher LLM (backend local | openai | vllm); see generators/teacher.py."""

    sample_size: int = Field(500, ge=1)
    """Documents to rate (FineWeb-Edu rated 450k with Llama-3-70B; a few thousand already
    train a useful fastText model)."""

    length_bins: list[int] = [1_000, 3_000, 10_000]
    """Character-length boundaries of the strata; each stratum gets an equal share of the
    sample (what one stratum lacks goes to the others), so short and long documents are
    both rated even when one kind dominates the corpus."""

    seed: int = 0
    """Which documents are sampled (and the teacher's per-request seeds)."""

    template: str = "edu_annotate_v1"
    """Prompt template `<id>_v<version>` in configs/prompts/."""

    max_doc_chars: int = Field(3_000, ge=100)
    """Characters of each document shown to the teacher (its beginning)."""

    max_answer_tokens: int = Field(16, ge=4)
    """Cap on the answer's tokens; `{"score": 3}` needs about 6."""

    request_batch: int = Field(32, ge=1)
    """Requests per teacher call, and per checkpoint file; ratings are stored by id, so it
    may change between attempts without re-rating anything."""

    retry_rounds: int = Field(1, ge=0)
    """Times the failed rows of a batch are sent again before they are recorded as failed
    (the teacher's own transport retries come on top)."""

    @field_validator("length_bins")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if v != sorted(set(v)) or any(b <= 0 for b in v):
            raise ValueError("length_bins must be increasing positive character counts")
        return v


def _strata(lengths: np.ndarray, bins: Sequence[int]) -> np.ndarray:
    return np.searchsorted(np.asarray(bins, np.int64), lengths, side="right").astype(np.int16)


def _indexed_candidates(item: tuple[int, str], cfg: EduAnnotateConfig) -> pa.Table:
    """`_file_candidates` of one (index, file) pair, as the executor maps them."""
    return _file_candidates(item[1], item[0], cfg)


def _file_candidates(path: str, file_index: int, cfg: EduAnnotateConfig) -> pa.Table:
    """Per stratum, the `sample_size` kept documents of one file with the smallest keys:
    no final quota can need more, and no text is held."""
    best: list[pa.Table] = []
    for table in iter_documents([path], cfg.batch_rows, columns=("id", "text")):
        has_text = pc.fill_null(pc.greater(pc.utf8_length(table["text"]), 0), False)
        table = table.filter(has_text)
        if not len(table):
            continue
        ids = table["id"].to_pylist()
        lengths = pc.utf8_length(table["text"]).to_numpy(zero_copy_only=False)
        best.append(
            pa.table(
                {
                    "id": pa.array(ids, pa.string()),
                    "stratum": _strata(lengths, cfg.length_bins),
                    "key": sample_key(ids, cfg.seed),
                    "n_chars": lengths.astype(np.int64),
                    "file": np.full(len(ids), file_index, np.int32),
                }
            )
        )
        if sum(len(t) for t in best) > 4 * cfg.sample_size * (len(cfg.length_bins) + 1):
            best = [_top_per_stratum(pa.concat_tables(best), cfg.sample_size)]
    if not best:
        return _CANDIDATES.empty_table()
    return _top_per_stratum(pa.concat_tables(best), cfg.sample_size)


_CANDIDATES = pa.schema(
    [("id", pa.string()), ("stratum", pa.int16()), ("key", pa.uint64()),
     ("n_chars", pa.int64()), ("file", pa.int32())]
)  # fmt: skip


def _top_per_stratum(table: pa.Table, k: int) -> pa.Table:
    table = table.sort_by([("stratum", "ascending"), ("key", "ascending"), ("id", "ascending")])
    strata = table["stratum"].to_numpy()
    starts = np.flatnonzero(np.r_[True, strata[1:] != strata[:-1]])
    ends = np.r_[starts[1:], len(strata)]
    keep = np.concatenate(
        [np.arange(s, min(s + k, e)) for s, e in zip(starts, ends, strict=True)] or [[]]
    ).astype(np.int64)
    return table.take(pa.array(keep, pa.int64()))


def allocate(available: dict[int, int], total: int) -> dict[int, int]:
    """Equal shares of `total` over strata, what a small stratum cannot take going to the
    rest (largest remainder first, lowest stratum on ties)."""
    quota = dict.fromkeys(available, 0)
    left = min(total, sum(available.values()))
    open_ = sorted(s for s, n in available.items() if n > 0)
    while left and open_:
        share, extra = divmod(left, len(open_))
        for i, s in enumerate(open_):
            take = min(share + (1 if i < extra else 0), available[s] - quota[s])
            quota[s] += take
            left -= take
        open_ = [s for s in open_ if quota[s] < available[s]]
    return quota


class EduAnnotateStage(GlobalStage):
    """Teacher ratings (0-5) of a stratified sample; see the module docstring."""

    name: ClassVar[str] = "edu_annotate"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = EduAnnotateConfig
    needs: ClassVar[tuple[str, ...]] = ("id", "text")
    adds: ClassVar[tuple[str, ...]] = RATING_COLUMNS[1:]
    unwritten_reasons = frozenset({"not_sampled"})
    transport_keys = batch.TRANSPORT_KEYS
    retryable: ClassVar[bool] = True

    config: EduAnnotateConfig

    def preflight(self) -> None:
        from generators.prompts import require_template

        require_template("template", self.config.template)
        preflight_teacher(self.config.teacher)

    # -- prepare: sample, then rate, a checkpoint per request batch --
    def prepare(self, inputs: Sequence[str], state_dir: str, executor: Executor = LOCAL) -> None:
        from generators.prompts import load_template

        cfg = self.config
        self.state_dir = str(state_dir)
        state = Path(state_dir)
        template = load_template(cfg.template)
        files = [str(p) for p in inputs]
        stamp = batch.state_stamp(self, files, template_sha256=template.sha256)
        batch.open_state(state, stamp, self.name)
        if (state / DONE_FILE).is_file():
            return

        sample_path = state / SAMPLE_FILE
        if not sample_path.is_file():
            sample = self._draw_sample(files, executor)
            tmp = state / f".{SAMPLE_FILE}.tmp-{os.getpid()}"
            pq.write_table(sample, tmp)
            os.replace(tmp, sample_path)
        sample = pq.read_table(sample_path)
        stats = self._rate(sample, template, state / RATINGS_DIR)
        write_json_atomic(state / DONE_FILE, stats)

    def _draw_sample(self, files: list[str], executor: Executor) -> pa.Table:
        cfg = self.config
        parts = list(
            executor.map(functools.partial(_indexed_candidates, cfg=cfg), [*enumerate(files)])
        )
        cands = _top_per_stratum(
            pa.concat_tables([_CANDIDATES.empty_table(), *parts]), cfg.sample_size
        )
        strata = cands["stratum"].to_numpy()
        quota = allocate(
            {int(s): int((strata == s).sum()) for s in np.unique(strata)}, cfg.sample_size
        )
        keep = np.concatenate(
            [np.flatnonzero(strata == s)[:q] for s, q in quota.items()] or [np.array([], int)]
        )
        chosen = cands.take(pa.array(keep, pa.int64())).sort_by(
            [("key", "ascending"), ("id", "ascending")]
        )
        log.info(
            "edu_annotate: sampled %d documents, per length stratum %s",
            len(chosen), {int(s): q for s, q in quota.items()},
        )  # fmt: skip
        # Texts of the sample only, from the files that hold it.
        texts: dict[str, str] = {}
        wanted = pa.array(chosen["id"].to_pylist(), pa.string())
        for i in sorted(set(chosen["file"].to_pylist())):
            for t in iter_documents([files[i]], cfg.batch_rows, columns=("id", "text")):
                t = t.filter(pc.is_in(t["id"], value_set=wanted))
                cut = pc.utf8_slice_codeunits(t["text"], 0, cfg.max_doc_chars)
                texts.update(zip(t["id"].to_pylist(), cut.to_pylist(), strict=True))
        return chosen.append_column(
            "text", pa.array([texts[i] for i in chosen["id"].to_pylist()], pa.large_string())
        )

    def _rate(self, sample: pa.Table, template: Any, ratings_dir: Path) -> dict[str, Any]:
        cfg = self.config
        requests = [
            self._request(template, i, t)
            for i, t in zip(sample["id"].to_pylist(), sample["text"].to_pylist(), strict=True)
        ]
        done, stats = batch.run_checkpointed(
            requests, ratings_dir, cfg.teacher, batch_size=cfg.request_batch,
            retry_rounds=cfg.retry_rounds, label=self.name,
        )  # fmt: skip
        labels = pc.drop_null(self._ratings_table(done, template)["edu_label"]).to_numpy()
        values, counts = np.unique(labels, return_counts=True)
        stats["label_counts"] = {str(k): int(v) for k, v in zip(values, counts, strict=True)}
        log.info("edu_annotate: %s", json.dumps(stats))
        return stats

    def _request(self, template: Any, doc_id: str, text: str) -> ChatRequest:
        boundary = "document-" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
        return ChatRequest(
            id=doc_id,
            messages=template.messages(document=text, boundary=boundary),
            max_tokens=self.config.max_answer_tokens,
            json_schema=SCORE_SCHEMA,
        )

    def _ratings_table(self, done: pa.Table, template: Any) -> pa.Table:
        """Checkpointed completions -> the rating columns (the JSON answers were validated
        against SCORE_SCHEMA by the teacher client, so a successful row parses)."""
        ok = pc.is_null(done["error"])
        labels = [
            json.loads(t)["score"] if t is not None else None
            for t in pc.if_else(ok, done["text"], None).to_pylist()
        ]
        n = len(done)
        return pa.table(
            {
                "id": done["id"],
                "edu_label": pa.array(labels, pa.int8()),
                "teacher_model": done["model"],
                "teacher_backend": done["backend"],
                "template_id": pa.array([template.template_id] * n, pa.string()),
                "template_version": pa.array([template.version] * n, pa.int32()),
                "teacher_answer": pc.if_else(ok, done["text"], done["raw"]),
                "teacher_error": done["error"],
                "prompt_tokens": done["prompt_tokens"],
                "completion_tokens": done["completion_tokens"],
            }
        )

    def load_ratings(self) -> pa.Table:
        """The rating columns of every rated document (after prepare())."""
        from generators.prompts import load_template

        done = batch.load_checkpoints(Path(self.state_dir or "") / RATINGS_DIR)
        return self._ratings_table(done, load_template(self.config.template))

    # -- --retry-failed --
    def reopen_failed(self, state_dir: str) -> int:
        """Sampled documents whose rating failed; the next prepare() asks exactly those."""
        self.state_dir = str(state_dir)
        return batch.reopen_failed(Path(state_dir), Path(state_dir) / RATINGS_DIR)

    def output_revision(self) -> str:
        if not self.state_dir:
            return ""
        return batch.answers_revision(Path(self.state_dir) / RATINGS_DIR)

    # -- the per-part pass: attach ratings, mark failures and the unsampled --
    def setup(self) -> None:
        state = Path(self.state_dir or "")
        if not (state / DONE_FILE).is_file():
            raise RuntimeError(
                f"edu_annotate: no finished ratings in {self.state_dir!r}; call "
                "prepare(inputs, state_dir) over all inputs before process()"
            )
        self._ratings = self.load_ratings()

    def process(self, table: pa.Table) -> pa.Table:
        pos = pc.index_in(table["id"], value_set=self._ratings["id"])
        found = pc.is_valid(pos)
        for name in RATING_COLUMNS[1:]:
            table = set_column(table, name, self._ratings[name].take(pos))
        failed = pc.and_(found, pc.is_valid(table["teacher_error"]))
        return mark_dropped(
            table, self.name, [("not_sampled", pc.invert(found)), ("teacher_error", failed)]
        )


# --- edu_train ---------------------------------------------------------------------------------

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


def _fit_fasttext(train_path: str, params: dict[str, Any], model_path: str) -> float:
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
                    _fit_fasttext, str(path), cfg.hyperparameters(), str(model_path)
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


# --- edu_score ---------------------------------------------------------------------------------


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

    engine: Engine = "auto"
    """How the model is run (filters/fasttext_scorer.py): "fused" (Primer's numba kernel,
    about 2.3x fastText's predict, equal to about 1e-5), "fasttext" (its own predict), or
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

    config: EduScoreConfig

    def preflight(self) -> None:
        require_path("model", self.config.model, "file")

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
        label_values(self._scorer.labels, cfg.label_values)  # fail now, not mid-run

    def process(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        score = expected_scores(
            self._scorer, table["text"], self._prep["lowercase"], self._prep["max_chars"],
            cfg.label_values,
        ).astype(np.float32)  # fmt: skip
        score_arr = pa.array(score, pa.float32())
        table = set_column(table, "edu_score", score_arr)
        table = set_column(
            table, "edu_int", pa.array(np.clip(np.rint(score), 0, 5).astype(np.int8))
        )
        table = set_column(table, "edu_phase1", pc.greater_equal(score_arr, cfg.phase1_min_score))
        table = set_column(table, "edu_phase2", pc.greater_equal(score_arr, cfg.phase2_min_score))
        rules = [("below_phase1", pc.invert(table["edu_phase1"]))] if cfg.drop_below_phase1 else []
        return mark_dropped(table, self.name, rules)
