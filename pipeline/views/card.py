"""The dataset card of an export (`primer export`, pipeline/views/export.py): where its rows
came from, in a README.md the Hugging Face Hub reads.

    from pipeline.views.card import dataset_card, lineage
    from pipeline.views.runs import open_run
    run = open_run("runs/quickstart")
    lineage(run, "edu_score")      # ['extract', 'langid', 'quality', 'dedup', 'edu_annotate', ...]
    print(dataset_card(run, "edu_score", "parquet", ["id", "text"], None, 123, shards))

The card opens with the Hub's YAML (license, size category, language when a langid stage
chose it, `configs` naming the data files), then: the stages the rows went through
(`lineage`: the stage, the stages whose parts it read and those its config names, such as
edu_train's model), each with its version, rows in / kept, drops per reason, thresholds
(the stage class's `threshold_keys`) and whole config, secrets masked again; the export's
own filter, columns and row count; the raw inputs and their licences. All counts come from
the manifests, never from a scan.

Licences: Primer records no licence of its own. For the folders of the raw inputs of those
stages, the card lists the licence and readme files found there now or recorded by the run
as skipped inputs (`skipped_inputs` in the manifest). A folder's licence counts as known
only when its README declares it in YAML front matter (`license: ...`, the Hub's
convention), or when the folder holds exactly one plain LICENSE/LICENCE/COPYING file whose
text names one licence this module recognises. A licence file with a suffix
(`LICENSE.apache-2.0`) often covers some of a folder's files only, so it is listed, not
trusted. When any folder's licence is unknown, the card's `license` is `other` and the card
says that the user must fill it in: nothing is guessed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage
from pipeline.secrets import mask
from pipeline.views.runs import Run

DATA_FILES = {"parquet": "data/train-*.parquet", "jsonl": "data/train-*.jsonl.gz"}
"""The data files of an export by format, as the card's `configs` name them."""

# --------------------------------------------------------------------------------------------
# Which stages the rows went through
# --------------------------------------------------------------------------------------------


def stage_order(run: Run) -> list[str]:
    """Stages with a manifest, in run order: the summary's order, then the rest (a later
    `primer stage` into the same folder) by when they first ran."""
    listed = [s for s in run.stages if s in run.manifests]
    rest = sorted(
        (s for s in run.manifests if s not in listed),
        key=lambda s: (run.manifests[s].get("attempts") or [{}])[0].get("started", ""),
    )
    return listed + rest


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _strings(v)


def _upstream(run: Run, stage: str) -> list[str]:
    """The stages whose output `stage` read: its input parts' folders, and the stages its
    config names ("@edu_train/model.bin", or that path once resolved into the run)."""
    found = []
    for label in run.manifests[stage].get("inputs", []):
        p = Path(label.split("#", 1)[0])
        up = run.manifests.get(p.parent.name)
        if up is not None and p.stem in (up.get("part_names") or []) and p.parent.name != stage:
            found.append(p.parent.name)
    run_name = run.path.resolve().name
    for value in _strings(run.manifests[stage].get("config", {})):
        if value.startswith("@"):
            name = value[1:].partition("/")[0]
            if name in run.manifests and name != stage:
                found.append(name)
            continue
        parts = Path(value).parts
        for i in range(1, len(parts)):
            if parts[i] in run.manifests and parts[i - 1] == run_name and parts[i] != stage:
                found.append(parts[i])
                break
    return list(dict.fromkeys(found))


def lineage(run: Run, stage: str) -> list[str]:
    """`stage` and every stage upstream of it, in run order."""
    seen: set[str] = set()
    todo = [stage]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_upstream(run, name))
    return [s for s in stage_order(run) if s in seen]


def raw_inputs(run: Run, stages: Sequence[str]) -> list[str]:
    """The input files (not stage parts) that `stages` read, as their manifests record them."""
    out = []
    for s in stages:
        for label in run.manifests[s].get("inputs", []):
            p = Path(label.split("#", 1)[0])
            up = run.manifests.get(p.parent.name)
            if up is None or p.stem not in (up.get("part_names") or []):
                out.append(label.split("#", 1)[0])
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------
# Licences of the inputs
# --------------------------------------------------------------------------------------------

_LICENCE_FILE = re.compile(r"^(licen[cs]e|copying|notice)([.\-_].*)?$", re.IGNORECASE)
_PLAIN_LICENCE = re.compile(r"^(licen[cs]e|copying)(\.(txt|md))?$", re.IGNORECASE)
_README = re.compile(r"^readme(\.(md|txt))?$", re.IGNORECASE)
_KNOWN_LICENCES = [
    (re.compile(r"apache license,?\s+version 2\.0", re.I), "apache-2.0"),
    (re.compile(r"^\s*(the )?mit license", re.I), "mit"),
    (re.compile(r"open data commons attribution license", re.I), "odc-by"),
    (re.compile(r"open database license|\bodbl\b", re.I), "odbl"),
    (re.compile(r"creative commons attribution 4\.0 international|\bcc[- ]by[- ]4\.0\b", re.I), "cc-by-4.0"),
    (re.compile(r"attribution-sharealike 4\.0 international|\bcc[- ]by[- ]sa[- ]4\.0\b", re.I), "cc-by-sa-4.0"),
    (re.compile(r"\bcc0 1\.0 universal\b", re.I), "cc0-1.0"),
]  # fmt: skip


def _read_head(path: str, limit: int = 16384) -> str | None:
    try:
        with storage.open_input(path) as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except (OSError, ValueError, ImportError):
        return None


def _front_matter_licence(text: str) -> list[str]:
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return []
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return []
    value = meta.get("license") if isinstance(meta, dict) else None
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if isinstance(v, str | int | float) and str(v).strip()]


def _is_hub_spec(path: str) -> bool:
    return path.startswith("hf:") and not path.startswith("hf://")


def _same(a: str, b: str) -> bool:
    """Two folders alike: the run records skipped files by absolute path, inputs by their
    path relative to the working directory when inside it."""
    if storage.is_remote(a) or storage.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(storage.local(a)) == os.path.abspath(storage.local(b))


def input_licences(run: Run, stages: Sequence[str]) -> list[dict[str, Any]]:
    """Per input folder of `stages`' raw inputs: the files read, the licence and readme
    files found (now, or recorded as skipped by the run), and the licence ids known from
    them (empty when unknown; see the module docstring for the rule)."""
    inputs = raw_inputs(run, stages)
    skipped = [
        s["path"] for st in stages for s in run.manifests[st].get("skipped_inputs", []) or []
    ]
    folders: dict[str, list[str]] = {}
    for f in inputs:
        # a Hub dataset spec (hf:NAME:SPLIT) has no folder: its licence is on its own card
        folders.setdefault(f if _is_hub_spec(f) else storage.parent(f), []).append(f)
    out = []
    for folder, files in folders.items():
        candidates = {} if _is_hub_spec(folder) else {
            storage.name(s): s for s in skipped if _same(storage.parent(s), folder)
        }  # fmt: skip
        local = storage.local(folder)
        if not storage.is_remote(folder) and not _is_hub_spec(folder) and Path(local).is_dir():
            for p in sorted(Path(local).iterdir()):
                if p.is_file() and (_LICENCE_FILE.match(p.name) or _README.match(p.name)):
                    candidates.setdefault(p.name, str(p))
        notes, licences, source = [], [], None
        readmes = {n: p for n, p in candidates.items() if _README.match(n)}
        licence_files = {n: p for n, p in candidates.items() if _LICENCE_FILE.match(n)}
        for n, p in sorted(readmes.items()):
            text = _read_head(p)
            declared = _front_matter_licence(text or "")
            if declared and not licences:
                licences, source = declared, f"{n} (front matter)"
            notes.append({"file": n, "found": text is not None, "declares": declared})
        for n, p in sorted(licence_files.items()):
            text = _read_head(p)
            names = sorted({lid for rx, lid in _KNOWN_LICENCES if text and rx.search(text)})
            notes.append({"file": n, "found": text is not None, "names": names})
        plain = [x for x in notes if "names" in x and _PLAIN_LICENCE.match(x["file"])]
        single = len(licence_files) == 1 and len(plain) == 1 and len(plain[0]["names"]) == 1
        if not licences and single:
            licences, source = plain[0]["names"], plain[0]["file"]
        out.append(
            {"folder": folder, "files": len(files), "licences": licences, "source": source,
             "found": notes}
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# The dataset card
# --------------------------------------------------------------------------------------------


def _threshold_keys(uses: str) -> frozenset[str]:
    from pipeline import registry

    if uses not in registry.names():
        return frozenset()
    try:
        return registry.get(uses).threshold_keys
    except Exception:  # a stage whose module cannot import here: list its config only
        return frozenset()


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"),
                        (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):  # fmt: skip
        if n < limit:
            return name
    return "n>1B"


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def dataset_card(
    run: Run,
    stage: str,
    fmt: str,
    columns: Sequence[str],
    where: str | None,
    rows: int,
    shards: Sequence[dict[str, Any]],
) -> str:
    """README.md of an export: Hub YAML, then where the rows came from."""
    stages = lineage(run, stage)
    licences = input_licences(run, stages)
    known = all(x["licences"] for x in licences) and bool(licences)
    ids = sorted({lid for x in licences for lid in x["licences"]})
    pattern = DATA_FILES.get(fmt, "data-*.arrow")
    meta: dict[str, Any] = {
        "license": (ids[0] if len(ids) == 1 else ids) if known else "other",
        "pretty_name": f"{run.summary.get('recipe') or run.path.name} {stage}",
        "size_categories": [_size_category(rows)],
        "tags": ["primer"],
    }
    if fmt in DATA_FILES:  # a save_to_disk folder is read by load_from_disk, not by configs
        meta["configs"] = [
            {"config_name": "default", "data_files": [{"split": "train", "path": pattern}]}
        ]
    builder = "json" if fmt == "jsonl" else fmt
    load = (
        f'`datasets.load_dataset("{builder}", data_files="{pattern}", split="train")` in this '
        f'folder, or `load_dataset(FOLDER_OR_HUB_REPO, split="train")`'
        if fmt in DATA_FILES
        else "`datasets.load_from_disk(FOLDER)`"
    )
    langid = [s for s in stages if run.uses(s) == "langid"]
    languages = run.manifests[langid[-1]].get("config", {}).get("languages") if langid else None
    if languages:
        meta["language"] = list(languages)
    m = run.manifests[stage]
    try:
        primer = version("primer")
    except PackageNotFoundError:
        primer = "unknown"
    title = meta["pretty_name"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += [
        f"The rows kept by stage `{stage}` (`{run.uses(stage)}` v{m.get('version')}) of the "
        f"Primer run `{run.path.name}`"
        + (f" (recipe `{run.summary['recipe']}`)" if run.summary.get("recipe") else "")
        + f", exported by Primer {primer} as {fmt}.",
        "",
        f"- rows: {rows:,} (the stage kept {m.get('rows_out', 0):,} of {m.get('rows_in', 0):,})",
        f"- filter: `{where}`" if where else "- filter: none (every kept row)",
        f"- columns: {', '.join(f'`{c}`' for c in columns)}",
        f"- files: {len(shards)} ({pattern}); stage fingerprint `{m.get('output_fingerprint') or m.get('fingerprint')}`",
        f"- load with {load}",
        "",
        "## Stages the rows went through",
        "",
        "| stage | uses | version | rows in | kept | dropped |",
        "|---|---|---|---:|---:|---:|",
    ]  # fmt: skip
    for s in stages:
        sm = run.manifests[s]
        if sm.get("kind") == "artifact":
            lines.append(f"| {s} | {run.uses(s)} | {sm.get('version')} | artifact | | |")
            continue
        dropped = sum((sm.get("dropped") or {}).values())
        lines.append(
            f"| {s} | {run.uses(s)} | {sm.get('version')} | {sm.get('rows_in', 0):,} | "
            f"{sm.get('rows_out', 0):,} | {dropped:,} |"
        )
    lines += ["", "### Rows dropped, per reason", "", "| stage | reason | rows | share of input |"]
    lines += ["|---|---|---:|---:|"]
    any_drop = False
    for s in stages:
        sm = run.manifests[s]
        for reason, count in sorted((sm.get("dropped") or {}).items(), key=lambda kv: -kv[1]):
            share = count / sm["rows_in"] if sm.get("rows_in") else 0.0
            lines.append(f"| {s} | `{_md(reason)}` | {count:,} | {share:.1%} |")
            any_drop = True
    if not any_drop:
        lines.append("| | (none) | | |")
    lines += ["", "### Thresholds and config (secrets masked)", ""]
    for s in stages:
        config = mask(run.manifests[s].get("config") or {})
        keys = sorted(k for k in _threshold_keys(run.uses(s)) if k in config)
        thresholds = ", ".join(f"`{k}={json.dumps(config[k])}`" for k in keys)
        lines.append(f"- `{s}`: thresholds {thresholds}" if keys else f"- `{s}`: no thresholds")
    lines += ["", "<details><summary>every stage's config</summary>", ""]
    for s in stages:
        config = mask(run.manifests[s].get("config") or {})
        lines += [f"`{s}`:", "", "```yaml", yaml.safe_dump(config, sort_keys=True).rstrip(), "```"]
        lines.append("")
    lines += ["</details>", "", "## Inputs and licences", ""]
    if not licences:
        lines.append("No raw input files are recorded in the stages' manifests.")
    for x in licences:
        where_from = f"from {x['source']}" if x["source"] else "not recorded"
        shown = ", ".join(x["licences"]) if x["licences"] else "unknown"
        lines.append(
            f"- `{x['folder']}`: {x['files']} input file(s); licence: {shown} ({where_from})"
        )
        for n in x["found"]:
            state = "" if n["found"] else " (recorded by the run, not readable now)"
            said = n.get("declares") or n.get("names") or []
            named = f": names {', '.join(said)}" if said else ""
            lines.append(f"  - `{n['file']}`{state}{named}")
    if not known:
        lines += [
            "",
            "**The licence of some inputs is not recorded.** Primer does not decide licences: "
            "check each input's own terms (the files listed above, the source's website) and "
            "set `license:` in this card's header before publishing.",
        ]
    others = [s for s in stage_order(run) if s not in stages]
    if others:
        lines += ["", f"Other stages in the run, not upstream of these rows: {', '.join(others)}."]
    return "\n".join(lines) + "\n"
