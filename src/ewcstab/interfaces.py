"""Interfaces shared across the package. Imports nothing else from ewcstab.

The training loop only talks to these protocols, so an importance method or a
penalty variant is a plug-in and the loop never asks which one is running
(in the spirit of Avalanche's plugins).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

ParamDict = dict[str, Tensor]


@dataclass(frozen=True)
class Task:
    """One task of a sequence: whole splits as tensors on the training device.

    x: (N, 1, 28, 28) float in [0, 1]; y: (N,) int64. ``train_bytes``: for byte images, train_x's
    pixel bytes (train_x == train_bytes.float() / 255 exactly), which the stacked engine gathers
    batches from (a quarter of the memory traffic); None otherwise and on accelerators.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    train_bytes: Tensor | None = None


class Importance(Protocol):
    """Estimates per-parameter importances Omega for one task.

    Offline methods (fisher, mas, signal, magnitude) do all their work in
    ``end_task``; the online one (si) also listens to every optimizer step.
    ``before_step`` sees the gradients of the full loss (task loss plus penalty)
    just before the optimizer updates the parameters, ``after_step`` just after.
    """

    name: str

    def begin_task(self, model: nn.Module) -> None: ...

    def before_step(self, params: list[Tensor], grads: list[Tensor]) -> None: ...

    def after_step(self, params: list[Tensor]) -> None: ...

    def end_task(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict: ...


class Penalty(Protocol):
    """A quadratic pull towards the anchor: sum_i c_i (theta_i - theta*_i)^2."""

    name: str

    def consolidate(self, anchor: ParamDict, omega: ParamDict) -> None: ...

    def add_grad_(self, params: list[Tensor], grads: list[Tensor]) -> None: ...

    def value(self, params: list[Tensor]) -> Tensor: ...
