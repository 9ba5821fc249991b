"""`primer plan RECIPE`: what a run will cost before it starts, and whether the nodes fit.

Reads the sizes of a recipe's raw inputs (Parquet row counts from the footers; other formats
counted on a few small files, else from bytes per document), follows the documents through
the stages with each stage's keep rate, and prints per stage the documents in and out, CPU-
and GPU-hours, the memory one worker and the driver need, the disk its output takes, and the
wall time on the cluster described by `Node`. A stage whose workers need more memory than a
node has per CPU, a teacher whose tensor parallelism needs more GPUs than a node has, or
outputs larger than the free disk are problems (exit 1), said before hours of work are spent.

Rates come from configs/rates.yaml (measured per-core rates; rough keep rates; teacher GPU
throughputs that are assumptions) or, with `--from RUN`, from a finished run's manifests:
keep rates, bytes per row and per-core docs/s as that run measured them (run the recipe on a
sample of your data first; that is the honest way to size a crawl).

    primer plan configs/phi3_mini.yaml --nodes 16 --cpus 64 --memory-gb 256 --gpus 8
    primer plan configs/quickstart.yaml --from runs/quickstart --json
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage
from pipeline.io import expand_inputs, read_json
from pipeline.parts import ReadOptions, plan_parts
from pipeline.recipe import LoadedRecipe

RATES = Path(__file__).resolve().parents[1] / "configs" / "rates.yaml"
_SAMPLE_FILE_BYTES = 64 << 20  # raw files counted exactly when at most this big
_SAMPLE_FILES = 3


@dataclass
class Node:
    """One node of the cluster the plan is for (default: this machine)."""

    cpus: int
    memory_gb: float
    gpus: int = 0
    count: int = 1

    @classmethod
    def this_machine(cls) -> Node:
        import psutil

        return cls(os.cpu_count() or 1, psutil.virtual_memory().total / 2**30, 0, 1)


@dataclass
class StageEstimate:
    stage: str
    uses: str
    docs_in: int
    docs_out: int
    parts: int
    cpu_hours: float
    gpu_hours: float
    worker_mb: float
    driver_mb: float
    disk_gb: float
    source: str  # where the rates came from: "rates" or "RUN"
    notes: list[str] = field(default_factory=list)


def load_rates(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    return yaml.safe_load(Path(path or RATES).read_text())


def measured_rates(run: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Keep rates, bytes per row and per-core docs/s of every stage a run finished."""
    out: dict[str, dict[str, float]] = {}
    for manifest in Path(run).glob("*/_manifest.json"):
        m = read_json(manifest)
        if not m.get("complete") or not m.get("rows_in") or m.get("kind") == "artifact":
            continue
        rows = m["rows_in"]
        out[m["stage"]] = {
            "keep": m["rows_out"] / rows,
            "out_bytes_per_doc": m["bytes"] / rows,
            **({"docs_per_core_s": rows / m["work_seconds"]} if m.get("work_seconds") else {}),
        }
    return out


def _family(fmt: str) -> str:
    """A READERS key -> the format family rates.yaml names: ".warc.wet.gz" -> "wet"."""
    for family, marks in (
        ("wet", ("wet",)),
        ("warc", ("warc",)),
        ("jsonl", ("jsonl", "ndjson", "json")),
        ("html", ("htm",)),
    ):
        if any(m in fmt for m in marks):
            return family
    return fmt.strip(".")


def count_documents(files: list[str], rates: dict[str, Any]) -> tuple[int, str]:
    """(documents, how they were counted) in raw input files (local or URIs): Parquet
    footers exactly; other formats by reading a few small files, else by bytes per document."""
    from pipeline.readers import detect_format, iter_batches

    families = {f: _family(detect_format(f)) for f in files}
    parquet = [f for f in files if families[f] == "parquet"]
    docs = sum(storage.parquet_metadata(f).num_rows for f in parquet)
    hows = [f"{len(parquet)} Parquet footers"] if parquet else []
    datasets = [f for f in files if families[f] == "hf"]
    hows += [f"{len(datasets)} dataset(s) by their metadata"] if datasets else []
    docs += sum(_dataset_rows(f, rates) for f in datasets)
    by_format: dict[str, list[str]] = {}
    for f in files:
        if families[f] not in ("parquet", "hf"):
            by_format.setdefault(families[f], []).append(f)
    for fmt, group in sorted(by_format.items()):
        sizes = {f: storage.size(f) for f in group}
        small = [f for f in group if sizes[f] <= _SAMPLE_FILE_BYTES][:_SAMPLE_FILES]
        if small:
            counted = sum(len(t) for f in small for t in iter_batches(f, 10_000))
            per_byte = counted / max(sum(sizes[f] for f in small), 1)
            hows.append(f"{fmt}: {len(small)} file(s) counted")
        else:
            per_byte = 1 / rates["documents"].get(f"{fmt}_bytes_per_doc", 3000)
            hows.append(f"{fmt}: bytes per document from rates")
        docs += round(sum(sizes.values()) * per_byte)
    return docs, "; ".join(hows)


def _dataset_rows(path: str, rates: dict[str, Any]) -> int:
    """Rows of a dataset input: a saved dataset's count, a hub split's from its card's
    metadata, else rates' `hf_docs_per_dataset`."""
    from pipeline.readers.hf import open_hf_dataset

    ds = open_hf_dataset(path)
    if getattr(ds, "num_rows", None) is not None:
        return int(ds.num_rows)
    splits = getattr(ds.info, "splits", None) or {}
    split = ds.split if getattr(ds, "split", None) else None
    if split is not None and str(split) in splits and splits[str(split)].num_examples:
        return int(splits[str(split)].num_examples)
    return int(rates["documents"].get("hf_docs_per_dataset", 1_000_000))


def human(n: float) -> str:
    """12,345 -> "12.3k"; 3.3e12 -> "3.3T"."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _teacher(
    stage: Any, requests: int, prompt_chars: int, rates: dict[str, Any]
) -> tuple[float, float, list[str]]:
    """(GPU-hours, CPU-hours, notes) of a teacher stage's requests."""
    t = rates["teacher"]
    teacher = stage.config.teacher
    prompt = requests * (prompt_chars / t["chars_per_token"])
    output = requests * (getattr(stage.config, "max_tokens", None) or teacher.max_tokens)
    output *= t["output_fill"]
    tokens = f"{human(prompt)} prompt + {human(output)} output tokens"
    if teacher.backend == "vllm":
        hours = (
            prompt / t["prompt_tokens_per_gpu_s"] + output / t["output_tokens_per_gpu_s"]
        ) / 3600
        return hours, 0.0, [f"{tokens} on vLLM (assumed GPU rates)"]
    if teacher.backend == "local":
        return 0.0, output / t["local_output_tokens_per_core_s"] / 3600, [f"{tokens}, local"]
    return 0.0, 0.0, [f"{tokens} on the openai server (not counted here)"]


def _stage_rates(rates: dict[str, Any], uses: str, config: Any) -> dict[str, Any]:
    """rates.yaml's entry for a stage; `by: {field: {value: {...}}}` in it overrides the
    rates where the stage's config has that value (extract's backends differ 10x)."""
    r = dict(rates["stages"].get(uses, {}))
    for name, values in r.pop("by", {}).items():
        r.update(values.get(str(getattr(config, name, None)), {}))
    return r


def estimate(
    loaded: LoadedRecipe,
    rates: dict[str, Any],
    measured: dict[str, dict[str, float]] | None = None,
    read: ReadOptions | None = None,
) -> list[StageEstimate]:
    """Follow the documents through the recipe's stages; see the module docstring."""
    measured = measured or {}
    read = read or ReadOptions.of(loaded.recipe.read)
    out: dict[str, StageEstimate] = {}
    driver = rates["driver"]
    for i, spec in enumerate(loaded.stages):
        uses = spec.cls.name
        r = {**_stage_rates(rates, uses, spec.config), **measured.get(spec.name, {})}
        source = "RUN" if spec.name in measured else "rates"
        stage = spec.cls(spec.config)
        notes: list[str] = []
        refs = [x[1:] for x in spec.inputs or [] if x.startswith("@")]
        if spec.inputs is not None and not refs:
            files = expand_inputs(spec.inputs)
            docs_in, how = count_documents(files, rates)
            parts = len(plan_parts(files, read=read))
            notes.append(f"input: {len(files):,} files, {how}")
        else:
            upstream = [out[x] for x in refs] if refs else [out[loaded.stages[i - 1].name]]
            docs_in = sum(u.docs_out for u in upstream)
            parts = sum(u.parts for u in upstream)
        docs_out = round(docs_in * r.get("keep", 1.0))
        cpu = docs_in / r["docs_per_core_s"] / 3600 if "docs_per_core_s" in r else 0.0
        gpu = 0.0
        disk = docs_in * r.get("out_bytes_per_doc", 0)
        if uses == "edu_annotate":
            requests = min(spec.config.sample_size, docs_in)
            gpu, cpu_t, more = _teacher(stage, requests, spec.config.max_doc_chars + 1400, rates)
            cpu, docs_out, disk = cpu + cpu_t, requests, requests * r.get("out_bytes_per_doc", 0)
            notes += more
        elif uses == "seeds":
            docs_out = sum(spec.config.per_style.values()) or docs_in
            parts = max(1, math.ceil(docs_out / spec.config.part_rows))
        elif uses == "generate":
            gpu, cpu_t, more = _teacher(stage, docs_in, 1200, rates)
            cpu += cpu_t
            notes += more
        elif uses == "mixture":
            budget = sum(p.tokens for p in spec.config.phases)
            # Each (input stage, filter) is tokenized once, whatever phases use it.
            inputs = {
                (ref[1:], src.filter)
                for phase in spec.config.phases
                for src in phase.sources
                for ref in src.input
                if ref.startswith("@") and ref[1:] in out
            }
            tokenized = sum(out[stage_name].docs_out for stage_name, _ in inputs)
            tokenized *= r["tokens_per_doc"]
            cpu = tokenized / r["tokens_per_core_s"] / 3600
            disk = 2 * (tokenized + budget)  # uint16 token cache, then the shards
            docs_in = docs_out = 0
            notes.append(
                f"{human(budget)} tokens in {len(spec.config.phases)} phases; "
                f"~{human(tokenized)} tokens to tokenize"
            )
        out[spec.name] = StageEstimate(
            spec.name, uses, docs_in, docs_out, parts, cpu, gpu, r.get("worker_mb", 500),
            driver["base_mb"] + parts * driver["per_part_kb"] / 1024, disk / 2**30, source, notes,
        )  # fmt: skip
    return list(out.values())


def problems(estimates: list[StageEstimate], loaded: LoadedRecipe, node: Node) -> list[str]:
    """What would stop the run on these nodes: memory per worker, GPUs, disk."""
    found = []
    per_cpu_mb = node.memory_gb * 1024 / max(node.cpus, 1)
    for e in estimates:
        if e.worker_mb > per_cpu_mb:
            found.append(
                f"{e.stage}: a worker needs ~{e.worker_mb:,.0f} MB and a node has "
                f"{per_cpu_mb:,.0f} MB per CPU: give its workers more memory (ray's "
                f"--memory / num_cpus per task) or use nodes with more memory per core"
            )
        if e.driver_mb > node.memory_gb * 1024 / 2:
            found.append(f"{e.stage}: the driver needs ~{e.driver_mb:,.0f} MB")
    for spec in loaded.stages:
        teacher = getattr(spec.config, "teacher", None)
        if teacher is not None and teacher.backend == "vllm":
            tp = teacher.vllm.tensor_parallel_size
            if tp > node.gpus:
                found.append(
                    f"{spec.name}: vLLM with tensor_parallel_size {tp} needs {tp} GPUs on one "
                    f"node; a node has {node.gpus}"
                )
    disk = sum(e.disk_gb for e in estimates)
    probe = Path(loaded.output).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    if disk > free:
        found.append(f"outputs need ~{disk:,.0f} GB and {probe} has {free:,.0f} GB free")
    return found


def format_plan(estimates: list[StageEstimate], node: Node, found: list[str]) -> str:
    cpus, gpus = node.cpus * node.count, node.gpus * node.count
    lines = [
        f"Plan for {node.count} node(s) x {node.cpus} CPUs, {node.memory_gb:,.0f} GB, "
        f"{node.gpus} GPUs",
        "",
        f"  {'stage':<14}{'docs in':>14}{'docs out':>14}{'CPU-h':>10}{'GPU-h':>9}"
        f"{'worker MB':>11}{'driver MB':>11}{'disk GB':>10}{'wall h':>9}  rates",
    ]
    for e in estimates:
        wall = max(e.cpu_hours / max(cpus, 1), e.gpu_hours / max(gpus, 1) if e.gpu_hours else 0)
        lines.append(
            f"  {e.stage:<14}{e.docs_in:>14,}{e.docs_out:>14,}{e.cpu_hours:>10,.1f}"
            f"{e.gpu_hours:>9,.1f}{e.worker_mb:>11,.0f}{e.driver_mb:>11,.0f}{e.disk_gb:>10,.1f}"
            f"{wall:>9,.2f}  {e.source}"
        )
        lines += [f"  {'':<14}{note}" for note in e.notes]
    total_cpu = sum(e.cpu_hours for e in estimates)
    total_gpu = sum(e.gpu_hours for e in estimates)
    lines += [
        "",
        f"  total: {total_cpu:,.1f} CPU-hours, {total_gpu:,.1f} GPU-hours, "
        f"{sum(e.disk_gb for e in estimates):,.1f} GB of outputs",
    ]
    if found:
        lines += ["", "  PROBLEMS:"] + [f"  - {p}" for p in found]
    return "\n".join(lines)


def plan_command(
    loaded: LoadedRecipe,
    node: Node,
    rates_path: str | None = None,
    previous: str | None = None,
    as_json: bool = False,
) -> int:
    rates = load_rates(rates_path)
    estimates = estimate(loaded, rates, measured_rates(previous) if previous else None)
    found = problems(estimates, loaded, node)
    if as_json:
        import json

        print(json.dumps({"node": asdict(node), "stages": [asdict(e) for e in estimates],
                          "problems": found}, indent=2))  # fmt: skip
    else:
        print(format_plan(estimates, node, found))
    return 1 if found else 0
