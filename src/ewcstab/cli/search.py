"""``ewcstab search`` (run or resume an Optuna study of lambda) and ``ewcstab search-summary``.

What several workers on one study guarantee (exact trial count, distinct lambdas, retried kills, one set
of settings) is described in ``ewcstab.search``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ewcstab.cli.common import (
    add_run_arguments, check_folder, check_outputs, config_from_args, nonnegative_int, positive_int, prepare_run,
)
from ewcstab.errors import ConfigError, UserError

log = logging.getLogger(__name__)

SEARCH_HELP = """\
Run (or resume) an Optuna study of lambda for one (arch, method, variant).

tpe: TPE over log-lambda in [--low, --high] with a median pruner; grid: each of the given lambdas once.
The study lives in --storage and holds exactly --n-trials finished trials, however many workers share it
and however often they are killed and restarted: each worker samples its own stream, never repeats a
lambda, and a killed trial's lambda is tried again. A worker with other settings than the study's is
refused. Example:

    ewcstab search --config config/quick.yaml --method mas --low 0.1 --high 100 --n-trials 20 \\
        --storage sqlite:///results/search/mlp/mas/original/study.db --runs-dir results/search/runs \\
        --out best_lambda.json --trials-out trials.csv
"""


def _search():
    """``ewcstab.search``: needs optuna (the ``workflow`` extra)."""
    try:
        from ewcstab import search
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("optuna", "sqlalchemy"):
            raise UserError(f"search needs {err.name}: pip install -e '.[workflow]' (or -r requirements.txt)") from None
        raise
    return search


def spec_from_args(args: argparse.Namespace):
    """The validated ``SearchSpec`` of the flags."""
    search = _search()
    if args.grid and args.mode != "grid":
        raise ConfigError("grid: --grid needs --mode grid")
    grid = None
    if args.mode == "grid":
        grid = list(args.grid) if args.grid else search.grid_values(args.low, args.high, args.grid_n)
    spec = search.SearchSpec(args.mode, args.low, args.high, args.n_trials, args.seeds_per_trial, grid,
                             args.sampler_seed, args.pruner)
    spec.validate()
    return spec


def study_name(args: argparse.Namespace, base) -> str:
    return args.study_name or f"{base.arch}-{base.method}-{base.variant}"


def cmd_search(args: argparse.Namespace) -> int:
    if bool(args.out) != bool(args.trials_out):
        raise ConfigError("trials-out: give --out and --trials-out together (the best lambda, and the table of "
                          "all trials)")
    check_outputs({"out": args.out, "trials-out": args.trials_out, "worker-out": args.worker_out})
    check_folder("runs-dir", args.runs_dir)
    spec = spec_from_args(args)
    search = _search()
    search.check_storage_url(args.storage)
    base = prepare_run(args)
    name = study_name(args, base)
    study = search.run_search(name, args.storage, base, spec, Path(args.runs_dir), progress=not args.no_progress,
                              heartbeat=args.heartbeat or None, trials_per_batch=args.trials_per_batch)
    from ewcstab.io import write_json_atomic

    if args.worker_out:
        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == search.worker_id()]
        write_json_atomic(args.worker_out, {
            "study": name, "worker": search.worker_id(), "storage": args.storage,
            "trials": [{"number": t.number, "state": t.state.name, "lam": t.params.get("lam")} for t in mine],
        })
    if args.out:
        write_summary(study, spec, base, args.storage, args.out, args.trials_out)
    return 0


def cmd_search_summary(args: argparse.Namespace) -> int:
    check_outputs({"out": args.out, "trials-out": args.trials_out})
    spec = spec_from_args(args)
    base = config_from_args(args)
    search = _search()
    study = search.load_study(study_name(args, base), args.storage)
    search.check_same_settings(study, base, spec, write=False)
    write_summary(study, spec, base, args.storage, args.out, args.trials_out)
    return 0


def write_summary(study, spec, base, storage: str, out: str, trials_out: str) -> None:
    """best_lambda JSON (with the run settings and provenance) and the CSV of all trials, each atomic."""
    import torch

    from ewcstab import provenance
    from ewcstab.io import write_json_atomic, write_text_atomic
    from ewcstab.search import summarize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the summary ran
    meta = {
        "arch": base.arch, "method": base.method, "variant": base.variant, "storage": storage,
        "run_config": base.resolved().to_dict(),
        "provenance": {k: v for k, v in provenance.collect(device, {}, "").items()
                       if k in ("packages", "git", "device", "host", "created")},
    }
    record, trials = summarize(study, spec, meta)
    write_text_atomic(trials_out, trials.to_csv(index=False))
    write_json_atomic(out, record)
    log.info("best lambda %.6g (mean acc %.4f) -> %s", record["best_lambda"], record["best_value"], out)


def _add_search_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--mode", choices=("tpe", "grid"), default="tpe", help="tpe over log-lambda, or a grid sweep")
    p.add_argument("--low", type=float, required=True, help="smallest lambda (tpe: > 0)")
    p.add_argument("--high", type=float, required=True, help="largest lambda")
    p.add_argument("--grid-n", type=positive_int, default=10, help="grid mode: number of evenly spaced lambdas")
    p.add_argument("--grid", type=float, nargs="+", help="grid mode: explicit lambda values >= 0, each once "
                   "(overrides --grid-n)")
    p.add_argument("--n-trials", type=positive_int, required=True, help="finished trials the study must hold")
    p.add_argument("--seeds-per-trial", type=positive_int, default=1, help="runs per trial (seeds 1000, 1001, ...)")
    p.add_argument("--sampler-seed", type=nonnegative_int, default=0,
                   help="seed of the study's sampling; worker streams derive from it")
    p.add_argument("--pruner", choices=("median", "none"), default="median", help="early stopping of trials (tpe)")
    p.add_argument("--storage", required=True, help="sqlite:///file.db, journal:///file.log, or a database URL")
    p.add_argument("--study-name", help="default: ARCH-METHOD-VARIANT")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run (or resume) an Optuna search of lambda for one (arch, method, variant)",
                       description=SEARCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_search_arguments(p)
    p.add_argument("--shared", action="store_true",
                   help="accepted for older scripts; no effect: every worker shares the study safely (only "
                        "trials of dead workers are failed)")
    p.add_argument("--heartbeat", type=nonnegative_int, default=60,
                   help="seconds between this worker's trial heartbeats (any storage; 0: off); another worker "
                        "fails a trial of this one that is silent for 3 of these intervals (+10 s) and retries "
                        "its lambda")
    p.add_argument("--runs-dir", required=True, help="folder for every trial's run records")
    p.add_argument("--trials-per-batch", type=positive_int, default=1,
                   help="ask this many trials at once and train all their runs as one batch (ewcstab.runner; "
                        "default 1: one trial at a time through the single-run path)")
    p.add_argument("--worker-out", help="JSON listing the trials this worker ran")
    p.add_argument("--out", help="best-lambda JSON, written when the study is complete (with --trials-out)")
    p.add_argument("--trials-out", help="CSV of all trials (with --out)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_search)

    q = sub.add_parser("search-summary", help="best lambda (JSON) and all trials (CSV) of a finished study")
    _add_search_arguments(q)
    q.add_argument("--out", required=True, help="best-lambda JSON")
    q.add_argument("--trials-out", required=True, help="CSV of all trials")
    q.set_defaults(func=cmd_search_summary)
