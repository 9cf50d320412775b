"""Figures of the reproduction (seaborn on matplotlib) and the report's other pages.

Every figure function takes tidy tables (pandas DataFrames, as the workflow writes them to
``results/``) and returns a matplotlib Figure; ``save_figure`` writes the PNG (report) and PDF.
The workflow calls them from ``workflow/scripts/plot_*.py``, the notebooks directly:

>>> from ewcstab import figures
>>> figures.set_style()
>>> trials = figures.read_trials(figures.find_trials("results"))
>>> fig = figures.plot_lambda_search(trials, runs=pd.read_csv("results/tables/continual_runs.csv"))

Paper sections: 2-3 (continual learning, lambda search) in ``continual``, the gradient-explosion
study (Section 2's claim) in ``explosion``, 4 (pruning) in ``pruning``.
"""

from ewcstab.figures.continual import (
    plot_lambda_search,
    plot_lambda_sweep,
    plot_search_trials,
    plot_state_comparison,
    plot_task_curves,
)
from ewcstab.figures.explosion import plot_explosion_accuracy, plot_explosion_traces
from ewcstab.figures.pruning import plot_pruning_curves
from ewcstab.figures.style import save_figure, set_style
from ewcstab.figures.tables import (
    final_at_best,
    find_trials,
    paper_task_curves,
    pruning_summary,
    read_trials,
    results_dir,
    task_curves,
)

__all__ = [
    "final_at_best", "find_trials", "paper_task_curves", "plot_explosion_accuracy", "plot_explosion_traces",
    "plot_lambda_search", "plot_lambda_sweep", "plot_pruning_curves",
    "plot_search_trials", "plot_state_comparison", "plot_task_curves", "pruning_summary", "read_trials", "results_dir", "save_figure",
    "set_style", "task_curves",
]
