"""The `primer` command line.

    primer run configs/quickstart.yaml [--output DIR] [--stages a,b] [--set k=v ...] [--ray-address ADDR]
    primer stage NAME --input PATH_OR_GLOB... --output DIR [--set key=value ...]
    primer stages
    primer train-smoke RUN_DIR [--steps 40] [--model phi3_tiny] [--seq-len 256] [--batch-size 4]

`run` executes a recipe's stages in order, resuming finished parts. `stage` runs one stage
on given files into DIR/<stage>/ (what DAG tasks and debugging use); Parquet inputs written
by an earlier Primer stage are read as such (kept rows only, all columns). `stages` lists
every stage with its config keys and defaults. `train-smoke` trains a tiny Phi-3-architecture
model on a run's mixture shards (RUN_DIR/mixture) and fails if the loss does not fall. Bad
config fails before any work.
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

    t = sub.add_parser(
        "train-smoke",
        help="train a tiny Phi-3 on a run's mixture shards; fail if loss does not fall",
    )
    t.add_argument("run", help="a run folder (its mixture/ is read) or a mixture folder")
    t.add_argument("--model", default="phi3_tiny", help="phi3_tiny, phi3_mini or a model YAML")
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--seq-len", type=int, default=256, help="window length (re-windows the shards)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output", help="folder for metrics.json (default RUN/train_smoke_cli)")
    return p


def _train_smoke_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.train_smoke import ModelConfigError, TrainSmokeError, TrainSmokeStage

    run = Path(args.run)
    mixture = run if (run / "manifest.json").is_file() else run / "mixture"
    if not (mixture / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{args.run}: no mixture manifest (looked for {mixture}/manifest.json)"
        )
    out = Path(args.output) if args.output else mixture.parent / "train_smoke_cli"
    try:
        m = TrainSmokeStage(
            mixture=str(mixture),
            model=args.model,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            threads=args.threads,
            seed=args.seed,
        ).train(out)
    except TrainSmokeError as e:
        print(f"primer: train-smoke failed: {e}", file=sys.stderr)
        return 1
    except (ModelConfigError, ValueError) as e:  # a bad model YAML, a bad or stale manifest
        print(f"primer: train-smoke: {e}", file=sys.stderr)
        return 2
    print(
        f"train-smoke: {m['steps']} steps, loss {m['first_loss']:.3f} -> {m['last_loss']:.3f}, "
        f"{m['tokens_per_s']:,.0f} tokens/s, {m['parameters']:,} parameters; {out / 'metrics.json'}"
    )
    return 0


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
        if args.command == "train-smoke":
            return _train_smoke_command(args)
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
