"""Importance registry: config name -> estimator.

Every estimator follows ``ewcstab.interfaces.Importance``: ``end_task`` returns a
dict parameter-name -> tensor; SI additionally listens to each optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ewcstab.importance.fisher import Fisher
from ewcstab.importance.magnitude import Magnitude
from ewcstab.importance.mas import MAS
from ewcstab.importance.si import SI
from ewcstab.importance.signal import Signal
from ewcstab.interfaces import Importance

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


__all__ = ["REGISTRY", "build_importance", "Fisher", "MAS", "SI", "Signal", "Magnitude"]
