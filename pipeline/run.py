"""Run a recipe end to end (or some of its stages) and leave a readable summary.

`run_recipe` validates everything first, starts or joins Ray, runs each stage in order
(each reading the previous stage's kept rows), and writes `DIR/run_summary.json`, built
from every stage's manifest, so a run resumed three times reports all of its parts, not
the last attempt's. `format_summary` renders the same numbers for a terminal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, LoadedRecipe, StageSpec, replace_refs, stage_refs
from pipeline.io import expand_inputs, read_json, write_json_atomic
from pipeline.lock import RunLock
from pipeline.progress import configure_ray_data_logging
from pipeline.runner import ReadOptions, _now, output_files, output_fingerprint, run_stage
from pipeline.secrets import scrub
from pipeline.stage import PreflightError, Stage

log = logging.getLogger("primer")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray once."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers import pipeline/filters/generators from the installed package; quiet logs.
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": always a fresh local Ray, never a cluster some other `ray start`
        # left running on this machine (join one with --ray-address or RAY_ADDRESS).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    # Ray Data logs every dataset's plan at INFO; Primer's own progress lines say enough
    # (pipeline/progress.py configures it, in workers too, before ray.data loads).
    configure_ray_data_logging()
    with contextlib.suppress(ImportError, AttributeError):
        # ray.data may have been imported (and configured) before Primer set the variable.
        from ray.data._internal.logging import configure_logging

        configure_logging()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # Primer prints its own progress with rate and ETA
    ctx.verbose_stats_logs = False


def _upstream_fingerprint(out_root: Path, stage: str) -> str:
    output_files(out_root / stage)  # a clear error when it is missing or incomplete
    return output_fingerprint(out_root / stage)


def resolve_refs(spec: StageSpec, out_root: Path) -> tuple[Stage, list[str]]:
    """Build the stage with "@stage/file" config values turned into paths in this run."""
    raw = spec.config.model_dump()
    refs = list(dict.fromkeys(r[1:].partition("/")[0] for r in stage_refs(raw)))
    if not refs:
        return spec.cls(spec.config), []

    def path_of(ref: str) -> str:
        stage, _, rest = ref[1:].partition("/")
        return str(out_root / stage / rest) if rest else str(out_root / stage)

    config = spec.cls.Config.model_validate(replace_refs(raw, path_of))
    return spec.cls(config), refs


def select_stages(loaded: LoadedRecipe, only: Sequence[str] | None) -> list[StageSpec]:
    if not only:
        return loaded.stages
    known = {s.name: s for s in loaded.stages}
    unknown = [s for s in only if s not in known]
    if unknown:
        raise ConfigError(f"--stages: {unknown} not in this recipe; its stages: {', '.join(known)}")
    return [s for s in loaded.stages if s.name in only]


@dataclass
class StagePlan:
    """What one stage of a run will read, worked out before any stage runs."""

    spec: StageSpec
    files: list[str] | None  # raw input files; None: earlier stages' outputs (`refs`)
    refs: list[str]  # stages whose outputs it reads
    config_refs: list[str]  # stages named by "@stage/file" config values
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) no reader takes


def plan_run(
    loaded: LoadedRecipe, selected: Sequence[StageSpec], out_root: Path
) -> list[StagePlan]:
    """Check everything that can be checked before any work, and list every problem at once
    (a ConfigError: the CLI exits 2): inputs that match nothing, files no reader handles
    (skipped with a warning unless `read.on_unknown_input: fail`), input files whose schema
    cannot work (a Parquet without the text column), each stage's `preflight()` (model and
    benchmark paths, language codes), and the outputs of earlier stages that this run does
    not compute but reads (they must exist and be complete)."""
    from pipeline.readers import check_input, classify_inputs

    read = loaded.recipe.read
    by_name = {s.name: i for i, s in enumerate(loaded.stages)}
    running = {s.name for s in selected}
    problems: list[str] = []
    plans = []
    for spec in selected:
        i = by_name[spec.name]
        where = f"stages.{spec.name}"
        refs = [r[1:] for r in spec.inputs or [] if r.startswith("@")]
        files = None
        skipped: list[tuple[str, str]] = []
        if spec.inputs is not None and not refs:
            try:
                found = expand_inputs(spec.inputs)
            except FileNotFoundError as e:
                problems.append(f"{where}.input: {e}")
                found = []
            files, skipped = classify_inputs(found)
            if skipped:
                listing = "".join(f"\n    {f}: {why}" for f, why in skipped)
                if read.on_unknown_input == "fail":
                    problems.append(
                        f"{where}.input: {len(skipped)} file(s) no reader handles (set "
                        f"read.on_unknown_input: skip to leave them out):{listing}"
                    )
                else:
                    log.warning(
                        "%s: skipping %d input file(s) no reader handles:%s",
                        spec.name, len(skipped), listing,
                    )  # fmt: skip
            if found and not files and not problems:
                problems.append(
                    f"{where}.input: none of the {len(found)} matched files is readable"
                )
            for f in files:
                bad = check_input(f, read.text_column, read.id_column)
                if bad:
                    problems.append(f"{where}.input: {bad}")
        else:
            refs = refs or ([loaded.stages[i - 1].name] if i > 0 else [])
        config_refs = list(
            dict.fromkeys(r[1:].partition("/")[0] for r in stage_refs(spec.config.model_dump()))
        )
        for ref in dict.fromkeys([*refs, *config_refs]):
            if ref not in running:
                try:
                    output_files(out_root / ref)
                except FileNotFoundError as e:
                    problems.append(f"{where} reads {ref!r}: {e}")
        try:
            spec.cls(spec.config).preflight()
        except PreflightError as e:
            problems.append(f"{where}.{e.key}: {e.message}")
        plans.append(StagePlan(spec, files, refs, config_refs, skipped))
    if problems:
        raise ConfigError("\n".join(problems))
    return plans


def run_recipe(
    loaded: LoadedRecipe,
    output: str | Path | None = None,
    only: Sequence[str] | None = None,
    ray_address: str | None = None,
    executor: str | None = None,
    retry_failed: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the selected stages (all by default) of a validated recipe into `output`.

    Everything checkable is checked first (`plan_run`); then the run folder is locked
    (pipeline/lock.py: a second run on it exits at once), Ray is started or joined, and each
    stage runs in order. `retry_failed` asks the failed rows of retryable (teacher) stages
    again; stages after them recompute only if answers were recovered."""
    out_root = Path(output) if output else loaded.output
    if out_root.exists() and not out_root.is_dir():
        raise ConfigError(f"--output: {out_root} is a file, not a run folder")
    selected = select_stages(loaded, only)
    plans = plan_run(loaded, selected, out_root)
    executor = executor or loaded.recipe.executor
    use_ray = executor == "ray"
    read = ReadOptions(loaded.recipe.read.text_column, loaded.recipe.read.id_column)
    out_root.mkdir(parents=True, exist_ok=True)
    with RunLock(out_root, command):
        if use_ray:
            init_ray(ray_address or loaded.recipe.ray.address, loaded.recipe.ray.num_cpus)
        t0, started = time.monotonic(), _now()
        error = None
        try:
            for plan in plans:
                _run_planned(plan, out_root, use_ray, read, retry_failed)
        except BaseException as e:
            error = scrub(f"{type(e).__name__}: {e}")
            raise
        finally:
            # A stopped run still leaves a summary of everything committed so far.
            summary = write_run_summary(
                out_root, loaded, started, time.monotonic() - t0, error, command
            )
    # report.html is a view of files already committed: failing a finished run over it would
    # make a scheduler re-run good work, so an error is logged loudly and the run succeeds.
    try:
        from pipeline.report import write_report

        log.info("report: %s", write_report(out_root))
    except Exception:
        log.error(
            "report.html was NOT written for %s (the run's data and run_summary.json are "
            "complete); retry with: python -m pipeline.report %s",
            out_root,
            out_root,
            exc_info=True,
        )
    return summary


def _run_planned(
    plan: StagePlan, out_root: Path, use_ray: bool, read: ReadOptions, retry_failed: bool
) -> None:
    spec = plan.spec
    if plan.files is not None:
        files, upstream = plan.files, ""
    else:
        files = [f for r in plan.refs for f in output_files(out_root / r)]
        upstream = "+".join(_upstream_fingerprint(out_root, r) for r in plan.refs)
    stage, config_refs = resolve_refs(spec, out_root)
    upstream += "".join(f"+{_upstream_fingerprint(out_root, r)}" for r in config_refs)
    log.info("stage %s: %d input files", spec.name, len(files))
    run_stage(
        stage, files, out_root, use_ray, upstream, spec.fingerprint(), name=spec.name,
        read=read, skipped_inputs=plan.skipped, retry_failed=retry_failed,
    )  # fmt: skip


def write_run_summary(
    out_root: Path,
    loaded: LoadedRecipe,
    started: str,
    wall: float,
    error: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    runs_path = out_root / "_runs.json"
    runs = read_json(runs_path) if runs_path.is_file() else []
    entry = {"started": started, "finished": _now(), "wall_seconds": round(wall, 3)}
    entry |= {"status": "failed" if error else "ok", "error": error}
    if command:
        entry["command"] = scrub(command)
    runs.append(entry)
    write_json_atomic(runs_path, runs)
    stages = []
    for spec in loaded.stages:
        mpath = out_root / spec.name / "_manifest.json"
        if not mpath.is_file():
            continue
        m = read_json(mpath)
        stages.append(
            {
                k: m[k]
                for k in (
                    "stage",
                    "parts",
                    "rows_in",
                    "rows_out",
                    "dropped",
                    "bytes",
                    "work_seconds",
                    "wall_seconds",
                    "guardrail",
                )
            }
            | {
                "attempts": len(m["attempts"]),
                "complete": m.get("complete", True),
                "failed": m.get("failed"),
                "ids_renamed": m.get("ids_renamed", 0),
                "skipped_inputs": len(m.get("skipped_inputs", [])),
                "retries": m.get("retries", []),
            }
        )
    artifacts = {}
    for spec in loaded.stages:
        mpath = out_root / spec.name / "_manifest.json"
        if spec.cls.name == "mixture" and (out_root / spec.name / "manifest.json").is_file():
            mix = read_json(out_root / spec.name / "manifest.json")
            artifacts[spec.name] = {
                "kind": "mixture",
                "tokenizer": mix["tokenizer"]["name"],
                "seq_len": mix["seq_len"],
                "phases": [
                    {
                        "name": p["name"],
                        "tokens": p["tokens"],
                        "documents": p["documents"],
                        "sources": [
                            {k: src[k] for k in ("name", "tokens", "documents", "epochs")}
                            for src in p["sources"]
                        ],
                    }
                    for p in mix["phases"]
                ],
            }
        elif spec.cls.name == "train_smoke" and mpath.is_file():
            art = read_json(mpath).get("artifact", {})
            artifacts[spec.name] = {"kind": "train_smoke"} | {
                k: art[k] for k in ("steps", "first_loss", "last_loss", "loss_fell") if k in art
            }
    summary = {
        "recipe": loaded.recipe.name,
        "recipe_path": str(loaded.path) if loaded.path else None,
        "output": str(out_root),
        "runs": runs,
        "wall_seconds_all_runs": round(sum(r["wall_seconds"] for r in runs), 3),
        "stages": stages,
        "artifacts": artifacts,
    }
    write_json_atomic(out_root / "run_summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"Primer run {summary['recipe']!r} -> {summary['output']}",
        f"  {len(summary['runs'])} run(s), {summary['wall_seconds_all_runs']:.1f} s wall in total",
        "",
        f"  {'stage':<14}{'rows in':>12}{'kept':>12}{'dropped':>10}{'wall s':>10}  top drop reasons",
    ]
    for s in summary["stages"]:
        dropped = s["rows_in"] - s["rows_out"]
        reasons = ", ".join(f"{k} {v:,}" for k, v in list(s["dropped"].items())[:3])
        guard = s["guardrail"]
        flag = "  !! over guardrail" if guard["exceeded"] or guard.get("errors_exceeded") else ""
        if not s.get("complete", True):
            flag += "  !! INCOMPLETE"
        lines.append(
            f"  {s['stage']:<14}{s['rows_in']:>12,}{s['rows_out']:>12,}{dropped:>10,}"
            f"{s['wall_seconds']:>10.1f}  {reasons}{flag}"
        )
        notes = []
        if s.get("skipped_inputs"):
            notes.append(f"{s['skipped_inputs']} input file(s) skipped (no reader)")
        if s.get("ids_renamed"):
            notes.append(f"{s['ids_renamed']:,} duplicate ids made unique")
        for r in s.get("retries", [])[-1:]:
            notes.append(
                f"retry: {r['recovered']:,} of {r['failed_before']:,} failed rows recovered"
            )
        if notes:
            lines.append(f"  {'':<14}{'; '.join(notes)}")
    for name, art in summary.get("artifacts", {}).items():
        if art["kind"] == "mixture":
            lines += [
                "",
                f"  {name}: tokens per phase and source ({art['tokenizer']}, seq_len {art['seq_len']})",
            ]
            for p in art["phases"]:
                lines.append(
                    f"    {p['name']:<14}{p['tokens']:>14,} tokens {p['documents']:>10,} docs"
                )
                for src in p["sources"]:
                    share = src["tokens"] / p["tokens"] if p["tokens"] else 0.0
                    lines.append(
                        f"      {src['name']:<12}{src['tokens']:>14,} tokens {src['documents']:>10,} docs"
                        f"  {share:>6.1%}  {src['epochs']:.2f} epochs"
                    )
        elif art["kind"] == "train_smoke" and "first_loss" in art:
            lines += [
                "",
                f"  {name}: {art['steps']} steps, loss {art['first_loss']:.3f} -> {art['last_loss']:.3f}"
                f" ({'fell' if art['loss_fell'] else 'DID NOT FALL'})",
            ]
    lines.append("")
    lines.append(f"  details: {Path(summary['output']) / 'run_summary.json'}")
    if (Path(summary["output"]) / "report.html").is_file():
        lines.append(f"  report:  {Path(summary['output']) / 'report.html'}")
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
