"""``ewcstab run`` (one run, one record) and ``ewcstab run-batched`` (several runs as one batch)."""

from __future__ import annotations

import argparse
import logging

from ewcstab.cli.common import add_run_arguments, check_outputs, positive_int, prepare_run
from ewcstab.errors import ConfigError

log = logging.getLogger(__name__)

RUN_BATCHED_HELP = """\
Train several runs of one setting as one batch and write one record per run.

The runs are every combination of --seeds and --lams (seed-major: for each seed, each lambda), all other
settings shared (--config and the usual flags, as 'ewcstab run'); --out names one record file per run, in
that order. Each record is the one 'ewcstab run' writes for that seed and lambda, plus
"batch": {"runs", "index", "wall_seconds"}. Example (5 seeds of one lambda):

    ewcstab run-batched --config config/quick.yaml --method mas --lam 4.5 --seeds 0 1 2 3 4 \\
        --out runs/seed0.json runs/seed1.json runs/seed2.json runs/seed3.json runs/seed4.json
"""


def cmd_run(args: argparse.Namespace) -> int:
    check_outputs({"out": args.out})
    cfg = prepare_run(args)
    from ewcstab.io import write_json_atomic
    from ewcstab.runner import execute

    rec = execute(cfg, progress=not args.no_progress, trace=args.trace)
    write_json_atomic(args.out, rec)
    if rec["diverged"]:
        log.warning("diverged at %s; recorded in %s", rec["diverged_at"], args.out)
    else:
        log.info("mean accuracy after %d tasks: %.4f -> %s", len(rec["tasks"]), rec["final_mean_acc"], args.out)
    return 0


def cmd_run_batched(args: argparse.Namespace) -> int:
    if args.lams and args.lam_from:
        raise ConfigError("lams: give either --lams or --lam-from, not both")
    check_outputs({"out": args.out})
    base = prepare_run(args)
    seeds = args.seeds if args.seeds else [base.seed]
    lams = args.lams if args.lams else [base.lam]
    cfgs = [base.replace(seed=seed, lam=lam) for seed in seeds for lam in lams]
    if len(args.out) != len(cfgs):
        raise ConfigError(f"out: {len(args.out)} file(s) given for {len(cfgs)} runs "
                          f"({len(seeds)} seed(s) x {len(lams)} lambda(s)); give one --out path per run")
    from ewcstab.runner import execute_batched
    from ewcstab.io import write_json_atomic

    records = execute_batched(cfgs, progress=not args.no_progress, trace=args.trace,
                              runs_per_batch=args.runs_per_batch)
    for path, rec in zip(args.out, records):
        write_json_atomic(path, rec)
        if rec["diverged"]:
            log.warning("seed %s lam %s diverged at %s; recorded in %s",
                        rec["seed"], rec["config"]["lam"], rec["diverged_at"], path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
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

    p = sub.add_parser("run-batched", help="train several seeds/lambdas of one setting as one batch (MLP)",
                       description=RUN_BATCHED_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of the runs (default: the config's seed)")
    p.add_argument("--lams", type=float, nargs="+", help="lambdas of the runs (default: the config's lam)")
    p.add_argument("--lam-from", metavar="FILE", help="take lambda from a search's best_lambda JSON (not with --lams)")
    p.add_argument("--out", required=True, nargs="+", metavar="FILE", help="one record file per run, in order")
    p.add_argument("--runs-per-batch", type=positive_int, help="stack at most N runs at once (default: 4 per "
                   "CPU thread, all on a GPU); the records do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trace", action="store_true", help="also record per-step telemetry (gradient norms) per task")
    p.set_defaults(func=cmd_run_batched)
