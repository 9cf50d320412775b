"""The optimizer of R stacked runs: torch's own Adam or SGD over the stacked (R, *shape) parameters.

Adam and SGD are element-wise, so one optimizer over stacked tensors gives every run exactly the update
it would get alone (each element sees its own gradient and moments; the step count is shared, and equal
for every run of a batch). Adam is torch's fused kernel where the build has it (``fused=True``; on CUDA
also ``capturable=True``, so the step can be captured in a CUDA graph), else its foreach kernels.

The optimizer state of each run can be read out and loaded back (``run_states`` / ``load_run_states``):
what a carried chain hands from one run to the next (``RunConfig.optimizer_state``), and what survives
when runs leave the batch (``select``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: One run's optimizer state: per parameter, torch's state dict entry for that run
#: (Adam: {"step": float, "exp_avg": Tensor, "exp_avg_sq": Tensor}; SGD without momentum: {}).
RunState = list[dict[str, Any]]


def make_optimizer(name: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """torch's Adam (fused where supported) or SGD over the stacked parameters."""
    if name == "adam":
        capturable = params[0].device.type == "cuda"
        try:
            return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
        except (RuntimeError, TypeError):  # no fused kernel for this device/build
            return torch.optim.Adam(params, lr=lr, foreach=True, capturable=capturable)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=True)
    raise ValueError(f"optimizer: {name!r} is not allowed; allowed: adam, sgd")


def run_states(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[RunState]:
    """Each run's optimizer state (copies), in batch order."""
    runs = params[0].shape[0]
    out: list[RunState] = [[] for _ in range(runs)]
    for p in params:
        state = optimizer.state.get(p, {})
        for r in range(runs):
            out[r].append({k: _run_part(v, p, r) for k, v in state.items()})
    return out


def load_run_states(optimizer: torch.optim.Optimizer, params: list[Tensor], states: list[RunState]) -> None:
    """Give run r the state ``states[r]`` (every run of a batch must have the same Adam step count)."""
    if len(states) != params[0].shape[0]:
        raise ValueError(f"{len(states)} optimizer states for {params[0].shape[0]} runs")
    if not any(states[0]):
        return  # nothing to load (a fresh state, or SGD without momentum)
    packed: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):
        entry: dict[str, Any] = {}
        for key, value in states[0][i].items():
            parts = [s[i][key] for s in states]
            if isinstance(value, Tensor) and value.shape == p.shape[1:]:
                entry[key] = torch.stack(parts).to(p.device)
            else:
                if any(float(v) != float(value) for v in parts):
                    raise ValueError(f"optimizer state {key!r} differs between the runs of one batch: {parts}")
                entry[key] = torch.tensor(float(value))
        packed[i] = entry
    sd = optimizer.state_dict()
    optimizer.load_state_dict({"state": packed, "param_groups": sd["param_groups"]})


def select(optimizer: torch.optim.Optimizer, old: list[Tensor], new: list[Tensor], keep: Tensor,
           lr: float, name: str) -> torch.optim.Optimizer:
    """A new optimizer over ``new`` (the runs of ``old`` at positions ``keep``) that carries on with their
    state."""
    states = run_states(optimizer, old)
    fresh = make_optimizer(name, new, lr)
    load_run_states(fresh, new, [states[i] for i in keep.tolist()])
    return fresh


def _run_part(value: Any, param: Tensor, r: int) -> Any:
    """Run r's part of one optimizer-state entry: a per-element tensor's slice, a step count as a float."""
    if isinstance(value, Tensor) and value.shape == param.shape:
        return value[r].detach().clone()
    if isinstance(value, Tensor):
        return float(value)
    return value
