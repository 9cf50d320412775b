"""Total absolute signal (the first author's earlier importance), docs/protocol.md 'signal', on every architecture.

The paper defines it for linear layers only. With x the layer's input, W (out, in) its weight and
a = act(W x + b) its output after its nonlinearity (after softmax for the last layer):

    Omega(W[o, i]) = |W[o, i]| * mean_n |x_n,i|          Omega(b[o]) = mean_n |a_n,o|

i.e. a weight is as important as the signal it carries, a bias as the output it feeds. The natural
extensions below keep that reading: **a weight's importance is |weight| times the mean absolute value
of the input element it multiplies; an additive parameter's (bias, beta, position embedding)
importance is the mean absolute value of the post-nonlinearity output it is added to**, the mean
running over samples and over every position the parameter is shared across.

| module                      | parameter            | importance                                                  |
|-----------------------------|----------------------|-------------------------------------------------------------|
| ``nn.Linear``               | weight W[o, i]       | abs(W[o,i]) * mean over samples and tokens of abs(x_i)      |
| (also on token sequences,   | bias b[o]            | mean over samples and tokens of abs(act(out)_o)             |
| and attention q/k/v/out)    |                      |                                                             |
| ``nn.Conv2d``               | weight W[o, c, u, v] | abs(W[o,c,u,v]) * mean over samples and output positions of |
|                             |                      | abs(unfolded input element (c, u, v)) (the input pixel that |
|                             |                      | weight multiplies at each output position)                  |
|                             | bias b[o]            | mean over samples and positions of abs(act(out)_o)          |
| BatchNorm / ``LayerNorm``   | weight gamma[c]      | abs(gamma_c) * mean over samples (and positions/tokens) of  |
| (y = gamma * x_hat + beta)  |                      | abs(x_hat_c), x_hat the normalised input: the affine map is |
|                             |                      | a diagonal linear layer whose input is x_hat                |
|                             | bias beta[c]         | mean over samples (and positions/tokens) of abs(act(out)_c) |
| module with                 | every own parameter  | mean over samples, and over each dimension the parameter is |
| ``signal_rule = "additive"``| (added to the output)| broadcast along, of abs(act(out)): a bias at its own        |
| (e.g. position embedding)   |                      | resolution (one value per token and channel)                |

"act" is what the model names in ``signal_activations()``: module name -> callable applied to that
module's output, giving the signal a downstream layer sees (its nonlinearity; identity when none).
Our models' choices: MLP leaky ReLU, softmax after the last layer; CNN conv -> its BatchNorm and
leaky ReLU (so conv bias and BN beta see the same block output; max-pool, a selection, is left out),
BN -> leaky ReLU; attention model: q, k, v, out projections identity (no element-wise nonlinearity
acts on a projection's channels; the attention softmax acts on the q.k scores), MLP first layer
GELU, second identity, LayerNorms identity, patch embedding identity, head softmax. The position
embedding is added to the patch tokens, so its importance is mean over samples of abs(token) per
(token, channel). Our attention model has no class token (it mean-pools), so no rule is needed for
one; a prepended token is neither an input weight nor an additive term and would be an error here.

A module applied several times per sample (none of ours) is averaged over all its applications.
Every parameter must be covered: a parameter outside the listed modules, or a listed module of a
type without a rule, is an error, not a silent zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ewcstab.importance.base import OfflineImportance
from ewcstab.interfaces import ParamDict

Activation = Callable[[Tensor], Tensor]


class _Sums:
    """Running sums of |tensor| over rows and the number of rows seen."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, values: Tensor, rows: int) -> None:
        self.total = values if self.total is None else self.total + values
        self.count += rows

    def mean(self) -> Tensor:
        if self.total is None:
            raise ValueError("signal importance: a listed layer was never called by the model's forward")
        return self.total / self.count


class _Rule:
    """Accumulates what one module's importance needs over the forward passes, then computes it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inputs, self.outputs = _Sums(), _Sums()

    def observe(self, x: Tensor, a: Tensor) -> None:
        raise NotImplementedError

    def importance(self) -> dict[str, Tensor]:
        raise NotImplementedError


class _LinearRule(_Rule):
    """x (..., in), a (..., out): every leading index (sample, token) is one row."""

    def observe(self, x: Tensor, a: Tensor) -> None:
        m = self.module
        self.inputs.add(x.abs().reshape(-1, m.in_features).sum(0), x.numel() // m.in_features)
        self.outputs.add(a.abs().reshape(-1, m.out_features).sum(0), a.numel() // m.out_features)

    def importance(self) -> dict[str, Tensor]:
        m = self.module
        out = {"weight": m.weight.detach().abs() * self.inputs.mean()}  # (out, in) * (in,)
        if m.bias is not None:
            out["bias"] = self.outputs.mean()
        return out


class _Conv2dRule(_Rule):
    """Mean |unfolded input| per (c, u, v), from the per-pixel sum over samples.

    sum_n sum_positions |x_n[c, s*i + d*u - p, s*j + d*v - p]| = sum_positions A[c, ...] with
    A = sum_n |x_n| (C, H, W), because the unfolding is linear: so only A is accumulated and
    unfolded once at the end (zero padding contributes |0| = 0).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
            raise ValueError(
                f"signal importance supports Conv2d with zero padding given as numbers (or 'valid'); "
                f"got padding={module.padding!r}, padding_mode={module.padding_mode!r}"
            )

    def observe(self, x: Tensor, a: Tensor) -> None:
        if self.inputs.total is not None and self.inputs.total.shape != x.shape[1:]:
            raise ValueError("signal importance: a Conv2d saw inputs of different spatial sizes")
        self.inputs.add(x.abs().sum(0), x.shape[0])  # (C, H, W)
        self.outputs.add(a.abs().sum((0, 2, 3)), a.shape[0] * a.shape[2] * a.shape[3])  # (O,)

    def importance(self) -> dict[str, Tensor]:
        m = self.module
        padding = 0 if m.padding == "valid" else m.padding
        summed = self.inputs.mean()  # (C, H, W): mean over samples
        unfolded = F.unfold(summed.unsqueeze(0), m.kernel_size, m.dilation, padding, m.stride)  # (1, C*kh*kw, L)
        per_element = unfolded[0].mean(-1)  # (C*kh*kw,): mean over samples and output positions
        o, cg, kh, kw = m.weight.shape
        per_group = per_element.view(m.groups, cg, kh, kw)
        mean_input = per_group[torch.arange(o, device=per_group.device) // (o // m.groups)]  # (O, C/g, kh, kw)
        out = {"weight": m.weight.detach().abs() * mean_input}
        if m.bias is not None:
            out["bias"] = self.outputs.mean()
        return out


class _NormRule(_Rule):
    """Norm layers: |gamma_c| * mean |normalised input_c|; beta: mean |output_c|."""

    def importance(self) -> dict[str, Tensor]:
        m = self.module
        out: dict[str, Tensor] = {}
        if m.weight is not None:
            out["weight"] = m.weight.detach().abs() * self.inputs.mean()
        if m.bias is not None:
            out["bias"] = self.outputs.mean()
        return out


class _BatchNormRule(_NormRule):
    """x (N, C, *), normalised with the statistics the module uses in its current mode."""

    def observe(self, x: Tensor, a: Tensor) -> None:
        m = self.module
        use_batch = m.training or m.running_mean is None
        x_hat = F.batch_norm(
            x, None if use_batch else m.running_mean, None if use_batch else m.running_var,
            None, None, use_batch, 0.0, m.eps,
        )
        dims = [0] + list(range(2, x.dim()))
        rows = x.numel() // x.shape[1]
        self.inputs.add(x_hat.abs().sum(dims), rows)
        self.outputs.add(a.abs().sum(dims), rows)

class _LayerNormRule(_NormRule):
    """x (..., *normalized_shape); every leading index is one row."""

    def observe(self, x: Tensor, a: Tensor) -> None:
        shape = tuple(self.module.normalized_shape)
        x_hat = F.layer_norm(x, shape, None, None, self.module.eps)
        rows = x.numel() // math.prod(shape)
        self.inputs.add(x_hat.abs().reshape(-1, *shape).sum(0), rows)
        self.outputs.add(a.abs().reshape(-1, *shape).sum(0), rows)

class _AdditiveRule(_Rule):
    """Every own parameter is added (broadcast) to the module's output: the bias rule at its resolution."""

    def observe(self, x: Tensor, a: Tensor) -> None:
        self.outputs.add(a.abs().sum(0), a.shape[0])

    def importance(self) -> dict[str, Tensor]:
        mean = self.outputs.mean()  # output shape without the batch dimension
        return {k: _mean_to_shape(mean, p.shape) for k, p in self.module.named_parameters(recurse=False)}


def _mean_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Average ``t`` over the dimensions a parameter of ``shape`` is broadcast along (right-aligned)."""
    while t.dim() < len(shape):
        t = t.unsqueeze(0)
    t = t.mean(tuple(range(t.dim() - len(shape)))) if t.dim() > len(shape) else t
    dims = tuple(i for i, (have, want) in enumerate(zip(t.shape, shape)) if want == 1 and have != 1)
    t = t.mean(dims, keepdim=True) if dims else t
    if t.shape != shape:
        raise ValueError(f"signal importance: an additive parameter of shape {tuple(shape)} does not broadcast "
                         f"onto its module's output (per sample {tuple(t.shape)})")
    return t


def _rule_for(name: str, module: nn.Module) -> _Rule:
    if isinstance(module, nn.Linear):
        return _LinearRule(module)
    if isinstance(module, nn.Conv2d):
        return _Conv2dRule(module)
    if isinstance(module, _BatchNorm):
        return _BatchNormRule(module)
    if isinstance(module, nn.LayerNorm):
        return _LayerNormRule(module)
    if getattr(module, "signal_rule", None) == "additive":
        return _AdditiveRule(module)
    raise ValueError(
        f"signal importance has no rule for module {name!r} of type {type(module).__name__}; rules exist for "
        "Linear, Conv2d, BatchNorm, LayerNorm and modules declaring signal_rule = 'additive'"
    )


class Signal(OfflineImportance):
    name = "signal"

    def __init__(self, chunk_size: int = 1000) -> None:
        self.chunk_size = chunk_size  # samples per forward pass: bounds the activation memory (CNN)

    def compute(self, model: nn.Module, x: Tensor, y: Tensor) -> ParamDict:
        if not hasattr(model, "signal_activations"):
            raise ValueError(f"{type(model).__name__} does not define signal_activations(); signal importance needs it")
        acts: dict[str, Activation] = model.signal_activations()
        modules = dict(model.named_modules())
        unknown = sorted(set(acts) - set(modules))
        if unknown:
            raise ValueError(f"signal_activations() names modules the model does not have: {unknown}")
        rules = {name: _rule_for(name, modules[name]) for name in acts}
        covered = {f"{name}.{p}" for name in acts for p, _ in modules[name].named_parameters(recurse=False)}
        missing = sorted({k for k, _ in model.named_parameters()} - covered)
        if missing:
            raise ValueError(f"signal importance has no rule for parameters {missing}")

        def make_hook(name: str):
            def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                rules[name].observe(inputs[0], acts[name](output))

            return hook

        handles = [modules[name].register_forward_hook(make_hook(name)) for name in acts]
        try:
            with torch.no_grad():
                for start in range(0, x.shape[0], self.chunk_size):
                    model(x[start : start + self.chunk_size])
        finally:
            for h in handles:
                h.remove()

        omega: ParamDict = {}
        for name, rule in rules.items():
            omega.update({f"{name}.{k}": v for k, v in rule.importance().items()})
        return {k: omega[k] for k, _ in model.named_parameters()}  # the model's parameter order
