"""The run summary: `DIR/run_summary.json` and the table a terminal shows at the end.

Built from every stage's manifest (which sums all committed parts, whichever attempt wrote
them) and from `DIR/_runs.json` (one entry per `primer run`), so a run resumed three times
reports all of its parts, not the last attempt's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.io import read_json, write_json_atomic
from pipeline.parts import utc_now
from pipeline.recipe import LoadedRecipe
from pipeline.secrets import scrub


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
    entry = {"started": started, "finished": utc_now(), "wall_seconds": round(wall, 3)}
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
