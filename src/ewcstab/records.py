"""Run outcomes and run records. A leaf module: imports nothing else from the package.

A ``RunOutcome`` is what training one run produced (accuracies, divergence, timings, telemetry); the run
record (``run_record``) is its JSON form, one file per run (docs/run-records.md):

    schema, config, seed, tasks, acc_matrix, mean_acc_after_task, final_mean_acc,
    diverged, diverged_at {task, epoch, step, reason}, train_seconds, importance_seconds,
    wall_seconds, telemetry, [telemetry_trace], [stopped_after_task], [chain], divergence_rule,
    engine, provenance

A diverged run's accuracies after the divergence are null, never numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA = "ewcstab.run/1"


@dataclass
class Divergence:
    task: int  # 1-based
    epoch: int  # 1-based
    step: int  # 1-based optimizer step within the task; -1: found after the task (parameters, importance)
    reason: str


@dataclass
class RunOutcome:
    acc_matrix: list[list[float]] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    importance_seconds: list[float] = field(default_factory=list)
    divergence: Divergence | None = None
    telemetry: list[dict[str, object]] = field(default_factory=list)  # one summary per trained task
    telemetry_trace: list[dict[str, object]] | None = None  # per-step rows per task, when asked
    divergence_rule: dict[str, float] = field(default_factory=dict)
    stopped_after_task: int | None = None  # stopped by its caller (an Optuna pruner)
    chain: dict[str, object] | None = None  # carried optimizer state: where it came from
    #: the optimizer state the run ended with, per parameter (not part of the record): what the next
    #: run of a carried chain starts from
    final_optimizer_state: list[dict[str, Any]] | None = None


class StopRun(Exception):
    """Raised by an ``after_task`` callback of a single run to end the run there and keep its outcome so
    far (``RunOutcome.stopped_after_task``); any other exception propagates out of the run."""


def run_record(
    config: dict[str, Any], task_names: list[str], outcome: RunOutcome, wall_seconds: float,
    engine: dict[str, Any], provenance: dict[str, Any],
) -> dict[str, Any]:
    """The JSON record of one run; ``config`` is the resolved run configuration as a dict."""
    n_tasks = len(task_names)
    means: list[float | None] = [sum(row) / len(row) for row in outcome.acc_matrix]
    means += [None] * (n_tasks - len(means))
    div = outcome.divergence
    optional = {
        "telemetry_trace": outcome.telemetry_trace,
        "stopped_after_task": outcome.stopped_after_task,
        "chain": outcome.chain,
    }
    return {
        "schema": SCHEMA,
        "config": config,
        "seed": config["seed"],
        "tasks": task_names,
        "acc_matrix": outcome.acc_matrix,
        "mean_acc_after_task": means,
        "final_mean_acc": means[-1],
        "diverged": div is not None,
        "diverged_at": None if div is None else {"task": div.task, "epoch": div.epoch, "step": div.step,
                                                 "reason": div.reason},
        "train_seconds": outcome.train_seconds,
        "importance_seconds": outcome.importance_seconds,
        "wall_seconds": wall_seconds,
        "telemetry": outcome.telemetry,
        **{k: v for k, v in optional.items() if v is not None},
        "divergence_rule": outcome.divergence_rule,
        "engine": engine,
        "provenance": provenance,
    }
