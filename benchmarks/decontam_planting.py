"""Real benchmark items planted into web documents, the way the decontamination recall is
measured: the same documents in tests/filters/test_decontam.py and in
benchmarks/decontam_quality.py.

200 items (60 GSM8K, 70 MMLU, 45 ARC, 25 HumanEval; seed 7), each planted into a host
document in four forms (`FORMS`): verbatim, reformatted (case, spacing, punctuation and
choice labels changed), lightly rephrased (three words changed, sentences and choices
reordered) and the question alone.

    texts, meta = planted_docs(items, hosts)   # meta: [(form, item id)]
"""

from __future__ import annotations

import numpy as np

from filters.decontam.benchmarks import Item

_LETTERS = "ABCDEFGH"
_SUBSTITUTES = ["really", "certain", "quite", "several", "another", "specific", "given"]


def jitter(text: str, rng: np.random.Generator) -> str:
    """The same words with other case, spacing, line breaks and punctuation."""
    out = []
    for w in text.split():
        r = rng.random()
        w = w.upper() if r < 0.1 else w.capitalize() if r < 0.2 else w
        if rng.random() < 0.1:
            w += str(rng.choice([",", ";", "...", " -", "!", ":"]))
        out.append(w + str(rng.choice([" ", " ", " ", "  ", "\n", " \t"])))
    return "".join(out).strip()


def _choices(extra: tuple[str, ...], sep: str, style: str = "{}) ") -> str:
    return sep.join(style.format(_LETTERS[i]) + c for i, c in enumerate(extra))


def verbatim(item: Item, rng: np.random.Generator) -> str:
    # As stored in the benchmark file (GSM8K's answer with its calculator annotations).
    return "\n".join((*item.main, *(item.alt or item.extra)))


def reformatted(item: Item, rng: np.random.Generator) -> str:
    bench = item.benchmark
    question = "Question: " + jitter(" ".join(item.main), rng)
    if bench == "gsm8k":
        return f"{question}\nAnswer: {jitter(item.extra[0], rng)}"
    if bench == "humaneval":
        code = item.main[0].replace("    ", "\t") + item.extra[0].replace("    ", "  ")
        return f"Write this function.\n```python\n{code}\n```"
    sep = str(rng.choice(["\n", "  ", " "]))
    style = str(rng.choice(["{}) ", "({}) ", "{}. ", "{}: "]))
    choices = _choices(tuple(jitter(c, rng) for c in item.extra), sep, style)
    return f"{question}\n{choices}\nAnswer: B"


def rephrased(item: Item, rng: np.random.Generator) -> str:
    """Three words of the question changed and, with two or more, its sentences reordered;
    choices in another order (labelled); the answer left out."""
    words = " ".join(item.main).split()
    for p in rng.choice(len(words), size=min(3, len(words)), replace=False):
        words[p] = str(rng.choice(_SUBSTITUTES))
    text = " ".join(words)
    sentences = [s for s in text.replace("? ", "?|").replace(". ", ".|").split("|") if s]
    if len(sentences) > 1:
        sentences = sentences[1:] + sentences[:1]
    text = " ".join(sentences)
    if item.benchmark in ("gsm8k", "humaneval"):
        return text
    order = np.roll(np.arange(len(item.extra)), 1)
    return f"{text}\n{_choices(tuple(item.extra[i] for i in order), chr(10))}"


def question_only(item: Item, rng: np.random.Generator) -> str:
    """The question (or prompt) as stored, without choices or answer: a page quoting it."""
    return "\n".join(item.main)


FORMS = {
    "verbatim": verbatim,
    "reformatted": reformatted,
    "question_only": question_only,
    "rephrased": rephrased,
}


def plant(host: str, snippet: str, rng: np.random.Generator) -> str:
    lines = host.split("\n")
    at = int(rng.integers(0, len(lines) + 1))
    return "\n".join([*lines[:at], snippet, *lines[at:]])


def planted_docs(
    items: dict[str, Item], hosts: list[str]
) -> tuple[list[str], list[tuple[str, str]]]:
    """The planted documents: (texts, [(form, item id)]); `hosts` are the web texts the
    items are planted into (the FineWeb documents of data/sample)."""
    rng = np.random.default_rng(7)
    chosen = []
    for prefix, n in (("gsm8k/", 60), ("mmlu/", 70), ("arc_", 45), ("humaneval/", 25)):
        ids = sorted(i for i in items if i.startswith(prefix))
        chosen += [ids[j] for j in rng.choice(len(ids), size=n, replace=False)]
    texts, meta = [], []
    for form, render in FORMS.items():
        for k, item_id in enumerate(chosen):
            texts.append(plant(hosts[k % len(hosts)], render(items[item_id], rng), rng))
            meta.append((form, item_id))
    return texts, meta
