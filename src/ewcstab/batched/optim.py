"""The optimizer of R stacked runs: torch's own update kernels, called straight on the flat buffers.

``torch.optim.Adam(fused=True).step()`` spends more time in Python (grouping the tensors, checking
them, incrementing one step tensor per parameter) than the paper's MLP takes in its kernel. The runs of
a batch always step together, so their state is three flat buffers (m, v like ``stack.Layout``) and one
step counter, and a step is one call of the very kernel ``Adam.step`` ends in (``torch._fused_adam_``
over the per-(parameter, run) views ``Layout.tensors``, with the same arguments): bitwise the same
update, without the bookkeeping. SGD (the paper does not use it; ``optimizer: sgd``) likewise calls
``torch._foreach_add_`` as ``torch.optim.SGD(foreach=True)`` does without momentum.

Where the native passes run (``native.py``) and nothing rescales the gradient between the penalty and the
update (no clipping), ``StackedAdam.native_step`` does the penalty gradient, the telemetry norms, this same
update and SI's path integral in one pass over the buffers (``native.NativeGradient.adam_step``, checked
bitwise against ``torch._fused_adam_`` by ``native.adam_width``).

Dropping runs (divergence, pruning) keeps the others' moments: ``select``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ewcstab.batched.native import NativeGradient
from ewcstab.batched.stack import Layout

#: torch.optim.Adam's defaults, which the protocol uses (PROTOCOL.md: Adam, learning rate 1e-3)
BETAS, EPS = (0.9, 0.999), 1e-8


class StackedAdam:
    def __init__(self, layout: Layout, theta: Tensor, grad: Tensor, lr: float) -> None:
        self.lr = lr
        self.exp_avg = torch.zeros_like(theta)
        self.exp_avg_sq = torch.zeros_like(theta)
        self.count = 0  # steps taken: every run steps together
        # a float32 tensor, as Adam(fused=True) keeps it: torch's kernel reads the step from it
        self.state_step = torch.zeros((), dtype=torch.float32, device=theta.device)
        self.bind(layout, theta, grad)

    def bind(self, layout: Layout, theta: Tensor, grad: Tensor) -> None:
        self.theta, self.grad = theta, grad
        self._lists = [layout.tensors(b) for b in (theta, grad, self.exp_avg, self.exp_avg_sq)]
        self._steps = [self.state_step] * len(self._lists[0])  # one counter: every run steps together

    def step(self) -> None:
        self.count += 1
        self.state_step.fill_(self.count)
        torch._fused_adam_(*self._lists, [], self._steps, lr=self.lr, beta1=BETAS[0], beta2=BETAS[1],
                           weight_decay=0.0, eps=EPS, amsgrad=False, maximize=False)

    def native_step(self, passes: NativeGradient, anchor: Tensor | None, twice_coef: Tensor | None,
                    accum: Tensor | None) -> Tensor:
        """``step`` on the task gradient plus the penalty gradient 2 c (theta - anchor) (when given), SI's path
        integral into ``accum`` (when given), in one native pass; returns the (R, 3) telemetry norms (task,
        penalty, full gradient). The gradient buffer keeps the task gradient."""
        self.count += 1
        return passes.adam_step(self.grad, self.theta, self.exp_avg, self.exp_avg_sq, anchor, twice_coef, accum,
                                self.lr, BETAS, EPS, self.count)

    def select(self, old: Layout, keep: Tensor, theta: Tensor, grad: Tensor) -> None:
        """Keep the runs at positions ``keep`` (their moments); ``theta``/``grad``: the new buffers."""
        self.exp_avg = old.select(self.exp_avg, keep)
        self.exp_avg_sq = old.select(self.exp_avg_sq, keep)
        self.bind(old.with_runs(int(keep.numel())), theta, grad)


class StackedSGD:
    def __init__(self, layout: Layout, theta: Tensor, grad: Tensor, lr: float) -> None:
        self.lr = lr
        self.bind(layout, theta, grad)

    def bind(self, layout: Layout, theta: Tensor, grad: Tensor) -> None:
        self._params, self._grads = layout.tensors(theta), layout.tensors(grad)

    def step(self) -> None:
        torch._foreach_add_(self._params, self._grads, alpha=-self.lr)

    def select(self, old: Layout, keep: Tensor, theta: Tensor, grad: Tensor) -> None:
        self.bind(old.with_runs(int(keep.numel())), theta, grad)


def make_stacked_optimizer(
    name: str, layout: Layout, theta: Tensor, grad: Tensor, lr: float
) -> StackedAdam | StackedSGD:
    if name == "adam":
        return StackedAdam(layout, theta, grad, lr)
    if name == "sgd":
        return StackedSGD(layout, theta, grad, lr)
    raise ValueError(f"optimizer: {name!r} is not allowed; allowed: adam, sgd")
