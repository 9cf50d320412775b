"""Synaptic Intelligence (Zenke et al. 2017), as in PROTOCOL.md 'si'.

During a task, at every optimizer step, accumulate w_i += -g_i * delta_theta_i, where g
is the gradient of the full loss (task loss plus penalty) and delta_theta the change
the optimizer actually made. At the task's end,

    Omega_i = w_i / ((theta_end_i - theta_start_i)^2 + xi),   xi = 0.1 (paper),

with theta_start the parameters when the task began (the anchor). All updates are
foreach kernels on the parameter list: no per-tensor Python work per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ewcstab.interfaces import ParamDict


class SI:
    name = "si"

    def __init__(self, xi: float = 0.1) -> None:
        self.xi = xi
        self._names: list[str] = []
        self._start: list[Tensor] = []
        self._accum: list[Tensor] = []
        self._old: list[Tensor] = []
        self._grads: list[Tensor] = []

    def begin_task(self, model: nn.Module) -> None:
        named = [(k, p.detach()) for k, p in model.named_parameters()]
        self._names = [k for k, _ in named]
        self._start = [p.clone() for _, p in named]
        self._accum = [torch.zeros_like(p) for _, p in named]
        self._old = [p.clone() for _, p in named]
        self._grads = [torch.zeros_like(p) for _, p in named]

    def before_step(self, params: list[Tensor], grads: list[Tensor]) -> None:
        # Copies, not references: gradient clipping may rescale the grads in place
        # afterwards, and g is the gradient of the loss, not the clipped step direction.
        torch._foreach_copy_(self._old, [p.detach() for p in params])
        torch._foreach_copy_(self._grads, grads)

    def after_step(self, params: list[Tensor]) -> None:
        delta = torch._foreach_sub([p.detach() for p in params], self._old)
        torch._foreach_mul_(delta, self._grads)
        torch._foreach_sub_(self._accum, delta)  # w += -g * delta_theta

    def end_task(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
        end = dict(model.named_parameters())
        return {
            k: w / ((end[k].detach() - s).square() + self.xi)
            for k, s, w in zip(self._names, self._start, self._accum)
        }
