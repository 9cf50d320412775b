"""The EWC penalty for R stacked runs, each with its own lambda, anchor and importances.

Same quadratic form and coefficient rules as ``ewcstab.penalty`` (reused from its ``VARIANTS``):

    penalty_r = sum_i c_{r,i} (theta_{r,i} - theta*_{r,i})^2
    original / clipped: c = lambda_r Omega_r
    stabilized:         c = 0.5 lambda_r Omega_r / (alpha lambda_r Omega_r + 1)

The coefficients are formed run by run at consolidation (once per task, with the very rule and Python
float lambda the single-run path uses, so they are bitwise the same); the per-step gradient 2 c (theta -
theta*) is then one element-wise kernel over all runs. Clipping (clipped variant) uses each run's own
total gradient norm: clip coefficient clip_norm / (||g_r|| + 1e-6), at most 1, as
``torch.nn.utils.clip_grad_norm_`` computes it for one run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ewcstab.batched.stack import Layout
from ewcstab.penalty import VARIANTS


class StackedPenalty:
    """The penalty of R runs: ``lams[r]`` per run, anchor and coefficients as flat (R * P,) buffers."""

    def __init__(self, variant: str, lams: list[float], alpha: float, clip_norm: float = 1.0) -> None:
        try:
            self.rule, clips = VARIANTS[variant]
        except KeyError:
            raise ValueError(f"variant: {variant!r} is not allowed; allowed: {', '.join(VARIANTS)}") from None
        if any(lam < 0 for lam in lams):
            raise ValueError(f"lam: {min(lams)!r} is not allowed; allowed: a number >= 0")
        self.name = variant
        self.lams = [float(lam) for lam in lams]
        self._any_lam = any(lam > 0 for lam in self.lams)
        self.alpha = float(alpha)
        self.clip_norm = clip_norm if clips else None
        self.anchor: Tensor | None = None
        self.twice_coef: Tensor | None = None
        self._pen: Tensor | None = None
        self.pen_tensors: list[Tensor] = []  # per (parameter, run) views of the last gradient, for norms

    @property
    def active(self) -> bool:
        """Some run has an anchor and lambda > 0 (runs with lambda 0 then get an exact zero gradient)."""
        return self.anchor is not None and self._any_lam

    def consolidate(self, layout: Layout, theta: Tensor, omega: Tensor) -> None:
        """Anchor theta* = theta; coefficients from the accumulated importances, run by run."""
        self.anchor = theta.clone()
        coef = torch.empty_like(omega)
        for r, lam in enumerate(self.lams):
            for c, om in zip(layout.run_views(coef, r), layout.run_views(omega, r)):
                c.copy_(self.rule(om, lam, self.alpha))
        self.twice_coef = coef.mul_(2.0)

    def grad(self, layout: Layout, theta: Tensor) -> Tensor | None:
        """2 c (theta - theta*) for every run, in a buffer reused by the next call (``pen_tensors``: its
        per-(parameter, run) views); None while no run has a penalty."""
        if not self.active:
            return None
        # into a buffer kept across steps: a fresh (R * P,) tensor per step costs page faults
        if self._pen is None or self._pen.shape != theta.shape:
            self._pen = torch.empty_like(theta)
            self.pen_tensors = layout.tensors(self._pen)
        torch.sub(theta, self.anchor, out=self._pen)
        return self._pen.mul_(self.twice_coef)

    def clip_(self, layout: Layout, grad: Tensor, grad_tensors: list[Tensor]) -> Tensor | None:
        """Clip each run's total gradient norm in place (clipped variant); returns the pre-clip norms (R,).
        ``grad_tensors``: the per-(parameter, run) views of ``grad``."""
        if self.clip_norm is None:
            return None
        norms = layout.norms(grad_tensors)
        clip_coef = self.clip_norm / (norms + 1e-6)
        layout.scale_(grad, torch.clamp(clip_coef, max=1.0))
        return norms

    def step_gain(self, layout: Layout, r: int) -> list[Tensor]:
        """Run r's kappa = 2 alpha c per parameter (``QuadraticPenalty.step_gain``); [] before any anchor."""
        if self.twice_coef is None:
            return []
        return [self.alpha * tc for tc in layout.run_views(self.twice_coef, r)]

    def anchor_of(self, layout: Layout, r: int) -> list[Tensor]:
        return [] if self.anchor is None else layout.run_views(self.anchor, r)

    def select(self, layout: Layout, keep: Tensor) -> None:
        self.lams = [self.lams[i] for i in keep.tolist()]
        self._any_lam = any(lam > 0 for lam in self.lams)
        if self.anchor is not None:
            self.anchor = layout.select(self.anchor, keep)
            self.twice_coef = layout.select(self.twice_coef, keep)
