"""Importance registry: config name -> estimator.

Every estimator follows ``ewcstab.interfaces.Importance``: ``end_task`` returns the importances of every
run of a stack, (R, *shape) per parameter; SI additionally listens to each optimizer step. The offline
estimators (``OfflineImportance``) hold the formula for one network in ``compute(model, x, y)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ewcstab.importance.fisher import Fisher
from ewcstab.importance.magnitude import Magnitude
from ewcstab.importance.mas import MAS
from ewcstab.importance.si import SI
from ewcstab.importance.signal import Signal
from ewcstab.interfaces import Importance, ParamDict

REGISTRY: dict[str, Callable[..., Importance]] = {
    "fisher": Fisher,
    "mas": MAS,
    "si": SI,
    "signal": Signal,
    "magnitude": Magnitude,
}


def build_importance(name: str, **options: Any) -> Importance:
    """Build an estimator by name; options are the estimator's own keyword arguments."""
    try:
        factory = REGISTRY[name]
    except KeyError:
        raise ValueError(f"method: {name!r} is not allowed; allowed: {', '.join(REGISTRY)}") from None
    return factory(**options)


def network_importance(estimator: Importance, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
    """An offline estimator's importances of one ordinary module (a stack of one run holding a copy of it):
    name -> tensor of the parameter's shape. The module itself is not changed."""
    from ewcstab.stacking import Runs

    runs = Runs([model], next(model.parameters()).device)
    return {k: v[0] for k, v in zip(runs.names, estimator.end_task(runs, x, y))}


__all__ = ["REGISTRY", "build_importance", "network_importance", "Fisher", "MAS", "SI", "Signal", "Magnitude"]
