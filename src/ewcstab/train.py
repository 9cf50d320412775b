"""The continual-learning runner: the protocol loop of PROTOCOL.md.

For each task t = 1..T:
  train ``epochs`` epochs (Adam created once per run, state kept across tasks),
  loss = cross-entropy + EWC penalty (its gradient added directly, see penalty.py);
  evaluate on the test sets of tasks 1..t;
  if t < T: Omega += importance on the last ``importance_samples`` training samples
  (model in eval mode), anchor theta* = current parameters.

A run whose loss or gradient becomes NaN/inf, or whose loss blows up (``telemetry.BlowupRule``:
loss > min(1e4, 100 x max(the task's first batch loss, ln 10)) by default), stops and is reported as
diverged, with the task, epoch and step; its later accuracies are null, never numbers.

Every run also records gradient-explosion telemetry (``telemetry.py``): per trained task, summaries of
the pre-clip gradient norm, the penalty gradient's share of it, the penalty's step gain kappa, the
distance to the anchor and how often clipping fired; per-step traces only when asked (``trace=True``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from ewcstab.config import RunConfig
from ewcstab.data import build_tasks, data_checksums, datasets_of, resolve_data_root
from ewcstab.device import resolve_device, synchronize
from ewcstab.importance import build_importance
from ewcstab.interfaces import Importance, ParamDict, Task
from ewcstab.metrics import accuracy
from ewcstab.models import build_model
from ewcstab.penalty import QuadraticPenalty, build_penalty
from ewcstab.telemetry import DEFAULT_BLOWUP, BlowupRule, TaskMonitor, total_norm
from ewcstab import provenance

log = logging.getLogger(__name__)


@dataclass
class Divergence:
    task: int  # 1-based
    epoch: int  # 1-based
    step: int  # 1-based optimizer step within the task
    reason: str


@dataclass
class RunOutcome:
    acc_matrix: list[list[float]] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    importance_seconds: list[float] = field(default_factory=list)
    divergence: Divergence | None = None
    telemetry: list[dict[str, object]] = field(default_factory=list)  # one summary per trained task
    telemetry_trace: list[dict[str, object]] | None = None  # per-step rows per task, when asked
    divergence_rule: dict[str, float] = field(default_factory=DEFAULT_BLOWUP.to_dict)
    stopped_after_task: int | None = None  # a batched run its caller stopped early (a pruned trial)


def blowup_rule(cfg: RunConfig) -> BlowupRule:
    """The loss blow-up rule of a config (see ``telemetry.BlowupRule``)."""
    return BlowupRule(factor=cfg.blowup_factor, cap=cfg.blowup_cap)


def make_optimizer(name: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, TypeError):  # fused unsupported on this device/build
            return torch.optim.Adam(params, lr=lr, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=True)
    raise ValueError(f"optimizer: {name!r} is not allowed; allowed: adam, sgd")


def importance_options(cfg: RunConfig) -> dict[str, object]:
    return {"fisher": {"label": cfg.fisher_label}, "si": {"xi": cfg.si_xi}}.get(cfg.method, {})


def train_task(
    model: nn.Module,
    task: Task,
    task_index: int,
    cfg: RunConfig,
    optimizer: torch.optim.Optimizer,
    penalty: QuadraticPenalty,
    importance: Importance,
    generator: torch.Generator,
    progress: bool = False,
    monitor: TaskMonitor | None = None,
    blowup: BlowupRule = DEFAULT_BLOWUP,
) -> Divergence | None:
    """Train one task; returns the divergence, or None if it stayed finite and did not blow up.

    ``monitor`` (made here when not given) receives each step's telemetry; pass one to read it
    afterwards. Every step: task-loss gradient, its norm, + penalty gradient (and its norm), the
    importance's hook, clipping (clipped variant), optimizer step. Norms stay on the device; the host
    looks at them every ``divergence_check_every`` steps and at the task's end.
    """
    params = [p for p in model.parameters()]
    grads = [p.grad for p in params]
    n = task.train_x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if monitor is None:
        device = task.train_x.device
        monitor = TaskMonitor(task_index, total_steps, device, penalty.step_gain(), penalty.clip_norm, blowup)
    check = cfg.divergence_check_every
    model.train()
    importance.begin_task(model)
    bar = tqdm(
        total=total_steps, desc=f"task {task_index}", unit="step",
        disable=not progress, mininterval=1.0, leave=False,
    )
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=generator).to(task.train_x.device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            # index_select: the same rows as task.train_x[idx], without advanced indexing's overhead
            loss = F.cross_entropy(model(task.train_x.index_select(0, idx)), task.train_y.index_select(0, idx))
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            task_norm = total_norm(grads)  # before the penalty's gradient joins it
            penalty_grads = penalty.grad(params)
            if penalty_grads is not None:
                torch._foreach_add_(grads, penalty_grads)
            importance.before_step(params, grads)
            pre_clip = penalty.clip_(params)
            monitor.record(loss, task_norm, penalty_grads, grads, pre_clip)
            optimizer.step()
            importance.after_step(params)
            step += 1
            if step % check == 0 or step == total_steps:
                bar.update(step - bar.n)
                diverged = monitor.check()
                if diverged is not None:
                    first, reason = diverged
                    bar.close()
                    return Divergence(task_index, (first - 1) // steps_per_epoch + 1, first, reason)
    bar.close()
    return None


def _nonfinite(tensors: ParamDict) -> bool:
    return not all(bool(torch.isfinite(t).all()) for t in tensors.values())


AfterTask = Callable[[int, list[float]], None]


class StopRun(Exception):
    """Raised by an ``after_task`` callback to end the run there and keep its outcome so far
    (``RunOutcome.stopped_after_task``); any other exception propagates out of the run."""


def run_sequence(
    cfg: RunConfig,
    tasks: list[Task],
    device: torch.device,
    progress: bool = False,
    after_task: AfterTask | None = None,
    trace: bool = False,
    blowup: BlowupRule | None = None,
) -> RunOutcome:
    """Train one continual-learning run over ``tasks`` with config ``cfg``.

    ``after_task(t, accuracies)`` is called after each evaluated task (1-based t); it may
    raise to stop the run early (an Optuna pruner does): ``StopRun`` returns the outcome so far,
    any other exception propagates. ``trace``: also keep the per-step
    telemetry rows (``RunOutcome.telemetry_trace``). ``blowup``: the loss blow-up rule.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch).to(device)
    params = list(model.parameters())
    for p in params:  # allocate grads once: foreach kernels then always see the same tensors
        p.grad = torch.zeros_like(p)
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr)
    penalty = build_penalty(cfg.variant, cfg.lam, cfg.resolved_alpha, cfg.clip_norm)
    importance = build_importance(cfg.method, **importance_options(cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    omega: ParamDict = {k: torch.zeros_like(p) for k, p in model.named_parameters()}

    blowup = blowup or blowup_rule(cfg)
    outcome = RunOutcome(telemetry_trace=[] if trace else None, divergence_rule=blowup.to_dict())
    for t, task in enumerate(tasks, start=1):
        n_steps = cfg.epochs * math.ceil(task.train_x.shape[0] / cfg.batch_size)
        monitor = TaskMonitor(t, n_steps, device, penalty.step_gain(), penalty.clip_norm, blowup)
        synchronize(device)
        start = time.perf_counter()
        divergence = train_task(
            model, task, t, cfg, optimizer, penalty, importance, generator, progress, monitor=monitor, blowup=blowup
        )
        synchronize(device)
        outcome.train_seconds.append(time.perf_counter() - start)
        outcome.telemetry.append(monitor.summary(params, penalty.anchor))
        if outcome.telemetry_trace is not None:
            outcome.telemetry_trace.append(monitor.trace())
        if divergence is None and _nonfinite(dict(model.named_parameters())):
            divergence = Divergence(t, cfg.epochs, -1, "non-finite parameters")
            outcome.telemetry[-1].update(diverged=True, divergence_reason=divergence.reason)
        if divergence is not None:
            outcome.divergence = divergence
            log.warning("run diverged: %s", divergence)
            break
        outcome.acc_matrix.append([accuracy(model, s.test_x, s.test_y, cfg.eval_batch_size) for s in tasks[:t]])
        log.info("after task %d: mean accuracy %.4f", t, sum(outcome.acc_matrix[-1]) / t)
        if after_task is not None:
            try:
                after_task(t, outcome.acc_matrix[-1])
            except StopRun:
                outcome.stopped_after_task = t
                break
        if t == len(tasks):
            break
        start = time.perf_counter()
        task_omega = importance.end_task(model, task.train_x[-cfg.importance_samples :], task.train_y[-cfg.importance_samples :])
        synchronize(device)
        outcome.importance_seconds.append(time.perf_counter() - start)
        if _nonfinite(task_omega):
            outcome.divergence = Divergence(t, cfg.epochs, -1, "non-finite importance")
            break
        for k in omega:
            omega[k] += task_omega[k]
        penalty.consolidate({k: p.detach() for k, p in model.named_parameters()}, omega)
    return outcome


#: How ``execute`` trains a run. ``stacked``: the batched engine (``ewcstab.batched``) with one run: the
#: MLP's forward and backward written out with batched products straight into the gradient buffer, no
#: autograd graph and no gradient zeroing per step, torch's Adam kernel called without the optimizer's
#: Python bookkeeping, and the element-wise work in native passes (``ewcstab.batched.native``); about 1.3x
#: faster than ``autograd`` on this CPU, and equal to it: bitwise on one CPU thread, to rounding elsewhere
#: (telemetry norms: to rounding); other architectures fall back to ``run_sequence``).
#: ``autograd``: ``run_sequence``. ``auto`` (default): ``stacked``.
ENGINES = ("auto", "stacked", "autograd")


def train_run(
    cfg: RunConfig,
    tasks: list[Task],
    device: torch.device,
    progress: bool = False,
    after_task: AfterTask | None = None,
    trace: bool = False,
    blowup: BlowupRule | None = None,
    engine: str = "auto",
) -> RunOutcome:
    """One run with the chosen engine (``ENGINES``); ``after_task`` as in ``run_sequence``."""
    if engine not in ENGINES:
        raise ValueError(f"engine: {engine!r} is not allowed; allowed: {', '.join(ENGINES)}")
    if engine == "autograd":
        return run_sequence(cfg, tasks, device, progress, after_task, trace=trace, blowup=blowup)
    from ewcstab.batched.engine import train_batched

    def hook(t: int, accs: dict[int, list[float]]) -> list[int]:
        try:
            after_task(t, accs[0])
        except StopRun:
            return [0]
        return []

    return train_batched([cfg], tasks, device, progress=progress, trace=trace, blowup=blowup, runs_per_batch=1,
                         after_task=hook if after_task is not None else None)[0]


def load_run_data(cfg: RunConfig) -> tuple[list[Task], torch.device, Path]:
    """The task sequence of ``cfg`` on its device, the device, and the data root it was read from."""
    resolved = cfg.resolved()
    device = resolve_device(cfg.device)
    root = resolve_data_root(cfg.data_root)
    tasks = build_tasks(
        resolved.sequence, resolved.n_tasks, cfg.perm_seed, root, device,
        cfg.train_subset, cfg.test_subset, cfg.download,
    )
    return tasks, device, root


def run_provenance(cfg: RunConfig, device: torch.device, root: Path) -> dict[str, object]:
    """A record's provenance: versions, commit, device, host, and the sha256 of the data files used."""
    resolved = cfg.resolved()
    checksums = data_checksums(datasets_of(resolved.sequence, resolved.n_tasks), root)
    return provenance.collect(device, checksums, str(root))


def execute(
    cfg: RunConfig,
    progress: bool = False,
    after_task: AfterTask | None = None,
    trace: bool = False,
    blowup: BlowupRule | None = None,
    engine: str = "auto",
) -> dict[str, object]:
    """Load the data, run, and return the run record (see ``record``); ``trace``: add per-step telemetry;
    ``engine``: see ``ENGINES`` (recorded as ``engine``)."""
    cfg.validate()
    tasks, device, root = load_run_data(cfg)
    wall = time.perf_counter()
    outcome = train_run(cfg, tasks, device, progress, after_task, trace=trace, blowup=blowup, engine=engine)
    wall = time.perf_counter() - wall
    rec = record(cfg.resolved(), [t.name for t in tasks], outcome, wall, run_provenance(cfg, device, root))
    from ewcstab.batched.engine import engine_keys

    rec.update(engine_keys(cfg.arch, device, engine))
    return rec


def record(
    cfg: RunConfig, task_names: list[str], outcome: RunOutcome, wall_seconds: float, prov: dict[str, object]
) -> dict[str, object]:
    """The run record: one JSON object per run (see README, 'Run records').

    "telemetry": one summary dict per trained task (keys in ``ewcstab.telemetry``);
    "telemetry_trace" (only when the run was traced): per task, the per-step rows;
    "divergence_rule": the loss blow-up rule the run used.
    """
    n_tasks = len(task_names)
    means: list[float | None] = [sum(row) / len(row) for row in outcome.acc_matrix]
    means += [None] * (n_tasks - len(means))
    div = outcome.divergence
    return {
        "schema": "ewcstab.run/1",
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "tasks": task_names,
        "acc_matrix": outcome.acc_matrix,
        "mean_acc_after_task": means,
        "final_mean_acc": means[-1],
        "diverged": div is not None,
        "diverged_at": None if div is None else {"task": div.task, "epoch": div.epoch, "step": div.step, "reason": div.reason},
        "train_seconds": outcome.train_seconds,
        "importance_seconds": outcome.importance_seconds,
        "wall_seconds": wall_seconds,
        "telemetry": outcome.telemetry,
        **({} if outcome.telemetry_trace is None else {"telemetry_trace": outcome.telemetry_trace}),
        **({} if outcome.stopped_after_task is None else {"stopped_after_task": outcome.stopped_after_task}),
        "divergence_rule": outcome.divergence_rule,
        "provenance": prov,
    }
