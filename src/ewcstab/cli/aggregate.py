"""``ewcstab gather`` (run records -> one long-format CSV) and ``ewcstab table`` (Table 1)."""

from __future__ import annotations

import argparse

from ewcstab.cli.common import check_inputs, check_outputs, read_json_input

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
    check_outputs({"csv-out": args.csv_out, "md-out": args.md_out, "tex-out": args.tex_out})
    import pandas as pd

    from ewcstab.aggregate import continual_table, to_latex, to_markdown
    from ewcstab.io import write_text_atomic

    runs = pd.read_csv(args.runs)
    paper = pd.read_csv(args.paper) if args.paper else None
    table = continual_table(runs, best, paper)
    write_text_atomic(args.csv_out, table.to_csv(index=False))
    write_text_atomic(args.md_out, to_markdown(table))
    if args.tex_out:
        write_text_atomic(args.tex_out, to_latex(table))
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
    t.add_argument("--csv-out", required=True)
    t.add_argument("--md-out", required=True)
    t.add_argument("--tex-out", help="the same table in LaTeX (booktabs)")
    t.set_defaults(func=cmd_table)
