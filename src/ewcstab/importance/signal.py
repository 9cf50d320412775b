"""Total absolute signal (the first author's earlier importance), PROTOCOL.md 'signal'.

For a linear layer with input x (B, in), weight W (out, in) and output after its
nonlinearity a = act(W x + b) (after softmax for the last layer):

    Omega(W[o, i]) = |W[o, i]| * mean_n |x_n,i|
    Omega(b[o])    = mean_n |a_n,o|

The model names each linear layer's nonlinearity through ``signal_activations()``
(module name -> callable on the pre-activation). Every parameter must be covered:
a parameter outside those layers is an error, not a silent zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ewcstab.importance.base import OfflineImportance
from ewcstab.interfaces import ParamDict


class Signal(OfflineImportance):
    name = "signal"

    def __init__(self, chunk_size: int = 10_000) -> None:
        self.chunk_size = chunk_size

    def compute(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
        if not hasattr(model, "signal_activations"):
            raise ValueError(f"{type(model).__name__} does not define signal_activations(); signal importance needs it")
        acts = model.signal_activations()
        modules = dict(model.named_modules())
        layers = {name: modules[name] for name in acts}
        covered = {f"{name}.{p}" for name, m in layers.items() for p, _ in m.named_parameters(recurse=False)}
        missing = sorted({k for k, _ in model.named_parameters()} - covered)
        if missing:
            raise ValueError(f"signal importance has no rule for parameters {missing}")

        in_sum = {name: torch.zeros(m.in_features, device=x.device) for name, m in layers.items()}
        out_sum = {name: torch.zeros(m.out_features, device=x.device) for name, m in layers.items()}

        def make_hook(name: str):
            def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                in_sum[name] += inputs[0].abs().reshape(-1, inputs[0].shape[-1]).sum(0)
                out_sum[name] += acts[name](output).abs().reshape(-1, output.shape[-1]).sum(0)

            return hook

        handles = [m.register_forward_hook(make_hook(name)) for name, m in layers.items()]
        try:
            with torch.no_grad():
                for start in range(0, x.shape[0], self.chunk_size):
                    model(x[start : start + self.chunk_size])
        finally:
            for h in handles:
                h.remove()

        n = x.shape[0]
        omega: ParamDict = {}
        for name, m in layers.items():
            omega[f"{name}.weight"] = m.weight.detach().abs() * (in_sum[name] / n)  # (out, in) * (in,)
            if m.bias is not None:
                omega[f"{name}.bias"] = out_sum[name] / n
        return omega
