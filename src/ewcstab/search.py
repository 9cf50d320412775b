"""``ewcstab search``: an Optuna study of lambda for one (arch, method, variant).

- ``tpe`` mode: TPE (seeded) over log-lambda in [low, high]; a median pruner stops
  hopeless lambdas early from the mean accuracy reported after every task.
- ``grid`` mode: Optuna's GridSampler over given lambda values (the paper's grids), no
  pruning, for a faithful accuracy-versus-lambda curve.

The objective of a trial is the mean accuracy after the last task, averaged over the
trial's seeds. Intermediate value at step ``s*T + t`` is the mean accuracy after task t
of the s-th seed, so trials are compared at equal progress.

A trial whose run diverges is marked PRUNED with the user attribute ``diverged``; TPE
then ranks it below the trials that got further. The study lives in a storage chosen by
URL (``sqlite:///path.db``, ``journal:///path.log`` for Optuna's journal file storage on a
shared filesystem, or any SQLAlchemy database URL), so an interrupted study resumes on
rerun: finished trials are kept, trials left RUNNING by a dead single worker are marked
FAIL and redone, and only the missing number of trials is run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ewcstab.config import RunConfig

log = logging.getLogger(__name__)

#: Identifies this process in each trial's user attributes (host:pid).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

#: Trial seeds are offset from the final runs' seeds (0..N-1) so selection and report use different runs.
TRIAL_SEED_OFFSET = 1000


@dataclass
class SearchSpec:
    """What to search: lambda range or grid, trials, seeds per trial."""

    mode: str  # tpe | grid
    low: float
    high: float
    n_trials: int
    seeds_per_trial: int
    grid: list[float] | None = None
    sampler_seed: int = 0
    pruner: str = "median"  # median | none
    pruner_startup_trials: int = 4

    def validate(self) -> None:
        if self.mode not in ("tpe", "grid"):
            raise ValueError(f"mode: {self.mode!r} is not allowed; allowed: tpe, grid")
        if self.pruner not in ("median", "none"):
            raise ValueError(f"pruner: {self.pruner!r} is not allowed; allowed: median, none")
        if self.mode == "tpe" and not (0 < self.low < self.high):
            raise ValueError(f"lambda range [{self.low}, {self.high}]: tpe needs 0 < low < high (log scale)")
        if self.mode == "grid" and not self.grid:
            raise ValueError("grid mode needs a non-empty list of lambda values")
        if self.n_trials < 1 or self.seeds_per_trial < 1:
            raise ValueError("n_trials and seeds_per_trial must be >= 1")


def open_storage(url: str, heartbeat: int | None = None):
    """An Optuna storage from a URL; ``journal:///path`` selects the journal file storage.

    With ``heartbeat`` (seconds), database storages record a heartbeat for every running
    trial; a trial whose worker died (no heartbeat for 3 intervals) is marked FAIL by the
    next worker that looks, and retried once with the same lambda. Optuna's journal
    storage has no heartbeat: there a dead worker's trial is failed only when a single
    worker restarts the study (see ``fail_stale_trials``).
    """
    import optuna

    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    options = {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if heartbeat:
        options = {
            "heartbeat_interval": heartbeat,
            "grace_period": 3 * heartbeat,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        }
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine, **options)


def grid_values(low: float, high: float, n: int) -> list[float]:
    """n evenly spaced lambdas in [low, high] (the paper's grids give range and count)."""
    return [float(v) for v in np.round(np.linspace(low, high, n), 10)]


def fail_stale_trials(study) -> int:
    """Mark RUNNING trials FAIL: only safe when no other worker shares the study."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        log.warning("trial %d was left running by an interrupted worker: marked FAIL, will be redone", t.number)
    return len(stale)


def check_same_settings(study, base: RunConfig) -> None:
    """A study belongs to one set of run settings: resuming it with others would mix trials.

    The settings (everything but lambda and seed) are stored with the study when it is
    created; a later worker with different settings is refused.
    """
    from ewcstab.config import ConfigError

    settings = {k: v for k, v in base.resolved().to_dict().items() if k not in ("lam", "seed", "device", "data_root")}
    stored = study.user_attrs.get("run_settings")
    if stored is None:
        study.set_user_attr("run_settings", settings)
    elif stored != settings:
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        diff = ", ".join(f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ConfigError(
            f"study {study.study_name!r} was run with other settings ({diff}); "
            "delete its storage or use another study name"
        )


def make_study(name: str, storage_url: str, spec: SearchSpec, heartbeat: int | None = None):
    import optuna

    if spec.mode == "grid":
        sampler = optuna.samplers.GridSampler({"lam": spec.grid}, seed=spec.sampler_seed)
    else:
        # constant liar: trials still running (other workers', or asked in the same batch) count as bad,
        # so concurrent trials spread out instead of sampling the same lambda
        sampler = optuna.samplers.TPESampler(seed=spec.sampler_seed, n_startup_trials=min(5, spec.n_trials),
                                             constant_liar=True)
    if spec.pruner == "median" and spec.mode == "tpe":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=1)
    else:
        pruner = optuna.pruners.NopPruner()
    # Workers started together race to create the storage's tables and the study; the
    # losers see an integrity/operational error once, then find everything in place.
    for attempt in range(6):
        try:
            return optuna.create_study(
                study_name=name, storage=open_storage(storage_url, heartbeat), sampler=sampler, pruner=pruner,
                direction="maximize", load_if_exists=True,
            )
        except Exception as err:  # sqlalchemy IntegrityError / OperationalError, optuna DuplicatedStudyError
            if attempt == 5:
                raise
            log.info("storage busy (%s), retrying", type(err).__name__)
            time.sleep(0.5 + random.random() * 2**attempt)
    raise AssertionError("unreachable")


def run_search(
    name: str,
    storage_url: str,
    base: RunConfig,
    spec: SearchSpec,
    runs_dir: Path,
    single_worker: bool = True,
    progress: bool = False,
    heartbeat: int | None = 60,
    poll_seconds: float = 5.0,
    trials_per_batch: int = 1,
):
    """Run (or resume) the study until it holds exactly ``spec.n_trials`` finished trials.

    Several workers (processes, cluster jobs) may run this on the same storage at once.
    Trials are numbered atomically by the storage, so a trial runs only if fewer than
    ``n_trials`` non-failed trials precede it; a surplus trial, started by a race between
    workers, is marked FAIL with the user attribute ``surplus`` and never evaluated. A
    worker with nothing left to start waits while other workers' trials are running, and
    takes over a trial that fails (its worker died) instead of leaving the study short.

    ``trials_per_batch`` > 1: the worker asks that many trials at once and trains all their runs
    (trials x seeds) as one batch (``ewcstab.batched``; the MLP is stacked, other archs run one
    after another), see ``_run_trial_batch``.
    """
    import optuna
    from optuna.trial import TrialState

    from ewcstab.io import write_json_atomic
    from ewcstab.runner import execute

    spec.validate()
    base.validate()
    study = make_study(name, storage_url, spec, heartbeat)
    check_same_settings(study, base)
    if single_worker:
        fail_stale_trials(study)
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    n_tasks = base.resolved().n_tasks

    class Surplus(Exception):
        """This trial was started after the study already had enough trials."""

    def objective(trial: optuna.Trial) -> float:
        if _is_surplus(study, trial, spec):
            raise Surplus()
        lam = _suggest_lam(trial, spec)
        finals = []
        for s in range(spec.seeds_per_trial):
            seed = TRIAL_SEED_OFFSET + s
            cfg = base.replace(lam=lam, seed=seed)
            out = runs_dir / f"trial{trial.number:04d}_seed{seed}.json"
            rows: list[list[float]] = []

            def report(t: int, accs: list[float], s: int = s, rows: list = rows) -> None:
                rows.append(accs)
                trial.report(sum(accs) / len(accs), step=s * n_tasks + t)
                if trial.should_prune():
                    trial.set_user_attr(f"pruned_after_task_seed{seed}", t)
                    write_json_atomic(out, pruned_record(cfg, rows, trial.number))
                    raise optuna.TrialPruned(f"pruned after task {t} of seed {seed}")

            rec = execute(cfg, progress=progress, after_task=report)
            rec["trial"] = trial.number
            write_json_atomic(out, rec)
            if rec["diverged"]:
                trial.set_user_attr("diverged", True)
                trial.set_user_attr("diverged_at", rec["diverged_at"])
                raise optuna.TrialPruned(f"diverged at {rec['diverged_at']}")
            finals.append(rec["final_mean_acc"])
            trial.set_user_attr(f"final_mean_acc_seed{seed}", rec["final_mean_acc"])
        return float(np.mean(finals))

    def count(*states: TrialState) -> int:
        return len(study.get_trials(deepcopy=False, states=states))

    log.info("study %s: %d of %d trials finished", name, count(*finished_states), spec.n_trials)
    while count(*finished_states) < spec.n_trials:
        if count(*finished_states) + count(TrialState.RUNNING) >= spec.n_trials:
            time.sleep(poll_seconds)  # others are running the last trials; take over any that fail
            if heartbeat:
                optuna.storages.fail_stale_trials(study)
            continue
        if trials_per_batch > 1:
            free = spec.n_trials - count(*finished_states) - count(TrialState.RUNNING)
            _run_trial_batch(study, spec, base, runs_dir, min(trials_per_batch, free), n_tasks, progress)
        else:
            study.optimize(objective, n_trials=1, catch=(Surplus,), gc_after_trial=False)
    return study


def pruned_record(cfg: RunConfig, acc_rows: list[list[float]], trial_number: int) -> dict[str, object]:
    """The short record of a run its trial's pruner stopped: settings and the accuracies it reached."""
    return {"schema": "ewcstab.run/1", "pruned": True, "config": cfg.resolved().to_dict(), "seed": cfg.seed,
            "acc_matrix": acc_rows, "trial": trial_number}


def _is_surplus(study, trial, spec: SearchSpec) -> bool:
    """Mark ``trial`` with this worker; True (and the ``surplus`` mark) if ``spec.n_trials`` non-failed
    trials precede it, i.e. a race between workers started one trial too many."""
    from optuna.trial import TrialState

    ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state != TrialState.FAIL]
    trial.set_user_attr("worker", WORKER_ID)
    if len(ahead) >= spec.n_trials:
        trial.set_user_attr("surplus", True)
        return True
    return False


def _suggest_lam(trial, spec: SearchSpec) -> float:
    if spec.mode == "grid":
        return trial.suggest_float("lam", min(spec.grid), max(spec.grid))
    return trial.suggest_float("lam", spec.low, spec.high, log=True)


def _run_trial_batch(study, spec: SearchSpec, base: RunConfig, runs_dir: Path, k: int, n_tasks: int,
                     progress: bool) -> None:
    """Ask ``k`` trials, train their runs (trial-major, seeds 1000, 1001, ... each) as one batch, tell.

    The intermediate value of a trial at step t is its seeds' mean accuracy after task t averaged over
    the seeds (the seeds run side by side, not one after another as in the one-trial-at-a-time mode;
    with one seed per trial both modes report the same values). After every task the pruner judges each
    trial; a pruned trial's runs stop there (``ewcstab.batched.BatchAfterTask``) and each gets the short
    record the one-at-a-time mode writes. A trial with a diverged run is PRUNED with ``diverged``. The
    trials' heartbeats are recorded while they train (database storages), so another worker can take
    over the trials of a worker that died.
    """
    import contextlib

    from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize uses per trial
    from optuna.trial import TrialState

    from ewcstab.runner import execute_batched
    from ewcstab.io import write_json_atomic

    trials, lams = [], []
    for _ in range(k):
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": we record it below
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            trial = study.ask()
        if _is_surplus(study, trial, spec):
            study.tell(trial, state=TrialState.FAIL)
            continue
        trials.append(trial)
        lams.append(_suggest_lam(trial, spec))
    if not trials:
        return
    seeds = [TRIAL_SEED_OFFSET + s for s in range(spec.seeds_per_trial)]
    cfgs = [base.replace(lam=lam, seed=seed) for lam in lams for seed in seeds]
    owner = [i for i in range(len(trials)) for _ in seeds]  # run index -> trial position
    pruned: dict[int, int] = {}  # trial position -> task after which it was pruned
    rows: dict[int, list[list[float]]] = {i: [] for i in range(len(cfgs))}

    def after_task(t: int, accs: dict[int, list[float]]) -> list[int]:
        per_trial: dict[int, list[float]] = {}
        for i, a in accs.items():
            rows[i].append(a)
            per_trial.setdefault(owner[i], []).append(sum(a) / len(a))
        stop = []
        for pos, means in per_trial.items():
            trial = trials[pos]
            trial.report(float(np.mean(means)), step=t)
            if trial.should_prune():
                pruned[pos] = t
                stop += [i for i in accs if owner[i] == pos]
        return stop

    with contextlib.ExitStack() as beats:
        for trial in trials:
            beats.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
        records = execute_batched(cfgs, progress=progress, after_task=after_task)
    finals: dict[int, list[float]] = {i: [] for i in range(len(trials))}
    diverged: dict[int, dict] = {}
    for i, (cfg, rec) in enumerate(zip(cfgs, records)):
        pos, trial = owner[i], trials[owner[i]]
        out = runs_dir / f"trial{trial.number:04d}_seed{cfg.seed}.json"
        if pos in pruned and not rec["diverged"]:
            trial.set_user_attr(f"pruned_after_task_seed{cfg.seed}", pruned[pos])
            write_json_atomic(out, pruned_record(cfg, rows[i], trial.number))
            continue
        rec["trial"] = trial.number
        write_json_atomic(out, rec)
        if rec["diverged"]:
            diverged.setdefault(pos, rec["diverged_at"])
        else:
            finals[pos].append(rec["final_mean_acc"])
            trial.set_user_attr(f"final_mean_acc_seed{cfg.seed}", rec["final_mean_acc"])
    for pos, trial in enumerate(trials):
        if pos in diverged:
            trial.set_user_attr("diverged", True)
            trial.set_user_attr("diverged_at", diverged[pos])
            study.tell(trial, state=TrialState.PRUNED)
        elif pos in pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, float(np.mean(finals[pos])))
    log.info("batch of %d trial(s) told: %s", len(trials), ", ".join(
        f"#{t.number} lam {lam:.4g}" for t, lam in zip(trials, lams)))


def summarize(study, spec: SearchSpec, meta: dict[str, object]) -> tuple[dict[str, object], "object"]:
    """best_lambda record and the trials table (pandas DataFrame)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {study.study_name!r} has no completed trial: cannot choose lambda")
    best = max(complete, key=lambda t: t.value)
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in
              (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    trials = study.trials_dataframe(attrs=("number", "value", "params", "state", "duration", "user_attrs"))
    trials["duration"] = trials["duration"].dt.total_seconds()
    trials = trials.rename(columns={"params_lam": "lam", "duration": "duration_seconds"})
    trials["diverged"] = trials.get("user_attrs_diverged", False)
    trials["diverged"] = trials["diverged"].fillna(False).astype(bool)
    record = {
        **meta,
        "study": study.study_name,
        "mode": spec.mode,
        "lambda_range": [spec.low, spec.high] if spec.mode == "tpe" else [min(spec.grid), max(spec.grid)],
        "best_lambda": best.params["lam"],
        "best_value": best.value,
        "best_trial": best.number,
        "n_trials": counts,
        "n_diverged": int(trials["diverged"].sum()),
        "seeds_per_trial": spec.seeds_per_trial,
    }
    if not math.isfinite(record["best_value"]):
        raise RuntimeError("best trial has a non-finite value")
    return record, trials


def _spec_from_args(args: argparse.Namespace) -> SearchSpec:
    from ewcstab.config import ConfigError

    grid = None
    if args.mode == "grid":
        grid = args.grid or grid_values(args.low, args.high, args.grid_n)
    spec = SearchSpec(args.mode, args.low, args.high, args.n_trials, args.seeds_per_trial, grid,
                      args.sampler_seed, args.pruner)
    try:
        spec.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return spec


def _write_summary(study, spec: SearchSpec, base: RunConfig, storage: str, out: str, trials_out: str) -> None:
    from ewcstab import provenance
    from ewcstab.device import resolve_device
    from ewcstab.io import write_json_atomic, write_text_atomic

    meta = {
        "arch": base.arch, "method": base.method, "variant": base.variant, "storage": storage,
        "run_config": base.resolved().to_dict(),
        "provenance": {k: v for k, v in provenance.collect(resolve_device(base.device), {}, "").items()
                       if k in ("packages", "git", "device", "host", "created")},
    }
    record, trials = summarize(study, spec, meta)
    write_text_atomic(trials_out, trials.to_csv(index=False))
    write_json_atomic(out, record)
    logging.info("best lambda %.6g (mean acc %.4f) -> %s", record["best_lambda"], record["best_value"], out)


def cmd_search(args: argparse.Namespace) -> int:
    from ewcstab.cli import config_from_args
    from ewcstab.io import write_json_atomic

    base = config_from_args(args)
    spec = _spec_from_args(args)
    name = args.study_name or f"{base.arch}-{base.method}-{base.variant}"
    if args.trials_per_batch < 1:
        from ewcstab.config import ConfigError

        raise ConfigError(f"trials_per_batch: {args.trials_per_batch!r} is not allowed; allowed: an integer >= 1")
    study = run_search(name, args.storage, base, spec, Path(args.runs_dir), single_worker=not args.shared,
                       progress=not args.no_progress, heartbeat=args.heartbeat or None,
                       trials_per_batch=args.trials_per_batch)
    if args.worker_out:
        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == WORKER_ID]
        write_json_atomic(args.worker_out, {
            "study": name, "worker": WORKER_ID, "storage": args.storage,
            "trials": [{"number": t.number, "state": t.state.name, "lam": t.params.get("lam")} for t in mine],
        })
    if args.out:
        _write_summary(study, spec, base, args.storage, args.out, args.trials_out)
    return 0


def cmd_search_summary(args: argparse.Namespace) -> int:
    import optuna

    from ewcstab.cli import config_from_args

    base = config_from_args(args)
    spec = _spec_from_args(args)
    name = args.study_name or f"{base.arch}-{base.method}-{base.variant}"
    study = optuna.load_study(study_name=name, storage=open_storage(args.storage))
    _write_summary(study, spec, base, args.storage, args.out, args.trials_out)
    return 0


def _add_search_arguments(p: argparse.ArgumentParser) -> None:
    from ewcstab.cli import add_run_arguments

    add_run_arguments(p)
    p.add_argument("--mode", choices=("tpe", "grid"), default="tpe", help="tpe over log-lambda, or a grid sweep")
    p.add_argument("--low", type=float, required=True, help="smallest lambda (tpe: > 0)")
    p.add_argument("--high", type=float, required=True, help="largest lambda")
    p.add_argument("--grid-n", type=int, default=10, help="grid mode: number of evenly spaced lambdas")
    p.add_argument("--grid", type=float, nargs="+", help="grid mode: explicit lambda values (overrides --grid-n)")
    p.add_argument("--n-trials", type=int, required=True, help="finished trials the study must hold")
    p.add_argument("--seeds-per-trial", type=int, default=1, help="runs per trial (seeds 1000, 1001, ...)")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE/grid sampler")
    p.add_argument("--pruner", choices=("median", "none"), default="median", help="early stopping of trials (tpe)")
    p.add_argument("--storage", required=True, help="sqlite:///file.db, journal:///file.log, or a database URL")
    p.add_argument("--study-name", help="default: ARCH-METHOD-VARIANT")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run (or resume) an Optuna search of lambda for one (arch, method, variant)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_search_arguments(p)
    p.add_argument("--shared", action="store_true",
                   help="other workers share this study: do not fail RUNNING trials at start")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between trial heartbeats (database storages; 0: off); a trial silent for "
                        "3 heartbeats is failed and retried")
    p.add_argument("--runs-dir", required=True, help="folder for every trial's run records")
    p.add_argument("--trials-per-batch", type=int, default=1,
                   help="ask this many trials at once and train all their runs as one batch (ewcstab.batched; "
                        "default 1: one trial at a time through the single-run path)")
    p.add_argument("--worker-out", help="JSON listing the trials this worker ran")
    p.add_argument("--out", help="best-lambda JSON (single worker; else use search-summary)")
    p.add_argument("--trials-out", help="CSV of all trials (with --out)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_search)

    q = sub.add_parser("search-summary", help="best lambda (JSON) and all trials (CSV) of a finished study")
    _add_search_arguments(q)
    q.add_argument("--out", required=True, help="best-lambda JSON")
    q.add_argument("--trials-out", required=True, help="CSV of all trials")
    q.set_defaults(func=cmd_search_summary)
