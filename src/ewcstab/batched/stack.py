"""R runs of the paper's MLP stacked into one set of tensors, with a hand-written forward/backward.

Layout (``Layout``): every per-run state of the batch (parameters, gradients, Adam moments, anchor,
penalty coefficients, importances, SI accumulators) is ONE flat buffer of R * P floats, parameter-major:

    [ layers.0.weight of run 0..R-1 | layers.0.bias of run 0..R-1 | layers.1.weight ... ]

so each parameter's stack is a contiguous (R, *shape) view (batched matrix products can write straight
into it, ``torch.bmm(..., out=view)``), while every element-wise update (penalty, Adam, SI) is one
kernel over the whole buffer. Element-wise ops never mix runs, so stacking them is exact; the only
per-run reductions (gradient norms, clipping) go through ``Layout.norms``.

Forward/backward (``train_step``) for the MLP 784-300-150-10 with leaky ReLU (``ewcstab.models.mlp``),
with x (R, B, 784) each run's own batch:

    z_l = a_{l-1} W_l^T + b_l        torch.baddbmm over R              (R, B, out_l)
    a_l = leaky_relu(z_l, 0.01)      in place (a_l > 0 exactly where z_l > 0, so the backward can use a_l)
    loss_r = mean_b CE(z_L[r, b], y[r, b])
    dL/dz_L, then per layer:  dW_l = delta_l^T a_{l-1} (bmm),  db_l = sum_b delta_l,
                              delta_{l-1} = leaky'(a_{l-1}) * (delta_l W_l)

using the same ATen backward kernels autograd runs for ``F.cross_entropy`` and ``F.leaky_relu``
(``nll_loss_backward``, ``_log_softmax_backward_data``, ``leaky_relu_backward``), so per run the
gradients equal the single-run path's up to the matrix kernels' summation order: bitwise equal where
the batched product runs the same GEMM per run as the single run's ``addmm``/``mm`` (our tests: one
thread, or the paper's batch 100 on two threads), else equal to rounding. As in autograd, no gradient
is formed for the input images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ewcstab.models.mlp import LEAKY_SLOPE, MLP


@dataclass(frozen=True)
class Layout:
    """Where each parameter of each run sits in a flat (R * P,) buffer (parameter-major, see module doc)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    runs: int

    @classmethod
    def of(cls, model: nn.Module, runs: int) -> "Layout":
        named = list(model.named_parameters())
        return cls(tuple(k for k, _ in named), tuple(tuple(p.shape) for _, p in named), runs)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def widths(self) -> tuple[int, ...]:
        """The MLP's layer widths (input, hidden..., classes), from the weights' (out, in) shapes."""
        return (self.shapes[0][1], *(shape[0] for shape in self.shapes[0::2]))

    @property
    def per_run(self) -> int:
        return sum(self.sizes)

    @property
    def numel(self) -> int:
        return self.runs * self.per_run

    def with_runs(self, runs: int) -> "Layout":
        return Layout(self.names, self.shapes, runs)

    def zeros(self, device: torch.device) -> Tensor:
        return torch.zeros(self.numel, device=device)

    def views(self, flat: Tensor) -> list[Tensor]:
        """One (R, *shape) view per parameter, in the model's order."""
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(flat[start : start + self.runs * size].view(self.runs, *shape))
            start += self.runs * size
        return out

    def rows(self, flat: Tensor) -> list[Tensor]:
        """One (R, numel) view per parameter: per-run reductions and scalings."""
        return [v.view(self.runs, -1) for v in self.views(flat)]

    def run_views(self, flat: Tensor, r: int) -> list[Tensor]:
        """Run r's parameters as tensors of the model's shapes (views into ``flat``)."""
        return [v[r] for v in self.views(flat)]

    def stack(self, per_run: list[list[Tensor]], device: torch.device) -> Tensor:
        """Flat buffer from per-run lists of tensors (each in the model's parameter order)."""
        flat = self.zeros(device)
        for k, view in enumerate(self.views(flat)):
            view.copy_(torch.stack([tensors[k].detach() for tensors in per_run]))  # copy_: any source device
        return flat

    def select(self, flat: Tensor, keep: Tensor) -> Tensor:
        """The buffer of the runs at positions ``keep`` (1-D long tensor), in that order."""
        new = self.with_runs(int(keep.numel()))
        out = new.zeros(flat.device)
        for src, dst in zip(self.views(flat), new.views(out)):
            torch.index_select(src, 0, keep, out=dst)
        return out

    def tensors(self, flat: Tensor) -> list[Tensor]:
        """Every (parameter, run) as its own contiguous view, parameter-major: [p0 r0, p0 r1, ..., p1 r0, ...].

        The optimizer and the norms work on these, so that each kernel sees exactly the tensors of the
        single-run path (a fused kernel's vectorised body and scalar tail then fall on the same elements,
        which makes the results bitwise equal, not just equal to rounding)."""
        return [v[r] for v in self.views(flat) for r in range(self.runs)]

    def norms(self, tensors: list[Tensor]) -> Tensor:
        """Per-run L2 norm over all parameters, (R,), of a buffer given as its ``tensors`` views: per-tensor
        norms (``torch._foreach_norm``), then the norm of each run's norms, exactly as
        ``telemetry.total_norm`` and ``clip_grad_norm_`` form it for one run."""
        per_tensor = torch.stack(torch._foreach_norm(tensors))  # (n_params * R,)
        # (R, n_params) contiguous: each run's norms reduced along a contiguous row, as the single run's
        # 1-D stack is (reducing the (n_params, R) view over dim 0 accumulates differently, off by an ulp)
        by_run = per_tensor.view(len(self.shapes), self.runs).T.contiguous()
        return torch.linalg.vector_norm(by_run, dim=1)

    def scale_(self, flat: Tensor, factor: Tensor) -> None:
        """flat[run r] *= factor[r] in place; factor (R,)."""
        column = factor.unsqueeze(1)
        for v in self.rows(flat):
            v.mul_(column)

    def finite(self, flat: Tensor) -> Tensor:
        """(R,) bool: run r's elements are all finite."""
        return torch.stack([torch.isfinite(v).all(1) for v in self.rows(flat)]).all(0)


def supports(model: nn.Module) -> bool:
    """The batched engine implements the paper's MLP (any layer sizes): Linear layers + leaky ReLU."""
    return type(model) is MLP and [k for k, _ in model.named_parameters()] == [
        f"layers.{i}.{p}" for i in range(len(model.layers)) for p in ("weight", "bias")
    ]


def split(views: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """(weights, biases) from the parameter views layers.0.weight, layers.0.bias, ..."""
    return views[0::2], views[1::2]


def forward(weights: list[Tensor], biases: list[Tensor], x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Forward pass of every run. x: (R, B, in) per-run inputs, or (B, in) shared by all runs.

    Returns the input of each layer [x, a_1, ..., a_{L-1}] (each (R, B, width)) and the logits (R, B, C).
    """
    runs = weights[0].shape[0]
    h = x if x.dim() == 3 else x.unsqueeze(0).expand(runs, -1, -1)  # (R, B, in); shared: stride-0 batch
    inputs = [h]
    for layer, (w, b) in enumerate(zip(weights, biases)):
        z = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))  # (R, B, out)
        if layer == len(weights) - 1:
            return inputs, z
        h = F.leaky_relu_(z, LEAKY_SLOPE)
        inputs.append(h)
    raise AssertionError("unreachable")


def backward_(
    weights: list[Tensor], inputs: list[Tensor], delta: Tensor, grad_weights: list[Tensor], grad_biases: list[Tensor]
) -> None:
    """Write dW_l = delta_l^T a_{l-1} and db_l = sum_b delta_l into the gradient views, from
    delta = d loss / d logits (R, B, C); no gradient for the network's input."""
    for layer in range(len(weights) - 1, -1, -1):
        torch.bmm(delta.transpose(1, 2), inputs[layer], out=grad_weights[layer])  # (R, out, in)
        torch.sum(delta, 1, out=grad_biases[layer])  # (R, out)
        if layer:
            back = torch.bmm(delta, weights[layer])  # (R, B, in) = d loss / d a_{layer-1}
            delta = torch.ops.aten.leaky_relu_backward(back, inputs[layer], LEAKY_SLOPE, True)


#: (device, batch) -> (grad_output 1, total_weight B) of nll_loss_backward, made once
_CE_CONSTANTS: dict[tuple[torch.device, int], tuple[Tensor, Tensor]] = {}


def cross_entropy_step(params: list[Tensor], grads: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    """One step's task loss and its gradient for every run.

    params/grads: the (R, *shape) views of the parameter and gradient buffers; x (R, B, in), y (R, B).
    Writes d CE / d theta into ``grads`` and returns the per-run mean cross-entropy (R,).
    """
    weights, biases = split(params)
    grad_weights, grad_biases = split(grads)
    runs, batch = y.shape
    inputs, logits = forward(weights, biases, x)
    classes = logits.shape[-1]
    logp = torch.log_softmax(logits.view(runs * batch, classes), 1)  # (R*B, C)
    target = y.reshape(-1)
    loss = F.nll_loss(logp, target, reduction="none").view(runs, batch).mean(1)  # (R,)
    # The kernels autograd runs for F.cross_entropy's backward; total_weight = B gives every run its
    # own batch mean (-1/B at the targets), exactly as in the single-run path.
    key = (logp.device, batch)
    if key not in _CE_CONSTANTS:
        _CE_CONSTANTS[key] = (torch.ones((), device=logp.device), torch.full((), float(batch), device=logp.device))
    one, total_weight = _CE_CONSTANTS[key]
    grad_logp = torch.ops.aten.nll_loss_backward(one, logp, target, None, 1, -100, total_weight)
    delta = torch.ops.aten._log_softmax_backward_data(grad_logp, logp, 1, logp.dtype).view(runs, batch, classes)
    backward_(weights, inputs, delta, grad_weights, grad_biases)
    return loss


@torch.no_grad()
def count_correct(params: list[Tensor], x: Tensor, y: Tensor, chunk: int) -> Tensor:
    """(R,) number of samples of (x (N, ...), y (N,)) each run classifies correctly, ``chunk`` samples
    (``eval_batch_size``) at a time as ``ewcstab.metrics.accuracy``, runs in groups bounding the memory."""
    weights, biases = split(params)
    flat_x = x.reshape(x.shape[0], -1)
    runs = weights[0].shape[0]
    correct = torch.zeros(runs, dtype=torch.long, device=x.device)
    for group in run_groups(runs, min(chunk, flat_x.shape[0]), [w.shape[1] for w in weights]):
        w_g, b_g = [w[group] for w in weights], [b[group] for b in biases]
        for start in range(0, flat_x.shape[0], chunk):
            _, logits = forward(w_g, b_g, flat_x[start : start + chunk])
            correct[group] += (logits.argmax(-1) == y[start : start + chunk]).sum(1)
    return correct


def run_groups(runs: int, samples: int, widths: list[int], budget_bytes: int = 256 << 20) -> list[slice]:
    """Runs per pass over ``samples`` samples so that a pass's activations (about three float32 tensors of
    every layer width per run and sample) stay within ``budget_bytes``. Passes are split over runs, never
    over samples, so each run sums over its samples in the single-run path's chunks and order."""
    per_run = 3 * 4 * samples * sum(widths)
    size = max(1, budget_bytes // per_run)
    return [slice(start, min(start + size, runs)) for start in range(0, runs, size)]
