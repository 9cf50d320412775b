"""Carried against fresh optimizer state: the comparison table the workflow writes beside Table 1."""

from __future__ import annotations

import pandas as pd
import pytest
from scipy import stats

from ewcstab.aggregate import state_comparison, state_comparison_markdown


def runs_table() -> pd.DataFrame:
    """Two tasks; mas original at 4.5 in both states (carried: positions 1, 2, 1, 2), and lambda = 0."""
    rows = []
    finals = {"carried": [0.955, 0.957, 0.954, 0.956], "fresh": [0.949, 0.950, 0.948, 0.951]}
    for state, values in finals.items():
        for seed, acc in enumerate(values):
            for t, mean in ((1, 0.979 if state == "carried" else 0.977), (2, acc)):
                rows.append({"arch": "mlp", "role": "final", "method": "mas", "variant": "original", "lam": 4.5,
                             "seed": seed, "optimizer_state": state, "after_task": t, "n_tasks": 2,
                             "mean_acc": mean, "diverged": False,
                             "chain_position": seed % 2 + 1 if state == "carried" else None})
    for state, acc in (("carried", 0.47), ("fresh", 0.46)):
        for seed in range(2):
            rows.append({"arch": "mlp", "role": "baseline", "method": "mas", "variant": "original", "lam": 0.0,
                         "seed": seed, "optimizer_state": state, "after_task": 2, "n_tasks": 2,
                         "mean_acc": acc + 0.01 * seed, "diverged": False, "chain_position": None})
    return pd.DataFrame(rows)


def test_state_comparison_has_means_welch_t_task1_and_chain_positions():
    table = state_comparison(runs_table())
    assert list(table["method"]) == ["mas", "lambda = 0"]
    mas = table.iloc[0]
    assert mas["acc_carried"] == pytest.approx(0.9555) and mas["acc_fresh"] == pytest.approx(0.9495)
    assert mas["diff"] == pytest.approx(0.006)
    want = stats.ttest_ind([0.955, 0.957, 0.954, 0.956], [0.949, 0.950, 0.948, 0.951], equal_var=False)
    assert (mas["t"], mas["p"]) == pytest.approx((want.statistic, want.pvalue))
    assert (mas["task1_carried"], mas["task1_fresh"]) == pytest.approx((0.979, 0.977))
    assert mas["carried_from_donor"] == pytest.approx((0.955 + 0.954) / 2)
    assert mas["carried_from_counted"] == pytest.approx((0.957 + 0.956) / 2)
    markdown = state_comparison_markdown(table)
    assert "0.9555 ± " in markdown and "+0.0060" in markdown and "lambda = 0" in markdown


def test_nothing_to_compare_with_one_state():
    runs = runs_table()
    assert state_comparison(runs[runs["optimizer_state"] == "fresh"]).empty
