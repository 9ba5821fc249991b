"""Benchmark decontamination: word n-gram overlap with benchmark test items.

What: every row gets `contam_benchmarks` (the benchmarks it overlaps, comma-separated),
`contam_items` (a JSON list of the items hit, "benchmark/split:index") and `contam_ngrams`
(how many distinct n-grams it shares with them); all three stay null for a clean row. A
contaminated row is dropped (`decontaminate:contaminated`) in `mode: drop`; in `mode: cut`
the matching spans are cut out of `text` and the row is kept unless too little is left.
`hit_report()` sums the columns of a stage's output per benchmark.

Why: a model that trained on a test item scores well on it for the wrong reason, and a
synthetic pipeline whose teacher memorised a benchmark can copy items into its output.
GPT-3 (Brown et al., 2020, appendix C) removed training text sharing a word 13-gram with any
test item, and lm-evaluation-harness's Janitor implements the same rule; Llama 2 and 3
measured contamination with 10- and 8-gram overlap. A 13-gram rarely occurs twice by chance,
so one shared n-gram (`min_ngrams: 1`) is the usual rule. n-gram overlap finds copies,
reformatted ones included (case, punctuation, accents, line breaks and labels such as
"Question:" or "A)" are normalised away or only break the n-grams that straddle them); it
misses paraphrases: a changed word every dozen words leaves no 13-gram intact. Measured on
200 real items planted into FineWeb documents (tests/filters/test_decontam.py): recall 1.0
verbatim and reformatted, 0.96 for the question quoted alone, ~0.55 for a light rephrasing
(three words changed, sentences and choices reordered); no hit on 711 clean web documents.

How: `setup()` loads the benchmark files (one loader per format: GSM8K, HumanEval, MMLU CSV,
llm-foundry's in-context-learning JSONL; see `load_items`) and builds an index once per
worker process: the sorted unique 64-bit hashes of every item's n-grams, each pointing to
the items that contain it (CSR arrays), with a 16 MB bit filter that turns away ~98% of
web n-grams before the binary search. The 37,276 items of shared/data/benchmarks give 2.1M
n-grams in 60 MB, built in ~5 s of one core, loading included (`index_stats`); the worker's
RSS peaks ~335 MB higher while building and keeps ~105 MB. A batch is normalised with
dedup's `normalise` (NFKD with accents dropped, lower-cased, punctuation and symbols
dropped, whitespace collapsed), its n-grams hashed with the polynomial hash of dedup's
shingles kept 64 bits wide (the top 32 bits are dedup's shingle hash; ~1e-13 chance of a
false match per lookup) and looked up, all in numpy over the batch: ~1,600 FineWeb
documents a second on one core, 12x lm-evaluation-harness's Janitor
(benchmarks/decontam_quality.py). Only contaminated rows in `mode: cut` go through Python,
one at a time.

What is indexed, per item:
- its full text (question or passage, choices, answer or solution, in file order);
- for multiple-choice items, the lettered prompt "question A. c1 B. c2 ..." (MMLU's own
  prompt format and the usual quiz-page layout; "A)", "(a)" and "A." all normalise to the
  same word), so a copy with labelled choices keeps its cross-choice n-grams;
- other renderings: GSM8K answers with and without their calculator annotations.
A question or item shorter than `ngram` words but with at least `short_min_words` (8) is
also indexed whole, as one n-gram of its own length; a document is searched for those by
their first 8 words (an anchor array that stays in cache), then the whole span is compared.
A fifth of MMLU's questions and over 40% of TriviaQA's and CommonsenseQA's are 8-12 words:
without this, a page quoting one of them would never match. Fewer than 8 words is no
evidence ("The Voting Rights Act of 1965", an MMLU question, occurs in a FineWeb sample
document that has nothing to do with MMLU): 8% of MMLU's questions are that short and are
found only with their choices; 131 items (mostly TriviaQA and PIQA) have no n-gram at all.
n-grams shared by more than `max_items_per_ngram` items are templates (MMLU's
moral_scenarios header is in 895 items) and are left out: they name no item.

    stage = DecontaminateStage(benchmarks="../shared/data/benchmarks")
    out = stage(table)                      # or `primer run` with stage `decontaminate`
    hit_report([out])                       # {"rows": ..., "benchmarks": {"gsm8k": ...}}
    python -m benchmarks.decontam_quality   # recall on planted items, FP rate, docs/s
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import gzip
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

# dedup's normaliser and its n-gram hash building blocks: decontamination must see text
# exactly as dedup does, and hash an n-gram the same way (here kept 64 bits wide).
from filters.dedup import (
    _LEN_MIX,
    _POLY,
    _buffers,
    _doc_groups,
    _fmix64,
    _powers,
    normalise,
    word_bounds,
)
from pipeline.readers import is_saved_dataset
from pipeline.stage import (
    PreflightError,
    Stage,
    StageConfig,
    is_ref,
    mark_dropped,
    require_path,
    set_column,
)

REASON = "contaminated"


# --- benchmark items ------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One benchmark test item: its id and the passages its n-grams come from."""

    id: str  # "benchmark/split:index", index counted from 0 in file order
    benchmark: str
    main: tuple[str, ...]  # question-like fields: indexed alone, and whole when short
    extra: tuple[str, ...] = ()  # choices, answers, solutions: only in the full text
    alt: tuple[str, ...] = ()  # other renderings (n-grams only, never whole)


# llm-foundry's local_data files are these upstream splits (their row counts match).
_FOUNDRY_SPLITS = {
    "arc_challenge": "test",
    "arc_easy": "test",
    "openbook_qa": "test",
    "lambada_openai": "test",
    "piqa": "validation",
    "siqa": "validation",
    "commonsense_qa": "validation",
    "boolq": "validation",
    "winogrande": "validation",
    "triviaqa_sm_sub": "validation",
}
# Prompt scaffolding llm-foundry adds around the original fields ("Question: ...\nChoices:\n
# A. bank\nB. ...\nAnswer:"); a web copy of the item has the fields, not this layout.
_LABEL = re.compile(r"^\s*(Question|Context|Passage|Choices|Answer)\s*:\s*", re.I)
_CHOICE_LINE = re.compile(r"^\s*[A-E][.)]\s+(.*\S)")
_GSM8K_CALC = re.compile(r"<<[^<>]*>>")  # calculator annotations: "<<16-3-4=9>>9"


def _choice_texts(choices: Any) -> list[str]:
    """Choice strings from a list of strings or a hub-style {"text": [...], "label": [...]}."""
    if isinstance(choices, dict):
        choices = choices.get("text", [])
    return [str(c) for c in choices or []]


def gsm8k_items(records: Iterable[dict], benchmark: str, split: str) -> Iterator[Item]:
    """GSM8K (`question`, `answer`); the hub's openai/gsm8k rows have the same fields. The
    answer is indexed without its calculator annotations (how it reads on a web page) and,
    as an alternative, as stored."""
    for i, r in enumerate(records):
        answer = str(r.get("answer") or "")
        clean = _GSM8K_CALC.sub("", answer)
        alt = (answer,) if clean != answer else ()
        yield Item(f"{benchmark}/{split}:{i}", benchmark, (str(r["question"]),), (clean,), alt)


def humaneval_items(records: Iterable[dict], benchmark: str, split: str) -> Iterator[Item]:
    """HumanEval (`prompt`, `canonical_solution`), as in openai/openai_humaneval."""
    for i, r in enumerate(records):
        yield Item(
            f"{benchmark}/{split}:{i}",
            benchmark,
            (str(r["prompt"]),),
            (str(r.get("canonical_solution") or ""),),
        )


def _lettered(main: Sequence[str], choices: Sequence[str]) -> tuple[str, ...]:
    """The item as a multiple-choice prompt ("question\nA. c1\nB. c2 ..."): MMLU's own
    prompt format and the usual layout of quiz pages. Every label style ("A)", "(a)", "A.")
    normalises to the same word, so this one rendering matches them all."""
    if len(choices) < 2:
        return ()
    letters = "ABCDEFGHIJ"
    lines = [f"{letters[i]}. {c}" for i, c in enumerate(choices[: len(letters)])]
    return ("\n".join((*main, *lines)),)


def mmlu_items(records: Iterable[dict], benchmark: str, split: str) -> Iterator[Item]:
    """MMLU: `question` and the choices, as `choice0..3` columns (the CSV here) or a
    `choices` list (cais/mmlu on the hub). `split` is the subject."""
    for i, r in enumerate(records):
        if "choices" in r:
            choices = _choice_texts(r["choices"])
        else:
            choices = [str(r[k]) for k in sorted(r) if k.startswith("choice") and r[k] is not None]
        main = (str(r["question"]),)
        yield Item(
            f"{benchmark}/{split}:{i}", benchmark, main, tuple(choices), _lettered(main, choices)
        )


def _split_query(query: str) -> tuple[list[str], list[str]]:
    """llm-foundry prompt -> (main fields without their labels, choices). A labelled line
    ("Passage:", "Question:") starts a field and unlabelled lines continue it (a LAMBADA
    context is one field of several paragraphs); after "Choices:", "A. text" lines are
    choices."""
    main: list[str] = []
    choices: list[str] = []
    in_choices = False
    for line in query.splitlines():
        label = _LABEL.match(line)
        if label:
            in_choices = label.group(1).lower() == "choices"
        m = _CHOICE_LINE.match(line) if in_choices else None
        if m:
            choices.append(m.group(1))
            continue
        text = _LABEL.sub("", line).strip()
        if text and main and not label:
            main[-1] = f"{main[-1]}\n{text}"
        elif text:
            main.append(text)
    return main, choices


def foundry_items(records: Iterable[dict], benchmark: str, split: str) -> Iterator[Item]:
    """llm-foundry in-context-learning JSONL: `query`/`choices`/`gold` (ARC, PIQA, SIQA,
    CommonsenseQA, OpenBookQA, BoolQ), `context`/`continuation` (LAMBADA),
    `context_options`/`continuation` (WinoGrande), `context`/`answer` (TriviaQA)."""
    for i, r in enumerate(records):
        item_id = f"{benchmark}/{split}:{i}"
        if "context_options" in r:
            # WinoGrande: the sentence with each option filled in, and with the blank
            # ("Sarah was a better surgeon than Maria so _ always got ...") left empty.
            cont = str(r.get("continuation") or "")
            opts = [str(o) for o in r["context_options"]]
            words = [o.split() for o in opts]
            common = []
            for group in zip(*words, strict=False):
                if len(set(group)) > 1:
                    break
                common.append(group[0])
            filled = tuple(f"{o} {cont}" for o in opts)
            yield Item(item_id, benchmark, (*filled, f"{' '.join(common)} {cont}"))
            continue
        text = str(r.get("query") or r.get("context") or "")
        main, choices = _split_query(text)
        listed = _choice_texts(r.get("choices"))
        if not all(len(c) == 1 and c.isupper() for c in listed):  # not just "A", "B"
            choices += listed
        extra = list(choices)
        for key in ("continuation", "answer"):
            if r.get(key):
                extra.append(str(r[key]))
        yield Item(item_id, benchmark, tuple(main), tuple(extra), _lettered(main, choices))


@dataclass(frozen=True)
class _Format:
    name: str
    keys: frozenset[str]  # a record with all these fields is in this format
    items: Callable[[Iterable[dict], str, str], Iterator[Item]]


_FORMATS = (
    _Format("humaneval", frozenset({"prompt", "canonical_solution"}), humaneval_items),
    _Format("mmlu", frozenset({"question", "choice0"}), mmlu_items),
    _Format("mmlu", frozenset({"question", "choices", "subject"}), mmlu_items),
    _Format("gsm8k", frozenset({"question", "answer"}), gsm8k_items),
    _Format("foundry", frozenset({"query"}), foundry_items),
    _Format("foundry", frozenset({"context_options"}), foundry_items),
    _Format("foundry", frozenset({"context"}), foundry_items),
)


def _format_of(record: dict, where: str) -> _Format:
    for fmt in _FORMATS:
        if fmt.keys <= record.keys():
            return fmt
    known = "; ".join(f"{f.name}: {sorted(f.keys)}" for f in _FORMATS)
    raise ValueError(
        f"decontaminate.benchmarks: {where} has fields {sorted(record)}, which match no "
        f"known benchmark format ({known})"
    )


def _read_records(path: Path) -> list[dict]:
    name = path.name.lower()
    if name.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _names(path: Path, fmt: _Format) -> tuple[str, str]:
    """(benchmark, split) of a benchmark file, from its format and name."""
    stem = path.name.split(".")[0]
    if fmt.name == "humaneval":
        return "humaneval", "test"
    if fmt.name == "mmlu":
        return "mmlu", stem.removesuffix("_test")
    if fmt.name == "gsm8k":
        return "gsm8k", stem
    return stem, _FOUNDRY_SPLITS.get(stem, "test")


_BENCHMARK_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv")


def _local_path(source: str | Path) -> Path:
    return Path(os.path.expandvars(str(source))).expanduser()


def _is_benchmark_file(path: Path) -> bool:
    return path.name.lower().endswith(_BENCHMARK_SUFFIXES)


def benchmark_files(sources: Sequence[str | Path]) -> list[Path]:
    """The benchmark files of `sources` (folders are searched for .jsonl, .jsonl.gz and
    .csv files, other files skipped), sorted so item order is the same everywhere."""
    files: list[Path] = []
    for src in sources:
        p = _local_path(src)
        if p.is_dir():
            found = [f for f in sorted(p.rglob("*")) if f.is_file() and _is_benchmark_file(f)]
            if not found:
                raise FileNotFoundError(
                    f"decontaminate.benchmarks: {p} holds no .jsonl, .jsonl.gz or .csv file"
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(
                f"decontaminate.benchmarks: {src} does not exist; give a folder laid out like "
                "shared/data/benchmarks or a list of benchmark files"
            )
    return sorted(dict.fromkeys(files))


def load_items(sources: Sequence[str | Path]) -> list[Item]:
    """Every test item of the benchmark files or folders in `sources`.

    The format of a file is recognised from the fields of its first record (see
    `_FORMATS`); the benchmark name from the format or the file name ("mmlu" with the
    subject as split for MMLU CSVs, the file stem for llm-foundry files). Rows of a hub
    dataset go through the same per-format functions (`gsm8k_items(ds, "gsm8k", "test")`).
    """
    items: list[Item] = []
    hub = [str(s) for s in sources if str(s).startswith("hf:") or is_saved_dataset(s)]
    for path in benchmark_files([s for s in sources if str(s) not in hub]):
        records = _read_records(path)
        if not records:
            continue
        fmt = _format_of(records[0], str(path))
        benchmark, split = _names(path, fmt)
        items.extend(fmt.items(records, benchmark, split))
    for source in hub:
        records, benchmark, split = _dataset_records(source)
        if records:
            fmt = _format_of(records[0], source)
            items.extend(
                fmt.items(records, fmt.name if fmt.name != "foundry" else benchmark, split)
            )
    return items


def _dataset_records(source: str) -> tuple[list[dict], str, str]:
    """Rows of "hf:NAME[:CONFIG]:SPLIT" (e.g. "hf:openai/gsm8k:main:test", read through
    `datasets.load_dataset`, from the hub or its cache) or of a `save_to_disk` folder,
    with the benchmark name and split they get in item ids."""
    import datasets

    if source.startswith("hf:"):
        parts = source[3:].split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"decontaminate.benchmarks: {source!r} is not hf:NAME[:CONFIG]:SPLIT")
        name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
        ds = datasets.load_dataset(name, config, split=split)
        return list(ds), name.split("/")[-1], split
    ds = datasets.load_from_disk(source)
    if isinstance(ds, datasets.DatasetDict):
        return [r for split in ds for r in ds[split]], Path(source).name, "+".join(ds)
    return list(ds), Path(source).name, "test"


# --- hashing --------------------------------------------------------------------------------

_P_INV = np.uint64(pow(int(_POLY), -1, 1 << 64))
_BUILD_ITEMS = 4096  # items normalised and hashed together while building the index


@dataclass
class _Words:
    """Word boundaries and span hashing over normalised text (single spaces, trimmed)."""

    buf: np.ndarray  # UTF-8 bytes
    word_start: np.ndarray  # byte offset of each word
    word_end: np.ndarray
    first_word: np.ndarray  # text t has words [first_word[t], first_word[t + 1])
    _g: np.ndarray | None = field(default=None, repr=False)  # prefix sums, on first use
    _inv: np.ndarray | None = field(default=None, repr=False)  # P^-k

    @classmethod
    def of(cls, buf: np.ndarray, off: np.ndarray) -> _Words:
        return cls(buf, *word_bounds(buf, off))

    @property
    def n_words(self) -> np.ndarray:
        return np.diff(self.first_word)

    def span_hashes(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """64-bit hashes of the text from word `first` to word `last` (inclusive): a
        polynomial hash of the bytes from prefix sums, G[k] = sum_{j<k} c_j P^j, so the
        span [s, e) is (G[e] - G[s]) * P^-s (mod 2^64); its length mixed in, then fmix64."""
        if self._g is None:
            size = len(self.buf)
            pw = _powers(size + 1)
            self._g = np.zeros(size + 1, np.uint64)
            np.cumsum(self.buf * pw[:size], out=self._g[1:])
            inv = np.full(size + 1, _P_INV, np.uint64)
            inv[0] = 1
            self._inv = np.multiply.accumulate(inv, out=inv)
        s, e = self.word_start[first], self.word_end[last]
        h = self._g[e] - self._g[s]
        h *= self._inv[s]
        h ^= (e - s).astype(np.uint64) * _LEN_MIX
        return _fmix64(h)

    def kgrams(
        self, k: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hashes of every k-word window (of the texts in `mask`), with its text and its
        first word (counted in the text)."""
        n = np.maximum(self.n_words - k + 1, 0)
        if mask is not None:
            n = np.where(mask, n, 0)
        total = int(n.sum())
        text = np.repeat(np.arange(len(n)), n)
        starts = np.zeros(len(n) + 1, np.int64)
        np.cumsum(n, out=starts[1:])
        rel = np.arange(total) - starts[:-1][text]
        first = self.first_word[:-1][text] + rel
        return self.span_hashes(first, first + (k - 1)), text, rel


# --- the index ------------------------------------------------------------------------------


class _BitFilter:
    """A one-hash Bloom filter over the top bits of 64-bit keys, sized for ~1.5% of its
    bits set: it rejects ~98% of absent hashes with one memory read, before the binary
    search (which costs ~20 cache misses in a large key array)."""

    def __init__(self, keys: np.ndarray, max_bits: int = 27) -> None:
        self.nbits = int(min(max(np.ceil(np.log2(max(len(keys), 1) * 64)), 16), max_bits))
        self.shift = np.uint64(64 - self.nbits)
        self.bits = np.zeros(1 << (self.nbits - 3), np.uint8)
        top = keys >> self.shift
        np.bitwise_or.at(
            self.bits, top >> np.uint64(3), np.left_shift(1, top & np.uint64(7)).astype(np.uint8)
        )

    def maybe(self, h: np.ndarray) -> np.ndarray:
        """Positions of `h` that may be keys."""
        top = h >> self.shift
        return np.flatnonzero((self.bits[top >> np.uint64(3)] >> (top & np.uint64(7))) & 1)


@dataclass
class NgramIndex:
    """Sorted unique n-gram hashes, each pointing to the items that contain it.

    Short passages (`short_min` <= k < `ngram` words) are keys too, hashed whole. A document
    is not hashed at every length k to find them: each short passage's first `short_min`
    words are an *anchor*, documents are searched for anchors (a small array that stays in
    cache) and the k-word window starting at an anchor hit is then hashed and compared."""

    keys: np.ndarray  # uint64, sorted, unique
    item_off: np.ndarray  # keys[k] is in items item_idx[item_off[k]:item_off[k + 1]]
    item_idx: np.ndarray  # int32 into `item_ids`
    item_ids: list[str]
    item_benchmark: np.ndarray  # int16 into `benchmarks`
    benchmarks: list[str]
    item_ngrams: np.ndarray  # int32: distinct indexed n-grams per item
    ngram: int
    short_min: int
    anchors: np.ndarray  # uint64, sorted: hashes of short passages' first short_min words
    anchor_off: np.ndarray  # anchors[a] starts passages anchor_key/len[off[a]:off[a + 1]]
    anchor_key: np.ndarray  # int64 into `keys`: the whole passage's key
    anchor_len: np.ndarray  # int64: its length in words
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        self.key_filter = _BitFilter(self.keys)
        self.anchor_filter = _BitFilter(self.anchors)

    def lookup(self, h: np.ndarray) -> np.ndarray:
        """Index into `keys` of each hash, -1 where absent."""
        return _search(self.keys, h, self.key_filter.maybe(h))

    def lookup_anchor(self, h: np.ndarray) -> np.ndarray:
        """Index into `anchors` of each hash, -1 where absent."""
        return _search(self.anchors, h, self.anchor_filter.maybe(h))

    @property
    def nbytes(self) -> int:
        arrays = (self.keys, self.item_off, self.item_idx, self.anchors, self.anchor_off)
        arrays += (self.anchor_key, self.anchor_len, self.key_filter.bits, self.anchor_filter.bits)
        return sum(a.nbytes for a in arrays)


def _search(keys: np.ndarray, h: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Index into sorted `keys` of `h[where]` (all of `h` when None); -1 where absent."""
    out = np.full(len(h), -1, np.int64)
    sel = np.arange(len(h)) if where is None else where
    if len(sel) and len(keys):
        q = h[sel]
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        found = keys[pos] == q
        out[sel[found]] = pos[found]
    return out


def build_index(
    items: Sequence[Item],
    ngram: int = 13,
    short_min_words: int = 8,
    max_items_per_ngram: int = 10,
) -> NgramIndex:
    """The n-gram index of `items`; see the module docstring for what is indexed."""
    t0 = time.perf_counter()
    hashes, item_of, short_parts = [], [], []
    n_passages = 0
    # A few thousand items at a time: Arrow's scratch for normalising stays small.
    for first_item in range(0, len(items), _BUILD_ITEMS):
        texts, owner, kind = _passages(items, first_item, first_item + _BUILD_ITEMS)
        n_passages += len(texts)
        buf, off = _buffers(normalise(pa.array(texts, pa.large_string())))
        for lo, hi in _doc_groups(off):
            words = _Words.of(buf[off[lo] : off[hi]], off[lo : hi + 1] - off[lo])
            h, text, _ = words.kgrams(ngram, mask=(kind[lo:hi] & 1) > 0)
            hashes.append(h)
            item_of.append(owner[lo + text])
            n_words = words.n_words
            short = np.flatnonzero(
                ((kind[lo:hi] & 2) > 0) & (n_words >= short_min_words) & (n_words < ngram)
            )
            first, n_short = words.first_word[short], n_words[short]
            whole = words.span_hashes(first, first + n_short - 1)
            hashes.append(whole)
            item_of.append(owner[lo + short])
            anchor = words.span_hashes(first, first + short_min_words - 1)
            short_parts.append((whole, anchor, n_short))
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    it_arr = np.concatenate(item_of) if item_of else np.zeros(0, np.int32)
    del hashes, item_of

    keys, item_off, item_idx, n_template = _csr(h, it_arr, max_items_per_ngram)
    del h, it_arr
    anchors, anchor_off, anchor_key, anchor_len = _anchors(keys, short_parts)
    benchmarks = sorted({it.benchmark for it in items})
    code = {b: i for i, b in enumerate(benchmarks)}
    index = NgramIndex(
        keys=keys,
        item_off=item_off,
        item_idx=item_idx,
        item_ids=[it.id for it in items],
        item_benchmark=np.array([code[it.benchmark] for it in items], np.int16),
        benchmarks=benchmarks,
        item_ngrams=np.bincount(item_idx, minlength=len(items)).astype(np.int32),
        ngram=ngram,
        short_min=short_min_words,
        anchors=anchors,
        anchor_off=anchor_off,
        anchor_key=anchor_key,
        anchor_len=anchor_len,
        stats={},
    )
    index.stats = {
        "items": len(items),
        "passages": n_passages,
        "ngrams": int(len(keys)),
        "short_passages": int(len(anchor_key)),
        "template_ngrams_dropped": n_template,
        "items_without_ngrams": int((index.item_ngrams == 0).sum()),
        "index_bytes": index.nbytes,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    return index


def _passages(items: Sequence[Item], lo: int, hi: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The passages of items [lo, hi): (texts, owning item, kind bits). Each item's full
    text (n-grams, and whole when short), its main fields when they are not the whole full
    text (whole when short; their n-grams are already in the full text), and its other
    renderings (n-grams only). Kind bit 0: n-grams; bit 1: whole when short."""
    texts: list[str] = []
    owner: list[int] = []
    kind: list[int] = []
    for i in range(lo, min(hi, len(items))):
        it = items[i]
        main = it.main if len(it.main) > 1 or it.extra else ()
        for text, k in (("\n".join((*it.main, *it.extra)), 3), *((m, 2) for m in main)):
            texts.append(text)
            owner.append(i)
            kind.append(k)
        for text in it.alt:
            texts.append(text)
            owner.append(i)
            kind.append(1)
    return texts, np.asarray(owner, np.int32), np.asarray(kind, np.uint8)


def _csr(
    h: np.ndarray, item: np.ndarray, max_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(hash, item) pairs -> sorted unique keys, CSR offsets and item lists, with keys of
    more than `max_items` items left out; also how many were left out."""
    order = np.lexsort((item, h))
    h, item = h[order], item[order]
    del order
    keep = np.ones(len(h), bool)
    keep[1:] = (h[1:] != h[:-1]) | (item[1:] != item[:-1])
    h, item = h[keep], item[keep]
    first = np.flatnonzero(np.r_[True, h[1:] != h[:-1]]) if len(h) else np.zeros(0, np.int64)
    per_key = np.diff(np.append(first, len(h)))
    template = per_key > max_items
    keep = ~np.repeat(template, per_key)
    keys, per_key = h[first[~template]], per_key[~template]
    item_off = np.zeros(len(keys) + 1, np.int64)
    np.cumsum(per_key, out=item_off[1:])
    return keys, item_off, item[keep].astype(np.int32), int(template.sum())


def _anchors(
    keys: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted unique anchors with, per anchor, the (key, length) of its short passages;
    passages whose key was left out of `keys` (a template) are left out."""
    whole = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint64)
    anchor = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint64)
    length = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    key = _search(keys, whole)
    ok = key >= 0
    anchor, key, length = anchor[ok], key[ok], length[ok].astype(np.int64)
    order = np.lexsort((length, key, anchor))
    anchor, key, length = anchor[order], key[order], length[order]
    keep = np.ones(len(anchor), bool)
    keep[1:] = (anchor[1:] != anchor[:-1]) | (key[1:] != key[:-1])
    anchor, key, length = anchor[keep], key[keep], length[keep]
    first = np.flatnonzero(np.r_[True, anchor[1:] != anchor[:-1]]) if len(anchor) else key[:0]
    off = np.append(first, len(anchor)).astype(np.int64)
    return anchor[first], off, key, length


# --- matching ---------------------------------------------------------------------------------


@dataclass
class Matches:
    """Every n-gram of a batch found in the index: its row, key, first word and length."""

    row: np.ndarray  # int64
    key: np.ndarray  # int64 into index.keys
    start: np.ndarray  # int64, first word in the row's normalised text
    size: np.ndarray  # int64, words


def find_matches(norm: pa.Array | pa.ChunkedArray, index: NgramIndex) -> Matches:
    """The n-grams of normalised texts (`normalise` output) that are in `index`."""
    if isinstance(norm, pa.ChunkedArray):
        norm = norm.combine_chunks() if norm.num_chunks else pa.array([], pa.large_string())
    buf, off = _buffers(pc.fill_null(norm, "").cast(pa.large_string()))
    parts: list[tuple[np.ndarray, ...]] = []
    for lo, hi in _doc_groups(off):
        words = _Words.of(buf[off[lo] : off[hi]], off[lo : hi + 1] - off[lo])
        h, text, rel = words.kgrams(index.ngram)
        pos = index.lookup(h)
        f = np.flatnonzero(pos >= 0)
        parts.append((lo + text[f], pos[f], rel[f], np.full(len(f), index.ngram)))
        if len(index.anchors):
            parts.append(_short_matches(words, index, lo))
    if not parts:
        empty = np.zeros(0, np.int64)
        return Matches(empty, empty, empty, empty)
    return Matches(*(np.concatenate(c).astype(np.int64) for c in zip(*parts, strict=True)))


def _short_matches(words: _Words, index: NgramIndex, lo: int) -> tuple[np.ndarray, ...]:
    """Short passages found whole: anchor hits, each checked against the passages it starts."""
    h, text, rel = words.kgrams(index.short_min)
    a = index.lookup_anchor(h)
    f = np.flatnonzero(a >= 0)
    a, text, rel = a[f], text[f], rel[f]
    per = index.anchor_off[a + 1] - index.anchor_off[a]
    starts = np.zeros(len(per) + 1, np.int64)
    np.cumsum(per, out=starts[1:])
    cand = np.repeat(index.anchor_off[a] - starts[:-1], per) + np.arange(starts[-1])
    text, rel = np.repeat(text, per), np.repeat(rel, per)
    key, size = index.anchor_key[cand], index.anchor_len[cand]
    fits = np.flatnonzero(rel + size <= words.n_words[text])
    key, size, text, rel = key[fits], size[fits], text[fits], rel[fits]
    first = words.first_word[text] + rel
    same = np.flatnonzero(words.span_hashes(first, first + size - 1) == index.keys[key])
    return lo + text[same], key[same], rel[same], size[same]


@dataclass
class Hits:
    """Which items each row hits (>= min_ngrams shared n-grams, or all the item has)."""

    row: np.ndarray  # (row, item) pairs that are hits, sorted by row then item
    item: np.ndarray
    ngrams: np.ndarray  # per row: distinct n-grams shared with its hit items


def score_hits(m: Matches, index: NgramIndex, n_rows: int, min_ngrams: int) -> Hits:
    n_keys, n_items = max(len(index.keys), 1), max(len(index.item_ids), 1)
    rk = np.unique(m.row * n_keys + m.key)
    row, key = rk // n_keys, rk % n_keys
    per = index.item_off[key + 1] - index.item_off[key]
    starts = np.zeros(len(per) + 1, np.int64)
    np.cumsum(per, out=starts[1:])
    pos = np.repeat(index.item_off[key] - starts[:-1], per) + np.arange(starts[-1])
    t_row, t_key, t_item = np.repeat(row, per), np.repeat(key, per), index.item_idx[pos]
    pairs, inv, shared = np.unique(
        t_row * n_items + t_item, return_inverse=True, return_counts=True
    )
    need = np.minimum(min_ngrams, index.item_ngrams[pairs % n_items])
    hit = shared >= need
    hit_t = hit[inv.reshape(-1)]
    hit_keys = np.unique(t_row[hit_t] * n_keys + t_key[hit_t])
    return Hits(
        row=pairs[hit] // n_items,
        item=pairs[hit] % n_items,
        ngrams=np.bincount(hit_keys // n_keys, minlength=n_rows),
    )


# --- cutting ---------------------------------------------------------------------------------


def cut_spans(text: str, items: set[int], index: NgramIndex, margin: int) -> list[tuple[int, int]]:
    """Character spans of `text` covered by n-grams of `items`, widened by `margin` words on
    each side and merged. The text is split into whitespace tokens and each token normalised
    alone, so every normalised word points back to the token it came from."""
    tokens = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    if not tokens:
        return []
    normed = normalise(pa.array([text[s:e] for s, e in tokens], pa.large_string())).to_pylist()
    word_tok = [t for t, w in enumerate(normed) for _ in (w.split(" ") if w else ())]
    joined = " ".join(w for w in normed if w)
    m = find_matches(pa.array([joined], pa.large_string()), index)
    intervals = []
    for key, start, size in zip(m.key.tolist(), m.start.tolist(), m.size.tolist(), strict=True):
        owners = index.item_idx[index.item_off[key] : index.item_off[key + 1]].tolist()
        if items.intersection(owners):
            lo, hi = max(start - margin, 0), min(start + size + margin, len(word_tok))
            intervals.append((tokens[word_tok[lo]][0], tokens[word_tok[hi - 1]][1]))
    merged: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def remove_spans(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """`text` without `spans`; the pieces left are joined by a blank line."""
    pieces, prev = [], 0
    for s, e in spans:
        pieces.append(text[prev:s])
        prev = e
    pieces.append(text[prev:])
    return "\n\n".join(p.strip() for p in pieces if p.strip())


# --- the stage ---------------------------------------------------------------------------------


class DecontamConfig(StageConfig):
    """Settings of the `decontaminate` stage. Defaults follow GPT-3's decontamination
    (13-grams, one shared n-gram is a hit, 200 characters around a match cut)."""

    benchmarks: list[str]
    """Benchmark test sets: a folder laid out like shared/data/benchmarks (searched for
    .jsonl, .jsonl.gz and .csv files), files, `datasets.save_to_disk` folders, or hub
    datasets as "hf:NAME[:CONFIG]:SPLIT" (e.g. "hf:openai/gsm8k:main:test"). Required."""

    ngram: int = Field(13, ge=4, le=64)
    """Words per n-gram (GPT-3 and lm-evaluation-harness: 13; Llama 3: 8)."""

    min_ngrams: int = Field(1, ge=1)
    """A row hits an item when they share this many distinct n-grams, or all the n-grams the
    item has when it has fewer. 1 is the GPT-3 / Llama rule."""

    short_min_words: int = Field(8, ge=1)
    """Questions and items shorter than `ngram` words but at least this long are matched
    whole, as one n-gram (GPT-3's floor for its per-benchmark N was 8). Set it to `ngram`
    to skip short passages."""

    max_items_per_ngram: int = Field(10, ge=1)
    """n-grams found in more items than this are benchmark templates and not indexed."""

    mode: Literal["drop", "cut"] = "drop"
    """drop: a contaminated row gets drop_reason `decontaminate:contaminated`. cut: the
    matching spans are removed from `text` and the row kept, unless too little is left."""

    cut_margin_words: int = Field(30, ge=0)
    """cut: words removed on each side of a matching n-gram, so the unmatched rest of an
    item (its choices, a short answer) goes with it. 30 words is about GPT-3's 200 characters
    of web text (FineWeb averages ~6 characters a word with its space)."""

    max_cut_spans: int = Field(10, ge=1)
    """cut: a row with more separate contaminated spans than this is dropped instead (a
    benchmark dump, not a page quoting an item; GPT-3 dropped documents split into more than
    10 pieces)."""

    min_chars_after_cut: int = Field(200, ge=0)
    """cut: a row with fewer characters than this left is dropped (GPT-3: 200)."""

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str | Path):
            v = [v]
        if isinstance(v, list | tuple):
            v = [str(p) for p in v]
        if not v:
            raise ValueError("give at least one benchmark file or folder")
        return v

    @model_validator(mode="after")
    def _short_below_ngram(self) -> DecontamConfig:
        if self.short_min_words > self.ngram:
            raise ValueError(
                f"short_min_words ({self.short_min_words}) is above ngram ({self.ngram}); "
                f"set it to {self.ngram} to skip short passages"
            )
        return self


_INDEX_CACHE: dict[tuple, NgramIndex] = {}


def load_index(config: DecontamConfig) -> NgramIndex:
    """The index for `config`, built once per process (a Ray actor is a process) and reused
    while the benchmark files are unchanged."""
    hub = [s for s in config.benchmarks if s.startswith("hf:") or is_saved_dataset(s)]
    files = benchmark_files([s for s in config.benchmarks if s not in hub])
    key = (
        tuple(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files) + tuple(hub),
        config.ngram,
        config.short_min_words,
        config.max_items_per_ngram,
    )
    if key not in _INDEX_CACHE:
        t0 = time.perf_counter()
        items = load_items([*files, *hub])
        load_s = time.perf_counter() - t0
        index = build_index(items, config.ngram, config.short_min_words, config.max_items_per_ngram)
        index.stats["load_seconds"] = round(load_s, 3)
        del items
        _INDEX_CACHE.clear()  # one index per process is the memory budget
        _INDEX_CACHE[key] = index
        _give_back_scratch()
    return _INDEX_CACHE[key]


def _give_back_scratch() -> None:
    """Return the build's freed scratch to the OS. Measured: a worker's RSS peaks ~335 MB
    higher while building the 60 MB index of shared/data/benchmarks and keeps ~105 MB after
    this; glibc and Arrow's pool would otherwise hold ~180 MB more for the worker's life."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class DecontaminateStage(Stage):
    """n-gram overlap with benchmark test items; see the module docstring."""

    name = "decontaminate"
    version = 1
    Config = DecontamConfig
    needs = ("text",)
    adds = ("contam_benchmarks", "contam_items", "contam_ngrams")
    uses_model = True

    config: DecontamConfig

    def preflight(self) -> None:
        """Every benchmark source must be there before the run starts: a file, a folder
        holding benchmark files, a `save_to_disk` folder, or a well-formed "hf:" name (the
        hub itself is not asked). "@stage" sources are checked when that stage has run."""
        many = len(self.config.benchmarks) > 1
        for i, source in enumerate(self.config.benchmarks):
            key = f"benchmarks[{i}]" if many else "benchmarks"
            if source.startswith("hf:"):
                parts = source[3:].split(":")
                if len(parts) not in (2, 3) or "" in parts:
                    raise PreflightError(
                        key,
                        f"{source!r} is not hf:NAME[:CONFIG]:SPLIT (e.g. hf:openai/gsm8k:main:test)",
                    )
                continue
            if is_ref(source):
                continue
            require_path(key, source, kind="any")
            path = _local_path(source)
            files = path.rglob("*") if path.is_dir() and not is_saved_dataset(path) else None
            if files is not None and not any(f.is_file() and _is_benchmark_file(f) for f in files):
                raise PreflightError(
                    key,
                    f"{source!r} holds no .jsonl, .jsonl.gz or .csv file; give a folder laid "
                    "out like shared/data/benchmarks, or the benchmark files themselves",
                )

    def setup(self) -> None:
        self.index = load_index(self.config)

    def process(self, table: pa.Table) -> pa.Table:
        cfg, index = self.config, self.index
        n = len(table)
        norm = normalise(table["text"])
        hits = score_hits(find_matches(norm, index), index, n, cfg.min_ngrams)
        benches: list[str | None] = [None] * n
        items: list[str | None] = [None] * n
        rows, first = np.unique(hits.row, return_index=True)
        bounds = np.append(first, len(hits.row))
        hit_items: dict[int, set[int]] = {}
        for r, lo, hi in zip(rows.tolist(), bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            its = hits.item[lo:hi].tolist()
            hit_items[r] = set(its)
            codes = np.unique(index.item_benchmark[its])
            benches[r] = ",".join(index.benchmarks[c] for c in codes)
            items[r] = json.dumps([index.item_ids[i] for i in its])
        contaminated = np.zeros(n, bool)
        contaminated[rows] = True
        table = set_column(table, "contam_benchmarks", pa.array(benches, pa.string()))
        table = set_column(table, "contam_items", pa.array(items, pa.large_string()))
        table = set_column(
            table, "contam_ngrams", pa.array(hits.ngrams, pa.int32(), mask=~contaminated)
        )
        if cfg.mode == "cut" and len(rows):
            text, contaminated = self._cut(table["text"], hit_items)
            table = set_column(table, "text", text)
        return mark_dropped(table, self.name, [(REASON, pa.array(contaminated))])

    def _cut(
        self, text: pa.ChunkedArray, hit_items: dict[int, set[int]]
    ) -> tuple[pa.Array, np.ndarray]:
        """`text` with the contaminated spans cut out of the rows in `hit_items`, and the
        rows to drop: too many spans, or too little left. A dropped row keeps its whole
        text, so the drop can be audited. One row at a time, contaminated rows only."""
        cfg = self.config
        text = text.combine_chunks().cast(pa.large_string())
        drop = np.zeros(len(text), bool)
        cut = np.zeros(len(text), bool)
        new: list[str] = []
        for r in sorted(hit_items):
            value = text[r].as_py()
            spans = cut_spans(value, hit_items[r], self.index, cfg.cut_margin_words)
            left = remove_spans(value, spans)
            if not spans or len(spans) > cfg.max_cut_spans or len(left) < cfg.min_chars_after_cut:
                drop[r] = True
            else:
                cut[r] = True
                new.append(left)
        if new:
            text = pc.replace_with_mask(text, pa.array(cut), pa.array(new, pa.large_string()))
        return text, drop

    @property
    def index_stats(self) -> dict[str, Any]:
        """Items, n-grams, bytes and seconds of this worker's index (after `setup`)."""
        return dict(self.index.stats)


# --- report ------------------------------------------------------------------------------------


def _report_tables(sources: Iterable[pa.Table | str | Path]) -> Iterator[pa.Table]:
    cols = ["contam_benchmarks", "contam_items", "drop_reason"]
    for src in sources:
        if isinstance(src, pa.Table):
            yield src.select([c for c in cols if c in src.column_names])
            continue
        p = Path(src)
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"hit_report: {p} holds no Parquet file")
        for f in files:
            names = pq.read_schema(f).names
            yield pq.read_table(f, columns=[c for c in cols if c in names])


def hit_report(sources: Iterable[pa.Table | str | Path]) -> dict[str, Any]:
    """Benchmark hits of decontaminated rows: tables, Parquet files or a stage's folder.

    Returns {"rows", "contaminated", "dropped" (by this stage), "kept" (contaminated rows
    kept after a cut),
    "benchmarks": {name: {"documents", "items_hit", "top_items"}}}, benchmarks by documents
    hit; `top_items` are the (up to) 10 items found in the most documents."""
    rows = contaminated = dropped = kept = 0
    docs: dict[str, int] = {}
    per_item: dict[str, dict[str, int]] = {}
    for t in _report_tables(sources):
        rows += len(t)
        if "contam_items" not in t.column_names:
            continue
        t = t.filter(pc.is_valid(t["contam_items"]))
        contaminated += len(t)
        if "drop_reason" in t.column_names:
            reason = t["drop_reason"]
            dropped += pc.sum(pc.equal(reason, f"decontaminate:{REASON}")).as_py() or 0
            kept += reason.null_count
        for ids in t["contam_items"].to_pylist():
            seen = set()
            for item in json.loads(ids):
                bench = item.split("/", 1)[0]
                counts = per_item.setdefault(bench, {})
                counts[item] = counts.get(item, 0) + 1
                if bench not in seen:
                    seen.add(bench)
                    docs[bench] = docs.get(bench, 0) + 1
    benchmarks = {
        b: {
            "documents": docs[b],
            "items_hit": len(per_item[b]),
            "top_items": sorted(per_item[b].items(), key=lambda kv: (-kv[1], kv[0]))[:10],
        }
        for b in sorted(docs, key=lambda b: (-docs[b], b))
    }
    return {
        "rows": rows,
        "contaminated": contaminated,
        "dropped": dropped,
        "kept": kept,
        "benchmarks": benchmarks,
    }
