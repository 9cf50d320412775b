"""The textbook EWC training step, kept as the speed reference of ``ewcstab benchmark --path textbook``.

What a straightforward implementation does each step (and what ``ewcstab.train.train_task`` avoids):

- the penalty sum_i c_i (theta_i - theta*_i)^2 is added to the loss and differentiated by autograd,
  which builds and walks a graph of ~4 ops per parameter tensor every step (ours: the gradient
  2 c (theta - theta*) added straight into ``.grad`` with two multi-tensor kernels);
- ``torch.optim.Adam`` with its default implementation (on a CPU the per-tensor loop; ours: fused);
- ``loss.item()`` every step to catch a NaN, i.e. a host-device synchronisation per step (ours: one
  device-side telemetry row per step, read every ``divergence_check_every`` steps).

Same protocol, data order, importances and coefficients as the single-run path (it is swapped into
``ewcstab.train.run_sequence``), so the two train the same runs and only the speed differs (the
numbers agree to rounding, not bitwise: autograd sums the penalty's gradient in another order).
It records no per-step telemetry (its task summaries have zero steps) and is not used for results.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from unittest import mock

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ewcstab import train
from ewcstab.config import RunConfig
from ewcstab.interfaces import Importance, Task
from ewcstab.penalty import QuadraticPenalty


def textbook_optimizer(name: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam / SGD with PyTorch's default implementation choice (no fused or foreach request)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer: {name!r} is not allowed; allowed: adam, sgd")


def textbook_train_task(
    model: nn.Module,
    task: Task,
    task_index: int,
    cfg: RunConfig,
    optimizer: torch.optim.Optimizer,
    penalty: QuadraticPenalty,
    importance: Importance,
    generator: torch.Generator,
    progress: bool = False,
    monitor=None,
    blowup=None,
) -> train.Divergence | None:
    """One task the textbook way (module docstring); ``train.train_task``'s signature and data order."""
    params = list(model.parameters())
    n = task.train_x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    model.train()
    importance.begin_task(model)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=generator).to(task.train_x.device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(task.train_x[idx]), task.train_y[idx])
            if penalty.active:
                loss = loss + sum((c * (p - a) ** 2).sum() for p, a, c in zip(params, penalty.anchor, penalty.coef))
            loss.backward()
            importance.before_step(params, [p.grad for p in params])
            if penalty.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, penalty.clip_norm)
            optimizer.step()
            importance.after_step(params)
            step += 1
            if not math.isfinite(loss.item()):
                return train.Divergence(task_index, (step - 1) // steps_per_epoch + 1, step, "non-finite loss")
    return None


@contextlib.contextmanager
def textbook_path() -> Iterator[None]:
    """Within this context ``ewcstab.train.run_sequence`` trains with the textbook step and optimizer."""
    with mock.patch.object(train, "train_task", textbook_train_task), \
            mock.patch.object(train, "make_optimizer", textbook_optimizer):
        yield


__all__ = ["textbook_optimizer", "textbook_path", "textbook_train_task"]
