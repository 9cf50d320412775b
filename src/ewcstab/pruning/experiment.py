"""The pruning experiment for one network (paper section 4, docs/protocol.md 'Pruning by weight importance').

1. Train the architecture on plain MNIST: one task, the continual-learning protocol's training
   (Adam lr 1e-3, batch 100, 6 epochs, seeded as every run is seeded, so the network equals the first
   task of a run with the same seed), by the training engine (``ewcstab.engine.Engine``, one run).
2. Compute each importance with ``ewcstab.importance.build_importance``:
   - ``importance_data="test"``: on the MNIST test set, as the authors did (the set the curves are
     then evaluated on);
   - ``importance_data="heldout"``: train on all but the last ``heldout_size`` (10,000) training
     images and compute the importances on those held-out images instead.
   SI is online: its Omega comes from the training trajectory of this same network (every
   estimator observes the training steps; only SI uses them), so the importance data does not
   apply to SI.
3. Prune globally and per layer at every sparsity of the grid and record the test accuracy
   (``ewcstab.pruning.curve.pruning_curve``).

The result is one tidy table per network (columns ``CURVE_COLUMNS``) plus a metadata record
(configuration, timings, unpruned accuracy, provenance) written beside it as JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ewcstab import provenance
from ewcstab.config import ConfigError, RunConfig
from ewcstab.data import build_tasks, data_checksums, resolve_data_root
from ewcstab.device import resolve_device, synchronize
from ewcstab.importance import REGISTRY as IMPORTANCE_REGISTRY
from ewcstab.importance import build_importance
from ewcstab.interfaces import Importance, Networks, Task
from ewcstab.io import write_json_atomic, write_text_atomic
from ewcstab.metrics import accuracy
from ewcstab.pruning.curve import CURVE_METHODS, pruning_curve
from ewcstab.pruning.ranking import SCOPES, sparsity_levels
from ewcstab.engine import Engine

log = logging.getLogger(__name__)

IMPORTANCE_DATA = ("test", "heldout")
PRUNING_IMPORTANCES = ("magnitude", "fisher", "mas", "si", "signal")
CURVE_COLUMNS = ["arch", "importance_data", "seed", "importance", "scope", "sparsity", "n_pruned", "accuracy"]
#: The single task every network is trained on: task 1 of permuted MNIST is plain MNIST.
TRAIN_SEQUENCE = "permuted_mnist"


@dataclass
class PruneConfig:
    """One network of the pruning experiment.

    arch: model name (paper: mlp; signal needs the model's ``signal_activations``).
    seed: initialisation and data-order seed (the same seeding as ``ewcstab run``).
    importance_data: test (paper: the MNIST test set) | heldout (the last ``heldout_size``
        training images, which are then left out of training).
    importances: names from ``ewcstab.importance.REGISTRY`` (paper: all five).
    scopes: global | per_layer (paper: both).
    sparsity_step: grid spacing of p = 0, step, ..., 1 (paper: 0.001; 1/step a whole number).
    epochs, batch_size, lr, optimizer: training (paper: 6, 100, 1e-3, adam).
    heldout_size: held-out training images for importance_data=heldout (10,000).
    fisher_label: label of the Fisher's log-likelihood: true (paper) | predicted.
    si_xi: SI damping (paper: 0.1).
    train_subset / test_subset: first N samples of each split (quick runs; None = all).
    curve_method: auto | fast | direct (``ewcstab.pruning.curve``).
    device, data_root, download: as in ``RunConfig``.
    """

    arch: str = "mlp"
    seed: int = 0
    importance_data: str = "test"
    importances: tuple[str, ...] = PRUNING_IMPORTANCES
    scopes: tuple[str, ...] = SCOPES
    sparsity_step: float = 0.001
    epochs: int = 6
    batch_size: int = 100
    lr: float = 1e-3
    optimizer: str = "adam"
    heldout_size: int = 10_000
    fisher_label: str = "true"
    si_xi: float = 0.1
    train_subset: int | None = None
    test_subset: int | None = None
    curve_method: str = "auto"
    device: str = "auto"
    data_root: str | None = None
    download: bool = True

    def training_config(self) -> RunConfig:
        """The shared training settings as a validated one-task ``RunConfig`` (lam = 0: no penalty)."""
        return RunConfig(
            arch=self.arch, method="si", variant="original", lam=0.0, seed=self.seed,
            sequence=TRAIN_SEQUENCE, n_tasks=1, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            optimizer=self.optimizer, si_xi=self.si_xi, fisher_label=self.fisher_label,
            train_subset=self.train_subset, test_subset=self.test_subset, device=self.device,
            data_root=self.data_root, download=self.download,
        ).replace()  # replace() validates

    def validate(self) -> None:
        self.training_config()
        if self.importance_data not in IMPORTANCE_DATA:
            raise ConfigError(
                f"importance_data: {self.importance_data!r} is not allowed; allowed: {', '.join(IMPORTANCE_DATA)}"
            )
        for name in self.importances:
            if name not in IMPORTANCE_REGISTRY:
                raise ConfigError(f"importances: {name!r} is not allowed; allowed: {', '.join(IMPORTANCE_REGISTRY)}")
        if not self.importances or len(set(self.importances)) != len(self.importances):
            raise ConfigError(f"importances: {list(self.importances)} must be a non-empty list without repeats")
        for scope in self.scopes:
            if scope not in SCOPES:
                raise ConfigError(f"scopes: {scope!r} is not allowed; allowed: {', '.join(SCOPES)}")
        if not self.scopes or len(set(self.scopes)) != len(self.scopes):
            raise ConfigError(f"scopes: {list(self.scopes)} must be a non-empty list without repeats")
        if self.curve_method not in CURVE_METHODS:
            raise ConfigError(
                f"curve_method: {self.curve_method!r} is not allowed; allowed: {', '.join(CURVE_METHODS)}"
            )
        if isinstance(self.heldout_size, bool) or not isinstance(self.heldout_size, int) or self.heldout_size < 1:
            raise ConfigError(f"heldout_size: {self.heldout_size!r} must be an integer >= 1")
        try:
            sparsity_levels(self.sparsity_step)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["importances"], out["scopes"] = list(self.importances), list(self.scopes)
        return out


class StepObservers:
    """Fans the engine's step hooks out to several importance estimators (``interfaces.Importance``).

    The engine drives one observer; offline estimators ignore the steps, SI accumulates its
    path integral. No estimator is asked which method it is.
    """

    name = "observers"

    def __init__(self, estimators: dict[str, Importance]) -> None:
        self.estimators = estimators

    def begin_task(self, params: list[Tensor]) -> None:
        for est in self.estimators.values():
            est.begin_task(params)

    def before_step(self, params: list[Tensor], grads: list[Tensor]) -> None:
        for est in self.estimators.values():
            est.before_step(params, grads)

    def after_step(self, params: list[Tensor]) -> None:
        for est in self.estimators.values():
            est.after_step(params)

    def select(self, keep: Tensor) -> None:
        for est in self.estimators.values():
            est.select(keep)

    def end_task(self, runs: Networks, x: Tensor, y: Tensor) -> list[Tensor]:
        raise TypeError("StepObservers has no importance of its own; call end_task on each estimator")


def importance_options(cfg: PruneConfig) -> dict[str, dict[str, object]]:
    """Keyword arguments per estimator name (those not listed take none)."""
    return {"fisher": {"label": cfg.fisher_label}, "si": {"xi": cfg.si_xi}}


def split_for_importance(task: Task, importance_data: str, heldout_size: int) -> tuple[Task, Tensor, Tensor]:
    """(training task, importance x, importance y) for importance_data test | heldout."""
    if importance_data == "test":
        return task, task.test_x, task.test_y
    n = task.train_x.shape[0]
    if heldout_size >= n:
        raise ConfigError(f"heldout_size: {heldout_size} leaves no training data out of {n} training images")
    keep = n - heldout_size
    train = dataclasses.replace(task, train_x=task.train_x[:keep], train_y=task.train_y[:keep])
    return train, task.train_x[keep:], task.train_y[keep:]


def train_network(
    cfg: RunConfig, task: Task, device: torch.device, observer: Importance, progress: bool = False
) -> tuple[nn.Module, Networks]:
    """Train a fresh ``cfg.arch`` on one task with the training engine (one run).

    Returns the trained network (a module of its own, eval mode) and the engine's stack of one run (what
    SI's ``end_task`` reads). The run is seeded as every run is, so the network is the one task 1 of a run
    with this seed produces. ``observer`` receives the engine's step hooks (SI needs them).
    """
    engine = Engine([cfg], device, importance=observer)
    engine.train_task(1, task, progress)
    if engine.outcomes[0].divergence is not None:
        raise RuntimeError(f"training diverged: {engine.outcomes[0].divergence}")
    with engine.runs.network(0) as trained:
        return copy.deepcopy(trained), engine.runs


@dataclass
class NetworkResult:
    """Curves and bookkeeping of one network."""

    curves: pd.DataFrame
    unpruned_accuracy: float
    train_seconds: float
    importance_seconds: dict[str, float] = field(default_factory=dict)
    curve_seconds: dict[str, float] = field(default_factory=dict)
    curve_methods: dict[str, str] = field(default_factory=dict)
    n_prunable: dict[str, int] = field(default_factory=dict)


def prune_network(
    cfg: PruneConfig, task: Task, device: torch.device, progress: bool = False
) -> NetworkResult:
    """Train one network on ``task`` and compute every (importance, scope) curve on its test set."""
    cfg.validate()
    train_cfg = cfg.training_config()
    options = importance_options(cfg)
    estimators = {name: build_importance(name, **options.get(name, {})) for name in cfg.importances}
    train, imp_x, imp_y = split_for_importance(task, cfg.importance_data, cfg.heldout_size)

    synchronize(device)
    start = time.perf_counter()
    model, runs = train_network(train_cfg, train, device, StepObservers(estimators), progress)
    synchronize(device)
    result = NetworkResult(pd.DataFrame(), accuracy(model, task.test_x, task.test_y), time.perf_counter() - start)
    log.info("seed %d: trained in %.1f s, test accuracy %.4f", cfg.seed, result.train_seconds, result.unpruned_accuracy)

    frames = []
    for name, est in estimators.items():
        start = time.perf_counter()
        # SI ignores x, y: its Omega is the training path integral
        omega = dict(zip(runs.names, (o[0] for o in est.end_task(runs, imp_x, imp_y))))
        synchronize(device)
        result.importance_seconds[name] = time.perf_counter() - start
        for scope in cfg.scopes:
            curve = pruning_curve(model, omega, scope, task.test_x, task.test_y, cfg.sparsity_step, cfg.curve_method)
            key = f"{name}/{scope}"
            result.curve_seconds[key], result.curve_methods[key] = curve.seconds, curve.method
            result.n_prunable[scope] = curve.n_prunable
            log.info("seed %d: %s curve (%s) in %.1f s; accuracy at p=0.9: %.4f", cfg.seed, key, curve.method,
                     curve.seconds, curve.accuracy[_index_of(curve.sparsity, 0.9)])
            frames.append(pd.DataFrame({
                "arch": cfg.arch, "importance_data": cfg.importance_data, "seed": cfg.seed, "importance": name,
                "scope": scope, "sparsity": curve.sparsity, "n_pruned": curve.n_pruned, "accuracy": curve.accuracy,
            }))
    result.curves = pd.concat(frames, ignore_index=True)[CURVE_COLUMNS]
    return result


def _index_of(grid: np.ndarray, value: float) -> int:
    """Index of the grid point nearest to ``value`` (for log lines)."""
    return int(np.abs(grid - value).argmin())


def load_task(cfg: PruneConfig, device: torch.device) -> tuple[Task, Path]:
    """Plain MNIST (task 1 of permuted MNIST) on ``device``, with the config's subsets."""
    root = resolve_data_root(cfg.data_root)
    (task,) = build_tasks(TRAIN_SEQUENCE, 1, 0, root, device, cfg.train_subset, cfg.test_subset, cfg.download)
    return task, root


def run_pruning_experiment(cfg: PruneConfig, progress: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Load MNIST, run ``prune_network`` and return (curves table, metadata record)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    task, root = load_task(cfg, device)
    wall = time.perf_counter()
    result = prune_network(cfg, task, device, progress)
    wall = time.perf_counter() - wall
    meta = {
        "schema": "ewcstab.prune/1",
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "unpruned_accuracy": result.unpruned_accuracy,
        "n_prunable": result.n_prunable,
        "n_train": int(task.train_x.shape[0]) - (cfg.heldout_size if cfg.importance_data == "heldout" else 0),
        "n_importance": int(task.test_x.shape[0]) if cfg.importance_data == "test" else cfg.heldout_size,
        "n_test": int(task.test_x.shape[0]),
        "si_note": "SI's importance is the path integral of this network's training; importance_data does not apply",
        "train_seconds": result.train_seconds,
        "importance_seconds": result.importance_seconds,
        "curve_seconds": result.curve_seconds,
        "curve_methods": result.curve_methods,
        "wall_seconds": wall,
        "threads": torch.get_num_threads(),
        "provenance": provenance.collect(device, data_checksums(["mnist"], root), str(root)),
    }
    return result.curves, meta


def metadata_path(curves_path: str | Path) -> Path:
    """Where the metadata of a curve table goes: the same name with suffix .json (seed0.csv -> seed0.json)."""
    path = Path(curves_path)
    if path.suffix == ".json":
        raise ValueError(f"curve table {str(path)!r} must not end in .json (its metadata goes to NAME.json)")
    return path.with_suffix(".json")


def write_curves(
    curves: pd.DataFrame, meta: dict[str, Any], path: str | Path, meta_path: str | Path | None = None
) -> Path:
    """Write the curve table (CSV) and its metadata (JSON), each atomically; returns the metadata path.

    Accuracies are written with full float precision (``repr``), so tables re-read bit-exactly.
    """
    missing = [c for c in CURVE_COLUMNS if c not in curves.columns]
    if missing:
        raise ValueError(f"curve table lacks columns {missing}")
    if not all(math.isfinite(v) for v in curves["accuracy"]):
        raise ValueError("curve table holds a non-finite accuracy")
    meta_path = Path(meta_path) if meta_path is not None else metadata_path(path)
    write_text_atomic(path, curves[CURVE_COLUMNS].to_csv(index=False))
    write_json_atomic(meta_path, meta)
    return meta_path
