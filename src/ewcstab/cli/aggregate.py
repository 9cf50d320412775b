"""``ewcstab gather`` (run records -> one long-format CSV) and ``ewcstab table`` (Table 1)."""

from __future__ import annotations

import argparse

from ewcstab.cli.common import (
    add_table_outputs, check_inputs, check_outputs, read_json_input, table_outputs, write_table_outputs,
)

RUN_RECORD = "a run record (JSON) of 'ewcstab run'"


def cmd_gather(args: argparse.Namespace) -> int:
    for field, paths in (("final", args.final), ("baseline", args.baseline)):
        for path in paths:
            read_json_input(field, path, RUN_RECORD)
    check_outputs({"out": args.out})
    import pandas as pd

    from ewcstab.aggregate import gather_records
    from ewcstab.io import write_text_atomic

    parts = [gather_records(args.final, "final")]
    if args.baseline:
        parts.append(gather_records(args.baseline, "baseline"))
    write_text_atomic(args.out, pd.concat(parts, ignore_index=True).to_csv(index=False))
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    check_inputs("runs", args.runs, "the CSV of 'ewcstab gather'")
    best = [read_json_input("search", p, "the best_lambda JSON of a search") for p in args.search]
    check_inputs("paper", args.paper, "the paper's reference CSV (paper_continual.csv)")
    check_outputs(table_outputs(args))
    import pandas as pd

    from ewcstab.aggregate import continual_table, to_latex, to_markdown

    paper = pd.read_csv(args.paper) if args.paper else None
    table = continual_table(pd.read_csv(args.runs), best, paper)
    write_table_outputs(args, table.to_csv(index=False), to_markdown(table), lambda: to_latex(table))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("gather", help="run records (JSON) -> one long-format CSV")
    g.add_argument("--final", nargs="+", required=True, help="run records of the final runs")
    g.add_argument("--baseline", nargs="*", default=[], help="run records of the lambda = 0 baselines")
    g.add_argument("--out", required=True, help="CSV, one row per run and task")
    g.set_defaults(func=cmd_gather)
    t = sub.add_parser("table", help="Table 1: best lambda and accuracy per (arch, method, variant), paper beside")
    t.add_argument("--runs", required=True, help="CSV written by 'ewcstab gather'")
    t.add_argument("--search", nargs="+", required=True, help="best_lambda JSON of each search")
    t.add_argument("--paper", help="the paper's reference CSV (paper_continual.csv)")
    add_table_outputs(t)
    t.set_defaults(func=cmd_table)
