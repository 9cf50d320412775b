"""Common base for importances computed after a task (all but SI)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ewcstab.interfaces import Networks, ParamDict


class OfflineImportance:
    """An importance that ignores the optimizer steps and works in ``end_task``.

    Subclasses implement ``compute(model, x, y)``, the formula for one network (an ordinary module in
    eval mode: docs/protocol.md, importances are computed with the model in eval mode); ``end_task``
    applies it to every run of a stack, one network at a time, and stacks the results.
    """

    name = "offline"

    def begin_task(self, params: list[Tensor]) -> None:
        pass

    def before_step(self, params: list[Tensor], grads: list[Tensor]) -> None:
        pass

    def after_step(self, params: list[Tensor]) -> None:
        pass

    def select(self, keep: Tensor) -> None:
        pass

    def end_task(self, runs: Networks, x: Tensor, y: Tensor) -> list[Tensor]:
        per_run = []
        for r in range(runs.count):
            with runs.network(r) as model:
                omega = self.compute(model, x, y)
            per_run.append([omega[k].detach() for k in runs.names])
        return [torch.stack(parts) for parts in zip(*per_run)]  # (R, *shape) per parameter

    def compute(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
        raise NotImplementedError
