"""LaTeX tables: escaped text, one cell per column in every row, and the same numbers as Markdown.

No TeX is installed here, so the checks are structural (what would break compilation): every
special character escaped, math mode balanced, braces balanced, and each row with as many cells
as the column specification.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from ewcstab import latex

_UNESCAPED = re.compile(r"(?<!\\)[&%#_]")


def _check_text(text: str) -> None:
    """Running text (a cell, a caption): no unescaped special, math mode and braces balanced, ASCII only."""
    assert not _UNESCAPED.search(text), f"unescaped special character: {text}"
    assert len(re.findall(r"(?<!\\)\$", text)) % 2 == 0, f"unbalanced math mode: {text}"
    assert len(re.findall(r"(?<!\\)\{", text)) == len(re.findall(r"(?<!\\)\}", text)), f"unbalanced: {text}"
    assert not re.search(r"[^\x00-\x7f]", text), f"non-ASCII left in LaTeX: {text}"


def check_latex_table(tex: str) -> list[list[str]]:
    """Assert ``tex`` is a well-formed booktabs table; return its rows (header first) as cells."""
    assert tex.count(r"\begin{table}") == 1 and tex.count(r"\end{table}") == 1
    assert r"\caption{" in tex and r"\label{" in tex
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex)
    assert spec, "no tabular column specification"
    body = tex[tex.index(r"\toprule") + len(r"\toprule"):tex.index(r"\bottomrule")]
    rows = []
    for line in body.strip().splitlines():
        if line.strip() == r"\midrule":
            continue
        assert line.endswith(r" \\"), line
        cells = re.split(r"(?<!\\)&", line[: -len(r" \\")])
        assert len(cells) == len(spec.group(1)), f"{len(cells)} cells for {spec.group(1)!r}: {line}"
        for cell in cells:
            _check_text(cell)
        rows.append([c.strip() for c in cells])
    for line in tex[: tex.index(r"\toprule")].splitlines() + tex[tex.index(r"\bottomrule"):].splitlines():
        if not line.startswith("%"):
            _check_text(line.replace(r"\\", ""))
    return rows


def test_escape_specials_and_symbols():
    assert latex.escape("a_b & 5% #1 {x} ~ ^") == r"a\_b \& 5\% \#1 \{x\} \textasciitilde{} \textasciicircum{}"
    assert latex.escape("\\") == r"\textbackslash{}"  # its braces are not escaped again
    assert latex.escape("0.95 ± 0.01") == r"0.95 $\pm$ 0.01"
    assert latex.escape("max ‖g‖, max κ, λ ≥ 1") == r"max $\lVert g \rVert$, max $\kappa$, $\lambda$ $\geq$ 1"
    assert latex.escape(np.nan) == "" and latex.escape(None) == ""


def test_to_latex_aligns_numbers_right_and_keeps_every_cell():
    display = pd.DataFrame({"method": ["mas", "signal_x"], "acc (95% CI)": ["0.9500 ± 0.0020", "n/a"],
                            "runs": [20, 3], "note": ["", "not in the paper"]})
    tex = latex.to_latex(display, "A caption with 95% and λ", "tab:x", notes="t(0.975, n-1) · std")
    rows = check_latex_table(tex)
    assert re.search(r"\\begin\{tabular\}\{lrrl\}", tex)
    assert rows[0] == ["method", r"acc (95\% CI)", "runs", "note"]
    assert rows[1] == ["mas", r"0.9500 $\pm$ 0.0020", "20", ""]
    assert rows[2][0] == r"signal\_x" and len(rows) == 3
    assert r"\caption{A caption with 95\% and $\lambda$}" in tex and r"\label{tab:x}" in tex
    assert r"\footnotesize t(0.975, n-1) $\cdot$ std" in tex


@pytest.mark.parametrize("broken", [
    "\\begin{table}\\caption{x}\\label{y}\\begin{tabular}{ll}\n\\toprule\na & b & c \\\\\n\\bottomrule\n\\end{table}",
    "\\begin{table}\\caption{x}\\label{y}\\begin{tabular}{ll}\n\\toprule\na_1 & b \\\\\n\\bottomrule\n\\end{table}",
])
def test_checker_catches_broken_tables(broken):
    with pytest.raises(AssertionError):
        check_latex_table(broken)


def test_table1_latex_matches_markdown_numbers():
    from ewcstab.aggregate import to_latex, to_markdown

    common = {"arch": "mlp", "method": "mas", "variant": "original", "best_lambda": 4.5, "n_diverged": 0,
              "paper_best_lambda": 4.5, "paper_mean_acc_last": 0.9553, "paper_ci95_last": 0.0008,
              "paper_acc_lambda0": np.nan, "paper_note": "paper grid has no lambda = 0"}
    table = pd.DataFrame([
        {**common, "optimizer_state": "carried", "n_runs": 3, "mean_acc_last": 0.95523, "ci95_last": 0.0011,
         "acc_lambda0": 0.46, "gap_in_paper_ci": (0.95523 - 0.9553) / 0.0008},
        {**common, "optimizer_state": "fresh", "n_runs": 3, "mean_acc_last": 0.95123, "ci95_last": 0.0021,
         "acc_lambda0": 0.44, "gap_in_paper_ci": (0.95123 - 0.9553) / 0.0008},
    ])
    rows = check_latex_table(to_latex(table))
    line = " & ".join(rows[1])
    assert r"0.9512 $\pm$ 0.0021, 3 runs" in line and r"0.9552 $\pm$ 0.0011, 3 runs" in line
    assert r"0.9553 $\pm$ 0.0008" in rows[1] and "-5.1" in rows[1] and "-0.1" in rows[1]
    markdown = to_markdown(table)
    assert "0.9512 ± 0.0021, 3 runs" in markdown and "ours, carried: acc (95% CI)" in markdown
    assert rows[1][-1] == "paper grid has no lambda = 0" and len(rows[0]) == 14
