"""Common base for importances computed after a task (all but SI)."""

from __future__ import annotations

from torch import Tensor, nn

from ewcstab.interfaces import ParamDict


class OfflineImportance:
    """An importance that ignores the optimizer steps and works in ``end_task``.

    Subclasses implement ``compute(model, x, y)``; ``end_task`` runs it in eval
    mode (PROTOCOL.md: importances are computed with the model in eval mode).
    """

    name = "offline"

    def begin_task(self, model: nn.Module) -> None:
        pass

    def before_step(self, params: list[Tensor], grads: list[Tensor]) -> None:
        pass

    def after_step(self, params: list[Tensor]) -> None:
        pass

    def end_task(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
        was_training = model.training
        model.eval()
        try:
            return {k: v.detach() for k, v in self.compute(model, x, y).items()}
        finally:
            model.train(was_training)

    def compute(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
        raise NotImplementedError
