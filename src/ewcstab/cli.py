"""Command line: ``ewcstab run`` trains one continual-learning run and writes its record.

Further subcommands (benchmark, search, aggregation, pruning) are listed in ``extra_commands``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from ewcstab.config import ARCHS, METHODS, OPTIMIZERS, SEQUENCES, VARIANTS, RunConfig
from ewcstab.errors import ConfigError, UserError

#: CLI flag -> RunConfig field, for the overrides ``run`` accepts.
RUN_OVERRIDES = {
    "arch": "arch", "method": "method", "variant": "variant", "lam": "lam", "seed": "seed",
    "sequence": "sequence", "tasks": "n_tasks", "epochs": "epochs", "batch_size": "batch_size",
    "lr": "lr", "optimizer": "optimizer", "clip_norm": "clip_norm",
    "importance_samples": "importance_samples", "train_subset": "train_subset",
    "test_subset": "test_subset", "perm_seed": "perm_seed", "device": "device", "data_root": "data_root",
    "optimizer_state": "optimizer_state", "chain_length": "chain_length",
}


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that trains: each overrides the same key of --config."""
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of run settings (keys as in RunConfig); flags override it")
    p.add_argument("--arch", help=f"architecture: {', '.join(ARCHS)} (default mlp)")
    p.add_argument("--method", help=f"importance: {', '.join(METHODS)} (default fisher)")
    p.add_argument("--variant", help=f"penalty form: {', '.join(VARIANTS)} (default original)")
    p.add_argument("--lam", type=float, help="penalty strength lambda >= 0 (default 0: no consolidation)")
    p.add_argument("--seed", type=int, help="seed of initialisation and data order (default 0)")
    p.add_argument("--sequence", help=f"task sequence: {', '.join(SEQUENCES)} (default: the paper's for the arch)")
    p.add_argument("--tasks", type=int, help="use only the first N tasks of the sequence")
    p.add_argument("--epochs", type=int, help="epochs per task (paper: 6)")
    p.add_argument("--batch-size", type=int, help="training batch (paper: 100)")
    p.add_argument("--lr", type=float, help="learning rate (paper: 1e-3)")
    p.add_argument("--optimizer", help=f"{', '.join(OPTIMIZERS)} (paper: adam)")
    p.add_argument("--clip-norm", type=float, help="max gradient norm of the clipped variant (default 1.0)")
    p.add_argument("--importance-samples", type=int, help="last N training samples for importances (paper: 5000)")
    p.add_argument("--train-subset", type=int, help="train on the first N training samples of each task (quick runs)")
    p.add_argument("--test-subset", type=int, help="evaluate on the first N test samples of each task (quick runs)")
    p.add_argument("--perm-seed", type=int, help="seed of the permuted-MNIST permutations (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--data-root", help="torchvision data folder (default: $EWCSTAB_DATA, else ./data)")
    p.add_argument("--optimizer-state", choices=("fresh", "carried"),
                   help="fresh: a new optimizer per run (default); carried: start from the Adam state of the run "
                        "before it in its chain, as the authors' scripts did")
    p.add_argument("--chain-length", type=int, help="carried: counted runs per chain (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """--config file, then the explicit flags on top; --lam-from reads lambda from a search result."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    base = RunConfig.from_file(args.config) if args.config else RunConfig()
    changes = {field: getattr(args, flag) for flag, field in RUN_OVERRIDES.items() if getattr(args, flag) is not None}
    if getattr(args, "lam_from", None):
        if "lam" in changes:
            raise ConfigError("lam: give either --lam or --lam-from, not both")
        changes["lam"] = best_lambda_from(args.lam_from)
    return base.replace(**changes)


def best_lambda_from(path: str) -> float:
    import json
    from pathlib import Path

    if not Path(path).is_file():
        raise ConfigError(f"lam-from: {path!r} does not exist (expected the best_lambda JSON of a search)")
    try:
        value = json.loads(Path(path).read_text())["best_lambda"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"lam-from: {path!r} is not a search result (no 'best_lambda' key)") from None
    return float(value)


def cmd_run(args: argparse.Namespace) -> int:
    from ewcstab.io import write_json_atomic
    from ewcstab.runner import execute

    cfg = config_from_args(args)
    rec = execute(cfg, progress=not args.no_progress, trace=args.trace)
    write_json_atomic(args.out, rec)
    if rec["diverged"]:
        logging.warning("diverged at %s; recorded in %s", rec["diverged_at"], args.out)
    else:
        logging.info("mean accuracy after %d tasks: %.4f -> %s", len(rec["tasks"]), rec["final_mean_acc"], args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ewcstab",
        description="Stabilized EWC (Kutalev & Lapina, arXiv:2109.10021): continual-learning runs, "
        "lambda search, pruning by weight importance.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="train one continual-learning run and write its JSON record",
        description="Train one run of the paper's protocol and write one JSON record "
        "(accuracy matrix, divergence, timings, provenance). Example: "
        "ewcstab run --arch mlp --method mas --variant original --lam 4.5 --seed 0 --out run.json",
    )
    add_run_arguments(run)
    run.add_argument("--lam-from", metavar="FILE", help="take lambda from a search's best_lambda JSON")
    run.add_argument("--out", required=True, metavar="FILE", help="where to write the run record (JSON, atomic)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--trace", action="store_true", help="also record per-step telemetry (gradient norms) per task")
    run.set_defaults(func=cmd_run)
    for register in extra_commands():
        register(sub)
    return parser


def extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Functions that add further subcommands; each takes the subparsers object."""
    from ewcstab import aggregate, explosion, search
    from ewcstab.pruning import command as pruning

    return [search.register, aggregate.register, pruning.register, explosion.register, register_run_batched]


def cmd_run_batched(args: argparse.Namespace) -> int:
    from ewcstab.io import write_json_atomic
    from ewcstab.runner import execute_batched

    base = config_from_args(args)
    seeds = args.seeds if args.seeds else [base.seed]
    if args.lams and args.lam_from:
        raise ConfigError("lams: give either --lams or --lam-from, not both")
    lams = args.lams if args.lams else [base.lam]
    cfgs = [base.replace(seed=seed, lam=lam) for seed in seeds for lam in lams]
    if len(args.out) != len(cfgs):
        raise ConfigError(f"out: {len(args.out)} file(s) given for {len(cfgs)} runs "
                          f"({len(seeds)} seed(s) x {len(lams)} lambda(s)); give one --out path per run")
    records = execute_batched(cfgs, progress=not args.no_progress, trace=args.trace, runs_per_batch=args.runs_per_batch)
    for path, rec in zip(args.out, records):
        write_json_atomic(path, rec)
        if rec["diverged"]:
            logging.warning("seed %s lam %s diverged at %s; recorded in %s",
                            rec["seed"], rec["config"]["lam"], rec["diverged_at"], path)
    return 0


def register_run_batched(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run-batched", help="train several seeds/lambdas of one setting as one batch")
    add_run_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of the runs (default: the config's seed)")
    p.add_argument("--lams", type=float, nargs="+", help="lambdas of the runs (default: the config's lam)")
    p.add_argument("--lam-from", metavar="FILE", help="take lambda from a search's best_lambda JSON (not with --lams)")
    p.add_argument("--out", required=True, nargs="+", metavar="FILE", help="one record file per run, in order")
    p.add_argument("--runs-per-batch", type=int, help="stack at most N runs at once (default: 4 on a CPU, "
                   "all on a GPU); the records do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trace", action="store_true", help="also record per-step telemetry (gradient norms) per task")
    p.set_defaults(func=cmd_run_batched)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except ConfigError as err:
        parser.exit(2, f"ewcstab: invalid configuration: {err}\n")
    except UserError as err:  # data missing and the like: one clear line, not a traceback
        parser.exit(2, f"ewcstab: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
