"""Sums of element-wise transformed per-sample gradients, computed vectorised.

For a per-sample scalar s_n = f(model(x_n), y_n) this returns, per parameter,

    (1/N) * sum_n  r(d s_n / d theta),   r = square (Fisher) or abs (MAS).

Two exact backends:
- ``linear``: closed form for networks whose parameters all sit in ``nn.Linear``
  layers applied once to (B, in) inputs. The per-sample weight gradient is the
  outer product delta_n a_n^T (delta = d s_n / d output, a = layer input), and
  r(delta a^T) = r(delta) r(a)^T for r in {square, abs}, so the sum over samples
  is one matrix product r(delta)^T r(a): one forward and one backward pass.
- ``func``: torch.func ``vmap(grad(...))`` over chunks, for any architecture.
The model must be in eval mode (no batch statistics), so samples do not interact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ewcstab.interfaces import ParamDict

ScalarFn = Callable[[Tensor, Tensor], Tensor]  # (logits (B, C), y (B,)) -> (B,)

REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"square": torch.square, "abs": torch.abs}


def mean_reduced_sample_grads(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    scalar_fn: ScalarFn,
    reduction: str,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> ParamDict:
    """(1/N) sum_n r(grad_theta s_n) for every named parameter; see the module docstring."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not allowed; allowed: {', '.join(REDUCTIONS)}")
    if backend not in ("auto", "linear", "func"):
        raise ValueError(f"backend: {backend!r} is not allowed; allowed: auto, linear, func")
    if model.training:
        raise ValueError("per-sample gradients need the model in eval mode (model.eval())")
    n = x.shape[0]
    if backend in ("auto", "linear"):
        sums = _linear_closed_form(model, x, y, scalar_fn, reduction, chunk_size or 10_000)
        if sums is not None:
            return {k: v / n for k, v in sums.items()}
        if backend == "linear":
            raise ValueError("backend 'linear' needs every parameter in an nn.Linear applied once to (B, in) inputs")
    sums = _func_vmap(model, x, y, scalar_fn, reduction, chunk_size or 256)
    return {k: v / n for k, v in sums.items()}


def _linear_closed_form(
    model: nn.Module, x: Tensor, y: Tensor, scalar_fn: ScalarFn, reduction: str, chunk_size: int
) -> ParamDict | None:
    """Closed form for all-Linear networks, or None when the model does not qualify."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    owned = {f"{name}.{p}" for name, m in linears.items() for p, _ in m.named_parameters(recurse=False)}
    if {name for name, _ in model.named_parameters()} != owned:
        return None
    r = REDUCTIONS[reduction]
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for start in range(0, x.shape[0], chunk_size):
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in linears}

        def make_hook(name: str):
            def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                seen[name].append((inputs[0].detach(), output))

            return hook

        handles = [m.register_forward_hook(make_hook(name)) for name, m in linears.items()]
        try:
            with torch.enable_grad():
                logits = model(x[start : start + chunk_size])
                if any(len(v) != 1 or v[0][0].dim() != 2 for v in seen.values()):
                    return None
                outputs = [seen[name][0][1] for name in linears]
                deltas = torch.autograd.grad(scalar_fn(logits, y[start : start + chunk_size]).sum(), outputs)
        finally:
            for h in handles:
                h.remove()
        for (name, m), delta in zip(linears.items(), deltas):
            a = seen[name][0][0]  # (B, in)
            rd = r(delta)  # (B, out)
            sums[f"{name}.weight"] += rd.T @ r(a)  # (out, in)
            if m.bias is not None:
                sums[f"{name}.bias"] += rd.sum(0)
    return sums


def _func_vmap(
    model: nn.Module, x: Tensor, y: Tensor, scalar_fn: ScalarFn, reduction: str, chunk_size: int
) -> ParamDict:
    r = REDUCTIONS[reduction]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one_sample(p: ParamDict, xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return scalar_fn(logits, yi.unsqueeze(0)).squeeze(0)

    per_sample_grads = vmap(grad(one_sample), in_dims=(None, 0, 0))
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, x.shape[0], chunk_size):
        grads = per_sample_grads(params, x[start : start + chunk_size], y[start : start + chunk_size])
        for k, g in grads.items():
            sums[k] += r(g).sum(0)
    return sums
