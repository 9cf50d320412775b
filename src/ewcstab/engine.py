"""The training engine: R continual-learning runs of one setting trained side by side as one computation.

The runs of an engine share everything but ``seed`` and ``lam`` (architecture, method, variant, task
sequence, optimizer settings, ...; ``check_batchable`` refuses anything else, naming the field). R = 1 is
the ordinary single run: there is no other training path. Each run follows the protocol of
docs/protocol.md:

- initial parameters: ``torch.manual_seed(seed); build_model(arch)``, run by run, then stacked
  (``stacking.Runs``); data order: the run's own ``torch.Generator().manual_seed(seed)``, one
  ``torch.randperm`` per epoch, so a run sees the same batches whatever else trains beside it;
- one step (``_step``), for every run at once: forward of each run's own batch, per-run mean
  cross-entropy, its gradient by autograd (the gradient of the sum of the runs' losses is each run's own
  gradient), the penalty gradient 2 c (theta - theta*) added in place (each run its own lambda, anchor and
  accumulated Omega), the importance's step hooks (SI's path integral), per-run gradient-norm clipping
  (clipped variant), torch's Adam over the stacked parameters (element-wise: each run's own moments), and
  one telemetry row per run;
- after each task: accuracy of every run on the test sets of tasks 1..t, then (but after the last) the
  importances on the last ``importance_samples`` training samples, added to Omega, and the anchor set.

Nothing mixes runs (batched products, element-wise updates, per-run reductions), so a NaN in one run
never reaches another. The host looks at the runs once per epoch: the telemetry rows tell which runs
diverged (NaN/inf loss or gradient, loss blow-up), at which step; those runs are recorded as diverged and
retired (their slices dropped from every stacked tensor), the others go on. Runs stopped by the caller
after a task (an Optuna pruner) are retired the same way.

On a CUDA device the step runs without any host work: after a few eager steps it is captured once per
task in a CUDA graph (``torch.cuda.graph``; Adam is fused and capturable, telemetry rows are written at a
device-side counter) and replayed for every further step; a new capture follows every change of the
batch's runs. Capture problems fall back to eager steps with a warning. On a CPU the step runs eagerly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

from ewcstab.config import RunConfig
from ewcstab.errors import ConfigError
from ewcstab.importance import build_importance
from ewcstab.interfaces import Importance, Task
from ewcstab.models import build_model
from ewcstab.optim import RunState, StackedOptimizer
from ewcstab.penalty import build_penalty
from ewcstab.records import Divergence, RunOutcome
from ewcstab.stacking import Runs
from ewcstab.telemetry import BlowupRule, TaskMonitor, run_norms

log = logging.getLogger(__name__)

#: ``after_task(t, {run index: accuracies on tasks 1..t})`` for the runs still training, after task t is
#: evaluated; returns the indices of runs to stop there (an Optuna pruner's verdict), [] to go on.
BatchAfterTask = Callable[[int, dict[int, list[float]]], Iterable[int]]

#: The only config fields in which the runs of one engine may differ.
PER_RUN_FIELDS = ("seed", "lam")

#: Eager steps before a CUDA graph is captured (lazy initialisations happen outside the capture).
WARMUP_STEPS = 3

#: Runs x test samples per evaluation pass: bounds the activation memory of a pass (runs are evaluated in
#: groups, never with other sample chunks, so each run's predictions do not depend on the group size).
EVAL_RUN_SAMPLES = 1 << 15


def blowup_rule(cfg: RunConfig) -> BlowupRule:
    """The loss blow-up rule of a config (see ``telemetry.BlowupRule``)."""
    return BlowupRule(factor=cfg.blowup_factor, cap=cfg.blowup_cap)


def importance_options(cfg: RunConfig) -> dict[str, object]:
    """The estimator's own settings in a run config."""
    return {"fisher": {"label": cfg.fisher_label}, "si": {"xi": cfg.si_xi}}.get(cfg.method, {})


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


class Engine:
    """The state of R stacked runs and the protocol's steps over them.

    ``ids[p]`` is the index (in the configs given) of the run at batch position p; ``outcomes[i]`` is run
    i's outcome, filled as it trains. ``optimizer_states``: per run, the optimizer state to start from
    (a carried chain's inheritance), None for a fresh optimizer. ``importance``: the estimator driven by the
    step hooks (default: the config's method).
    """

    def __init__(
        self, cfgs: list[RunConfig], device: torch.device, *, trace: bool = False, blowup: BlowupRule | None = None,
        optimizer_states: list[RunState | None] | None = None, importance: Importance | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        cfg = check_batchable(cfgs)
        self.cfg, self.device, self.trace = cfg, device, trace
        self.blowup = blowup or blowup_rule(cfg)
        models = []
        for c in cfgs:
            torch.manual_seed(c.seed)  # each run's own initialisation, as when it trains alone
            models.append(build_model(c.arch))
        self.runs = Runs(models, device)
        self.optimizer = StackedOptimizer(cfg.optimizer, self.runs.params, cfg.lr)
        if optimizer_states is not None and any(s is not None for s in optimizer_states):
            if any(s is None for s in optimizer_states):
                raise ValueError("optimizer_states: give a state for every run of a batch, or for none")
            self.optimizer.load(optimizer_states)
        self.penalty = build_penalty(cfg.variant, [c.lam for c in cfgs], cfg.resolved_alpha, cfg.clip_norm)
        self.importance = importance or build_importance(cfg.method, **importance_options(cfg))
        self.generators = [torch.Generator().manual_seed(c.seed) for c in cfgs]
        self.omega = [torch.zeros_like(p) for p in self.runs.params]
        self.ids = list(range(len(cfgs)))
        self.outcomes = [RunOutcome(telemetry_trace=[] if trace else None, divergence_rule=self.blowup.to_dict())
                         for _ in cfgs]
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_idx: Tensor | None = None
        self._eager_steps = 0

    @property
    def info(self) -> dict[str, object]:
        """How this engine trains, for the run records."""
        return {"runs_in_batch": len(self.outcomes), "forward": self.runs.forward_kind,
                "cuda_graphs": self.cuda_graphs}

    # ------------------------------------------------------------------ one task's training
    def train_task(self, t: int, task: Task, progress: bool = False) -> None:
        """Train every run on task t (1-based); runs that diverge are recorded and retired."""
        cfg = self.cfg
        n, batch = task.train_x.shape[0], cfg.batch_size
        steps_per_epoch = math.ceil(n / batch)
        runs = len(self.ids)
        monitor = TaskMonitor(t, runs, cfg.epochs * steps_per_epoch, self.device, self.penalty.step_gain(),
                              self.penalty.clip_norm, self.blowup)
        self.importance.begin_task(self.runs.params)
        self._reset_graph()
        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"task {t} ({runs} runs)", unit="step",
                   disable=not progress, mininterval=1.0, leave=False)
        start, step = self._clock(), 0
        for epoch in range(1, cfg.epochs + 1):
            # (R, N): each run's own permutation, drawn as the run alone would draw it
            orders = torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(self.device)
            for s in range(steps_per_epoch):
                self._train_step(orders[:, s * batch : (s + 1) * batch], task, monitor)
                step += 1
            bar.update(steps_per_epoch)
            diverged = monitor.check(step)
            if diverged:
                seconds = (self._clock() - start) / runs
                for p, (bad, reason) in diverged.items():
                    self.outcomes[self.ids[p]].train_seconds.append(seconds)
                    self.outcomes[self.ids[p]].divergence = Divergence(t, (bad - 1) // steps_per_epoch + 1, bad, reason)
                self._summarise(monitor, list(diverged), [bad for bad, _ in diverged.values()],
                                list(diverged.values()))
                self._retire(list(diverged), monitor)
                if not self.ids:
                    break
        bar.close()
        if not self.ids:
            return
        seconds = (self._clock() - start) / runs
        positions = list(range(len(self.ids)))
        for p in positions:
            self.outcomes[self.ids[p]].train_seconds.append(seconds)
        self._summarise(monitor, positions, [step] * len(positions), [None] * len(positions))
        bad_params = [p for p, ok in enumerate(self._finite(self.runs.params)) if not ok]
        for p in bad_params:
            outcome = self.outcomes[self.ids[p]]
            outcome.divergence = Divergence(t, cfg.epochs, -1, "non-finite parameters")
            outcome.telemetry[-1].update(diverged=True, divergence_reason=outcome.divergence.reason)
        self._retire(bad_params)

    def _train_step(self, idx: Tensor, task: Task, monitor: TaskMonitor) -> None:
        """One step of every run on the batches ``idx`` (R, B) of the task's training rows: replayed from a
        CUDA graph where one is captured, else eagerly."""
        if not self.cuda_graphs or idx.shape[1] != self.cfg.batch_size:
            self._step(idx, task, monitor)
            return
        if self._graph is None:
            if self._eager_steps < WARMUP_STEPS:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._step(idx, task, monitor)
                torch.cuda.current_stream(self.device).wait_stream(side)
                self._eager_steps += 1
                return
            if not self._capture(idx, task, monitor):
                self._step(idx, task, monitor)
                return
        self._graph_idx.copy_(idx)
        self._graph.replay()

    def _capture(self, idx: Tensor, task: Task, monitor: TaskMonitor) -> bool:
        """Capture ``_step`` on a static index buffer (capture runs nothing); False (and graphs off) if the
        capture fails."""
        self._graph_idx = idx.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(self._graph_idx, task, monitor)
        except RuntimeError as err:
            log.warning("CUDA graph capture failed (%s); training with eager steps", " ".join(str(err).split()))
            self.cuda_graphs = False
            return False
        self._graph = graph
        return True

    def _reset_graph(self) -> None:
        self._graph, self._graph_idx, self._eager_steps = None, None, 0

    def _step(self, idx: Tensor, task: Task, monitor: TaskMonitor) -> None:
        """One optimizer step of every run; no host sync (see the module docstring)."""
        runs, batch = idx.shape
        rows = idx.reshape(-1)
        x = task.train_x.index_select(0, rows).view(runs, batch, *task.train_x.shape[1:])  # (R, B, 1, 28, 28)
        y = task.train_y.index_select(0, rows).view(runs, batch)  # (R, B)
        params = self.runs.params
        logits = self.runs.logits(x, train=True)  # (R, B, C)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(runs, batch).mean(1)
        # run r's part of the gradient of the sum is d loss_r / d theta_r. contiguous(): a weight's gradient
        # can come out transposed, and torch's fused CPU Adam (2.14) reads gradients as if contiguous
        grads = [g.contiguous() for g in torch.autograd.grad(losses.sum(), params)]
        task_norm = run_norms(grads)
        pen = self.penalty.add_grad_(params, grads)
        pen_norm, total = (None, task_norm) if pen is None else (run_norms(pen), run_norms(grads))
        self.importance.before_step(params, grads)
        self.penalty.clip_(grads, total)
        self.optimizer.step(params, grads)
        self.importance.after_step(params)
        monitor.record(losses, task_norm, pen_norm, total)

    # ------------------------------------------------------------------ after a task
    @torch.no_grad()
    def evaluate(self, seen: list[Task]) -> None:
        """Append every run's accuracies on the test sets of ``seen`` (tasks 1..t) to its outcome."""
        chunk = self.cfg.eval_batch_size
        runs = len(self.ids)
        group = max(1, EVAL_RUN_SAMPLES // chunk)
        counts = torch.zeros(len(seen), runs, dtype=torch.long, device=self.device)
        for i, s in enumerate(seen):
            for lo in range(0, runs, group):
                part = slice(lo, min(lo + group, runs))
                params = [p[part] for p in self.runs.params]
                buffers = {k: v[part] for k, v in self.runs.buffers.items()}
                for start in range(0, s.test_x.shape[0], chunk):
                    logits = self.runs.logits(s.test_x[start : start + chunk], False, True, params, buffers)
                    counts[i, part] += (logits.argmax(-1) == s.test_y[start : start + chunk]).sum(1)
        counts = counts.cpu().tolist()
        for p, rid in enumerate(self.ids):
            self.outcomes[rid].acc_matrix.append([counts[i][p] / s.test_x.shape[0] for i, s in enumerate(seen)])
        log.info("after task %d: mean accuracy %s", len(seen),
                 ", ".join(f"{sum(self.outcomes[rid].acc_matrix[-1]) / len(seen):.4f}" for rid in self.ids))

    def consolidate(self, t: int, task: Task) -> None:
        """Importances of every run on the task's last ``importance_samples`` training samples, added to
        Omega, and the anchor set to the current parameters; a run with non-finite importances diverges."""
        n = self.cfg.importance_samples
        start = self._clock()
        task_omega = self.importance.end_task(self.runs, task.train_x[-n:], task.train_y[-n:])
        seconds = (self._clock() - start) / len(self.ids)
        for rid in self.ids:
            self.outcomes[rid].importance_seconds.append(seconds)
        bad = [p for p, ok in enumerate(self._finite(task_omega)) if not ok]
        for p in bad:
            self.outcomes[self.ids[p]].divergence = Divergence(t, self.cfg.epochs, -1, "non-finite importance")
        keep = self._retire(bad)
        if not self.ids:
            return
        for acc, part in zip(self.omega, task_omega):
            acc += part if keep is None else part.index_select(0, keep)
        self.penalty.consolidate([p.detach() for p in self.runs.params], self.omega)

    def stop(self, positions: list[int], t: int) -> None:
        """Stop the runs at ``positions`` after task t (their caller's verdict); they keep their outcome."""
        for p in positions:
            self.outcomes[self.ids[p]].stopped_after_task = t
        self._retire(positions)

    def finish(self) -> list[RunOutcome]:
        """The outcomes, with each run still in the batch given its final optimizer state."""
        for rid, state in zip(self.ids, self.optimizer.run_states()):
            self.outcomes[rid].final_optimizer_state = state
        return self.outcomes

    # ------------------------------------------------------------------ bookkeeping
    def _summarise(self, monitor: TaskMonitor, positions: list[int], steps: list[int],
                   divergence: list[tuple[int, str] | None]) -> None:
        summaries = monitor.summaries(positions, steps, divergence, self.runs.params, self.penalty.anchor)
        for p, k, summary in zip(positions, steps, summaries):
            outcome = self.outcomes[self.ids[p]]
            outcome.telemetry.append(summary)
            if outcome.telemetry_trace is not None:
                outcome.telemetry_trace.append(monitor.trace(p, k))

    def _retire(self, positions: list[int], monitor: TaskMonitor | None = None) -> Tensor | None:
        """Drop the runs at ``positions`` from every stacked state, keeping their final optimizer state in
        their outcome; returns the kept positions (None when nothing was dropped)."""
        if not positions:
            return None
        leaving = set(positions)
        states = self.optimizer.run_states()
        for p in leaving:
            self.outcomes[self.ids[p]].final_optimizer_state = states[p]
        kept = [p for p in range(len(self.ids)) if p not in leaving]
        self.ids = [self.ids[p] for p in kept]
        self.generators = [self.generators[p] for p in kept]
        keep = torch.tensor(kept, dtype=torch.long, device=self.device)
        self._reset_graph()
        if not kept:
            return keep
        self.runs.select(keep)
        self.optimizer.select(keep)
        self.penalty.select(keep)
        self.importance.select(keep)
        self.omega = [o.index_select(0, keep) for o in self.omega]
        if monitor is not None:
            monitor.select(keep)
        return keep

    @staticmethod
    def _finite(tensors: list[Tensor]) -> list[bool]:
        """Per run: all elements of its slices finite (one host transfer)."""
        return torch.stack([torch.isfinite(t.detach().flatten(1)).all(1) for t in tensors]).all(0).tolist()

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def train_stack(
    cfgs: list[RunConfig], tasks: list[Task], device: torch.device, *, progress: bool = False, trace: bool = False,
    blowup: BlowupRule | None = None, after_task: BatchAfterTask | None = None,
    optimizer_states: list[RunState | None] | None = None, cuda_graphs: bool | None = None,
) -> tuple[list[RunOutcome], dict[str, object]]:
    """The protocol over ``tasks`` for the runs ``cfgs`` stacked in one engine: the outcomes (in order) and
    the engine's description for the records."""
    engine = Engine(cfgs, device, trace=trace, blowup=blowup, optimizer_states=optimizer_states,
                    cuda_graphs=cuda_graphs)
    for t, task in enumerate(tasks, start=1):
        engine.train_task(t, task, progress)
        if not engine.ids:
            break
        engine.evaluate(tasks[:t])
        if after_task is not None:
            stop = set(after_task(t, {rid: engine.outcomes[rid].acc_matrix[-1] for rid in engine.ids}))
            engine.stop([p for p, rid in enumerate(engine.ids) if rid in stop], t)
            if not engine.ids:
                break
        if t == len(tasks):
            break
        engine.consolidate(t, task)
        if not engine.ids:
            break
    return engine.finish(), engine.info
