"""Running configs: batches of the engine, carried-optimizer chains, data loading and run records.

``train_configs(cfgs, tasks, device)`` trains runs of one setting (differing only in seed and lambda) and
returns their outcomes in order:

- ``optimizer_state: fresh`` (docs/protocol.md): every run starts with a new optimizer. The runs are
  stacked in batches of ``runs_per_batch`` (default: ``CPU_RUNS_PER_THREAD`` per CPU thread, all on a GPU).
- ``optimizer_state: carried``: as the authors' scripts ran. Their Adam was created once per process and
  never reset between runs, so every run but a process's first started from the Adam state (both
  moments and the step count) the run before it ended with. Here a run belongs to the chain of its
  ``chain_length`` block of seeds at its lambda (``config.chain_of``): a donor run (seed
  ``DONOR_SEED_OFFSET`` + the block's first seed, fresh optimizer, same setting and lambda, not
  counted), then the block's seeds in increasing order, each starting from the state its predecessor
  ended with. Chains advance side by side: position k of every chain is one batch. Adam forgets with
  time constants of 10 and 1,000 steps, far less than a run's 36,000 steps, so what a run inherits hardly
  depends on how long the chain before it is; ``chain_length`` 1 (every run its own donor) makes the
  counted runs independent, a longer chain costs fewer donors. A run's record says where its state came
  from (``chain``). A run that follows a stopped run (an Optuna pruner's verdict) is not trained: it is
  recorded as stopped after task 0.

``execute`` / ``execute_batched`` load the data, train, and return the run records (``records.py``) with
their provenance.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ewcstab import provenance
from ewcstab.config import DONOR_SEED_OFFSET, RunConfig, chain_of
from ewcstab.data import build_tasks, data_checksums, datasets_of, resolve_data_root
from ewcstab.device import resolve_device
from ewcstab.engine import BatchAfterTask, check_batchable, train_stack
from ewcstab.interfaces import Task
from ewcstab.optim import RunState
from ewcstab.records import RunOutcome, StopRun, run_record
from ewcstab.telemetry import BlowupRule

log = logging.getLogger(__name__)

#: Runs stacked together per CPU thread when the caller does not say (more are trained batch after batch),
#: per architecture: torch splits a batched product over threads by run, so R should be a multiple of the
#: threads; per thread, R = 4 is as fast as one at a time for the MLP and 1.2x faster for the attention model,
#: while the CNN's stacked runs become a grouped convolution that oneDNN runs slower than R separate ones
#: (docs/performance.md).
CPU_RUNS_PER_THREAD = {"mlp": 4, "cnn": 1, "attention": 4}

#: ``after_task(t, accuracies on tasks 1..t)`` of a single run; raise ``StopRun`` to stop it there.
AfterTask = Callable[[int, list[float]], None]


def default_runs_per_batch(device: torch.device, arch: str) -> int | None:
    """Runs per batch when not given: ``CPU_RUNS_PER_THREAD`` per torch thread on a CPU, all of them on an
    accelerator."""
    return CPU_RUNS_PER_THREAD.get(arch, 1) * torch.get_num_threads() if device.type == "cpu" else None


def train_runs(
    cfgs: list[RunConfig], tasks: list[Task], device: torch.device, *, runs_per_batch: int | None = None,
    after_task: BatchAfterTask | None = None, optimizer_states: list[RunState | None] | None = None,
    **options,
) -> tuple[list[RunOutcome], dict[str, object]]:
    """``engine.train_stack`` over batches of at most ``runs_per_batch`` runs, as equal in size as possible
    (it changes the speed, never the results); returns the outcomes in order and the engine description of
    the first batch. ``options``: progress, trace, blowup, cuda_graphs."""
    most = runs_per_batch or default_runs_per_batch(device, cfgs[0].arch) or len(cfgs)
    if most < 1:
        raise ValueError(f"runs_per_batch: {runs_per_batch!r} is not allowed; allowed: an integer >= 1")
    size = math.ceil(len(cfgs) / math.ceil(len(cfgs) / most))  # 10 runs, at most 8: two batches of 5
    states = optimizer_states or [None] * len(cfgs)
    outcomes: list[RunOutcome] = []
    info: dict[str, object] = {}
    for lo in range(0, len(cfgs), size):
        hook = None if after_task is None else _shifted(after_task, lo)
        part, part_info = train_stack(cfgs[lo : lo + size], tasks, device, after_task=hook,
                                      optimizer_states=states[lo : lo + size], **options)
        outcomes += part
        info = info or {**part_info, "runs_per_batch": size}
    return outcomes, info


def train_configs(
    cfgs: list[RunConfig], tasks: list[Task], device: torch.device, **options,
) -> tuple[list[RunOutcome], dict[str, object]]:
    """The runs ``cfgs`` (one setting; seeds and lambdas free) with fresh or carried optimizer state (module
    docstring); options as ``train_runs`` (runs_per_batch, after_task, progress, trace, blowup, cuda_graphs)."""
    first = check_batchable(cfgs)
    if first.optimizer_state == "fresh":
        return train_runs(cfgs, tasks, device, **options)
    return _train_chains(cfgs, tasks, device, **options)


def _train_chains(
    cfgs: list[RunConfig], tasks: list[Task], device: torch.device, *, after_task: BatchAfterTask | None = None,
    **options,
) -> tuple[list[RunOutcome], dict[str, object]]:
    """Carried optimizer state: every chain the runs ``cfgs`` belong to, advanced side by side."""
    wanted = {(c.lam, c.seed): i for i, c in enumerate(cfgs)}
    if len(wanted) != len(cfgs):
        raise ValueError("the same (lambda, seed) is asked for twice")
    length = cfgs[0].chain_length
    last: dict[tuple[float, int], int] = {}  # (lambda, block's first seed) -> the block's last seed asked for
    for c in cfgs:
        key = (c.lam, c.seed - c.seed % length)
        last[key] = max(last.get(key, c.seed), c.seed)
    chains = {key: chain_of(seed, length) for key, seed in last.items()}  # donor seed first
    # each position of a chain is trained as a plain batch whose inherited state is given explicitly
    base = cfgs[0].replace(optimizer_state="fresh")
    states: dict[tuple[float, int], RunState | None] = {key: None for key in chains}
    stopped: set[tuple[float, int]] = set()
    donors: dict[tuple[float, int], RunOutcome] = {}
    results: list[RunOutcome | None] = [None] * len(cfgs)
    info: dict[str, object] = {}
    for k in range(max(len(seeds) for seeds in chains.values())):
        members = [(key, seeds[k], seeds[k - 1] if k else None) for key, seeds in chains.items() if k < len(seeds)]
        for key, seed, _ in [m for m in members if m[0] in stopped]:
            if (key[0], seed) in wanted:
                results[wanted[(key[0], seed)]] = RunOutcome(stopped_after_task=0, chain={"stopped": "predecessor"})
        members = [m for m in members if m[0] not in stopped]
        # runs whose inherited Adam step counts differ (a predecessor diverged) cannot share one optimizer
        for group in _by_step_count(members, states):
            batch = [base.replace(lam=key[0], seed=seed) for key, seed, _ in group]
            counted = [wanted.get((key[0], seed)) for key, seed, _ in group]
            hook = None if after_task is None else _counted_only(after_task, counted)
            outs, part_info = train_runs(batch, tasks, device, after_task=hook,
                                         optimizer_states=[states[key] for key, _, _ in group], **options)
            info = info or part_info
            for (key, seed, before), out, index in zip(group, outs, counted):
                inherited = states[key]
                states[key] = out.final_optimizer_state
                if out.stopped_after_task is not None:
                    stopped.add(key)
                if k == 0:
                    donors[key] = out
                    continue
                out.chain = _chain_entry(chains[key], seed, before, inherited, donors[key])
                if index is not None:
                    results[index] = out
    return [r if r is not None else RunOutcome() for r in results], info


def _by_step_count(members: list, states: dict) -> list[list]:
    """``members`` grouped by the Adam step count of the state each inherits (None: fresh)."""
    groups: dict[float | None, list] = {}
    for m in members:
        groups.setdefault(_steps_of(states[m[0]]), []).append(m)
    return list(groups.values())


def _steps_of(state: RunState | None) -> float | None:
    if not state:
        return None
    return next((float(s["step"]) for s in state if "step" in s), None)


def _chain_entry(seeds: list[int], seed: int, before: int, inherited: RunState | None,
                 donor: RunOutcome) -> dict[str, object]:
    """A carried run's ``chain`` record entry: the seeds trained before it and itself (donor first), its
    predecessor, and the donor's result."""
    donor_means = [sum(row) / len(row) for row in donor.acc_matrix]
    position = seeds.index(seed)
    return {
        "seeds": seeds[: position + 1], "position": position, "predecessor_seed": before,
        "donor_seed": seeds[0], "inherited_optimizer_steps": _steps_of(inherited),
        "donor_final_mean_acc": donor_means[-1] if donor_means and donor.divergence is None else None,
        "donor_diverged": donor.divergence is not None,
    }


def _shifted(after_task: BatchAfterTask, offset: int) -> BatchAfterTask:
    """``after_task`` for a sub-batch whose run 0 is run ``offset`` of the caller's list."""
    def hook(t: int, accs: dict[int, list[float]]) -> list[int]:
        return [i - offset for i in after_task(t, {i + offset: a for i, a in accs.items()})]
    return hook


def _counted_only(after_task: BatchAfterTask, counted: list[int | None]) -> BatchAfterTask:
    """``after_task`` that sees only the counted runs of a chain batch, under their indices in the caller's
    list (donors and runs nobody asked for are never stopped)."""
    def hook(t: int, accs: dict[int, list[float]]) -> list[int]:
        asked = {counted[p]: a for p, a in accs.items() if counted[p] is not None}
        if not asked:
            return []
        stop = set(after_task(t, asked))
        return [p for p, index in enumerate(counted) if index is not None and index in stop]
    return hook


# ---------------------------------------------------------------------- records
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
    """A record's provenance: versions, commit, device, numerics settings, host, and the data files' sha256."""
    resolved = cfg.resolved()
    checksums = data_checksums(datasets_of(resolved.sequence, resolved.n_tasks), root)
    return provenance.collect(device, checksums, str(root))


def execute_batched(
    cfgs: list[RunConfig], progress: bool = False, trace: bool = False, blowup: BlowupRule | None = None,
    runs_per_batch: int | None = None, after_task: BatchAfterTask | None = None,
) -> list[dict[str, object]]:
    """Load the data once, train the runs (``train_configs``), return one run record per config.

    ``wall_seconds`` of each record is the whole call's training time divided by the number of runs; the
    batch's total is in ``batch.wall_seconds``."""
    first = check_batchable(cfgs)
    tasks, device, root = load_run_data(first)
    provenance.set_numerics(device)
    wall = time.perf_counter()
    outcomes, info = train_configs(cfgs, tasks, device, progress=progress, trace=trace, blowup=blowup,
                                   runs_per_batch=runs_per_batch, after_task=after_task)
    wall = time.perf_counter() - wall
    prov = run_provenance(first, device, root)
    names = [t.name for t in tasks]
    records = []
    for i, (cfg, outcome) in enumerate(zip(cfgs, outcomes)):
        rec = run_record(cfg.resolved().to_dict(), names, outcome, wall / len(cfgs), info, prov)
        rec["batch"] = {"runs": len(cfgs), "index": i, "wall_seconds": wall}
        records.append(rec)
    return records


def execute(cfg: RunConfig, progress: bool = False, after_task: AfterTask | None = None,
            trace: bool = False, blowup: BlowupRule | None = None) -> dict[str, object]:
    """One run's record (a batch of one); ``after_task(t, accuracies)`` may raise ``StopRun`` to stop it
    after task t (any other exception propagates)."""
    def hook(t: int, accs: dict[int, list[float]]) -> list[int]:
        try:
            after_task(t, accs[0])
        except StopRun:
            return [0]
        return []

    (rec,) = execute_batched([cfg], progress, trace, blowup, 1, None if after_task is None else hook)
    del rec["batch"]
    return rec


__all__ = ["CPU_RUNS_PER_THREAD", "DONOR_SEED_OFFSET", "StopRun", "default_runs_per_batch", "execute",
           "execute_batched", "load_run_data", "run_provenance", "train_configs", "train_runs"]
