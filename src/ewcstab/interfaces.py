"""Interfaces shared across the package. Imports nothing else from ewcstab.

The training engine only talks to these protocols, so an importance method or a penalty variant is a
plug-in and the engine never asks which one is running (in the spirit of Avalanche's plugins).

Every per-run quantity the engine hands around is *stacked*: one tensor per parameter with a leading
run dimension, (R, *shape), for the R runs trained side by side (R = 1 for a single run). Element-wise
work on stacked tensors never mixes runs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

ParamDict = dict[str, Tensor]


@dataclass(frozen=True)
class Task:
    """One task of a sequence: whole splits as tensors on the training device.

    x: (N, 1, 28, 28) float in [0, 1]; y: (N,) int64.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


class Networks(Protocol):
    """R networks of one architecture with stacked parameters (``ewcstab.stacking.Runs``)."""

    names: list[str]  # parameter names, in the model's order
    params: list[Tensor]  # one (R, *shape) tensor per parameter, in ``names`` order

    @property
    def count(self) -> int: ...

    def network(self, r: int) -> AbstractContextManager[nn.Module]:
        """Run r as an ordinary module (eval mode) holding copies of its parameters and buffers."""
        ...


class Importance(Protocol):
    """Estimates per-parameter importances Omega of every run for one task.

    Offline methods (fisher, mas, signal, magnitude) do all their work in ``end_task``; the online one
    (si) also listens to every optimizer step. ``before_step`` sees the gradients of the full loss (task
    loss plus penalty) just before the optimizer updates the parameters, ``after_step`` just after.
    All tensors are stacked, (R, *shape) per parameter; ``end_task`` returns the same.
    """

    name: str

    def begin_task(self, params: list[Tensor]) -> None: ...

    def before_step(self, params: list[Tensor], grads: list[Tensor]) -> None: ...

    def after_step(self, params: list[Tensor]) -> None: ...

    def select(self, keep: Tensor) -> None:
        """Keep only the runs at positions ``keep`` (1-D long tensor) of any per-run state."""
        ...

    def end_task(self, runs: Networks, x: Tensor, y: Tensor) -> list[Tensor]: ...
