"""The `primer` command line.

    primer run configs/quickstart.yaml [--output DIR] [--stages a,b] [--set k=v ...] [--ray-address ADDR]
    primer stage NAME --input PATH_OR_GLOB... --output DIR [--set key=value ...]
    primer stages

`run` executes a recipe's stages in order, resuming finished parts. `stage` runs one stage
on given files into DIR/<stage>/ (what DAG tasks and debugging use); Parquet inputs written
by an earlier Primer stage are read as such (kept rows only, all columns). `stages` lists
every stage with its config keys and defaults. Bad config fails before any work.
"""

from __future__ import annotations

import argparse
import logging
import sys

from generators.generate import DryRun
from pipeline import registry
from pipeline.config import (
    ConfigError,
    LoadedRecipe,
    Recipe,
    StageSpec,
    build_stage_config,
    load_recipe,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="primer", description="Primer: pretraining data factory")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe's stages in order, resuming finished work")
    r.add_argument("recipe")
    r.add_argument("--output", help="run folder (default: the recipe's output, runs/<name>)")
    r.add_argument("--stages", help="comma-separated subset of the recipe's stages")
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. stages.quality.min_words=100",
    )
    r.add_argument(
        "--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )
    r.add_argument("--executor", choices=["ray", "local"], help="override the recipe's executor")

    s = sub.add_parser("stage", help="run one stage on given files into OUTPUT/<stage>/")
    s.add_argument("name")
    s.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB")
    s.add_argument("--output", required=True)
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="stage config key, e.g. min_score=0.8",
    )
    s.add_argument("--ray-address")
    s.add_argument("--executor", choices=["ray", "local"], default="ray")

    sub.add_parser("stages", help="list stages with their config keys and defaults")
    return p


def _stage_command(args: argparse.Namespace) -> LoadedRecipe:
    from pipeline.config import apply_overrides
    from pipeline.io import expand_inputs

    try:
        expand_inputs(args.input)
    except FileNotFoundError as e:
        raise ConfigError(f"--input: {e}") from None
    raw = apply_overrides({}, args.overrides)
    cls, cfg = build_stage_config(args.name, raw, f"stage {args.name} --set")
    spec = StageSpec(name=cls.name, cls=cls, config=cfg, inputs=list(args.input))
    recipe = Recipe(
        name=f"stage-{cls.name}", output=args.output, executor=args.executor, stages={cls.name: {}}
    )
    return LoadedRecipe(recipe=recipe, stages=[spec], path=None)


def _list_stages() -> None:
    for name in registry.names():
        cls = registry.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name}_v{cls.version}: {doc}")
        print(f"  needs: {', '.join(cls.needs) or '-'}   adds: {', '.join(cls.adds) or '-'}")
        for key, f in cls.Config.model_fields.items():
            default = f.get_default(call_default_factory=True)
            print(f"    {key} = (required)" if f.is_required() else f"    {key} = {default!r}")
        print()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command == "stages":
            _list_stages()
            return 0
        from pipeline.run import format_summary, run_recipe

        if args.command == "run":
            loaded = load_recipe(args.recipe, args.overrides)
            only = [s.strip() for s in args.stages.split(",")] if args.stages else None
            summary = run_recipe(loaded, args.output, only, args.ray_address, args.executor)
        else:
            loaded = _stage_command(args)
            summary = run_recipe(loaded, args.output, None, args.ray_address, args.executor)
        print(format_summary(summary))
        return 0
    except DryRun as e:
        print(str(e))
        return 0
    except ConfigError as e:
        print(f"primer: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"primer: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
