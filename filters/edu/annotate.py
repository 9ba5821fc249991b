"""The `edu_annotate` stage: a teacher LLM rates a stratified sample of documents 0-5.

A GlobalStage. `prepare` draws a stratified sample of the kept documents (equal shares per
length stratum, `length_bins`; within a stratum the documents with the smallest hash of
`seed:id`, so the sample is deterministic and independent of input order; the per-file
candidates fan out through the runner's executor) and has the teacher rate each 0-5 with
FineWeb-Edu's additive rubric (configs/prompts/edu_annotate_v2.j2). The document is untrusted text:
it sits between tags named by a hash of itself (which it therefore cannot contain) and the
score is read only from a JSON answer validated against `{"score": 0..5}`, so nothing in a
document can change how its score is parsed.

The driver holds the sample's ids (`_state/sample.parquet`), never its texts: the
candidates of each file are folded in as they arrive, and the workers write the sampled
texts, a file per chunk of whole input files (`_state/sample/`), which is the unit the
teacher's requests are built from (`AnnotateRequests`, wherever it runs).

Sampled rows are written with `edu_label`, the model, backend, template id and version, the
raw answer and token counts; a row the teacher failed on (timeout, dead server, garbage) is
written with `teacher_error`, its raw answer and the reason `edu_annotate:teacher_error`.
Rows not in the sample are counted (`edu_annotate:not_sampled`) but not written. Ratings
are stored by document id under `_state/ratings/<part>/`, the part named by the rows'
source_path (generators/teacher/checkpoint.py and store.py), so `process()` of a part
reads that part's ratings and `setup()` none; a file per request batch (with `vllm`, the
whole sample is one Ray Data job, so each engine replica loads the model once per run):
a killed run re-rates nothing it finished,
rows that failed are sent again (`retry_rounds` within a run, once more on every resume,
and on `primer run --retry-failed`). Transport settings (`request_batch`, the teacher's URL, timeouts,
retries, concurrency) are `transport_keys`: changing them re-sends nothing. What decides a
rating (the config, the template's sha256 in `content_fingerprint()`, the input) is the
stage's fingerprint, and the runner discards the stored ratings when it changes.

    stages:
      edu_annotate: {sample_size: 500, teacher: {backend: openai, base_url: ..., model: ...}}
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ConfigDict, Field, field_validator

from filters.edu.metrics import sample_key
from generators.prompts import load_template, require_template
from generators.teacher import checkpoint
from generators.teacher.base import ChatRequest, requests_table
from generators.teacher.config import TeacherConfig
from generators.teacher.factory import preflight_teacher
from generators.teacher.store import PART, PartAnswers, file_source, row_keys
from pipeline.executor import LOCAL, Executor
from pipeline.io import iter_documents, write_json_atomic
from pipeline.stage import GlobalStage, StageConfig, mark_dropped, set_column

log = logging.getLogger("primer.edu")

SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 5}},
    "required": ["score"],
    "additionalProperties": False,
}
"""The only answer edu_annotate accepts; anything else is a recorded `invalid_json` failure."""

DONE_FILE = checkpoint.DONE_FILE
SAMPLE_FILE = "sample.parquet"
SAMPLE_DIR = "sample"
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

    template: str = "edu_annotate_v2"
    """Prompt template `<id>_v<version>` in configs/prompts/: v2 is FineWeb-Edu's additive
    0-5 prompt (ratings comparable with its published annotations); v1 the rubric the
    bundled data/annotations/ were rated with."""

    max_doc_chars: int = Field(3_000, ge=100)
    """Characters of each document shown to the teacher (its beginning)."""

    max_answer_tokens: int = Field(16, ge=4)
    """Cap on the answer's tokens; `{"score": 3}` needs about 6."""

    request_batch: int = Field(32, ge=1)
    """Ratings per checkpoint file, and requests per teacher call (openai, local; vllm
    sends every pending request in one job); ratings are stored by id, so it may change
    between attempts without re-rating anything."""

    retry_rounds: int = Field(1, ge=0)
    """Times the failed rows are sent again before they are recorded as failed (the
    teacher's own transport retries come on top; vllm: one more job each, over the failed
    rows only)."""

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
    for table in iter_documents([path], cfg.batch_rows, columns=("id", "text", "source_path")):
        has_text = pc.fill_null(pc.greater(pc.utf8_length(table["text"]), 0), False)
        table = table.filter(has_text)
        if not len(table):
            continue
        ids = table["id"].to_pylist()
        lengths = pc.utf8_length(table["text"]).to_numpy(zero_copy_only=False)
        sources = table["source_path"] if "source_path" in table.column_names else None
        best.append(
            pa.table(
                {
                    "id": pa.array(ids, pa.string()),
                    "stratum": _strata(lengths, cfg.length_bins),
                    "key": sample_key(ids, cfg.seed),
                    "n_chars": lengths.astype(np.int64),
                    "file": np.full(len(ids), file_index, np.int32),
                    # The ratings' part folder: process() finds it by the row's source_path.
                    PART: row_keys(sources, len(ids), file_source(path)),
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
     ("n_chars", pa.int64()), ("file", pa.int32()), (PART, pa.string())]
)  # fmt: skip
_TEXTS = pa.schema([("id", pa.string()), (PART, pa.string()), ("text", pa.large_string())])
CHUNK_ROWS = 4096
"""Sampled documents per text file of the sample (whole input files each): the unit the
teacher's requests are built and planned by."""


def _chunks(chosen: pa.Table) -> list[pa.Table]:
    """The sample (sorted by file) cut into chunks of whole files, about CHUNK_ROWS rows."""
    files = chosen["file"].to_numpy()
    starts = np.flatnonzero(np.r_[True, files[1:] != files[:-1]]) if len(files) else []
    out, lo = [], 0
    for s in [*starts[1:], len(files)]:
        if s - lo >= CHUNK_ROWS or s == len(files):
            out.append(chosen.slice(lo, s - lo))
            lo = s
    return [c for c in out if len(c)]


@dataclass(frozen=True)
class SampleTexts:
    """Writes one chunk's texts (`<folder>/<chunk>.parquet`: id, part, the document's
    beginning), reading only that chunk's input files: the driver never holds them."""

    files: tuple[str, ...]
    folder: str
    batch_rows: int
    max_doc_chars: int

    def __call__(self, item: tuple[int, pa.Table]) -> int:
        index, chunk = item
        target = Path(self.folder) / f"{index:06d}.parquet"
        if target.is_file():
            return index  # written by an earlier attempt
        out = []
        for i in pc.unique(chunk["file"]).to_pylist():
            mine = chunk.filter(pc.equal(chunk["file"], i))
            for t in iter_documents([self.files[i]], self.batch_rows, columns=("id", "text")):
                t = t.filter(pc.is_in(t["id"], value_set=mine["id"]))
                cut = pc.utf8_slice_codeunits(t["text"], 0, self.max_doc_chars)
                part = mine[PART].take(pc.index_in(t["id"], value_set=mine["id"]))
                out.append(pa.table([t["id"], part, cut], schema=_TEXTS))
        table = pa.concat_tables([_TEXTS.empty_table(), *out])
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        pq.write_table(table.cast(_TEXTS), tmp)
        os.replace(tmp, target)
        return index


@dataclass(frozen=True)
class AnnotateRequests:
    """The rating requests of one chunk of the sample, built where it is called (a task of
    the plan step or of the vllm job, or the driver): `REQUEST_SCHEMA` rows and each
    document's part folder."""

    config: EduAnnotateConfig
    folder: str

    def __call__(self, chunk: int) -> pa.Table:
        cfg = self.config
        template = load_template(cfg.template)
        texts = pq.read_table(Path(self.folder) / f"{chunk:06d}.parquet")
        reqs = [
            rating_request(template, i, t, cfg.max_answer_tokens)
            for i, t in zip(texts["id"].to_pylist(), texts["text"].to_pylist(), strict=True)
        ]
        return requests_table(reqs).append_column(PART, texts[PART])


def rating_request(template: Any, doc_id: str, text: str, max_tokens: int) -> ChatRequest:
    """The request rating one document: it sits between tags named by a hash of itself."""
    boundary = "document-" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
    return ChatRequest(
        id=doc_id,
        messages=template.messages(document=text, boundary=boundary),
        max_tokens=max_tokens,
        json_schema=SCORE_SCHEMA,
    )


@dataclass(frozen=True)
class LabelCounts:
    """The rating of each document of one chunk, counted by label."""

    folder: str
    ratings: str

    def __call__(self, chunk: int) -> dict[str, int]:
        texts = pq.read_table(Path(self.folder) / f"{chunk:06d}.parquet", columns=["id", PART])
        done = PartAnswers(Path(self.ratings)).lookup_keys(texts[PART], texts["id"])
        labels = pc.drop_null(pa.array(_labels(done), pa.int8())).to_numpy()
        values, counts = np.unique(labels, return_counts=True)
        return {str(k): int(v) for k, v in zip(values, counts, strict=True)}


def _labels(done: pa.Table) -> list[int | None]:
    """The score of each usable answer (validated against SCORE_SCHEMA, so it parses)."""
    ok = pc.and_(pc.is_valid(done["id"]), pc.is_null(done["error"]))
    return [json.loads(t)["score"] if t is not None else None
            for t in pc.if_else(ok, done["text"], None).to_pylist()]  # fmt: skip


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
    transport_keys = checkpoint.TRANSPORT_KEYS
    retryable: ClassVar[bool] = True

    config: EduAnnotateConfig

    def preflight(self) -> None:
        require_template("template", self.config.template)
        preflight_teacher(self.config.teacher)

    def content_fingerprint(self) -> dict[str, str]:
        """The prompt template's sha256: editing the file re-rates the sample."""
        template = load_template(self.config.template)
        return {f"template.{template.name}": template.sha256}

    # -- prepare: sample, then rate, a checkpoint per request batch --
    def prepare(self, inputs: Sequence[str], state_dir: str, executor: Executor = LOCAL) -> None:
        cfg = self.config
        self.state_dir = str(state_dir)
        state = Path(state_dir)
        files = [str(p) for p in inputs]
        state.mkdir(parents=True, exist_ok=True)
        if (state / DONE_FILE).is_file():
            return
        sample_path = state / SAMPLE_FILE
        if sample_path.is_file() and "text" in pq.read_schema(sample_path).names:
            sample_path.unlink()  # an older layout; the same sample is drawn again
        if not sample_path.is_file():
            chosen = self._draw_sample(files, executor)
            tmp = state / f".{SAMPLE_FILE}.tmp-{os.getpid()}"
            pq.write_table(chosen, tmp)
            os.replace(tmp, sample_path)
        units = self._write_texts(files, pq.read_table(sample_path), executor, state / SAMPLE_DIR)
        build = AnnotateRequests(cfg, str(state / SAMPLE_DIR))
        ratings = state / RATINGS_DIR
        checkpoint.migrate_flat(build, units, ratings)
        stats = checkpoint.ask_parts(
            build, units, ratings, cfg.teacher, executor=executor, batch_size=cfg.request_batch,
            retry_rounds=cfg.retry_rounds, label=self.name,
        )  # fmt: skip
        labels: Counter[str] = Counter()
        for counts in executor.map(LabelCounts(str(state / SAMPLE_DIR), str(ratings)), units):
            labels.update(counts)
        stats["label_counts"] = dict(sorted(labels.items()))
        log.info("edu_annotate: %s", json.dumps(stats))
        write_json_atomic(state / DONE_FILE, stats)

    def _draw_sample(self, files: list[str], executor: Executor) -> pa.Table:
        """The sampled documents (no text), sorted by file: per-file candidates folded in
        as they come, so the driver holds a few times `sample_size` rows."""
        cfg = self.config
        bound = 4 * cfg.sample_size * (len(cfg.length_bins) + 1)
        best, held = [_CANDIDATES.empty_table()], 0
        fn = functools.partial(_indexed_candidates, cfg=cfg)
        for part in executor.map(fn, [*enumerate(files)]):
            best.append(part)
            held += len(part)
            if held > bound:
                best = [_top_per_stratum(pa.concat_tables(best), cfg.sample_size)]
                held = len(best[0])
        cands = _top_per_stratum(pa.concat_tables(best), cfg.sample_size)
        strata = cands["stratum"].to_numpy()
        quota = allocate(
            {int(s): int((strata == s).sum()) for s in np.unique(strata)}, cfg.sample_size
        )
        keep = np.concatenate(
            [np.flatnonzero(strata == s)[:q] for s, q in quota.items()] or [np.array([], int)]
        )
        chosen = cands.take(pa.array(keep, pa.int64())).sort_by(
            [("file", "ascending"), ("key", "ascending"), ("id", "ascending")]
        )
        log.info(
            "edu_annotate: sampled %d documents, per length stratum %s",
            len(chosen), {int(s): q for s, q in quota.items()},
        )  # fmt: skip
        return chosen

    def _write_texts(
        self, files: list[str], chosen: pa.Table, executor: Executor, folder: Path
    ) -> list[int]:
        """The sample's texts, a file per chunk, written by the executor's workers; returns
        the chunk numbers (the units the teacher is asked by)."""
        folder.mkdir(parents=True, exist_ok=True)
        chunks = _chunks(chosen)
        write = SampleTexts(tuple(files), str(folder), self.config.batch_rows,
                            self.config.max_doc_chars)  # fmt: skip
        for _ in executor.map(write, list(enumerate(chunks))):
            pass
        return list(range(len(chunks)))

    def sample_texts(self) -> pa.Table:
        """The sampled documents' ids and texts (after prepare(); for inspection)."""
        folder = Path(self.state_dir or "") / SAMPLE_DIR
        return pa.concat_tables(
            [_TEXTS.empty_table(), *(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))]
        )

    def _request(self, template: Any, doc_id: str, text: str) -> ChatRequest:
        return rating_request(template, doc_id, text, self.config.max_answer_tokens)

    def _ratings_table(self, done: pa.Table, template: Any) -> pa.Table:
        """Stored completions -> the rating columns, null where `done` has no row (the JSON
        answers were validated against SCORE_SCHEMA by the teacher client, so a successful
        row parses)."""
        found = pc.is_valid(done["id"])
        ok = pc.is_null(done["error"])
        return pa.table(
            {
                "id": done["id"],
                "edu_label": pa.array(_labels(done), pa.int8()),
                "teacher_model": done["model"],
                "teacher_backend": done["backend"],
                "template_id": pc.if_else(found, template.template_id, None),
                "template_version": pc.if_else(
                    found, pa.scalar(template.version, pa.int32()), None
                ),  # fmt: skip
                "teacher_answer": pc.if_else(ok, done["text"], done["raw"]),
                "teacher_error": done["error"],
                "prompt_tokens": done["prompt_tokens"],
                "completion_tokens": done["completion_tokens"],
            }
        )

    def load_ratings(self) -> pa.Table:
        """The rating columns of every rated document, by id (after prepare(); for
        inspection: a worker reads its part's ratings only)."""
        done = PartAnswers(Path(self.state_dir or "") / RATINGS_DIR).everything()
        table = self._ratings_table(done, load_template(self.config.template))
        return table.sort_by([("id", "ascending")])

    # -- --retry-failed --
    def reopen_failed(self, state_dir: str) -> int:
        """Sampled documents whose rating failed; the next prepare() asks exactly those."""
        self.state_dir = str(state_dir)
        return checkpoint.reopen_failed(Path(state_dir), Path(state_dir) / RATINGS_DIR)

    def output_revision(self) -> str:
        if not self.state_dir:
            return ""
        return checkpoint.answers_revision(Path(self.state_dir) / RATINGS_DIR)

    # -- the per-part pass: attach ratings, mark failures and the unsampled --
    def setup(self) -> None:
        state = Path(self.state_dir or "")
        if not (state / DONE_FILE).is_file():
            raise RuntimeError(
                f"edu_annotate: no finished ratings in {self.state_dir!r}; call "
                "prepare(inputs, state_dir) over all inputs before process()"
            )
        # Nothing is read here: process() reads the part folder of the rows in hand.
        self.ratings = PartAnswers(state / RATINGS_DIR)
        self._template = load_template(self.config.template)

    def process(self, table: pa.Table) -> pa.Table:
        sources = table["source_path"] if "source_path" in table.column_names else None
        done = self.ratings.lookup(sources, table["id"])
        found = pc.is_valid(done["id"])
        ratings = self._ratings_table(done, self._template)
        for name in RATING_COLUMNS[1:]:
            table = set_column(table, name, ratings[name])
        failed = pc.and_(found, pc.is_valid(table["teacher_error"]))
        return mark_dropped(
            table, self.name, [("not_sampled", pc.invert(found)), ("teacher_error", failed)]
        )
