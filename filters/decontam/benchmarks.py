"""Benchmark test items for decontamination: one loader per format, and the files of a
benchmark source.

What: `load_items` reads every test item of benchmark files or folders (GSM8K, HumanEval,
MMLU CSV, llm-foundry's in-context-learning JSONL; a file's format is recognised from the
fields of its first record), `datasets.save_to_disk` folders and hub datasets
("hf:NAME[:CONFIG]:SPLIT"), as `Item`s: an id ("benchmark/split:index"), the question-like
fields, the choices and answers, and other renderings of the item. The index (index.py)
decides what of an item becomes n-grams. `sources_fingerprint` hashes the local files of
the sources, so the stage recomputes when a benchmark set is edited.

    items = load_items(["../shared/data/benchmarks"])
    items[0].id, items[0].main                  # ("arc_challenge/test:0", ("...",))
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.readers.hf import is_saved_dataset
from pipeline.stage import is_ref


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


def local_path(source: str | Path) -> Path:
    return Path(os.path.expandvars(str(source))).expanduser()


def is_benchmark_file(path: Path) -> bool:
    return path.name.lower().endswith(_BENCHMARK_SUFFIXES)


def benchmark_files(sources: Sequence[str | Path]) -> list[Path]:
    """The benchmark files of `sources` (folders are searched for .jsonl, .jsonl.gz and
    .csv files, other files skipped), sorted so item order is the same everywhere."""
    files: list[Path] = []
    for src in sources:
        p = local_path(src)
        if p.is_dir():
            found = [f for f in sorted(p.rglob("*")) if f.is_file() and is_benchmark_file(f)]
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


_SAMPLE_BYTES = 1 << 16  # per place sampled: a file's start, middle and end


def _file_digest(path: Path, h: Any) -> None:
    size = path.stat().st_size
    h.update(f"{size}\n".encode())
    places = {0, max(size // 2 - _SAMPLE_BYTES // 2, 0), max(size - _SAMPLE_BYTES, 0)}
    with path.open("rb") as fh:
        for offset in sorted(places):
            fh.seek(offset)
            h.update(fh.read(_SAMPLE_BYTES))


def sources_fingerprint(sources: Sequence[str]) -> dict[str, str]:
    """{source: hash} over the local benchmark sources: each file's name (relative to its
    folder), size and a sample of its content (start, middle and end; all of a small file).
    "@stage" references and hub datasets ("hf:") are left out; a source that does not
    exist hashes as "missing" (preflight reports it)."""
    out: dict[str, str] = {}
    for source in sources:
        if is_ref(source) or str(source).startswith("hf:"):
            continue
        path = local_path(source)
        if path.is_dir():
            saved = is_saved_dataset(path)
            files = [
                f
                for f in sorted(path.rglob("*"))
                if f.is_file() and (saved or is_benchmark_file(f))
            ]
        elif path.is_file():
            files = [path]
        else:
            out[str(source)] = "missing"
            continue
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(path) if f != path else f.name}\n".encode())
            _file_digest(f, h)
        out[str(source)] = h.hexdigest()[:16]
    return out
