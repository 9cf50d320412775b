"""``ewcstab prune`` (one network's pruning curves) and ``ewcstab prune-summary`` (over networks).

The allowed values of --importance-data, --scopes, --curve-method and --importances are checked by
``PruneConfig.validate`` when the command runs (one line naming the flag), not by argparse: their lists
live in modules that import torch, which ``ewcstab --help`` does not load.
"""

from __future__ import annotations

import argparse
import logging

from ewcstab.cli.common import check_inputs, check_outputs, positive_int, set_threads
from ewcstab.errors import ConfigError

log = logging.getLogger(__name__)

#: CLI flag -> PruneConfig field.
PRUNE_FLAGS = {
    "arch": "arch", "seed": "seed", "importance_data": "importance_data", "importances": "importances",
    "scopes": "scopes", "sparsity_step": "sparsity_step", "epochs": "epochs", "batch_size": "batch_size",
    "lr": "lr", "heldout_size": "heldout_size", "fisher_label": "fisher_label", "train_subset": "train_subset",
    "test_subset": "test_subset", "curve_method": "curve_method", "device": "device", "data_root": "data_root",
}


def config_from_args(args: argparse.Namespace):
    """The validated ``PruneConfig`` of the flags given (the others keep PruneConfig's defaults)."""
    from ewcstab.pruning.experiment import PruneConfig

    values = {field: getattr(args, flag) for flag, field in PRUNE_FLAGS.items() if getattr(args, flag) is not None}
    for name in ("importances", "scopes"):
        if name in values:
            values[name] = tuple(values[name])
    cfg = PruneConfig(**values)
    cfg.validate()
    return cfg


def cmd_prune(args: argparse.Namespace) -> int:
    from ewcstab.device import check_device
    from ewcstab.pruning.experiment import metadata_path, run_pruning_experiment, write_curves

    try:
        meta_out = args.meta_out or str(metadata_path(args.out))
    except ValueError as err:  # a curve table named *.json would clash with its metadata
        raise ConfigError(f"out: {err}") from None
    check_outputs({"out": args.out, "meta-out": meta_out})
    cfg = config_from_args(args)
    set_threads(args.threads)
    check_device(cfg.device)
    curves, meta = run_pruning_experiment(cfg, progress=not args.no_progress)
    meta_path = write_curves(curves, meta, args.out, args.meta_out)
    log.info("unpruned accuracy %.4f; curves -> %s, metadata -> %s", meta["unpruned_accuracy"], args.out, meta_path)
    return 0


def cmd_prune_summary(args: argparse.Namespace) -> int:
    check_inputs("inputs", args.inputs, "a curve table (CSV) of 'ewcstab prune'")
    check_inputs("paper", args.paper, "the paper's pruning table (paper_pruning.csv)")
    check_outputs({"curves-out": args.curves_out, "all-out": args.all_out, "thresholds-out": args.thresholds_out,
                   "thresholds-md": args.thresholds_md, "thresholds-tex": args.thresholds_tex,
                   "comparison-out": args.comparison_out})
    from ewcstab.io import write_text_atomic
    from ewcstab.pruning.summary import (
        COMPARE_AT, TOLERANCES, compare_at, read_curves, read_paper, summarise_curves, thresholds_latex,
        thresholds_markdown, thresholds_table,
    )

    curves = read_curves(args.inputs)
    if args.all_out:
        write_text_atomic(args.all_out, curves.to_csv(index=False))
    summary = summarise_curves(curves)
    paper = read_paper(args.paper) if args.paper else None
    thresholds = thresholds_table(summary, paper, args.tolerances or list(TOLERANCES))
    comparison = compare_at(summary, paper, args.compare_at or list(COMPARE_AT))
    write_text_atomic(args.curves_out, summary.to_csv(index=False))
    if args.thresholds_out:
        write_text_atomic(args.thresholds_out, thresholds.to_csv(index=False))
    if args.thresholds_md:
        write_text_atomic(args.thresholds_md, thresholds_markdown(thresholds, comparison))
    if args.thresholds_tex:
        write_text_atomic(args.thresholds_tex, thresholds_latex(thresholds))
    if args.comparison_out:
        write_text_atomic(args.comparison_out, comparison.to_csv(index=False))
    log.info("%d networks' curves summarised -> %s", summary["n_runs"].max(), args.curves_out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``prune`` and ``prune-summary`` to the ``ewcstab`` command line."""
    p = sub.add_parser(
        "prune",
        help="train one network on MNIST and write its accuracy-vs-sparsity curves (CSV + JSON metadata)",
        description="Paper section 4: train the network on plain MNIST, compute each importance, prune "
        "globally and per layer at sparsities 0, step, ..., 1 and record the test accuracy. Writes a tidy CSV "
        "(arch, importance_data, seed, importance, scope, sparsity, n_pruned, accuracy) and NAME.json beside it "
        "(config, timings, provenance). Example: ewcstab prune --arch mlp --seed 0 --importance-data test "
        "--out results/pruning/mlp/test/seed0.csv",
    )
    p.add_argument("--arch", help="architecture (default mlp, the paper's 784-300-150-10)")
    p.add_argument("--seed", type=int, help="initialisation and data-order seed (default 0)")
    p.add_argument("--importance-data", metavar="{test,heldout}",
                   help="test: importances on the MNIST test set (paper, default); heldout: on the last "
                   "--heldout-size training images, left out of training. SI always uses its training path")
    p.add_argument("--heldout-size", type=int, help="held-out training images for --importance-data heldout (10000)")
    p.add_argument("--importances", nargs="+", metavar="NAME",
                   help="importances to prune by: magnitude, fisher, mas, si, signal (default: all five)")
    p.add_argument("--scopes", nargs="+", metavar="{global,per_layer}", help="global and/or per_layer (default both)")
    p.add_argument("--sparsity-step", type=float, help="grid step of the sparsity levels (default 0.001: 1001 levels)")
    p.add_argument("--epochs", type=int, help="training epochs (paper: 6)")
    p.add_argument("--batch-size", type=int, help="training batch (paper: 100)")
    p.add_argument("--lr", type=float, help="Adam learning rate (paper: 1e-3)")
    p.add_argument("--fisher-label", choices=("true", "predicted"), help="label of the Fisher (paper: true)")
    p.add_argument("--train-subset", type=int, help="train on the first N training images (quick runs)")
    p.add_argument("--test-subset", type=int, help="evaluate on the first N test images (quick runs)")
    p.add_argument("--curve-method", metavar="{auto,fast,direct}",
                   help="auto (fast incremental evaluator for nn.Linear chains, else direct; default), fast, direct")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--data-root", help="torchvision data folder (default: $EWCSTAB_DATA, else ./data)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--out", required=True, metavar="FILE.csv", help="curve table to write (atomic)")
    p.add_argument("--meta-out", metavar="FILE.json", help="metadata record (default: --out with suffix .json)")
    p.add_argument("--no-progress", action="store_true", help="no training progress bar")
    p.set_defaults(func=cmd_prune)

    s = sub.add_parser(
        "prune-summary",
        help="mean pruning curves over networks, sparsity thresholds, and the paper beside ours",
        description="Reads the CSVs of `ewcstab prune`, writes the mean curve with 95%% half-widths per "
        "(arch, importance data, importance, scope, sparsity), the threshold table (largest sparsity at which "
        "the mean accuracy stays within each tolerance of the unpruned network) with the paper's thresholds "
        "computed the same way over the sparsities its table lists, and a markdown report.",
    )
    s.add_argument("--inputs", nargs="+", required=True, metavar="CSV", help="per-network curve tables")
    s.add_argument("--curves-out", required=True, metavar="CSV", help="mean curves to write")
    s.add_argument("--all-out", metavar="CSV", help="every network's curves in one tidy table")
    s.add_argument("--thresholds-out", metavar="CSV", help="threshold table to write")
    s.add_argument("--thresholds-md", metavar="MD", help="markdown report (thresholds and selected sparsities)")
    s.add_argument("--thresholds-tex", metavar="TEX", help="the threshold table in LaTeX (booktabs)")
    s.add_argument("--comparison-out", metavar="CSV", help="accuracy at --compare-at sparsities, ours and the paper's")
    s.add_argument("--paper", metavar="CSV", help="the paper's pruning table (paper_pruning.csv) to compare with")
    s.add_argument("--tolerances", nargs="+", type=float,
                   help="absolute accuracy drops for the thresholds (default 0.01 0.05)")
    s.add_argument("--compare-at", nargs="+", type=float,
                   help="sparsities for the side-by-side accuracy table (default 0.5 0.7 0.8 0.9 0.95)")
    s.set_defaults(func=cmd_prune_summary)
