"""The EWC penalty, one quadratic form for every importance method.

    penalty = sum_i c_i (theta_i - theta*_i)^2

with the coefficient c set by the variant, exactly as the authors' code applies it
(PROTOCOL.md, 'Penalties'; note the factor of 2 between the two forms):

- ``original``:   c = lambda * Omega
- ``stabilized``: c = 0.5 * lambda * Omega / (alpha * lambda * Omega + 1)
- ``clipped``:    the original c, and the total gradient norm clipped to ``clip_norm``
                  (``torch.nn.utils.clip_grad_norm_``) before every optimizer step.

Why the stabilized form cannot explode: one gradient step of size alpha on the
penalty alone moves a weight by alpha * 2c * d towards the anchor (d = theta - theta*).
For the original form 2 alpha c = 2 alpha lambda Omega, which exceeds 1 (overshoot)
once alpha lambda Omega > 1/2 and exceeds 2 (growing oscillation, divergence) once
alpha lambda Omega > 1. For the stabilized form 2 alpha c = k / (k + 1) < 1 with
k = alpha lambda Omega >= 0, so the pull is always smaller than the distance.
(In the paper's notation, penalty lambda/2 Omega d^2, these thresholds read 1 and 2.)

The gradient 2 c d is added straight into ``.grad`` with foreach kernels, so no
autograd graph is built for the penalty on each step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ewcstab.interfaces import ParamDict

CoefficientRule = Callable[[Tensor, float, float], Tensor]  # (omega, lam, alpha) -> c


def original_coefficient(omega: Tensor, lam: float, alpha: float) -> Tensor:
    return lam * omega


def stabilized_coefficient(omega: Tensor, lam: float, alpha: float) -> Tensor:
    return 0.5 * lam * omega / (alpha * lam * omega + 1.0)


class QuadraticPenalty:
    """sum_i c_i (theta_i - theta*_i)^2, c from ``rule``; optional gradient-norm clipping."""

    def __init__(
        self,
        name: str,
        rule: CoefficientRule,
        lam: float,
        alpha: float,
        clip_norm: float | None = None,
    ) -> None:
        self.name = name
        self.rule = rule
        self.lam = float(lam)
        self.alpha = float(alpha)
        self.clip_norm = clip_norm
        self.anchor: list[Tensor] = []
        self.coef: list[Tensor] = []
        self._twice_coef: list[Tensor] = []

    @property
    def active(self) -> bool:
        return bool(self.anchor) and self.lam > 0

    def consolidate(self, anchor: ParamDict, omega: ParamDict) -> None:
        """Set the anchor theta* and the accumulated importances (same key order as the model)."""
        self.anchor = [anchor[k].detach().clone() for k in anchor]
        self.coef = [self.rule(omega[k].detach(), self.lam, self.alpha) for k in anchor]
        self._twice_coef = [2.0 * c for c in self.coef]

    def grad(self, params: list[Tensor]) -> list[Tensor] | None:
        """d penalty / d theta = 2 c (theta - theta*) as new tensors; None while the penalty is inactive."""
        if not self.active:
            return None
        diff = torch._foreach_sub([p.detach() for p in params], self.anchor)
        torch._foreach_mul_(diff, self._twice_coef)
        return diff

    def add_grad_(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """grads += d penalty / d theta = 2 c (theta - theta*)."""
        pen = self.grad(params)
        if pen is not None:
            torch._foreach_add_(grads, pen)

    def value(self, params: list[Tensor]) -> Tensor:
        if not self.active:
            return torch.zeros((), device=params[0].device)
        return sum((c * (p - a).square()).sum() for p, a, c in zip(params, self.anchor, self.coef))

    def clip_(self, params: list[Tensor]) -> Tensor | None:
        """Clip the total gradient norm in place (clipped variant); returns the pre-clip norm."""
        if self.clip_norm is None:
            return None
        return torch.nn.utils.clip_grad_norm_(params, self.clip_norm, foreach=True)

    def step_gain(self) -> list[Tensor]:
        """kappa_i = alpha * d^2 penalty / d theta_i^2 = 2 alpha c_i: the fraction of the distance
        to the anchor that one plain gradient step of size alpha on the penalty covers.
        kappa > 1 overshoots the anchor, kappa > 2 diverges."""
        return [self.alpha * tc for tc in self._twice_coef]


VARIANTS: dict[str, tuple[CoefficientRule, bool]] = {
    "original": (original_coefficient, False),
    "stabilized": (stabilized_coefficient, False),
    "clipped": (original_coefficient, True),
}


def build_penalty(variant: str, lam: float, alpha: float, clip_norm: float = 1.0) -> QuadraticPenalty:
    try:
        rule, clips = VARIANTS[variant]
    except KeyError:
        raise ValueError(f"variant: {variant!r} is not allowed; allowed: {', '.join(VARIANTS)}") from None
    if lam < 0:
        raise ValueError(f"lam: {lam!r} is not allowed; allowed: a number >= 0")
    return QuadraticPenalty(variant, rule, lam, alpha, clip_norm if clips else None)
