"""R networks of one architecture as stacked tensors, and their forward pass.

Every parameter and buffer of the R runs is one tensor with a leading run dimension, (R, *shape), so
the optimizer, the penalty, the importances and the telemetry handle all runs with one op per
parameter, and no op mixes runs. The forward pass of all runs at once is

    model.forward_stacked(params, x, shared)         where the model defines one (the MLP: batched
                                                     matrix products, faster on a CPU than vmap)
    vmap(functional_call(model, (params, buffers), x))   otherwise (torch.func), for any nn.Module

with x either (R, B, ...) (each run its own batch) or (B, ...) (one batch shared by every run: the test
sets). Training-mode BatchNorm updates each run's running statistics in place, in its own slice of the
stacked buffers. The model's own ``forward`` and ``forward_stacked`` are tested equal.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ewcstab.interfaces import ParamDict

#: (params name -> (R, *shape), x, shared) -> logits (R, B, C): a model's own stacked forward (module doc)
StackedForward = Callable[[ParamDict, Tensor, bool], Tensor]


class Runs:
    """The parameters (leaf tensors, (R, *shape) each) and buffers of R networks, and their forward."""

    def __init__(self, models: list[nn.Module], device: torch.device) -> None:
        if not models:
            raise ValueError("Runs needs at least one model")
        self.device = device
        self.names = [k for k, _ in models[0].named_parameters()]
        params, buffers = stack_module_state(models)  # name -> (R, *shape)
        self.params = [params[k].detach().to(device).requires_grad_() for k in self.names]
        self.buffers: ParamDict = {k: v.detach().to(device) for k, v in buffers.items()}
        # the structure only (parameters on the meta device): what functional_call runs
        self._template = copy.deepcopy(models[0]).to("meta")
        self._stacked: StackedForward | None = getattr(self._template, "forward_stacked", None)
        self._scratch: nn.Module | None = None  # a real module for ``network(r)``, made when first asked

    @property
    def count(self) -> int:
        return self.params[0].shape[0]

    @property
    def forward_kind(self) -> str:
        """"stacked" (the model's own batched forward) or "vmap" (torch.func over functional_call)."""
        return "vmap" if self._stacked is None or self.buffers else "stacked"

    def named(self, tensors: list[Tensor] | None = None) -> ParamDict:
        return dict(zip(self.names, self.params if tensors is None else tensors))

    def logits(self, x: Tensor, train: bool, shared: bool = False, params: list[Tensor] | None = None,
               buffers: ParamDict | None = None) -> Tensor:
        """(R, B, C) logits of every run. x: (R, B, ...) per-run batches, or with ``shared`` (B, ...), one
        batch for every run. ``params``/``buffers``: stacked tensors of a subset of runs (default: all)."""
        params = self.params if params is None else params
        buffers = self.buffers if buffers is None else buffers
        self._template.train(train)
        if self.forward_kind == "stacked":
            return self._stacked(self.named(params), x, shared)

        def one(p: ParamDict, b: ParamDict, xi: Tensor) -> Tensor:
            return functional_call(self._template, (p, b), (xi,))

        return vmap(one, in_dims=(0, 0, None if shared else 0), randomness="error")(self.named(params), buffers, x)

    def select(self, keep: Tensor) -> None:
        """Keep the runs at positions ``keep`` (1-D long tensor), in that order: new leaf tensors."""
        self.params = [p.detach().index_select(0, keep).requires_grad_() for p in self.params]
        self.buffers = {k: v.index_select(0, keep) for k, v in self.buffers.items()}

    def state_of(self, r: int) -> ParamDict:
        """Run r's parameters and buffers as a model's state dict (copies)."""
        return {**{k: p[r].detach().clone() for k, p in zip(self.names, self.params)},
                **{k: v[r].clone() for k, v in self.buffers.items()}}

    @contextmanager
    def network(self, r: int) -> Iterator[nn.Module]:
        """Run r as an ordinary module in eval mode, holding copies of its parameters and buffers (for the
        per-network importance formulas and pruning). Changes to it do not reach the stacked runs."""
        if self._scratch is None:
            self._scratch = copy.deepcopy(self._template).to_empty(device=self.device)
        self._scratch.load_state_dict(self.state_of(r))
        self._scratch.eval()
        yield self._scratch
