"""The paper's MLP for permuted MNIST: 784-300-150-10, leaky ReLU (slope 0.01), no output activation."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.01


class StackedLinear(torch.autograd.Function):
    """z = h W^T + b for R runs at once: h (R, B, in), W (R, out, in), b (R, out) -> z (R, B, out), one
    ``baddbmm``. The backward is written out so that every product keeps the fast layout: dW = dz^T h comes out
    as a contiguous (R, out, in) tensor (autograd's transpose of h^T dz would not be: torch's fused CPU Adam
    needs contiguous gradients, and the copy costs more than the product saves), db = sum_B dz, dh = dz W."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(h, w)
        return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, dz: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        h, w = ctx.saved_tensors
        dh = torch.bmm(dz, w) if ctx.needs_input_grad[0] else None  # (R, B, in)
        dw = torch.bmm(dz.transpose(1, 2), h) if ctx.needs_input_grad[1] else None  # (R, out, in)
        db = dz.sum(1) if ctx.needs_input_grad[2] else None  # (R, out)
        return dh, dw, db


class MLP(nn.Module):
    """784 -> 300 -> 150 -> 10; 282,160 parameters (docs/protocol.md)."""

    def __init__(self, sizes: tuple[int, ...] = (784, 300, 150, 10)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        for layer in self.layers[:-1]:
            h = F.leaky_relu(layer(h), LEAKY_SLOPE)
        return self.layers[-1](h)  # logits (B, 10)

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor, shared: bool) -> Tensor:
        """``forward`` of R networks at once (``ewcstab.stacking``), as batched matrix products:
        z_l = a_{l-1} W_l^T + b_l for every run, one ``StackedLinear`` (a ``baddbmm``) per layer.

        params: name -> (R, *shape); x: (R, B, 1, 28, 28) per run, or (B, 1, 28, 28) with ``shared``.
        Returns the logits (R, B, 10). Equal to ``forward`` run by run (tests/test_models.py); on a CPU
        about 1.2x faster than vmap over ``functional_call`` at the paper's batch of 100.
        """
        runs = params["layers.0.weight"].shape[0]
        h = x.flatten(1).expand(runs, -1, -1) if shared else x.flatten(2)  # (R, B, 784); shared: stride 0
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]  # (R, out, in), (R, out)
            h = StackedLinear.apply(h, w, b)  # (R, B, out)
            if i < last:
                h = F.leaky_relu(h, LEAKY_SLOPE)
        return h

    def signal_activations(self) -> dict[str, object]:
        """Nonlinearity applied to each linear layer's output, for the signal importance.

        The last layer's output is taken after softmax (docs/protocol.md, 'signal').
        """
        acts: dict[str, object] = {
            f"layers.{i}": (lambda z: F.leaky_relu(z, LEAKY_SLOPE)) for i in range(len(self.layers) - 1)
        }
        acts[f"layers.{len(self.layers) - 1}"] = lambda z: z.softmax(-1)
        return acts
