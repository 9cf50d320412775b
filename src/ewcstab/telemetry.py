"""Gradient-explosion telemetry: cheap per-task summaries of what the EWC penalty does to training.

The paper's claim (Section 2) is that plain EWC "explodes" once the penalty's step gain
kappa_i = 2 * alpha * c_i (c the penalty coefficient, see ``QuadraticPenalty.step_gain``) reaches 1
(overshoot) or 2 (divergence under plain gradient descent), and that clipping the gradient norm hides
it. To see this in every run without slowing it, each optimizer step writes one row of four numbers
into a device tensor (no host sync); the row is read once, when the task ends:

    loss               the task's cross-entropy on the batch (the penalty's value is never formed:
                       its gradient is added directly, see penalty.py)
    task_grad_norm     ||g_task||, the cross-entropy gradient's total L2 norm
    penalty_grad_norm  ||g_pen||, the penalty gradient 2 c (theta - theta*)
    grad_norm          ||g_task + g_pen||, the full loss's gradient before any clipping

Per-task summary keys (``TaskMonitor.summary``; one flat dict per trained task, JSON-safe: a value
that is NaN/inf or undefined is None):

    task, steps                         1-based task index, optimizer steps run in it
    loss_first, loss_last, loss_max     batch cross-entropy
    grad_norm_{mean,p50,p90,p99,max}    total pre-clip gradient norm over the task's steps
    task_grad_norm_{p50,max}, penalty_grad_norm_{p50,max}
    penalty_share_{p50,p90,p99,max}     ||g_pen|| / (||g_task|| + ||g_pen||) per step, in [0, 1]:
                                        0 = no pull, 0.5 = as large as the task gradient, -> 1 when the
                                        penalty dominates (a bounded share; ||g_pen|| / ||g|| would
                                        exceed 1 whenever the two gradients oppose each other)
    nonfinite_grad_steps                steps whose gradient norm was NaN/inf
    kappa_max, kappa_frac_ge1, kappa_frac_ge2
                                        largest step gain 2 alpha c_i during the task, and the fraction
                                        of all parameter elements with kappa >= 1 (overshoot) and >= 2
                                        (divergence under SGD); 0 when no penalty is active (task 1)
    anchor_dist_mean, anchor_dist_max   mean and max |theta - theta*| over all elements at the task's
                                        end (None on task 1: no anchor yet)
    clip_norm, clipped_steps, clipped_fraction
                                        clipped variant only (else None): steps whose pre-clip norm
                                        exceeded clip_norm, i.e. steps where clipping fired
    diverged, diverged_step, divergence_reason

Divergence (checked every ``divergence_check_every`` steps, one host sync each): the first step whose
loss or gradient norm is NaN/inf, or whose loss blows up under ``BlowupRule``. With ``trace=True``
``TaskMonitor.trace`` returns the per-step rows too (for gradient-norm traces of a run).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

#: Columns of the per-step device buffer.
COLUMNS = ("loss", "task_grad_norm", "penalty_grad_norm", "grad_norm")
_LOSS, _TASK, _PEN, _TOTAL = range(4)
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


@dataclass(frozen=True)
class BlowupRule:
    """A finite loss that counts as divergence: loss > min(cap, factor * max(first loss, floor)).

    The first loss is the task's first batch cross-entropy. factor 100: a normally training network's
    batch loss never grows to 100 times its starting value, while a network whose weights oscillate with
    growing amplitude (kappa > 2) reaches that within a few steps. floor ln(10), the cross-entropy of
    uniform guessing, so a task that starts already solved (first loss near 0) is not declared
    diverged by ordinary noise. cap 1e4: a hard ceiling whatever the first loss. ``factor = inf``
    and ``cap = inf`` switch the rule off (NaN/inf is still divergence).
    """

    factor: float = 100.0
    floor: float = math.log(10.0)
    cap: float = 1e4

    def threshold(self, first_loss: Tensor) -> Tensor:
        return (first_loss.clamp_min(self.floor) * self.factor).clamp_max(self.cap)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_BLOWUP = BlowupRule()


def total_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm of all elements of a list of tensors, as a device scalar (foreach kernels, no sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class TaskMonitor:
    """Per-step telemetry of one task on the training device, summarised once at the task's end."""

    def __init__(
        self,
        task: int,
        n_steps: int,
        device: torch.device,
        kappa: list[Tensor],
        clip_norm: float | None = None,
        blowup: BlowupRule = DEFAULT_BLOWUP,
    ) -> None:
        self.task = task
        self.clip_norm = clip_norm
        self.blowup = blowup
        self.rows = torch.full((n_steps, len(COLUMNS)), math.nan, device=device)  # (steps, 4)
        self.steps = 0
        self._checked = 0
        self._zero = torch.zeros((), device=device)
        self.divergence: tuple[int, str] | None = None  # (1-based step, reason)
        # kappa is constant within a task (the penalty changes only between tasks): reduce it now, on device
        if kappa:
            flat = torch.cat([k.detach().reshape(-1) for k in kappa])
            self._kappa = torch.stack([flat.max().double(), (flat >= 1).double().mean(), (flat >= 2).double().mean()])
        else:
            self._kappa = torch.zeros(3, device=device, dtype=torch.float64)

    # ----------------------------------------------------------------- per step (no host sync)
    def record(self, loss: Tensor, task_norm: Tensor, penalty_grads: list[Tensor] | None,
               grads: list[Tensor], pre_clip_norm: Tensor | None) -> None:
        """Store one step. ``task_norm`` was taken before the penalty gradient was added to ``grads``;
        ``pre_clip_norm`` is what clipping returned (None: no clipping, the norm is computed here)."""
        if penalty_grads is None:
            pen_norm, total = self._zero, task_norm if pre_clip_norm is None else pre_clip_norm
        else:
            pen_norm = total_norm(penalty_grads)
            total = total_norm(grads) if pre_clip_norm is None else pre_clip_norm
        self.rows[self.steps] = torch.stack([loss.detach(), task_norm, pen_norm, total.to(task_norm.dtype)])
        self.steps += 1

    # ----------------------------------------------------------------- every divergence_check_every steps
    def check(self) -> tuple[int, str] | None:
        """First diverged step among those not checked yet: (1-based step, reason), or None. One sync."""
        lo, hi = self._checked, self.steps
        self._checked = hi
        if self.divergence is not None or hi == lo:
            return self.divergence
        seg = self.rows[lo:hi]  # (k, 4)
        loss_bad = ~torch.isfinite(seg[:, _LOSS])
        grad_bad = ~torch.isfinite(seg[:, _TOTAL])
        blown = seg[:, _LOSS] > self.blowup.threshold(self.rows[0, _LOSS])
        bad = loss_bad | grad_bad | blown
        if not bool(bad.any()):
            return None
        i = int(bad.nonzero()[0])
        reason = "non-finite loss" if loss_bad[i] else "non-finite gradient" if grad_bad[i] else "loss blow-up"
        self.divergence = (lo + i + 1, reason)
        return self.divergence

    # ----------------------------------------------------------------- at the task's end
    def summary(self, params: list[Tensor], anchor: list[Tensor]) -> dict[str, object]:
        """The task's flat summary dict (see the module docstring); reads the device buffer once."""
        rows = self.rows[: self.steps].double()
        loss, task_norm, pen_norm, total = rows.unbind(1)
        share = pen_norm / (task_norm + pen_norm).clamp_min(1e-30)
        out: dict[str, object] = {"task": self.task, "steps": self.steps}
        dev: dict[str, Tensor] = {}  # device scalars, moved to the host together below
        if self.steps:
            dev["loss_first"], dev["loss_last"] = loss[0], loss[-1]
            dev["loss_max"] = _finite(loss).nan_to_num(-math.inf).max()
            g = _finite(total)
            dev["grad_norm_mean"] = g.nanmean()
            dev.update({f"grad_norm_{k}": g.nanquantile(q) for k, q in QUANTILES.items()})
            dev["grad_norm_max"] = g.nan_to_num(-math.inf).max()
            for name, col in (("task_grad_norm", task_norm), ("penalty_grad_norm", pen_norm)):
                dev[f"{name}_p50"] = _finite(col).nanquantile(0.5)
                dev[f"{name}_max"] = _finite(col).nan_to_num(-math.inf).max()
            s = _finite(share)
            dev.update({f"penalty_share_{k}": s.nanquantile(q) for k, q in QUANTILES.items()})
            dev["penalty_share_max"] = s.nan_to_num(-math.inf).max()
            dev["nonfinite_grad_steps"] = (~torch.isfinite(total)).sum()
            if self.clip_norm is not None:
                dev["clipped_steps"] = (total > self.clip_norm).sum()
        dev["kappa_max"], dev["kappa_frac_ge1"], dev["kappa_frac_ge2"] = self._kappa.unbind()
        if anchor:
            with torch.no_grad():
                dist = torch.cat([(p.detach() - a).abs().reshape(-1) for p, a in zip(params, anchor)])
            dev["anchor_dist_mean"], dev["anchor_dist_max"] = dist.mean(), dist.max()
        names = list(dev)
        values = torch.stack([v.double() for v in dev.values()]).cpu().tolist()  # the task's one transfer
        out.update({k: _json_number(v) for k, v in zip(names, values)})
        for key in ("nonfinite_grad_steps", "clipped_steps"):
            if out.get(key) is not None:
                out[key] = int(out[key])
        keys = ("loss_first", "loss_last", "loss_max", "grad_norm_mean", *(f"grad_norm_{k}" for k in QUANTILES),
                "grad_norm_max", "task_grad_norm_p50", "task_grad_norm_max", "penalty_grad_norm_p50",
                "penalty_grad_norm_max", *(f"penalty_share_{k}" for k in QUANTILES), "penalty_share_max",
                "nonfinite_grad_steps", "anchor_dist_mean", "anchor_dist_max")
        for key in keys:
            out.setdefault(key, None)
        out["clip_norm"] = self.clip_norm
        out["clipped_steps"] = out.get("clipped_steps") if self.clip_norm is not None else None
        out["clipped_fraction"] = (
            out["clipped_steps"] / self.steps if self.clip_norm is not None and self.steps else None
        )
        out["diverged"] = self.divergence is not None
        out["diverged_step"] = None if self.divergence is None else self.divergence[0]
        out["divergence_reason"] = None if self.divergence is None else self.divergence[1]
        return out

    def trace(self) -> dict[str, object]:
        """Per-step rows of this task: {"task": t, column: [value per step, None where non-finite]}."""
        cols = self.rows[: self.steps].double().cpu().T.tolist()
        return {"task": self.task, **{name: [_json_number(v) for v in col] for name, col in zip(COLUMNS, cols)}}


def _finite(t: Tensor) -> Tensor:
    """Non-finite entries replaced by NaN, for the nan-aware reductions."""
    return torch.where(torch.isfinite(t), t, torch.full_like(t, math.nan))


def _json_number(v: float) -> float | None:
    return v if math.isfinite(v) else None
