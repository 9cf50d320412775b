"""Pruning by weight importance (Kutalev & Lapina, arXiv:2109.10021, section 4).

- ``ranking``: deterministic ranking and torch.prune masks (global / per_layer scope).
- ``curve``: accuracy at every sparsity 0, 0.001, ..., 1 in one pass (fast for nn.Linear chains).
- ``experiment``: train one network on MNIST, compute the importances, write its curves.
- ``summary``: mean curves over networks, sparsity thresholds, the paper's values beside ours.

The ``ewcstab prune`` and ``ewcstab prune-summary`` commands are in ``ewcstab.cli.prune``.
"""

from ewcstab.pruning.curve import PruningCurve, linear_chain, pruning_curve
from ewcstab.pruning.experiment import (
    CURVE_COLUMNS,
    IMPORTANCE_DATA,
    PRUNING_IMPORTANCES,
    NetworkResult,
    PruneConfig,
    StepObservers,
    prune_network,
    run_pruning_experiment,
    train_network,
    write_curves,
)
from ewcstab.pruning.ranking import (
    SCOPES,
    apply_pruning,
    make_permanent,
    n_to_prune,
    prune_groups,
    pruned_counts,
    pruning_order,
    rank_positions,
    sparsity_levels,
)
from ewcstab.pruning.summary import (
    compare_at,
    read_curves,
    read_paper,
    summarise_curves,
    threshold_sparsity,
    thresholds_markdown,
    thresholds_table,
)

__all__ = [
    "CURVE_COLUMNS", "IMPORTANCE_DATA", "PRUNING_IMPORTANCES", "SCOPES", "NetworkResult", "PruneConfig",
    "PruningCurve", "StepObservers", "apply_pruning", "compare_at", "linear_chain", "make_permanent",
    "n_to_prune", "prune_groups", "prune_network", "pruned_counts", "pruning_curve", "pruning_order",
    "rank_positions", "read_curves", "read_paper", "run_pruning_experiment", "sparsity_levels",
    "summarise_curves", "threshold_sparsity", "thresholds_markdown", "thresholds_table", "train_network",
    "write_curves",
]
