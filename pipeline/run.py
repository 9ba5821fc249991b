"""Run a recipe end to end (or some of its stages) and leave a readable summary.

`run_recipe` validates everything first, starts or joins Ray, runs each stage in order
(each reading the previous stage's kept rows), and writes `DIR/run_summary.json`, built
from every stage's manifest, so a run resumed three times reports all of its parts, not
the last attempt's. `format_summary` renders the same numbers for a terminal.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, LoadedRecipe, StageSpec, replace_refs, stage_refs
from pipeline.io import expand_inputs, read_json, write_json_atomic
from pipeline.runner import _now, output_files, run_stage
from pipeline.stage import Stage

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
    # Ray Data logs every dataset's plan at INFO; Primer's own progress lines say enough.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # Primer prints its own progress with rate and ETA
    ctx.verbose_stats_logs = False


def _fingerprint_of(out_root: Path, stage: str) -> str:
    manifest = out_root / stage / "_manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{out_root / stage} has no finished output; run stage {stage!r} first"
        )
    return read_json(manifest)["fingerprint"]


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


def run_recipe(
    loaded: LoadedRecipe,
    output: str | Path | None = None,
    only: Sequence[str] | None = None,
    ray_address: str | None = None,
    executor: str | None = None,
) -> dict[str, Any]:
    out_root = Path(output) if output else loaded.output
    selected = select_stages(loaded, only)
    executor = executor or loaded.recipe.executor
    use_ray = executor == "ray"
    if use_ray:
        init_ray(ray_address or loaded.recipe.ray.address, loaded.recipe.ray.num_cpus)
    out_root.mkdir(parents=True, exist_ok=True)
    t0, started = time.monotonic(), _now()

    by_name = {s.name: i for i, s in enumerate(loaded.stages)}
    for spec in selected:
        i = by_name[spec.name]
        refs = [r[1:] for r in spec.inputs or [] if r.startswith("@")]
        if spec.inputs is not None and not refs:
            files, upstream = expand_inputs(spec.inputs), ""
        else:
            refs = refs or [loaded.stages[i - 1].name]
            files = [f for r in refs for f in output_files(out_root / r)]
            upstream = "+".join(_fingerprint_of(out_root, r) for r in refs)
        stage, config_refs = resolve_refs(spec, out_root)
        upstream += "".join(f"+{_fingerprint_of(out_root, r)}" for r in config_refs)
        log.info("stage %s: %d input files", spec.name, len(files))
        run_stage(stage, files, out_root, use_ray, upstream, spec.fingerprint(), name=spec.name)

    summary = write_run_summary(out_root, loaded, started, time.monotonic() - t0)
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


def write_run_summary(
    out_root: Path, loaded: LoadedRecipe, started: str, wall: float
) -> dict[str, Any]:
    runs_path = out_root / "_runs.json"
    runs = read_json(runs_path) if runs_path.is_file() else []
    runs.append({"started": started, "finished": _now(), "wall_seconds": round(wall, 3)})
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
            | {"attempts": len(m["attempts"])}
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
        flag = "  !! over guardrail" if s["guardrail"]["exceeded"] else ""
        lines.append(
            f"  {s['stage']:<14}{s['rows_in']:>12,}{s['rows_out']:>12,}{dropped:>10,}"
            f"{s['wall_seconds']:>10.1f}  {reasons}{flag}"
        )
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
