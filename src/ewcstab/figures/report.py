"""Pages of the HTML report besides the figures: tables, the configuration used, and provenance.

Snakemake's report shows PNG and HTML results inline (a CSV would only be offered for download),
so every table is rendered here to a small self-contained HTML page. Provenance: every run record
(and every search's best-lambda record) carries a ``provenance`` entry (package versions, git
commit and dirty flag, device, host, data root, sha256 of each data file); ``provenance_table``
turns them into one tidy table, field -> value -> how many records have it, so a mixed-up results
folder (two commits, two versions of a data file) shows up as a field with more than one value.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

CSS = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em; color: #222; }
h1 { font-size: 18px; } p { max-width: 60em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr.warn td { background: #fff3cd; }
pre { background: #f7f7f7; padding: 1em; font-size: 13px; }
"""

PROVENANCE_COLUMNS = ["field", "value", "n_records", "n_with_field", "consistent"]


def page(title: str, intro: str, body: str) -> str:
    """A self-contained HTML page (inline CSS, no scripts, nothing fetched)."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>\n<p>{intro}</p>\n{body}\n</body></html>\n")


def _fmt(value: object, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table_html(df: pd.DataFrame, warn_rows: Iterable[bool] | None = None) -> str:
    """An HTML table of every cell (floats to 4 significant digits, NaN as n/a); rows flagged in
    ``warn_rows`` are highlighted."""
    warn = list(warn_rows) if warn_rows is not None else [False] * len(df)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for flag, (_, r) in zip(warn, df.iterrows()):
        cells = "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.tolist())
        rows.append(f"<tr class='warn'>{cells}</tr>" if flag else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


def _pm(mean: object, half: object) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.4f}" if pd.isna(half) else f"{mean:.4f} ± {half:.4f}"


def table1_view(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as the paper shows it: ours beside the paper's, accuracy ± 95% half-width."""
    return pd.DataFrame({
        "arch": table["arch"], "method": table["method"], "variant": table["variant"],
        "λ ours": [f"{v:.4g}" for v in table["best_lambda"]],
        "λ paper": [_fmt(v) for v in table["paper_best_lambda"]],
        "accuracy ours": [_pm(m, h) for m, h in zip(table["mean_acc_last"], table["ci95_last"])],
        "accuracy paper": [_pm(m, h) for m, h in zip(table["paper_mean_acc_last"], table["paper_ci95_last"])],
        "runs": table["n_runs"], "diverged": table["n_diverged"],
        "λ = 0 ours": [_pm(m, h) for m, h in zip(table["acc_lambda0"], table["ci95_lambda0"])],
        "λ = 0 paper": [_fmt(v) for v in table["paper_acc_lambda0"]],
        "after each task, ours": [str(v).replace(";", ", ") for v in table["mean_acc_after_each_task"]],
        "search": [f"{m}, {n} trials" for m, n in zip(table["search_mode"], table["search_trials"])],
        "note": ["" if pd.isna(v) else v for v in table["paper_note"]],
    })


#: name of a table (results/tables/{name}.csv) -> title, introduction, view. Unknown names: every column.
TABLES = {
    "table1_continual": (
        "Table 1: continual learning, ours beside the paper",
        "Per architecture, importance and penalty variant: the λ chosen by the search, the mean accuracy after the "
        "last task over the final runs ± the 95% half-width t(0.975, n-1)·std/√n (ddof 0, as the paper), diverged "
        "runs, the λ = 0 baseline, and the paper's numbers (20 runs per λ). The quick configuration runs far fewer "
        "tasks, epochs and samples than the paper, so only the paper-scale numbers are comparable.",
        table1_view,
    ),
    "continual_runs": (
        "Every final and baseline run, after every task",
        "The long-format table every continual-learning figure and Table 1 are computed from: one row per run and "
        "task, the mean test accuracy over the tasks learned so far.",
        None,
    ),
    "optimizer_states": (
        "Carried against fresh optimizer state",
        "Per study and for λ = 0: the mean accuracy after the last task of runs that start from the Adam state of "
        "the run before them (carried, as the authors' scripts ran) and of runs with a fresh optimizer, the "
        "difference, Welch's t, and the accuracy after task 1 in each state.",
        None,
    ),
    "sweep_runs": (
        "Accuracy against λ in each optimizer state",
        "Every run of the λ sweeps, after every task: the table the accuracy-versus-λ figure is drawn from.",
        None,
    ),
    "provenance": (
        "Provenance of the results",
        "What produced the run records behind this report: package versions, git commit (and whether the tree had "
        "uncommitted changes), device, host, and the sha256 of every data file, with how many records share each "
        "value. Highlighted rows are fields on which the records disagree.",
        None,
    ),
    "pruning_thresholds": (
        "Pruning: sparsity thresholds, ours beside the paper",
        "The largest sparsity up to which the mean test accuracy stays within each tolerance of the unpruned "
        "network, for every importance and scope.",
        None,
    ),
}


def render_table(csv: str | Path, name: str) -> str:
    """The report page of ``results/tables/{name}.csv``."""
    return render_table_frame(pd.read_csv(csv), name)


def render_table_frame(df: pd.DataFrame, name: str) -> str:
    """The report page of table ``name`` (a key of ``TABLES``, else every column is shown)."""
    title, intro, view = TABLES.get(name, (name, f"The table <code>{html.escape(name)}.csv</code>.", None))
    warn = None
    if name == "provenance" and "consistent" in df:
        warn = ~df["consistent"].astype(bool)
    shown = view(df) if view is not None else df
    return page(title, intro, table_html(shown, warn))


def read_provenance(paths: Iterable[str | Path]) -> dict[str, dict]:
    """source path -> the ``provenance`` entry of its JSON record (records without one are skipped)."""
    out = {}
    for path in paths:
        rec = json.loads(Path(path).read_text())
        if isinstance(rec.get("provenance"), dict):
            out[str(path)] = rec["provenance"]
    return out


def _fields(prov: dict) -> dict[str, str]:
    """Flatten one provenance entry to field -> value (strings)."""
    fields = {}
    git = prov.get("git") or {}
    if "commit" in git:
        fields["git commit"] = str(git["commit"])
    if "dirty" in git:
        fields["git uncommitted changes"] = str(bool(git["dirty"]))
    for name, version in sorted((prov.get("packages") or {}).items()):
        fields[f"package {name}"] = str(version)
    for key in ("device", "host", "data_root"):
        if prov.get(key) is not None:
            fields[key.replace("_", " ")] = str(prov[key])
    for name, sha in sorted((prov.get("data_sha256") or {}).items()):
        fields[f"data sha256 {name}"] = str(sha)
    return fields


def provenance_table(provenance: dict[str, dict]) -> pd.DataFrame:
    """Tidy provenance: one row per (field, value) with the number of records that have that value,
    the number that have the field at all, and whether every such record agrees."""
    counts: dict[str, Counter] = {}
    for prov in provenance.values():
        for field, value in _fields(prov).items():
            counts.setdefault(field, Counter())[value] += 1
    rows = []
    for field in counts:  # insertion order: git, packages, device, host, data
        total = sum(counts[field].values())
        for value, n in sorted(counts[field].items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append((field, value, n, total, len(counts[field]) == 1))
    created = sorted(str(p["created"]) for p in provenance.values() if p.get("created"))
    if created:
        rows.append(("first record created", created[0], len(created), len(created), True))
        rows.append(("last record created", created[-1], len(created), len(created), True))
    return pd.DataFrame(rows, columns=PROVENANCE_COLUMNS)


def provenance_summary(provenance: dict[str, dict]) -> dict[str, object]:
    """JSON summary: record count, the fields on which records disagree, and field -> value -> count."""
    table = provenance_table(provenance)
    fields: dict[str, dict[str, int]] = {}
    for r in table.itertuples():
        fields.setdefault(r.field, {})[r.value] = int(r.n_records)
    return {
        "n_records": len(provenance),
        "inconsistent_fields": sorted(set(table.loc[~table["consistent"], "field"])),
        "fields": fields,
        "sources": sorted(provenance),
    }


def config_page(config: dict, configfiles: Iterable[str] = ()) -> str:
    """The merged configuration the workflow ran with, as YAML, and the files it was merged from."""
    import yaml

    files = ", ".join(f"<code>{html.escape(str(f))}</code>" for f in configfiles) or "n/a"
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
    return page("Configuration used", f"The validated configuration the workflow ran with, merged from {files} "
                "(<code>config/config.yaml</code> first, each <code>--configfile</code> on top); every key is documented "
                "in <code>config/config.yaml</code>.", f"<pre>{html.escape(text)}</pre>")
