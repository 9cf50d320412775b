"""Weight magnitude |theta|: the classical pruning criterion (docs/protocol.md, pruning only)."""

from __future__ import annotations

from torch import Tensor, nn

from ewcstab.importance.base import OfflineImportance
from ewcstab.interfaces import ParamDict


class Magnitude(OfflineImportance):
    name = "magnitude"

    def compute(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
        return {k: p.detach().abs() for k, p in model.named_parameters()}
