"""Batched training: R continual-learning runs (different seeds and/or lambdas) as one computation.

``train_batched(cfgs, tasks, device)`` -> one ``ewcstab.train.RunOutcome`` per config;
``execute_batched(cfgs)`` -> one run record per config (as ``ewcstab.train.execute``);
``ewcstab benchmark-batched`` (``benchmark.register``) times it against the single-run path.
See ``engine.py`` for what is per run and why the results equal the single-run path's.
"""

from ewcstab.batched.engine import (
    CPU_RUNS_PER_BATCH,
    BatchAfterTask,
    PER_RUN_FIELDS,
    check_batchable,
    default_runs_per_batch,
    execute_batched,
    train_batched,
    train_batched_with_params,
)

__all__ = [
    "CPU_RUNS_PER_BATCH",
    "BatchAfterTask",
    "PER_RUN_FIELDS",
    "check_batchable",
    "default_runs_per_batch",
    "execute_batched",
    "train_batched",
    "train_batched_with_params",
]
