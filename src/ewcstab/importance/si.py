"""Synaptic Intelligence (Zenke et al. 2017), as in docs/protocol.md 'si'.

During a task, at every optimizer step, accumulate w_i += -g_i * delta_theta_i, where g
is the gradient of the full loss (task loss plus penalty) and delta_theta the change
the optimizer actually made. At the task's end,

    Omega_i = w_i / ((theta_end_i - theta_start_i)^2 + xi),   xi = 0.1 (paper),

with theta_start the parameters when the task began (the anchor). Every tensor is stacked over runs,
(R, *shape), and every update is element-wise, so each run accumulates its own path integral.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ewcstab.interfaces import Networks


class SI:
    name = "si"

    def __init__(self, xi: float = 0.1) -> None:
        self.xi = xi
        self._start: list[Tensor] = []
        self._accum: list[Tensor] = []
        self._old: list[Tensor] = []
        self._grads: list[Tensor] = []

    def begin_task(self, params: list[Tensor]) -> None:
        self._start = [p.detach().clone() for p in params]
        self._accum = [torch.zeros_like(p) for p in self._start]
        self._old = [p.clone() for p in self._start]
        self._grads = [torch.zeros_like(p) for p in self._start]

    def before_step(self, params: list[Tensor], grads: list[Tensor]) -> None:
        # Copies, not references: gradient clipping may rescale the grads in place
        # afterwards, and g is the gradient of the loss, not the clipped step direction.
        for old, p, keep, g in zip(self._old, params, self._grads, grads):
            old.copy_(p.detach())
            keep.copy_(g)

    def after_step(self, params: list[Tensor]) -> None:
        for old, p, g, w in zip(self._old, params, self._grads, self._accum):
            delta = torch.sub(p.detach(), old, out=old)  # theta after - theta before, in the snapshot's buffer
            w.addcmul_(delta, g, value=-1.0)  # w += -g * delta_theta

    def select(self, keep: Tensor) -> None:
        for state in (self._start, self._accum, self._old, self._grads):
            state[:] = [t.index_select(0, keep) for t in state]

    def end_task(self, runs: Networks, x: Tensor, y: Tensor) -> list[Tensor]:
        return [w / ((p.detach() - s).square() + self.xi) for p, s, w in zip(runs.params, self._start, self._accum)]
