"""``ewcstab benchmark``: time the paper's full protocol, per task, training and importance apart.

Runs the real protocol (default: MLP, permuted MNIST, 10 tasks, 6 epochs, 60,000 samples)
once per listed method and prints seconds per task and runs per hour. Timings, not a test:
the numbers depend on the machine and on what else it is doing. ``--path textbook`` times the
same runs with the textbook training step instead (``ewcstab.textbook``: autograd penalty, default
Adam, a host sync per step), the reference the single-run path is measured against; ``--path
autograd`` times ``run_sequence``, ``--path stacked`` (default) what ``ewcstab run`` uses.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from ewcstab.cli import add_run_arguments, config_from_args


def benchmark(args: argparse.Namespace) -> dict[str, object]:
    from ewcstab.textbook import textbook_path
    from ewcstab.train import execute

    rows = {}
    for method in args.methods:
        cfg = config_from_args(args).replace(method=method, lam=args.lam if args.lam is not None else 1.0)
        start = time.perf_counter()
        with textbook_path() if args.path == "textbook" else contextlib.nullcontext():
            rec = execute(cfg, progress=False, engine="stacked" if args.path == "stacked" else "autograd")
        wall = time.perf_counter() - start
        train, imp = rec["train_seconds"], rec["importance_seconds"]
        rows[method] = {
            "train_seconds_per_task": train,
            "importance_seconds_per_task": imp,
            "train_seconds": sum(train),
            "importance_seconds": sum(imp),
            "run_seconds": sum(train) + sum(imp),
            "wall_seconds_with_data_loading": wall,
            "runs_per_hour": 3600.0 / (sum(train) + sum(imp)),
            "final_mean_acc": rec["final_mean_acc"],
        }
        print(
            f"{method:>7}: train {sum(train):6.1f} s ({max(train):.2f} s/task max), importance "
            f"{sum(imp):6.3f} s ({max(imp, default=0):.3f} s/task max), {rows[method]['runs_per_hour']:.0f} runs/h, "
            f"final mean acc {rec['final_mean_acc']}",
            flush=True,
        )
    return {"threads": torch.get_num_threads(), "device": rec["provenance"]["device"], "path": args.path,
            "methods": rows}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="time the full protocol per task (training and importance apart)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--methods", nargs="+", default=["fisher", "mas", "si", "signal"], help="methods to time")
    p.add_argument("--path", choices=("stacked", "autograd", "textbook"), default="stacked",
                   help="stacked: ewcstab run's default engine; autograd: run_sequence; textbook: the reference "
                        "step (ewcstab.textbook, swapped into run_sequence)")
    p.add_argument("--json", metavar="FILE", help="also write the timings as JSON")

    def run(args: argparse.Namespace) -> int:
        result = benchmark(args)
        if args.json:
            from ewcstab.io import write_json_atomic

            write_json_atomic(args.json, result)
        return 0

    p.set_defaults(func=run)
