"""The optimizer of R stacked runs: torch's own Adam or SGD update, applied to the stacked parameters.

Adam and SGD are element-wise, so one update over stacked (R, *shape) tensors gives every run exactly the
update it would get alone: each element sees its own gradient and moments; the step count is one per
batch, equal for all its runs. The update is torch's functional form (``torch.optim.adam.adam``, the
function ``torch.optim.Adam.step`` calls; ``torch.optim.sgd.sgd``) on state tensors held here, so the state
of each run can be read out, loaded and sliced without an optimizer's bookkeeping (and without its ~0.1 ms
of Python per step). Adam is torch's fused kernel where the device has one (on CUDA also capturable: its
step count lives on the device and the step can be captured in a CUDA graph), else its foreach kernels.

A run's state (``RunState``: per parameter {"step": float, "exp_avg": Tensor, "exp_avg_sq": Tensor} for
Adam, {} for SGD without momentum) is what a carried chain hands from one run to the next
(``RunConfig.optimizer_state``) and what runs keep when others leave the batch (``select``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.sgd import sgd

#: One run's optimizer state: per parameter, {"step", "exp_avg", "exp_avg_sq"} (Adam) or {} (SGD).
RunState = list[dict[str, Any]]

OPTIMIZERS = ("adam", "sgd")
#: torch.optim.Adam's defaults, which the paper's Adam(lr=1e-3) uses
BETAS, EPS = (0.9, 0.999), 1e-8


class StackedOptimizer:
    """torch's Adam (default hyperparameters but ``lr``) or plain SGD over stacked parameters.

    ``step(params, grads)`` updates the parameters in place (no ``.grad`` needed; no host sync)."""

    def __init__(self, name: str, params: list[Tensor], lr: float) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer: {name!r} is not allowed; allowed: {', '.join(OPTIMIZERS)}")
        self.name, self.lr, self.runs, self.n_params = name, lr, params[0].shape[0], len(params)
        device = params[0].device
        self.capturable = device.type == "cuda"
        self.fused = fused_kernel_runs(device.type)
        if name == "adam":
            self.exp_avg = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
            # one step count per parameter, as torch.optim.Adam keeps it (on the device where capturable)
            step_device = device if self.capturable or self.fused else torch.device("cpu")
            self.steps = [torch.zeros((), dtype=torch.float32, device=step_device) for _ in params]

    def step(self, params: list[Tensor], grads: list[Tensor]) -> None:
        with torch.no_grad():
            flat = [p.detach() for p in params]
            if self.name == "sgd":
                sgd(flat, grads, [None] * len(flat), foreach=True, weight_decay=0.0, momentum=0.0, lr=self.lr,
                    dampening=0.0, nesterov=False, maximize=False)
                return
            adam(flat, grads, self.exp_avg, self.exp_avg_sq, [], self.steps, foreach=not self.fused,
                 fused=self.fused or None, capturable=self.capturable, amsgrad=False, beta1=BETAS[0],
                 beta2=BETAS[1], lr=self.lr, weight_decay=0.0, eps=EPS, maximize=False)

    def run_states(self) -> list[RunState]:
        """Each run's state (copies), in batch order."""
        if self.name == "sgd":
            return [[{} for _ in range(self.n_params)] for _ in range(self.runs)]
        return [[{"step": float(s), "exp_avg": m[r].clone(), "exp_avg_sq": v[r].clone()}
                 for s, m, v in zip(self.steps, self.exp_avg, self.exp_avg_sq)] for r in range(self.runs)]

    def load(self, states: list[RunState]) -> None:
        """Give run r the state ``states[r]`` (every run of a batch must have the same step count)."""
        if len(states) != self.runs:
            raise ValueError(f"{len(states)} optimizer states for {self.runs} runs")
        if self.name == "sgd" or not any(states[0]):
            return  # nothing to load: SGD without momentum keeps no state
        for i, (m, v, s) in enumerate(zip(self.exp_avg, self.exp_avg_sq, self.steps)):
            steps = {float(state[i]["step"]) for state in states}
            if len(steps) != 1:
                raise ValueError(f"optimizer state 'step' differs between the runs of one batch: {sorted(steps)}")
            m.copy_(torch.stack([state[i]["exp_avg"] for state in states]))
            v.copy_(torch.stack([state[i]["exp_avg_sq"] for state in states]))
            s.fill_(steps.pop())

    def select(self, keep: Tensor) -> None:
        """Keep the state of the runs at positions ``keep`` (1-D long tensor), in that order."""
        if self.name == "adam":
            self.exp_avg = [m.index_select(0, keep) for m in self.exp_avg]
            self.exp_avg_sq = [v.index_select(0, keep) for v in self.exp_avg_sq]
        self.runs = int(keep.numel())


@functools.lru_cache(maxsize=None)
def fused_kernel_runs(device_type: str) -> bool:
    """Whether torch's fused Adam kernel runs on this device (CPU and CUDA in current builds)."""
    device = torch.device(device_type)
    try:
        p = torch.zeros(2, device=device)
        adam([p], [torch.ones_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], [],
             [torch.zeros((), device=device)], fused=True, capturable=device.type == "cuda", amsgrad=False,
             beta1=BETAS[0], beta2=BETAS[1], lr=1e-3, weight_decay=0.0, eps=EPS, maximize=False)
        return True
    except (RuntimeError, TypeError):
        return False
