"""``ewcstab gather`` (run records -> one long-format CSV) and ``ewcstab table`` (Table 1)."""

from __future__ import annotations

import argparse

from ewcstab.cli.common import (
    add_table_outputs, check_inputs, check_outputs, read_json_input, table_outputs, write_table_outputs,
)
from ewcstab.errors import ConfigError


def cmd_gather(args: argparse.Namespace) -> int:
    roles = (("final", args.final), ("baseline", args.baseline), ("sweep", args.sweep))
    if not any(paths for _, paths in roles):
        raise ConfigError("gather: give run records with --final, --baseline or --sweep")
    check_outputs({"out": args.out})
    import pandas as pd

    from ewcstab.aggregate import gather_records
    from ewcstab.io import write_text_atomic

    # gather_records checks every record (a DataError names a missing, cut-off or misplaced one)
    parts = [gather_records(paths, role) for role, paths in roles if paths]
    write_text_atomic(args.out, pd.concat(parts, ignore_index=True).to_csv(index=False))
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    check_inputs("runs", args.runs, "the CSV of 'ewcstab gather'")
    best = [read_json_input("search", p, "the lambda record (best_lambda JSON) of a study") for p in args.search]
    check_inputs("paper", args.paper, "the paper's reference CSV (paper_continual.csv)")
    check_outputs(table_outputs(args))
    import pandas as pd

    from ewcstab.aggregate import continual_table, to_latex, to_markdown

    paper = pd.read_csv(args.paper) if args.paper else None
    table = continual_table(pd.read_csv(args.runs), best, paper)
    write_table_outputs(args, table.to_csv(index=False), to_markdown(table), lambda: to_latex(table))
    return 0


def cmd_compare_states(args: argparse.Namespace) -> int:
    check_inputs("runs", args.runs, "the CSV of 'ewcstab gather'")
    check_outputs({"csv-out": args.csv_out, "md-out": args.md_out})
    import pandas as pd

    from ewcstab.aggregate import state_comparison, state_comparison_markdown
    from ewcstab.io import write_text_atomic

    table = state_comparison(pd.read_csv(args.runs))
    if table.empty:
        raise ConfigError(f"runs: {args.runs!r} holds no setting trained in both optimizer states (carried, fresh)")
    write_text_atomic(args.csv_out, table.to_csv(index=False))
    write_text_atomic(args.md_out, state_comparison_markdown(table))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("gather", help="run records (JSON) -> one long-format CSV")
    g.add_argument("--final", nargs="*", default=[], help="run records of the final runs")
    g.add_argument("--baseline", nargs="*", default=[], help="run records of the lambda = 0 baselines")
    g.add_argument("--sweep", nargs="*", default=[], help="run records of lambda sweeps")
    g.add_argument("--out", required=True, help="CSV, one row per run and task")
    g.set_defaults(func=cmd_gather)
    t = sub.add_parser("table", help="Table 1: best lambda and accuracy per (arch, method, variant), paper beside")
    t.add_argument("--runs", required=True, help="CSV written by 'ewcstab gather'")
    t.add_argument("--search", nargs="+", required=True, help="best_lambda JSON of each search")
    t.add_argument("--paper", help="the paper's reference CSV (paper_continual.csv)")
    add_table_outputs(t)
    t.set_defaults(func=cmd_table)
    c = sub.add_parser("compare-states", help="carried against fresh optimizer state per study: means, Welch t, "
                       "accuracy after task 1, by where the inherited state came from")
    c.add_argument("--runs", required=True, help="CSV written by 'ewcstab gather'")
    c.add_argument("--csv-out", required=True, help="the comparison (CSV)")
    c.add_argument("--md-out", required=True, help="the same in Markdown")
    c.set_defaults(func=cmd_compare_states)
