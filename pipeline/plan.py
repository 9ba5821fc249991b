"""Plan a run before any work: which stages run, what each reads, and every problem at once.

`plan_run` turns a validated recipe into one `StagePlan` per selected stage and checks
everything that can be checked without running anything: inputs that match nothing, files
no reader handles, Parquet inputs without the text column, each stage's `preflight()`
(model, tokenizer and benchmark paths, language codes), and the outputs of earlier stages
that this run reads but does not compute. Config values that are object-storage URIs (a
model, benchmarks) are fetched into the run folder first (pipeline/remote_assets.py). All
problems are raised together as one `ConfigError` (the CLI prints one line each and exits 2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.io import expand_inputs
from pipeline.recipe import ConfigError, LoadedRecipe, StageSpec
from pipeline.stage import PreflightError
from pipeline.stage_runner import output_files

log = logging.getLogger("primer")


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
        try:
            spec = _with_assets_fetched(spec, out_root)
        except (OSError, ValueError, ImportError) as e:
            problems.append(f"{where}: {e}")
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
        config_refs = spec.cls(spec.config).config_refs()
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


def _with_assets_fetched(spec: StageSpec, out_root: Path) -> StageSpec:
    """`spec` with its config's object-storage URIs (a model, benchmarks) fetched into the
    run folder and named as "@_assets/..." references (pipeline/remote_assets.py)."""
    from pipeline.remote_assets import fetch_config_assets

    raw = spec.config.model_dump()
    fetched = fetch_config_assets(raw, out_root)
    if fetched == raw:
        return spec
    return replace(spec, config=type(spec.config).model_validate(fetched))
