"""The `primer` command line.

    primer run RECIPE [--output DIR] [--stages a,b] [--set k=v ...] [--ray-address ADDR] [--retry-failed]
    primer stage NAME --input PATH_OR_GLOB... --output DIR [--set key=value ...]
    primer stages
    primer plan RECIPE [--from RUN] [--nodes N --cpus C --memory-gb M --gpus G] [--json]
    primer why RUN_DIR ID
    primer export RUN_DIR STAGE --to PATH_OR_URI [--format parquet|jsonl|hf] [--columns a,b]
        [--where SQL] [--shard-rows N] [--shard-bytes 256MiB] [--overwrite] [--push-to-hub OWNER/NAME]
    primer train-smoke RUN_DIR [--steps 40] [--model phi3_tiny] [--seq-len 256] [--batch-size 4]
    primer --version

`run` executes a recipe's stages in order, resuming finished parts (`--retry-failed` asks
the teacher again for the rows it failed on). `stage` runs one stage on given files into
DIR/<stage>/ (what DAG tasks and debugging use); Parquet inputs written by an earlier Primer
stage are read as such (kept rows only, all columns). `stages` lists every stage with its
config keys and defaults. `why` says which stage dropped a document and why. `export` writes
a stage's kept rows (column parts joined with their base) as Parquet, JSON Lines or a
`datasets` folder with a dataset card, optionally to the Hub. `train-smoke`
trains a tiny Phi-3-architecture model on a run's mixture shards and fails if the loss does
not fall.

Exit codes: 0 done; 2 a mistake in the command, the recipe or its inputs, found before any
work (one line naming the key or file); 1 a run that started and stopped (a guardrail, a
full disk, a read-only folder, a run folder in use), with one line saying what and where,
and what to do. `-v` adds debug logging and the traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version

from pipeline import registry
from pipeline.recipe import (
    ConfigError,
    LoadedRecipe,
    Recipe,
    StageSpec,
    build_stage_config,
    load_recipe,
)
from pipeline.remote import local_run
from pipeline.secrets import scrub


def _version() -> str:
    try:
        return version("primer")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _StageList(argparse.Action):
    """`-h` of `primer stage` lists the registered stages after the usual help."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        parser.print_help()
        print("\nstages (primer stages shows their keys and defaults):")
        for name in registry.names():
            cls = registry.get(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"  {name:<14} {doc}")
        parser.exit()


def _overrides(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key (repeatable; values are YAML), e.g. {example}",
    )


def _staging(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--staging",
        metavar="DIR",
        help="with an object-storage --output: the local working copy of the run (default "
        "$PRIMER_STAGING or ~/.cache/primer/staging/<run>)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="primer",
        description="Primer: a data factory for small-model pretraining (Phi-3 style).",
        epilog="Exit codes: 0 ok, 2 a mistake found before any work, 1 a run that stopped.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--version", action="version", version=f"primer {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a recipe's stages in order, resuming finished work")
    r.add_argument("recipe", help="recipe YAML (configs/quickstart.yaml, configs/phi3_mini.yaml)")
    r.add_argument(
        "--output",
        help="run folder, or a URI on object storage (s3://bucket/runs/x); default: the "
        "recipe's output, runs/<name>",
    )
    _staging(r)
    r.add_argument(
        "--stages", help="comma-separated subset of the recipe's stages (their inputs must exist)"
    )
    _overrides(r, "stages.quality.min_words=100")
    r.add_argument(
        "--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )
    r.add_argument(
        "--executor",
        choices=["ray", "local"],
        help="override the recipe's executor (local: in this process, for debugging)",
    )
    r.add_argument(
        "--retry-failed",
        action="store_true",
        help="ask the teacher again for the rows recorded as teacher errors (edu_annotate, "
        "generate); later stages recompute only if answers were recovered",
    )

    s = sub.add_parser(
        "stage",
        help="run one stage on given files into OUTPUT/<stage>/",
        add_help=False,
        description="Run one registered stage on given files into OUTPUT/<stage>/.",
    )
    s.add_argument("-h", "--help", action=_StageList, nargs=0, help="this help and the stages")
    s.add_argument("name", help="a registered stage (see the list below, or `primer stages`)")
    s.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH_OR_GLOB",
        help="input files, folders or globs (WARC/WET, JSONL, Parquet, HTML, stage outputs)",
    )
    s.add_argument(
        "--output",
        required=True,
        help="run folder or object-storage URI; the stage writes OUTPUT/NAME/",
    )
    _staging(s)
    _overrides(s, "min_score=0.8")
    s.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    s.add_argument(
        "--executor", choices=["ray", "local"], default="ray", help="ray (default) or local"
    )
    s.add_argument(
        "--on-unknown-input",
        choices=["skip", "fail"],
        default="skip",
        help="files no reader handles: skip them with a warning (default) or fail",
    )

    sub.add_parser("stages", help="list stages with their config keys and defaults")

    pl = sub.add_parser(
        "plan",
        help="size a recipe before running it: documents, CPU/GPU-hours, memory, disk per stage",
        description="Size a recipe: documents per stage, CPU- and GPU-hours, worker and "
        "driver memory, disk, wall time on the nodes given; exit 1 when a node is too small.",
    )
    pl.add_argument("recipe", help="recipe YAML")
    _overrides(pl, "stages.edu_annotate.sample_size=100000")
    pl.add_argument(
        "--from", dest="previous", metavar="RUN",
        help="take keep rates, bytes per row and docs/s from this finished run's manifests",
    )  # fmt: skip
    pl.add_argument("--rates", help="a rates YAML (default configs/rates.yaml)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes in the cluster (default 1)")
    pl.add_argument("--cpus", type=int, help="CPUs per node (default: this machine's)")
    pl.add_argument("--memory-gb", type=float, help="memory per node (default: this machine's)")
    pl.add_argument("--gpus", type=int, default=0, help="GPUs per node (default 0)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    w = sub.add_parser("why", help="which stage dropped a document, and why")
    w.add_argument("run", help="a run folder (runs/quickstart) or its object-storage URI")
    w.add_argument("id", help="the document id")
    _staging(w)

    u = sub.add_parser(
        "pull",
        help="bring a run on object storage into its staging folder and print where it is",
        description="Download the committed state of a run on object storage (s3://, gs://) "
        "into its local staging folder, for notebooks, the report and the loader.",
    )
    u.add_argument("uri", help="the run's URI (s3://bucket/runs/x)")
    _staging(u)

    x = sub.add_parser(
        "export",
        help="write a stage's kept rows as Parquet, JSON Lines or a datasets folder, with a card",
        description="Write a stage's kept rows (column parts joined with their base, text "
        "included) to a folder or URI, in shards, with a dataset card (README.md).",
    )
    x.add_argument("run", help="a run folder (runs/quickstart) or its object-storage URI")
    x.add_argument("stage", help="the stage whose kept rows to export (edu_score, dedup, ...)")
    x.add_argument(
        "--to", required=True, metavar="PATH_OR_URI",
        help="the export folder: a path, or s3://, gs:// (it must be empty; see --overwrite)",
    )  # fmt: skip
    x.add_argument(
        "--format", choices=["parquet", "jsonl", "hf"], default="parquet",
        help="parquet (default), jsonl (gzipped JSON Lines) or hf (datasets' save_to_disk)",
    )  # fmt: skip
    x.add_argument(
        "--columns", help="comma-separated columns (default: all but drop_reason, error, html)"
    )
    x.add_argument(
        "--where", metavar="SQL",
        help="keep only rows where this SQL expression is true, e.g. \"edu_score >= 2.5\"",
    )  # fmt: skip
    x.add_argument("--shard-rows", type=int, metavar="N", help="at most N rows per file")
    x.add_argument(
        "--shard-bytes", default="256MiB", metavar="SIZE",
        help="at most SIZE of data per file (default 256MiB; 500MB, 1GiB, bytes)",
    )  # fmt: skip
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export at --to")
    x.add_argument(
        "--push-to-hub", metavar="OWNER/NAME",
        help="then upload the export to this Hub dataset repo (HF_TOKEN; parquet or jsonl, "
        "local --to)",
    )  # fmt: skip
    x.add_argument("--private", action="store_true", help="create the Hub repo as private")
    _staging(x)

    t = sub.add_parser(
        "train-smoke",
        help="train a tiny Phi-3 on a run's mixture shards; fail if loss does not fall",
    )
    t.add_argument("run", help="a run folder (its mixture/ is read) or a mixture folder")
    t.add_argument("--model", default="phi3_tiny", help="phi3_tiny, phi3_mini or a model YAML")
    t.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    t.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    t.add_argument("--seq-len", type=int, default=256, help="window length (re-windows the shards)")
    t.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    t.add_argument("--seed", type=int, default=0, help="model init and window order seed")
    t.add_argument("--output", help="folder for metrics.json (default RUN/train_smoke_cli)")
    return p


def _train_smoke_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.tokens.phi3 import ModelConfigError
    from pipeline.tokens.train_smoke import TrainSmokeError, TrainSmokeStage

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


def _export_command(args: argparse.Namespace) -> int:
    """`primer export`: 2 for a mistake in the command (found before any write), 1 when the
    Hub push failed after a complete export."""
    from pipeline.views.export import (
        ExportError,
        HubPushError,
        check_hub,
        export_stage,
        push_to_hub,
    )

    try:
        if args.push_to_hub:
            check_hub(args.push_to_hub, args.to, args.format)
        done = export_stage(
            local_run(args.run, args.staging), args.stage, args.to, fmt=args.format,
            columns=args.columns.split(",") if args.columns else None, where=args.where,
            shard_rows=args.shard_rows, shard_bytes=args.shard_bytes, overwrite=args.overwrite,
        )  # fmt: skip
    except ExportError as e:
        print(f"primer: error: {scrub(str(e))}", file=sys.stderr)
        return 2
    of = f" of {done['stage_kept']:,} kept" if done.get("stage_kept") is not None else ""
    print(
        f"exported {done['rows']:,} rows{of} of stage {args.stage!r} to {args.to} "
        f"({args.format}, {len(done['files'])} file(s)); the card: README.md there"
    )
    if args.push_to_hub:
        try:
            url = push_to_hub(args.to, args.push_to_hub, private=args.private)
        except HubPushError as e:
            print(f"primer: {scrub(str(e))}", file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0


def _stage_command(args: argparse.Namespace) -> LoadedRecipe:
    from pipeline.recipe import apply_overrides

    raw = apply_overrides({}, args.overrides)
    cls, cfg = build_stage_config(args.name, raw, f"stage {args.name} --set")
    spec = StageSpec(name=cls.name, cls=cls, config=cfg, inputs=list(args.input))
    recipe = Recipe(
        name=f"stage-{cls.name}",
        output=args.output,
        executor=args.executor,
        stages={cls.name: {}},
        read={"on_unknown_input": args.on_unknown_input},
    )
    return LoadedRecipe(recipe=recipe, stages=[spec], path=None)


def _list_stages() -> None:
    for name in registry.names():
        cls = registry.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        module, _ = registry.location(name)
        print(f"{name}_v{cls.version}: {doc}")
        print(f"  in {module.replace('.', '/')}.py")
        print(f"  needs: {', '.join(cls.needs) or '-'}   adds: {', '.join(cls.adds) or '-'}")
        for key, f in cls.Config.model_fields.items():
            default = f.get_default(call_default_factory=True)
            kind = (
                "  (threshold)"
                if key in cls.threshold_keys
                else "  (transport)"
                if key in cls.transport_keys
                else ""
            )
            line = f"    {key} = (required)" if f.is_required() else f"    {key} = {default!r}"
            print(line + kind)
        print()


def _root_cause(e: BaseException) -> tuple[BaseException, str | None]:
    """The first OSError (disk full, read-only) under wrappers (PartError, Ray's task
    errors), else the innermost cause; and the file a wrapper says it was writing."""
    seen: set[int] = set()
    cur: BaseException | None = e
    last, where = e, None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        where = where or getattr(cur, "path", None)
        if isinstance(cur, OSError) and not isinstance(cur, FileNotFoundError):
            return cur, cur.filename or where
        last = cur
        nxt = getattr(cur, "cause", None)
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
    return last, where


_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or use another --output), then run the "
    "same command again; finished parts are kept",
    errno.EDQUOT: "the disk quota is exceeded: free space, then run the same command again",
    errno.EROFS: "the filesystem is read-only: choose a writable --output",
    errno.EACCES: "permission denied: choose a folder you can write (--output) or fix its "
    "permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write (--output)",
}


_OS_WORDS = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EROFS: "Read-only file system",
    errno.EACCES: "Permission denied",
}


def _runtime_failure(e: BaseException) -> str:
    from pipeline.lock import RunLocked
    from pipeline.stage_runner import GuardrailError

    if isinstance(e, GuardrailError | RunLocked):
        return str(e)
    cause, where = _root_cause(e)
    code = getattr(cause, "errno", None)
    if isinstance(cause, OSError) and code is None:
        # pyarrow's writers raise OSError without errno, naming it in the message only
        text = str(cause)
        code = next((c for c, word in _OS_WORDS.items() if word in text), None)
    if isinstance(cause, OSError) and code in _OS_ADVICE:
        return f"cannot write {where or 'a file of the run'}: {_OS_ADVICE[code]}"
    if isinstance(cause, OSError):
        at = f" ({where})" if where else ""
        return f"{cause.strerror or cause}{at}; run again with -v for the traceback"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{text} (run again with -v for the traceback)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    command = "primer " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        if args.command == "plan":
            from pipeline.sizing import Node, plan_command

            here = Node.this_machine()
            node = Node(
                args.cpus or here.cpus, args.memory_gb or here.memory_gb, args.gpus, args.nodes
            )
            loaded = load_recipe(args.recipe, args.overrides)
            return plan_command(loaded, node, args.rates, args.previous, args.json)
        if args.command == "stages":
            _list_stages()
            return 0
        if args.command == "train-smoke":
            return _train_smoke_command(args)
        if args.command == "why":
            from pipeline.views.why import why_command

            return why_command(local_run(args.run, args.staging), args.id)
        if args.command == "pull":
            print(local_run(args.uri, args.staging))
            return 0
        if args.command == "export":
            return _export_command(args)
        from pipeline.run import run_recipe
        from pipeline.stage import DryRun
        from pipeline.summary import format_summary

        try:
            if args.command == "run":
                loaded = load_recipe(args.recipe, args.overrides)
                only = [s.strip() for s in args.stages.split(",")] if args.stages else None
                summary = run_recipe(
                    loaded, args.output, only, args.ray_address, args.executor,
                    retry_failed=args.retry_failed, command=command, staging=args.staging,
                )  # fmt: skip
            else:
                loaded = _stage_command(args)
                summary = run_recipe(
                    loaded, args.output, None, args.ray_address, args.executor,
                    command=command, staging=args.staging,
                )  # fmt: skip
        except DryRun as e:
            print(str(e))
            return 0
        print(format_summary(summary))
        return 0
    except (ConfigError, FileNotFoundError) as e:
        if args.verbose:
            traceback.print_exc()
        kind = "config error" if isinstance(e, ConfigError) else "error"
        for line in scrub(str(e)).splitlines() or [type(e).__name__]:
            print(f"primer: {kind}: {line.strip()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("primer: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        print(f"primer: {scrub(_runtime_failure(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
