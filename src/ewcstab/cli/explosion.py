"""``ewcstab explosion-gather``, ``explosion-summary``, ``explosion-traces``: the gradient-explosion
study's tables (``ewcstab.explosion``)."""

from __future__ import annotations

import argparse

from ewcstab.cli.common import (
    add_table_outputs, check_inputs, check_outputs, read_json_input, table_outputs, write_table_outputs,
)
from ewcstab.errors import ConfigError


def cmd_gather(args: argparse.Namespace) -> int:
    for path in args.records:
        read_json_input("records", path, "a run record (JSON) of 'ewcstab run'")
    check_outputs({"out": args.out})
    from ewcstab.explosion import gather_runs
    from ewcstab.io import write_text_atomic

    write_text_atomic(args.out, gather_runs(args.records).to_csv(index=False))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    check_inputs("runs", args.runs, "the CSV of 'ewcstab explosion-gather'")
    check_outputs(table_outputs(args))
    import pandas as pd

    from ewcstab.explosion import summarize, summary_latex, summary_markdown

    summary = summarize(pd.read_csv(args.runs))
    write_table_outputs(args, summary.to_csv(index=False), summary_markdown(summary), lambda: summary_latex(summary))
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    for path in args.records:
        rec = read_json_input("records", path, "a run record of 'ewcstab run --trace'")
        if not isinstance(rec, dict) or "telemetry_trace" not in rec:
            raise ConfigError(f"records: {path!r} has no telemetry_trace (run it with 'ewcstab run --trace')")
    check_outputs({"out": args.out})
    from ewcstab.explosion import gather_traces
    from ewcstab.io import write_text_atomic

    write_text_atomic(args.out, gather_traces(args.records).to_csv(index=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("explosion-gather", help="gradient-explosion study: run records -> one row per run and task")
    g.add_argument("--records", nargs="+", required=True, help="run records (JSON) of the lambda sweep")
    g.add_argument("--out", required=True, help="CSV (explosion_runs.csv)")
    g.set_defaults(func=cmd_gather)
    s = sub.add_parser("explosion-summary",
                       help="gradient-explosion study: runs, divergences, accuracy ± 95%% CI per lambda")
    s.add_argument("--runs", required=True, help="CSV written by 'ewcstab explosion-gather'")
    add_table_outputs(s)
    s.set_defaults(func=cmd_summary)
    t = sub.add_parser("explosion-traces", help="gradient-explosion study: traced runs -> one row per step")
    t.add_argument("--records", nargs="+", required=True, help="run records made with 'ewcstab run --trace'")
    t.add_argument("--out", required=True, help="CSV (explosion_traces.csv)")
    t.set_defaults(func=cmd_traces)
