"""Per-step telemetry and divergence detection for R stacked runs (``ewcstab.telemetry`` batched).

Each step writes one row per run, (R, 4) = loss, task_grad_norm, penalty_grad_norm, grad_norm, into a
device buffer (R, steps, 4) without a host sync. Every ``divergence_check_every`` steps one transfer
tells, per run, the first step among the unchecked ones whose loss or gradient norm is NaN/inf or whose
loss blows up (``telemetry.BlowupRule``, threshold from the run's own first loss of the task), with the
same reason priority as ``TaskMonitor.check``. The per-task summary of one run is then
``TaskMonitor.summary`` itself, fed with that run's rows, so the record's telemetry keys and their
definitions are the single-run path's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ewcstab.telemetry import COLUMNS, DEFAULT_BLOWUP, BlowupRule, TaskMonitor

_REASONS = ("non-finite loss", "non-finite gradient", "loss blow-up")


class StackedMonitor:
    """One task's telemetry rows of R runs, (R, steps, 4) on the device."""

    def __init__(
        self, task: int, runs: int, n_steps: int, device: torch.device,
        clip_norm: float | None = None, blowup: BlowupRule = DEFAULT_BLOWUP,
    ) -> None:
        self.task = task
        self.n_steps = n_steps
        self.clip_norm = clip_norm
        self.blowup = blowup
        self.rows = torch.full((runs, n_steps, len(COLUMNS)), math.nan, device=device)  # (R, steps, 4)
        self.steps = 0
        self._checked = 0

    def record(self, loss: Tensor, norms: Tensor) -> None:
        """One step's (R,) losses and (R, 3) gradient norms (task, penalty, total); no host sync."""
        row = self.rows[:, self.steps]
        row[:, 0] = loss
        row[:, 1:] = norms
        self.steps += 1

    def check(self) -> dict[int, tuple[int, str]]:
        """Runs (positions in the batch) that diverged in the steps not checked yet: position ->
        (1-based step of the task, reason). One host transfer."""
        lo, hi = self._checked, self.steps
        self._checked = hi
        if hi == lo:
            return {}
        seg = self.rows[:, lo:hi]  # (R, k, 4)
        loss, total = seg[..., 0], seg[..., 3]
        loss_bad = ~torch.isfinite(loss)
        grad_bad = ~torch.isfinite(total)
        blown = loss > self.blowup.threshold(self.rows[:, 0, 0]).unsqueeze(1)
        bad = loss_bad | grad_bad | blown  # (R, k)
        first = bad.to(torch.uint8).argmax(1)  # first True (argmax returns the first maximum)
        pick = first.unsqueeze(1)
        code = torch.where(loss_bad.gather(1, pick), 0, torch.where(grad_bad.gather(1, pick), 1, 2)).squeeze(1)
        flags = torch.stack([bad.any(1).long(), first.long(), code.long()]).cpu().tolist()  # the one sync
        return {r: (lo + f + 1, _REASONS[c]) for r, (hit, f, c) in enumerate(zip(*flags)) if hit}

    def summary(
        self, r: int, params: list[Tensor], anchor: list[Tensor], kappa: list[Tensor],
        divergence: tuple[int, str] | None = None, trace: bool = False,
    ) -> tuple[dict[str, object], dict[str, object] | None]:
        """Run r's task summary (and per-step trace when asked), by ``TaskMonitor``'s own code."""
        monitor = TaskMonitor(self.task, 0, self.rows.device, kappa, self.clip_norm, self.blowup)
        monitor.rows = self.rows[r]
        monitor.steps = self.steps
        monitor.divergence = divergence
        return monitor.summary(params, anchor), monitor.trace() if trace else None

    def select(self, keep: Tensor) -> None:
        self.rows = self.rows.index_select(0, keep)
