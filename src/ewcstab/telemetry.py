"""Gradient-explosion telemetry: cheap per-task summaries of what the EWC penalty does to training.

The paper's claim (Section 2) is that plain EWC "explodes" once the penalty's step gain
kappa_i = 2 * alpha * c_i (c the penalty coefficient, see ``QuadraticPenalty.step_gain``) reaches 1
(overshoot) or 2 (divergence under plain gradient descent), and that clipping the gradient norm hides
it. To see this in every run without slowing it, each optimizer step writes one row of four numbers per
run into a device tensor (steps, R, 4), at a step counter that lives on the device too, so recording
needs no host sync and can be captured in a CUDA graph. The host reads the rows once per epoch (the
divergence check) and once at the task's end (the summary):

    loss               the task's cross-entropy on the batch (the penalty's value is never formed:
                       its gradient is added directly, see penalty.py)
    task_grad_norm     ||g_task||, the cross-entropy gradient's total L2 norm
    penalty_grad_norm  ||g_pen||, the penalty gradient 2 c (theta - theta*)
    grad_norm          ||g_task + g_pen||, the full loss's gradient before any clipping

Per-task summary keys (``TaskMonitor.summaries``; one flat dict per run and trained task, JSON-safe: a
value that is NaN/inf or undefined is None):

    task, steps                         1-based task index, optimizer steps run in it (a diverged run:
                                        up to and including its first bad step)
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

Divergence: the first step whose loss or gradient norm is NaN/inf, or whose loss blows up under
``BlowupRule``. A diverged run keeps computing (NaN stays in its own slice of every stacked tensor) until
the check at the epoch's end finds it and the engine retires it; its summary covers the steps up to its
first bad step, so it does not depend on when the check ran.
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
REASONS = ("non-finite loss", "non-finite gradient", "loss blow-up")


@dataclass(frozen=True)
class BlowupRule:
    """A finite loss that counts as divergence: loss > min(cap, factor * max(first loss, floor)).

    The first loss is the task's first batch cross-entropy. factor 100: a normally training network's
    batch loss never grows to 100 times its starting value, while a network whose weights oscillate with
    growing amplitude (kappa > 2) reaches that within a few steps. floor ln(10), the cross-entropy of
    uniform guessing, so a task that starts already solved (first loss near 0) is not declared
    diverged by ordinary noise. cap 1e4: a hard ceiling whatever the first loss.
    """

    factor: float = 100.0
    floor: float = math.log(10.0)
    cap: float = 1e4

    def threshold(self, first_loss: Tensor) -> Tensor:
        return (first_loss.clamp_min(self.floor) * self.factor).clamp_max(self.cap)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_BLOWUP = BlowupRule()


def run_norms(tensors: list[Tensor]) -> Tensor:
    """(R,) L2 norm of each run's elements over a list of stacked (R, *shape) tensors; on the device."""
    per_tensor = torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors])  # (n, R)
    return torch.linalg.vector_norm(per_tensor, dim=0)


class TaskMonitor:
    """Per-step telemetry of R runs during one task, on the training device."""

    def __init__(
        self, task: int, runs: int, n_steps: int, device: torch.device, kappa: list[Tensor],
        clip_norm: float | None = None, blowup: BlowupRule = DEFAULT_BLOWUP,
    ) -> None:
        self.task = task
        self.clip_norm = clip_norm
        self.blowup = blowup
        self.rows = torch.full((n_steps, runs, len(COLUMNS)), math.nan, device=device)  # (steps, R, 4)
        self._at = torch.zeros(1, dtype=torch.long, device=device)  # the next row, on the device
        self._zeros = torch.zeros(runs, device=device)
        self._checked = 0
        # kappa is constant within a task (the penalty changes only between tasks): reduce it now, (R, 3)
        if kappa:
            flat = torch.cat([k.detach().flatten(1) for k in kappa], 1)  # (R, n_elements)
            self._kappa = torch.stack([flat.amax(1).double(), (flat >= 1).double().mean(1),
                                       (flat >= 2).double().mean(1)], 1)
        else:
            self._kappa = torch.zeros(runs, 3, device=device, dtype=torch.float64)

    # ----------------------------------------------------------------- per step (no host sync)
    def record(self, loss: Tensor, task_norm: Tensor, pen_norm: Tensor | None, total: Tensor) -> None:
        """Store one step of every run: (R,) losses and norms (``pen_norm`` None: no penalty)."""
        pen = self._zeros if pen_norm is None else pen_norm
        row = torch.stack([loss.detach(), task_norm, pen, total.to(task_norm.dtype)], 1)  # (R, 4)
        self.rows.index_copy_(0, self._at, row.unsqueeze(0))
        self._at += 1

    # ----------------------------------------------------------------- once per epoch
    def check(self, steps: int) -> dict[int, tuple[int, str]]:
        """Runs (batch positions) with a diverged step among steps not checked yet, up to ``steps`` done:
        position -> (first bad 1-based step of the task, reason). One host transfer."""
        lo, hi = self._checked, steps
        self._checked = hi
        if hi == lo:
            return {}
        seg = self.rows[lo:hi]  # (k, R, 4)
        loss_bad = ~torch.isfinite(seg[..., _LOSS])
        grad_bad = ~torch.isfinite(seg[..., _TOTAL])
        blown = seg[..., _LOSS] > self.blowup.threshold(self.rows[0, :, _LOSS])
        bad = loss_bad | grad_bad | blown  # (k, R)
        first = bad.to(torch.uint8).argmax(0)  # first True per run (argmax returns the first maximum)
        pick = first.unsqueeze(0)
        code = torch.where(loss_bad.gather(0, pick), 0, torch.where(grad_bad.gather(0, pick), 1, 2)).squeeze(0)
        hit, first, code = torch.stack([bad.any(0).long(), first.long(), code.long()]).cpu().tolist()
        return {r: (lo + f + 1, REASONS[c]) for r, (h, f, c) in enumerate(zip(hit, first, code)) if h}

    # ----------------------------------------------------------------- at the task's end
    def summaries(
        self, positions: list[int], steps: list[int], divergence: list[tuple[int, str] | None],
        params: list[Tensor], anchor: list[Tensor],
    ) -> list[dict[str, object]]:
        """The task's summary dict of the runs at batch ``positions`` (see the module docstring), each over
        its first ``steps[i]`` steps; ``params``/``anchor`` stacked over all runs. One host transfer."""
        where = torch.tensor(positions, device=self.rows.device)
        n = max(steps)
        rows = self.rows[:n].index_select(1, where).double()  # (n, k, 4)
        limit = torch.tensor(steps, device=rows.device)
        valid = torch.arange(n, device=rows.device).unsqueeze(1) < limit  # (n, k)
        loss, task_norm, pen_norm, total = rows.unbind(2)

        def finite(t: Tensor) -> Tensor:  # invalid or non-finite entries -> NaN, for nan-aware reductions
            return torch.where(valid & torch.isfinite(t), t, torch.full_like(t, math.nan))

        def top(t: Tensor) -> Tensor:
            return finite(t).nan_to_num(-math.inf).amax(0)

        share = pen_norm / (task_norm + pen_norm).clamp_min(1e-30)
        stats: dict[str, Tensor] = {
            "loss_first": loss[0], "loss_last": loss.gather(0, (limit - 1).unsqueeze(0)).squeeze(0),
            "loss_max": top(loss), "grad_norm_mean": finite(total).nanmean(0),
        }
        stats.update({f"grad_norm_{k}": finite(total).nanquantile(q, dim=0) for k, q in QUANTILES.items()})
        stats["grad_norm_max"] = top(total)
        for name, col in (("task_grad_norm", task_norm), ("penalty_grad_norm", pen_norm)):
            stats[f"{name}_p50"] = finite(col).nanquantile(0.5, dim=0)
            stats[f"{name}_max"] = top(col)
        stats.update({f"penalty_share_{k}": finite(share).nanquantile(q, dim=0) for k, q in QUANTILES.items()})
        stats["penalty_share_max"] = top(share)
        stats["nonfinite_grad_steps"] = (valid & ~torch.isfinite(total)).sum(0).double()
        if self.clip_norm is not None:
            stats["clipped_steps"] = (valid & (total > self.clip_norm)).sum(0).double()
        kappa = self._kappa.index_select(0, where)
        stats["kappa_max"], stats["kappa_frac_ge1"], stats["kappa_frac_ge2"] = kappa.unbind(1)
        if anchor:
            with torch.no_grad():
                dist = [(p.detach().index_select(0, where) - a.index_select(0, where)).abs().flatten(1).double()
                        for p, a in zip(params, anchor)]
            count = sum(d.shape[1] for d in dist)
            stats["anchor_dist_mean"] = sum(d.sum(1) for d in dist) / count
            stats["anchor_dist_max"] = torch.stack([d.amax(1) for d in dist]).amax(0)
        names = list(stats)
        table = torch.stack([stats[k] for k in names]).cpu().tolist()  # (n_stats, k): the one transfer
        out = []
        for i, (k_steps, div) in enumerate(zip(steps, divergence)):
            s: dict[str, object] = {"task": self.task, "steps": k_steps}
            s.update({name: _json_number(table[j][i]) for j, name in enumerate(names)})
            for key in ("nonfinite_grad_steps", "clipped_steps"):
                if s.get(key) is not None:
                    s[key] = int(s[key])
            for key in ("anchor_dist_mean", "anchor_dist_max"):
                s.setdefault(key, None)
            s["clip_norm"] = self.clip_norm
            s["clipped_steps"] = s.get("clipped_steps") if self.clip_norm is not None else None
            s["clipped_fraction"] = s["clipped_steps"] / k_steps if self.clip_norm is not None else None
            s["diverged"] = div is not None
            s["diverged_step"] = None if div is None else div[0]
            s["divergence_reason"] = None if div is None else div[1]
            out.append(s)
        return out

    def trace(self, position: int, steps: int) -> dict[str, object]:
        """Per-step rows of the run at ``position``: {"task": t, column: [value per step, None where
        non-finite]} over its first ``steps`` steps."""
        cols = self.rows[:steps, position].double().cpu().T.tolist()
        return {"task": self.task, **{name: [_json_number(v) for v in col] for name, col in zip(COLUMNS, cols)}}

    def select(self, keep: Tensor) -> None:
        """Keep the runs at positions ``keep``."""
        self.rows = self.rows.index_select(1, keep)
        self._zeros = self._zeros[: keep.numel()]
        self._kappa = self._kappa.index_select(0, keep)


def _json_number(v: float) -> float | None:
    return v if math.isfinite(v) else None
