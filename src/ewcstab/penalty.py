"""The EWC penalty, one quadratic form for every importance method.

    penalty = sum_i c_i (theta_i - theta*_i)^2

with the coefficient c set by the variant, exactly as the authors' code applies it
(docs/protocol.md, 'Penalties'; note the factor of 2 between the two forms):

- ``original``:   c = lambda * Omega
- ``stabilized``: c = 0.5 * lambda * Omega / (alpha * lambda * Omega + 1),
                  computed as 0.5 / (alpha + 1 / (lambda * Omega)): the same number, and finite for
                  every finite lambda (the first form is inf / inf once lambda * Omega overflows)
- ``clipped``:    the original c, and each run's total gradient norm clipped to ``clip_norm`` before
                  every optimizer step (the rule of ``torch.nn.utils.clip_grad_norm_``).

Why the stabilized form cannot explode: one gradient step of size alpha on the
penalty alone moves a weight by alpha * 2c * d towards the anchor (d = theta - theta*).
For the original form 2 alpha c = 2 alpha lambda Omega, which exceeds 1 (overshoot)
once alpha lambda Omega > 1/2 and exceeds 2 (growing oscillation, divergence) once
alpha lambda Omega > 1. For the stabilized form 2 alpha c = k / (k + 1) < 1 with
k = alpha lambda Omega >= 0, so the pull is always smaller than the distance.
(In the paper's notation, penalty lambda/2 Omega d^2, these thresholds read 1 and 2.)

Every tensor is stacked over runs, (R, *shape) per parameter, and each run has its own lambda. The
gradient 2 c d is added straight into the gradient, so no autograd graph is built for the penalty.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CoefficientRule = Callable[[Tensor, Tensor, float], Tensor]  # (omega, lam broadcastable, alpha) -> c


def original_coefficient(omega: Tensor, lam: Tensor, alpha: float) -> Tensor:
    return lam * omega


def stabilized_coefficient(omega: Tensor, lam: Tensor, alpha: float) -> Tensor:
    """0.5 lam Omega / (alpha lam Omega + 1) = 0.5 / (alpha + 1 / (lam Omega)); lam Omega = 0 gives 1/0 =
    inf and c = 0, lam Omega = inf gives c = 0.5 / alpha."""
    return 0.5 / (alpha + (lam * omega).reciprocal())


def per_run(values: Tensor, like: Tensor) -> Tensor:
    """(R,) values shaped (R, 1, ..., 1) to broadcast over a stacked (R, *shape) tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class QuadraticPenalty:
    """sum_i c_i (theta_i - theta*_i)^2 for R stacked runs, c from ``rule`` and each run's lambda;
    optional per-run gradient-norm clipping."""

    def __init__(
        self, name: str, rule: CoefficientRule, lams: list[float], alpha: float, clip_norm: float | None = None,
    ) -> None:
        self.name = name
        self.rule = rule
        self.lams = [float(v) for v in lams]
        self.alpha = float(alpha)
        self.clip_norm = clip_norm
        self.anchor: list[Tensor] = []
        self.twice_coef: list[Tensor] = []
        self._grad: list[Tensor] = []  # the penalty gradient, written in place every step

    @property
    def active(self) -> bool:
        return bool(self.anchor) and max(self.lams) > 0

    def consolidate(self, anchor: list[Tensor], omega: list[Tensor]) -> None:
        """Set the anchor theta* and the accumulated importances, both stacked (R, *shape) per parameter."""
        # lambdas beyond the dtype's range are taken as its largest number (lambda * 0 stays 0, not inf * 0)
        dtype = omega[0].dtype
        lam = torch.tensor(self.lams, dtype=torch.float64).clamp(max=torch.finfo(dtype).max).to(omega[0].device, dtype)
        self.anchor = [a.detach().clone() for a in anchor]
        self.twice_coef = [2.0 * self.rule(o.detach(), per_run(lam, o), self.alpha) for o in omega]
        self._grad = [torch.empty_like(a) for a in self.anchor]

    def add_grad_(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor] | None:
        """grads += d penalty / d theta = 2 c (theta - theta*); returns that gradient (buffers reused from
        step to step), None while the penalty is inactive."""
        if not self.active:
            return None
        for p, a, tc, g, out in zip(params, self.anchor, self.twice_coef, grads, self._grad):
            torch.sub(p.detach(), a, out=out).mul_(tc)
            g.add_(out)
        return self._grad

    def value(self, params: list[Tensor]) -> Tensor:
        """(R,) penalty of every run (tests and telemetry; training adds the gradient directly)."""
        if not self.active:
            return torch.zeros(params[0].shape[0], device=params[0].device)
        return sum((0.5 * tc * (p - a).square()).flatten(1).sum(1)
                   for p, a, tc in zip(params, self.anchor, self.twice_coef))

    def clip_(self, grads: list[Tensor], norms: Tensor) -> Tensor | None:
        """Clipped variant: scale run r's gradient by min(1, clip_norm / (norms[r] + 1e-6)) in place, as
        ``clip_grad_norm_`` does for one run; returns the pre-clip norms (R,). None without clipping."""
        if self.clip_norm is None:
            return None
        factor = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(per_run(factor, g))
        return norms

    def step_gain(self) -> list[Tensor]:
        """kappa_i = alpha * d^2 penalty / d theta_i^2 = 2 alpha c_i: the fraction of the distance
        to the anchor that one plain gradient step of size alpha on the penalty covers.
        kappa > 1 overshoots the anchor, kappa > 2 diverges."""
        return [self.alpha * tc for tc in self.twice_coef]

    def select(self, keep: Tensor) -> None:
        """Keep the runs at positions ``keep`` (1-D long tensor)."""
        self.lams = [self.lams[i] for i in keep.tolist()]
        self.anchor = [a.index_select(0, keep) for a in self.anchor]
        self.twice_coef = [c.index_select(0, keep) for c in self.twice_coef]
        self._grad = [torch.empty_like(a) for a in self.anchor]


VARIANTS: dict[str, tuple[CoefficientRule, bool]] = {
    "original": (original_coefficient, False),
    "stabilized": (stabilized_coefficient, False),
    "clipped": (original_coefficient, True),
}


def build_penalty(variant: str, lams: list[float], alpha: float, clip_norm: float = 1.0) -> QuadraticPenalty:
    """The penalty of ``variant`` for runs with lambdas ``lams`` (one per run)."""
    try:
        rule, clips = VARIANTS[variant]
    except KeyError:
        raise ValueError(f"variant: {variant!r} is not allowed; allowed: {', '.join(VARIANTS)}") from None
    for lam in lams:
        if not lam >= 0:
            raise ValueError(f"lam: {lam!r} is not allowed; allowed: a number >= 0")
    return QuadraticPenalty(variant, rule, lams, alpha, clip_norm if clips else None)
