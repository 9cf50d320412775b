"""EWC's diagonal Fisher (Kirkpatrick et al. 2017), as in docs/protocol.md 'fisher'.

Omega_i = (1/N) sum_n (d log softmax(z_n)[y_n] / d theta_i)^2, one sample at a time.
``label='true'`` (the paper, the 'empirical Fisher') uses the data label;
``label='predicted'`` uses the model's argmax instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ewcstab.importance.base import OfflineImportance
from ewcstab.importance.persample import mean_reduced_sample_grads
from ewcstab.interfaces import ParamDict


def log_likelihood(logits: Tensor, y: Tensor) -> Tensor:
    return logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B,)


class Fisher(OfflineImportance):
    name = "fisher"

    def __init__(self, label: str = "true", backend: str = "auto") -> None:
        if label not in ("true", "predicted"):
            raise ValueError(f"fisher_label: {label!r} is not allowed; allowed: true, predicted")
        self.label = label
        self.backend = backend

    def compute(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
        if self.label == "predicted":
            with torch.no_grad():
                y = torch.cat([model(x[i : i + 2000]).argmax(-1) for i in range(0, x.shape[0], 2000)])
        return mean_reduced_sample_grads(model, x, y, log_likelihood, "square", self.backend)
