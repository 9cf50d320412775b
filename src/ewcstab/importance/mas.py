"""Memory Aware Synapses (Aljundi et al. 2018), as in docs/protocol.md 'mas'.

Omega_i = (1/N) sum_n |d ||softmax(z_n)||_2^2 / d theta_i|, one sample at a time; no label needed.
"""

from __future__ import annotations

from torch import Tensor, nn

from ewcstab.importance.base import OfflineImportance
from ewcstab.importance.persample import mean_reduced_sample_grads
from ewcstab.interfaces import ParamDict


def squared_output_norm(logits: Tensor, _y: Tensor) -> Tensor:
    return logits.softmax(-1).square().sum(-1)  # (B,)


class MAS(OfflineImportance):
    name = "mas"

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend

    def compute(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
        return mean_reduced_sample_grads(model, x, y, squared_output_norm, "abs", self.backend)
