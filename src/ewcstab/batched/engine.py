"""R continual-learning runs trained as one batched computation (issue 8).

The runs of a batch share everything but ``seed`` and ``lam`` (architecture, method, variant, task
sequence, optimizer settings, ...); ``check_batchable`` refuses anything else, naming the field. Each run
follows the single-run protocol of ``ewcstab.train.run_sequence`` (PROTOCOL.md) exactly:

- initial parameters: ``torch.manual_seed(seed); build_model(arch)``, built run by run, then stacked;
- data order: the run's own ``torch.Generator().manual_seed(seed)`` and one ``torch.randperm`` per
  epoch; a step gathers every run's batch in one indexing op, x[(R, B) indices] -> (R, B, 784);
- loss = cross-entropy + the run's penalty (its own lambda, anchor and accumulated Omega), the penalty
  gradient added straight into the gradient; clipping on the run's own total norm (clipped variant);
- optimizer: ``optim.py``, created once per batch and kept across tasks: the very kernel the single-run
  path's ``Adam(fused=True)`` (or SGD) runs, called once per step over one view per (parameter, run) of
  the flat buffers, each run's moments its own;
- the element-wise work around it (penalty gradient, telemetry norms, SI) in single native passes
  (``native.py``) where a C compiler is at hand, else as PyTorch ops: the same gradient either way;
  without clipping, one native pass does the penalty gradient, the norms, Adam and SI together
  (``StackedAdam.native_step``), bitwise the update of torch's kernel (checked: ``native.adam_width``);
- on one thread, the forward and backward (``stack.cross_entropy_step``) in one native call too
  (``native.NativeMlpStep``: torch's own sgemm and Sleef kernels, ATen's reduction orders), bitwise the
  PyTorch ops' gradients (checked: ``native.mlp_kernels``);
- after each task: evaluation of every run on tasks 1..t, then importances of every run on the last
  ``importance_samples`` training samples (``importance.py``), accumulated, and the anchor set;
- telemetry and divergence as in ``ewcstab.telemetry``: per-step rows on the device, one host check
  every ``divergence_check_every`` steps. A run that diverged (NaN/inf loss or gradient, loss blow-up)
  is dropped from the batch at that check, i.e. at the very step the single-run path stops it, so its
  record (accuracies so far, divergence task/epoch/step/reason, the task's telemetry summary) equals the
  single run's. Nothing mixes runs (batched products, element-wise updates, per-run reductions), so a
  NaN in one run cannot reach another before it is dropped.

Equality with the single-run path: every element-wise kernel sees the single run's values (the
optimizer and the norms even its very tensors, ``stack.Layout.tensors``), the importances sum over the
same sample chunks in the same order, and the batched products run one GEMM per run. On this CPU
(MKL) that made every run bitwise equal to ``run_sequence`` on one thread, and at the paper's batch of
100 on two; where a batched product sums in another order than the single run's ``addmm`` (other
shapes or thread counts, other BLAS or GPU kernels) the runs agree to rounding at first, and training
amplifies that slowly (as two runs of the single path on different hardware would differ). The native
passes (``native.py``) change none of it; only the telemetry's gradient norms are then summed in
another order (equal to rounding).

Architectures other than the MLP fall back to the single-run path, run after run. More runs than
``runs_per_batch`` are trained batch after batch (``default_runs_per_batch``). Timings in each run's
outcome are the batch's seconds divided by the number of runs in the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from ewcstab.batched.importance import build_stacked_importance
from ewcstab.batched import native
from ewcstab.batched.monitor import StackedMonitor
from ewcstab.batched.optim import make_stacked_optimizer
from ewcstab.batched.penalty import StackedPenalty
from ewcstab.batched.stack import Layout, count_correct, cross_entropy_step, supports
from ewcstab.config import ConfigError, RunConfig
from ewcstab.device import synchronize
from ewcstab.interfaces import ParamDict, Task
from ewcstab.models import build_model
from ewcstab.telemetry import BlowupRule
from ewcstab.train import (
    Divergence, RunOutcome, StopRun, blowup_rule, load_run_data, record, run_provenance, run_sequence,
)

log = logging.getLogger(__name__)

#: ``after_task(t, {run index: accuracies on tasks 1..t})`` for the runs still training, after task t is
#: evaluated; returns the indices of runs to stop there (an Optuna pruner's verdict), [] to go on.
BatchAfterTask = Callable[[int, dict[int, list[float]]], Iterable[int]]

#: The only config fields in which the runs of one batch may differ.
PER_RUN_FIELDS = ("seed", "lam")

#: Runs stacked together on a CPU when the caller does not say (more are trained batch after batch).
#: Measured on the 2-core Xeon this was written on (benchmark-batched, mas, one thread; README
#: "Throughput"): per full protocol run, 1 run ~55 s, 2 runs ~52 s, 4 runs ~53 s, 6 ~57 s, 8 ~58 s, 16 ~70 s:
#: past 4-6 runs the stacked per-run state (about 9 MB per run: parameters, gradient, Adam moments, anchor,
#: coefficients) streams from further away each step; 2 and 4 are within the machine's noise of each other.
CPU_RUNS_PER_BATCH = 4


def default_runs_per_batch(device: torch.device) -> int | None:
    """Runs per batch when not given: ``CPU_RUNS_PER_BATCH`` on a CPU, all of them on an accelerator."""
    return CPU_RUNS_PER_BATCH if device.type == "cpu" else None


def stacks(arch: str) -> bool:
    """Whether the engine stacks runs of ``arch`` (the MLP); other archs run one after another."""
    return supports(build_model(arch))


def engine_keys(arch: str, device: torch.device, engine: str = "stacked") -> dict[str, str]:
    """A run record's ``engine`` ("stacked", or "autograd" where asked for or where ``arch`` does not
    stack) and, for the stacked engine, ``elementwise``: "native" (``native.py``) or "torch"."""
    if engine == "autograd" or not stacks(arch):
        return {"engine": "autograd"}
    return {"engine": "stacked", "elementwise": "native" if native.available(device) else "torch"}


def check_batchable(cfgs: list[RunConfig]) -> RunConfig:
    """Validate every config and that they differ only in seed and lam; returns the first, resolved."""
    if not cfgs:
        raise ConfigError("a batch needs at least one run config")
    for cfg in cfgs:
        cfg.validate()
    resolved = [cfg.resolved() for cfg in cfgs]
    first = resolved[0]
    for i, other in enumerate(resolved[1:], start=1):
        for f in dataclasses.fields(RunConfig):
            if f.name in PER_RUN_FIELDS:
                continue
            a, b = getattr(first, f.name), getattr(other, f.name)
            if a != b:
                raise ConfigError(
                    f"{f.name}: run {i} has {b!r} but run 0 has {a!r}; runs batched together may differ "
                    f"only in {' and '.join(PER_RUN_FIELDS)}"
                )
    return first


def train_batched(cfgs: list[RunConfig], tasks: list[Task], device: torch.device, **options) -> list[RunOutcome]:
    """Train the runs ``cfgs`` (same settings but seed and lam) over ``tasks``, as one computation.

    Returns one ``RunOutcome`` per config, in order, equal (to floating-point tolerance) to what
    ``ewcstab.train.run_sequence(cfg, tasks, device)`` returns for that config. ``options``: those of
    ``train_batched_with_params`` (progress, trace, blowup, runs_per_batch, after_task).
    """
    return train_batched_with_params(cfgs, tasks, device, **options)[0]


def train_batched_with_params(
    cfgs: list[RunConfig],
    tasks: list[Task],
    device: torch.device,
    progress: bool = False,
    trace: bool = False,
    blowup: BlowupRule | None = None,
    runs_per_batch: int | None = None,
    after_task: BatchAfterTask | None = None,
) -> tuple[list[RunOutcome], list[ParamDict | None]]:
    """``train_batched``, plus each run's parameters where it stopped (the end of the sequence, the
    check at which it was found diverged, or the task after which ``after_task`` stopped it); None for
    every run of the single-run fallback.

    ``runs_per_batch``: at most this many runs are stacked at once, the next ones in the next batch
    (None: see ``default_runs_per_batch``); it changes the speed, never the results. ``blowup``: the loss
    blow-up rule (None: the configs' ``blowup_factor`` and ``blowup_cap``, as ``run_sequence``).
    ``after_task``: see ``BatchAfterTask``; a run it stops keeps its outcome so far, with
    ``stopped_after_task`` set (the single-run path's ``after_task`` stops a run by raising ``StopRun``).
    """
    first = check_batchable(cfgs)
    blowup = blowup or blowup_rule(first)  # shared: the blow-up fields are part of the shared settings
    size = runs_per_batch or default_runs_per_batch(device) or len(cfgs)
    if size < 1:
        raise ValueError(f"runs_per_batch: {runs_per_batch!r} is not allowed; allowed: an integer >= 1")
    if len(cfgs) > size:
        outcomes: list[RunOutcome] = []
        params: list[ParamDict | None] = []
        for start in range(0, len(cfgs), size):
            hook = None if after_task is None else _shifted(after_task, start)
            o, p = train_batched_with_params(
                cfgs[start : start + size], tasks, device, progress, trace, blowup, size, hook
            )
            outcomes += o
            params += p
        return outcomes, params
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)  # the single-run path's initialisation, run by run
        models.append(build_model(cfg.arch))
        if not supports(models[0]):
            log.info("the batched engine implements the MLP only; running %d %s runs one after another",
                     len(cfgs), cfg.arch)
            outcomes = [_run_single(i, c, tasks, device, progress, trace, blowup, after_task) for i, c in enumerate(cfgs)]
            return outcomes, [None] * len(cfgs)
    batch = _Batch(cfgs, models, device, trace, blowup)
    outcomes = batch.run(tasks, progress, after_task)
    for p, rid in enumerate(batch.ids):
        batch.final_params[rid] = batch.params_of(p)
    return outcomes, batch.final_params


def epoch_batches(orders: Tensor, labels: Tensor, batch: int) -> list[tuple[Tensor, Tensor]]:
    """Each step's (R * B,) sample rows (run 0's batch, run 1's, ...) and (R, B) labels, from the epoch's (R, N)
    orders: ``orders[:, s*B : (s+1)*B]`` as the single-run path takes it, formed in a few ops for the whole epoch
    (per step, slicing, copying and gathering the labels cost more than the image gather). The last batch
    has the N % B remaining samples when B does not divide N."""
    runs, n = orders.shape
    full = n // batch
    rows = orders[:, : full * batch].view(runs, full, batch).transpose(0, 1).reshape(full, runs * batch)
    ys = labels[rows].view(full, runs, batch)
    out = list(zip(rows.unbind(0), ys.unbind(0)))
    if n % batch:
        rest = orders[:, full * batch :].reshape(-1)
        out.append((rest, labels[rest].view(runs, -1)))
    return out


def _shifted(after_task: BatchAfterTask, offset: int) -> BatchAfterTask:
    """``after_task`` for a sub-batch whose run 0 is run ``offset`` of the caller's list."""
    def hook(t: int, accs: dict[int, list[float]]) -> list[int]:
        return [i - offset for i in after_task(t, {i + offset: a for i, a in accs.items()})]
    return hook


def _run_single(
    index: int, cfg: RunConfig, tasks: list[Task], device: torch.device, progress: bool, trace: bool,
    blowup: BlowupRule, after_task: BatchAfterTask | None,
) -> RunOutcome:
    """The single-run path for one run of a batch the engine cannot stack, ``after_task`` adapted."""
    def hook(t: int, accs: list[float]) -> None:
        if after_task is not None and index in set(after_task(t, {index: accs})):
            raise StopRun()

    return run_sequence(cfg, tasks, device, progress, hook, trace=trace, blowup=blowup)


class _Batch:
    """The state of R stacked runs; ``ids[p]`` is the config index of the run at batch position p."""

    def __init__(self, cfgs: list[RunConfig], models: list, device: torch.device, trace: bool, blowup: BlowupRule):
        cfg = cfgs[0]
        self.cfg, self.device, self.trace, self.blowup = cfg, device, trace, blowup
        self.layout = Layout.of(models[0], len(cfgs))
        self.theta = self.layout.stack([list(m.parameters()) for m in models], device)
        self.grad = self.layout.zeros(device)
        self.optimizer = make_stacked_optimizer(cfg.optimizer, self.layout, self.theta, self.grad, cfg.lr)
        self.penalty = StackedPenalty(cfg.variant, [c.lam for c in cfgs], cfg.resolved_alpha, cfg.clip_norm)
        self.importance = build_stacked_importance(cfg.method, cfg.fisher_label, cfg.si_xi)
        self.use_native = native.available(device)
        # the forward/backward in one native call where it reproduces the PyTorch ops here (one thread, this build)
        self.mlp_kernels = native.mlp_kernels(self.layout.widths) if self.use_native else None
        # penalty, Adam and SI in one native pass: not with clipping (it needs the full norm before the update)
        self.fused = (self.use_native and cfg.optimizer == "adam" and self.penalty.clip_norm is None
                      and native.adam_width() is not None)
        self._bind()
        self.generators = [torch.Generator().manual_seed(c.seed) for c in cfgs]
        self.omega = self.layout.zeros(device)
        self.ids = list(range(len(cfgs)))
        self.seeds = [c.seed for c in cfgs]
        self.final_params: list[ParamDict | None] = [None] * len(cfgs)
        self.outcomes = [RunOutcome(telemetry_trace=[] if trace else None, divergence_rule=blowup.to_dict())
                         for _ in cfgs]

    def _bind(self) -> None:
        """Views of the flat buffers: (R, *shape) per parameter for the products, one gradient tensor per
        (parameter, run) for torch's norms (see ``Layout.tensors``); the native passes for this many runs."""
        self.params = self.layout.views(self.theta)
        self.grads = self.layout.views(self.grad)
        self.grad_tensors = self.layout.tensors(self.grad)
        self.zeros = torch.zeros(self.layout.runs, device=self.device)
        self.native = native.NativeGradient(self.layout.sizes, self.layout.runs) if self.use_native else None
        self.mlp_step = (None if self.mlp_kernels is None
                         else native.NativeMlpStep(self.layout.widths, self.layout.runs, self.mlp_kernels))
        self.importance.native = self.native

    # ------------------------------------------------------------------ the protocol loop
    def run(self, tasks: list[Task], progress: bool, after_task: BatchAfterTask | None = None) -> list[RunOutcome]:
        cfg = self.cfg
        for t, task in enumerate(tasks, start=1):
            runs = len(self.ids)
            synchronize(self.device)
            start = time.perf_counter()
            monitor = self._train_task(t, task, progress, start, runs)
            synchronize(self.device)
            share = (time.perf_counter() - start) / runs
            if not self.ids:
                break
            finite = self.layout.finite(self.theta).cpu().tolist()
            bad = {}
            for p, rid in enumerate(self.ids):
                self.outcomes[rid].train_seconds.append(share)
                self._summarise(monitor, p, None)
                if not finite[p]:
                    bad[p] = Divergence(t, cfg.epochs, -1, "non-finite parameters")
                    self.outcomes[rid].telemetry[-1].update(diverged=True, divergence_reason=bad[p].reason)
            self._retire(bad)
            if not self.ids:
                break
            self._evaluate(tasks[:t])
            if after_task is not None:
                stop = set(after_task(t, {rid: self.outcomes[rid].acc_matrix[-1] for rid in self.ids}))
                for rid in stop & set(self.ids):
                    self.outcomes[rid].stopped_after_task = t
                self._retire({p: None for p, rid in enumerate(self.ids) if rid in stop})
                if not self.ids:
                    break
            if t == len(tasks):
                break
            start = time.perf_counter()
            x, y = task.train_x[-cfg.importance_samples :], task.train_y[-cfg.importance_samples :]
            task_omega = self.importance.end_task(self.layout, self.theta, x, y)
            synchronize(self.device)
            share = (time.perf_counter() - start) / len(self.ids)
            finite = self.layout.finite(task_omega).cpu().tolist()
            for rid in self.ids:
                self.outcomes[rid].importance_seconds.append(share)
            _, (task_omega,) = self._retire(
                {p: Divergence(t, cfg.epochs, -1, "non-finite importance") for p, ok in enumerate(finite) if not ok},
                (task_omega,),
            )
            if not self.ids:
                break
            self.omega += task_omega
            self.penalty.consolidate(self.layout, self.theta, self.omega)
        return self.outcomes

    def _train_task(self, t: int, task: Task, progress: bool, start: float, runs: int) -> StackedMonitor:
        """Train every run on one task; runs that diverge are retired at the check that finds them."""
        cfg, layout, penalty, importance = self.cfg, self.layout, self.penalty, self.importance
        n = task.train_x.shape[0]
        x_all = task.train_x.reshape(n, -1)  # (N, 784)
        # byte images: gather bytes and convert (native.py), the very floats of x_all at a quarter of the reads
        # (data.build_tasks puts them on huge pages, ewcstab.memory: random rows, few TLB misses)
        images = None
        if self.native is not None and task.train_bytes is not None and native.bytes_convert_exactly():
            images = task.train_bytes.reshape(n, -1)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        monitor = StackedMonitor(t, runs, total_steps, self.device, penalty.clip_norm, self.blowup)
        importance.begin_task(layout, self.theta)
        clipping = penalty.clip_norm is not None
        bar = tqdm(total=total_steps, desc=f"task {t} ({runs} runs)", unit="step", disable=not progress,
                   mininterval=1.0, leave=False)
        step = 0
        for _epoch in range(cfg.epochs):
            # (R, N): each run's own permutation, drawn exactly as the single-run path draws it
            orders = torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(self.device)
            batches = epoch_batches(orders, task.train_y, cfg.batch_size)
            for i in range(steps_per_epoch):
                rows, y = batches[i]  # (R * B,) rows, run after run; (R, B) labels
                if images is not None:
                    batch_x = self.native.gather_bytes(images, rows)
                else:
                    batch_x = x_all.index_select(0, rows)  # one gather for every run (faster than x[idx])
                if self.mlp_step is not None:  # the same gradients (native.mlp_kernels checked it), one call
                    loss = self.mlp_step(self.theta, self.grad, batch_x, y)
                else:
                    loss = cross_entropy_step(self.params, self.grads, batch_x.view(*y.shape, -1), y)  # x (R, B, 784)
                monitor.record(loss, self._update(clipping))
                step += 1
                if step % cfg.divergence_check_every == 0 or step == total_steps:
                    bar.update(step - bar.n)
                    diverged = monitor.check()
                    if diverged:
                        share = (time.perf_counter() - start) / runs
                        for p, (bad_step, reason) in diverged.items():
                            self.outcomes[self.ids[p]].train_seconds.append(share)
                            self._summarise(monitor, p, (bad_step, reason))
                        keep, _ = self._retire({
                            p: Divergence(t, (s - 1) // steps_per_epoch + 1, s, reason)
                            for p, (s, reason) in diverged.items()
                        }, monitor=monitor)
                        if not self.ids:
                            bar.close()
                            return monitor
                        orders = orders.index_select(0, keep)
                        batches = epoch_batches(orders, task.train_y, cfg.batch_size)
                        layout = self.layout
        bar.close()
        return monitor

    def _update(self, clipping: bool) -> Tensor:
        """Everything of a step after the products: penalty gradient, clipping, optimizer, SI's path integral.
        Returns the (R, 3) telemetry norms of the task gradient, the penalty gradient and the gradient the
        optimizer was given (before clipping: the norm clipping saw)."""
        penalty, importance = self.penalty, self.importance
        if self.fused:  # one native pass; the same update (native.adam_width checked it against torch's kernel)
            # without a penalty the pass's penalty norm is 0 and its full norm the task norm, exactly
            active = penalty.active
            return self.optimizer.native_step(self.native, penalty.anchor if active else None,
                                              penalty.twice_coef if active else None, importance.path_integral())
        task_norm, pen_norm, full_norm = self._full_gradient()
        importance.before_step(self.theta, self.grad, clipping)
        total = penalty.clip_(self.layout, self.grad, self.grad_tensors)
        self.optimizer.step()
        importance.after_step(self.theta)
        return torch.stack([task_norm, pen_norm, (full_norm if total is None else total).to(task_norm.dtype)], 1)

    def _full_gradient(self) -> tuple[Tensor, Tensor, Tensor]:
        """Add the penalty gradient to the task gradient in ``self.grad`` (and take SI's snapshot of theta);
        returns the (R,) norms of the task gradient, the penalty gradient and the full gradient."""
        penalty, importance, layout = self.penalty, self.importance, self.layout
        active = penalty.active
        if self.native is not None:  # one pass (native.py): the same gradient, the norms to rounding
            snapshot = importance.step_snapshot()
            norms = self.native.gradient(self.grad, self.theta, penalty.anchor if active else None,
                                         penalty.twice_coef if active else None, snapshot)
            if active:
                return norms[:, 0], norms[:, 1], norms[:, 2]
            return norms[:, 0], self.zeros, norms[:, 0]
        task_norm = layout.norms(self.grad_tensors)  # before the penalty's gradient joins it
        pen = penalty.grad(layout, self.theta)
        if pen is None:
            return task_norm, self.zeros, task_norm
        pen_norm = layout.norms(penalty.pen_tensors)
        self.grad.add_(pen)
        return task_norm, pen_norm, layout.norms(self.grad_tensors)

    # ------------------------------------------------------------------ per-run bookkeeping
    def params_of(self, p: int) -> ParamDict:
        """The run at position p as a model's state: name -> tensor (copies)."""
        return {k: v.clone() for k, v in zip(self.layout.names, self.layout.run_views(self.theta, p))}

    def _summarise(self, monitor: StackedMonitor, p: int, divergence: tuple[int, str] | None) -> None:
        outcome = self.outcomes[self.ids[p]]
        summary, trace = monitor.summary(
            p, self.layout.run_views(self.theta, p), self.penalty.anchor_of(self.layout, p),
            self.penalty.step_gain(self.layout, p), divergence, self.trace,
        )
        outcome.telemetry.append(summary)
        if outcome.telemetry_trace is not None:
            outcome.telemetry_trace.append(trace)

    @torch.no_grad()
    def _evaluate(self, seen: list[Task]) -> None:
        chunk = self.cfg.eval_batch_size
        counts = torch.stack([count_correct(self.params, s.test_x, s.test_y, chunk) for s in seen]).cpu()  # (t, R)
        sizes = [s.test_x.shape[0] for s in seen]
        for p, rid in enumerate(self.ids):
            row = [int(c) / size for c, size in zip(counts[:, p].tolist(), sizes)]
            self.outcomes[rid].acc_matrix.append(row)
        log.info("after task %d: mean accuracy %s", len(seen),
                 ", ".join(f"{sum(self.outcomes[rid].acc_matrix[-1]) / len(seen):.4f}" for rid in self.ids))

    def _retire(
        self, diverged: dict[int, Divergence | None], extra: tuple[Tensor, ...] = (),
        monitor: StackedMonitor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Record the divergences and drop those runs from every stacked state (None: a run stopped by
        its caller, not diverged).

        Returns the kept batch positions (long tensor) and the ``extra`` flat buffers restricted to them."""
        keep_list = [p for p in range(len(self.ids)) if p not in diverged]
        keep = torch.tensor(keep_list, dtype=torch.long, device=self.device)
        if not diverged:
            return keep, extra
        for p, div in diverged.items():
            self.final_params[self.ids[p]] = self.params_of(p)
            if div is not None:
                self.outcomes[self.ids[p]].divergence = div
                log.warning("run %d (seed %d) diverged: %s", self.ids[p], self.seeds[self.ids[p]], div)
        if not keep_list:  # nothing left to train: the callers stop on an empty batch
            self.ids = []
            return keep, tuple(b[:0] for b in extra)
        old = self.layout
        theta, grad = old.select(self.theta, keep), old.select(self.grad, keep)
        self.penalty.select(old, keep)
        self.importance.select(old, keep)
        self.omega = old.select(self.omega, keep)
        extra = tuple(old.select(b, keep) for b in extra)
        if monitor is not None:
            monitor.select(keep)
        self.generators = [self.generators[p] for p in keep_list]
        self.ids = [self.ids[p] for p in keep_list]
        self.layout = old.with_runs(len(keep_list))
        self.theta, self.grad = theta, grad
        self.optimizer.select(old, keep, theta, grad)  # Adam's moments carry on with their runs
        self._bind()
        return keep, extra


def execute_batched(
    cfgs: list[RunConfig],
    progress: bool = False,
    trace: bool = False,
    blowup: BlowupRule | None = None,
    runs_per_batch: int | None = None,
    after_task: BatchAfterTask | None = None,
) -> list[dict[str, object]]:
    """Load the data once, train the runs as one batch, return one run record per config (the same
    record as ``ewcstab.train.execute``, plus ``"batch": {"runs", "index", "wall_seconds",
    "runs_per_batch"}``). ``wall_seconds`` of each record is the whole call's training time divided by
    the number of runs; the batch's total is ``batch.wall_seconds``."""
    first = check_batchable(cfgs)
    tasks, device, root = load_run_data(first)
    wall = time.perf_counter()
    outcomes = train_batched(cfgs, tasks, device, progress=progress, trace=trace, blowup=blowup,
                             runs_per_batch=runs_per_batch, after_task=after_task)
    wall = time.perf_counter() - wall
    prov = run_provenance(first, device, root)
    names = [t.name for t in tasks]
    records = []
    for i, (cfg, outcome) in enumerate(zip(cfgs, outcomes)):
        rec = record(cfg.resolved(), names, outcome, wall / len(cfgs), prov)
        rec.update(engine_keys(first.arch, device))
        rec["batch"] = {"runs": len(cfgs), "index": i, "wall_seconds": wall,
                        "runs_per_batch": runs_per_batch or default_runs_per_batch(device) or len(cfgs)}
        records.append(rec)
    return records
