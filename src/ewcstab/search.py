"""An Optuna study of lambda for one (arch, method, variant), shared safely by any number of workers.

- ``tpe`` mode: TPE (seeded, constant liar) over log-lambda in [low, high]; a median pruner stops
  hopeless lambdas early from the mean accuracy reported after every task.
- ``grid`` mode: the given lambda values (the paper's grids), each tried once, no pruning, for a faithful
  accuracy-versus-lambda curve.

The objective of a trial is the mean accuracy after the last task, averaged over the trial's seeds.
Intermediate value at step ``s*T + t`` is the mean accuracy after task t of the s-th seed, so trials are
compared at equal progress. A trial whose run diverges is marked PRUNED with the user attribute
``diverged``; TPE then ranks it below the trials that got further. The study lives in a storage chosen by
URL (``sqlite:///path.db``, ``journal:///path.log`` for Optuna's journal file storage, or any SQLAlchemy
database URL), so an interrupted study resumes on rerun.

What the study guarantees, with any number of workers, kills and restarts (public Optuna API only):

- **Exactly n_trials finished trials.** A trial and the retries of its lambda form a *chain*, keyed by
  the number of its first trial (numbers are handed out atomically by the storage). A chain *holds a slot*
  while one of its trials is finished, running or queued, or while its last trial failed and its lambda
  waits for a retry. A new trial runs only if fewer than n_trials chains with a smaller key hold a slot;
  otherwise it is failed at once with the user attribute ``surplus`` (no lambda drawn).
- **Distinct lambdas.** The sampler (``LambdaSampler``) never proposes a lambda the study already holds.
  A trial that still finds its lambda in another chain (two workers drew the same grid value at once), or
  a retry that finds its chain already running, is failed with ``duplicate``: each trial checks after its
  own lambda is stored, so of two racing trials at least one sees the other.
- **A killed trial's lambda is tried.** A trial whose worker died is failed (see below) and its lambda
  queued again with ``study.enqueue_trial`` (user attributes ``retry_of``: the chain's key, ``attempt``);
  the next worker that asks runs it. After ``MAX_ATTEMPTS`` starts the lambda is given up (logged).
- **Only dead workers' trials are failed**, whatever flags another worker was started with. A worker
  claims each trial it runs (user attribute ``worker``, host:pid) and keeps its heartbeat (user attributes
  ``heartbeat``: the time of the last beat on the worker's clock, ``heartbeat_interval``: its own
  interval, see ``Heartbeats``). A running trial is failed when its worker ran on this host and that
  process is gone, when its heartbeat is older than 3 of its own worker's intervals plus
  ``CLOCK_SLACK`` seconds (for clocks of different hosts), or when no worker claimed it within
  ``CLAIM_SECONDS``. The heartbeat is a user attribute, so it works on every storage (journal files too)
  and in both the one-trial and the batched mode.
- **Own sampling streams.** Each worker process samples from its own stream: the stream number is the
  number of the first trial the process asks (unique), the stream's seed ``SeedSequence([sampler_seed,
  stream])``; each trial records its ``stream``. A restart therefore never replays the first run's
  draws, and K workers draw K different sequences. Reproducible: a single worker's study (its restarts
  at the same points included) as far as its training is, and every stream's sequence of draws; with K
  workers, which stream runs how many trials depends on timing, so their set of lambdas is reproducible
  only in grid mode (the grid) and stream by stream in tpe mode.
- **One set of settings.** The study stores its search settings (mode, range or grid, seeds per trial,
  sampler seed, pruner) and run settings when it is created; a worker or summary with other settings is
  refused with one ``ConfigError`` naming the differences, before it touches any trial.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ewcstab.config import RunConfig
from ewcstab.errors import ConfigError, UserError

log = logging.getLogger(__name__)

#: This machine, as the ``worker`` user attribute names it (host:pid).
HOST = socket.gethostname()

#: Trial seeds are offset from the final runs' seeds (0..N-1) so selection and report use different runs.
TRIAL_SEED_OFFSET = 1000

#: Starts of one lambda (its first trial and the retries after its workers died) before it is given up.
MAX_ATTEMPTS = 3

#: Seconds allowed for clocks of different hosts to disagree when judging a heartbeat.
CLOCK_SLACK = 10

#: Seconds within which a worker claims the trial it asked (it does so at once); an unclaimed running
#: trial older than this was asked by a worker that died in between.
CLAIM_SECONDS = 60

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def worker_id() -> str:
    """This process, as each trial records it (user attribute ``worker``)."""
    return f"{HOST}:{os.getpid()}"


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
    pruner: str = "median"  # median | none (tpe only: grid mode never prunes)
    pruner_startup_trials: int = 4

    def validate(self) -> None:
        if self.mode not in ("tpe", "grid"):
            raise ConfigError(f"mode: {self.mode!r} is not allowed; allowed: tpe, grid")
        if self.pruner not in ("median", "none"):
            raise ConfigError(f"pruner: {self.pruner!r} is not allowed; allowed: median, none")
        for name in ("n_trials", "seeds_per_trial"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {value!r} is not allowed; allowed: an integer >= 1")
        for name in ("sampler_seed", "pruner_startup_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}: {value!r} is not allowed; allowed: an integer >= 0")
        if self.mode == "tpe":
            if not (math.isfinite(self.low) and math.isfinite(self.high) and 0 < self.low < self.high):
                raise ConfigError(f"lambda range [{self.low}, {self.high}] is not allowed: tpe needs "
                                  "0 < low < high (log scale), both finite")
            return
        if not self.grid:
            raise ConfigError("grid: grid mode needs a non-empty list of lambda values")
        for value in self.grid:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"grid: {value!r} is not allowed; allowed: finite numbers >= 0")
        if len(set(self.grid)) != len(self.grid):
            raise ConfigError(f"grid: {list(self.grid)} lists a value more than once; give each lambda once")
        if self.n_trials > len(self.grid):
            raise ConfigError(f"n_trials: {self.n_trials} is more than the {len(self.grid)} grid values; "
                              f"allowed: 1..{len(self.grid)}")

    def settings(self) -> dict[str, object]:
        """What a study stores about its search at creation (``check_same_settings``); n_trials is not in
        it, so a finished study can be extended by asking for more trials."""
        common = {"mode": self.mode, "seeds_per_trial": self.seeds_per_trial, "sampler_seed": self.sampler_seed}
        if self.mode == "grid":
            return {**common, "grid": sorted(float(v) for v in self.grid), "pruner": "none"}
        out = {**common, "low": float(self.low), "high": float(self.high), "pruner": self.pruner}
        if self.pruner == "median":
            out["pruner_startup_trials"] = self.pruner_startup_trials
        return out

    @property
    def lambda_range(self) -> list[float]:
        return [min(self.grid), max(self.grid)] if self.mode == "grid" else [self.low, self.high]


def grid_values(low: float, high: float, n: int) -> list[float]:
    """n evenly spaced lambdas in [low, high] (the paper's grids give range and count)."""
    return [float(v) for v in np.round(np.linspace(low, high, n), 10)]


# ------------------------------------------------------------------------------------------- storage
def check_storage_url(url: str) -> Path | None:
    """The file of a journal or SQLite storage URL (None for a database server); a URL that is not one of
    the allowed forms is a ``ConfigError``. Touches nothing."""
    if url.startswith("journal:///"):
        return Path(url[len("journal:///"):])
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"storage: {url!r} is not a storage URL; allowed: sqlite:///FILE, journal:///FILE, "
                          "or an SQLAlchemy database URL (postgresql://..., mysql://...)") from None
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise ConfigError(f"storage: {url!r} is not a file; allowed: sqlite:///FILE (workers share the file)")
    return Path(parsed.database)


def open_storage(url: str, must_exist: bool = False):
    """An Optuna storage from a URL (``check_storage_url``); ``journal:///path`` selects the journal file
    storage.

    ``must_exist``: the storage must be there already (summaries): a missing SQLite or
    journal file is a ``ConfigError`` and no file is created. A URL that cannot be opened is a
    ``ConfigError`` naming it, at once (no retries: only the races of workers that create the same
    storage together are retried, by ``make_study``).
    """
    path = check_storage_url(url)
    if path is not None:
        _prepare_file(url, path, must_exist)
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise ConfigError(f"storage: cannot open {url!r}: {_one_line(err)}") from None
    import sqlalchemy

    backend = sqlalchemy.engine.make_url(url).get_backend_name()
    engine: dict[str, object] = {}
    if backend == "sqlite":
        engine = {"connect_args": {"timeout": 60}}  # workers wait for each other's writes
    elif backend in ("postgresql", "mysql"):
        engine = {"connect_args": {"connect_timeout": 10}}  # an unreachable server fails in seconds
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError, ValueError, TypeError) as err:
        if _is_creation_race(err):
            raise
        raise ConfigError(f"storage: cannot open {url!r}: {type(err).__name__}: {_one_line(err)}") from None


def _prepare_file(url: str, path: Path, must_exist: bool) -> None:
    if must_exist and not path.is_file():
        raise ConfigError(f"storage: {url!r}: no file {str(path)!r} (run 'ewcstab search' first)")
    if path.is_dir():
        raise ConfigError(f"storage: {url!r}: {str(path)!r} is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"storage: cannot create the folder of {url!r}: {_one_line(err)}") from None


def _is_creation_race(err: BaseException) -> bool:
    """Errors of workers that create the same storage and study at the same moment (the losers find
    everything in place on a second try); anything else is a real problem with the storage."""
    import sqlalchemy

    if isinstance(err, (sqlalchemy.exc.IntegrityError, optuna.exceptions.DuplicatedStudyError)):
        return True
    text = str(err).lower()
    return isinstance(err, sqlalchemy.exc.OperationalError) and ("locked" in text or "already exists" in text)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def make_study(name: str, storage_url: str, spec: SearchSpec):
    """Create or load the study ``name`` with this worker's sampler (``LambdaSampler``) and the pruner of
    ``spec``; returns (study, sampler)."""
    sampler = LambdaSampler(spec)
    if spec.pruner == "median" and spec.mode == "tpe":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=1)
    else:
        pruner = optuna.pruners.NopPruner()
    for attempt in range(6):
        try:
            storage = open_storage(storage_url)
            with _optuna_quiet():
                study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                            direction="maximize", load_if_exists=True)
            return study, sampler
        except Exception as err:  # noqa: BLE001 (only the creation races are retried)
            if attempt == 5 or not _is_creation_race(err):
                raise
            log.info("storage busy (%s), retrying", type(err).__name__)
            time.sleep(0.1 + random.random() * 0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def load_study(name: str, storage_url: str):
    """An existing study (summaries): a missing storage or study is a ``ConfigError``, nothing created."""
    storage = open_storage(storage_url, must_exist=True)
    try:
        with _optuna_quiet():
            return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise ConfigError(f"study-name: no study {name!r} in {storage_url!r}; it holds: "
                          f"{', '.join(names) if names else 'no study'}") from None


class _optuna_quiet:
    """Optuna's INFO lines about creating or loading a study are left out (errors stay one line)."""

    def __enter__(self) -> None:
        self.level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(max(self.level, optuna.logging.WARNING))

    def __exit__(self, *exc: object) -> None:
        optuna.logging.set_verbosity(self.level)


def run_settings(base: RunConfig) -> dict[str, object]:
    """The run settings a study is bound to: everything but lambda and seed (the trials' own) and where
    the run happens (device, data folder)."""
    return {k: v for k, v in base.resolved().to_dict().items() if k not in ("lam", "seed", "device", "data_root")}


def check_same_settings(study, base: RunConfig, spec: SearchSpec, write: bool = True) -> None:
    """A study belongs to one search and one set of run settings: resuming it with others would mix
    trials. The settings are stored with the study (user attributes ``search_settings`` and
    ``run_settings``) by its first worker (``write``); any later worker or summary with other settings is
    refused. A run setting missing from an older study counts as RunConfig's default."""
    wanted = {"search_settings": spec.settings(), "run_settings": run_settings(base)}
    stored = study.user_attrs
    if write and any(key not in stored for key in wanted):
        for key, value in wanted.items():
            if key not in stored:
                study.set_user_attr(key, value)
        stored = study.user_attrs  # read back: of two workers creating it with other settings, one is refused
    defaults = {"search_settings": {}, "run_settings": run_settings(RunConfig(arch=base.arch))}
    diffs = []
    for key, value in wanted.items():
        old = stored.get(key)
        if old is None:
            continue
        for k in sorted(set(old) | set(value)):
            before, after = old.get(k, defaults[key].get(k)), value.get(k, defaults[key].get(k))
            if before != after:
                diffs.append(f"{k}: {before!r} -> {after!r}")
    if diffs:
        raise ConfigError(f"study {study.study_name!r} was created with other settings ({'; '.join(diffs)}); "
                          "give the study's settings, another --study-name, or another storage")


# ------------------------------------------------------------------------------------------- sampling
class LambdaSampler(optuna.samplers.BaseSampler):
    """Draws lambda for one worker process's trials from the process's own stream, never a value the
    study already holds.

    The stream opens at the first trial the process asks: its number is the stream number, its seed
    ``stream_seed(spec.sampler_seed, stream)``. tpe: a TPE sampler (constant liar, univariate: lambda is
    the only parameter) seeded from the stream; a draw the study already holds is drawn again (the
    sampler's random state has moved on, so the redraw is new and as reproducible as the first). grid: a
    grid value no chain holds, picked by the stream's generator.
    """

    MAX_DRAWS = 100

    def __init__(self, spec: SearchSpec) -> None:
        self.spec = spec
        self.stream: int | None = None
        self._tpe: optuna.samplers.TPESampler | None = None
        self._rng: np.random.Generator | None = None
        self._lock = threading.Lock()

    def _open_stream(self, number: int) -> None:
        with self._lock:
            if self.stream is not None:
                return
            seed = stream_seed(self.spec.sampler_seed, number)
            self.stream, self._rng = number, np.random.default_rng(seed)
            if self.spec.mode == "tpe":
                with warnings.catch_warnings():  # constant_liar is "experimental"
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    # constant liar: trials still running (other workers', or asked in the same batch) count
                    # as bad, so concurrent trials spread out instead of crowding one region
                    self._tpe = optuna.samplers.TPESampler(
                        seed=seed, n_startup_trials=min(5, self.spec.n_trials), constant_liar=True,
                        multivariate=False)

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self._open_stream(trial.number)
        if self._tpe is not None:
            self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial: FrozenTrial) -> dict:
        return {}

    def sample_relative(self, study, trial: FrozenTrial, search_space: dict) -> dict:
        return {}

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution) -> float:
        held = {c.lam for c in chains(study.get_trials(deepcopy=False)).values() if c.lam is not None}
        if self.spec.mode == "grid":
            free = [v for v in self.spec.grid if v not in held] or list(self.spec.grid)  # none: a race, see admit
            return float(free[int(self._rng.integers(len(free)))])
        for _ in range(self.MAX_DRAWS):
            value = self._tpe.sample_independent(study, trial, param_name, param_distribution)
            if value not in held:
                return value
        raise RuntimeError(f"no new lambda in {self.MAX_DRAWS} draws from stream {self.stream}")

    def after_trial(self, study, trial: FrozenTrial, state: TrialState, values) -> None:
        if self._tpe is not None:
            self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._tpe is not None:
            self._tpe.reseed_rng()


def stream_seed(sampler_seed: int, stream: int) -> int:
    """The seed of sampling stream ``stream`` of a study seeded with ``sampler_seed``."""
    return int(np.random.SeedSequence([sampler_seed, stream]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------- chains
@dataclass
class Chain:
    """A trial and the retries of its lambda (trials marked ``surplus`` or ``duplicate`` are in none)."""

    key: int
    trials: list[FrozenTrial] = field(default_factory=list)

    @property
    def lam(self) -> float | None:
        return next((t.params["lam"] for t in self.trials if "lam" in t.params), None)

    @property
    def attempts(self) -> int:
        """How often its lambda was started."""
        return sum("lam" in t.params for t in self.trials)

    @property
    def live(self) -> bool:
        return any(t.state in LIVE for t in self.trials)

    def waits_for_retry(self) -> bool:
        """Its last trial was cut short after drawing its lambda, and the lambda may be started again."""
        if self.live:
            return False
        last = max(self.trials, key=lambda t: t.number)
        return last.state == TrialState.FAIL and "lam" in last.params and self.attempts < MAX_ATTEMPTS

    def holds_slot(self) -> bool:
        return self.live or self.waits_for_retry()


def chains(trials: list[FrozenTrial]) -> dict[int, Chain]:
    """The study's chains by key (the number of a chain's first trial)."""
    out: dict[int, Chain] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.user_attrs.get("surplus") or t.user_attrs.get("duplicate"):
            continue
        key = t.user_attrs.get("retry_of", t.number)
        out.setdefault(key, Chain(key)).trials.append(t)
    return out


class Rejected(Exception):
    """A trial that must not run: ``surplus`` or ``duplicate`` (its user attribute, see the module doc)."""


def admit(study, trial, spec: SearchSpec) -> float:
    """Check ``trial`` against the study and draw its lambda; raise ``Rejected`` if it must not run.

    Surplus (checked before the lambda is drawn): n_trials chains with a smaller key hold a slot. Duplicate
    (checked after the lambda is stored): another chain holds the lambda, or another trial of its own chain
    is running or finished.
    """
    key = trial.user_attrs.get("retry_of", trial.number)
    ahead = [c for k, c in chains(study.get_trials(deepcopy=False)).items() if k < key]
    if sum(c.holds_slot() for c in ahead) >= spec.n_trials:
        raise Rejected("surplus")
    lam = _suggest_lam(trial, spec)
    for k, c in chains(study.get_trials(deepcopy=False)).items():
        if k != key and c.lam == lam:
            raise Rejected("duplicate")
        if k == key and any(t.number != trial.number and t.state in LIVE and t.state != TrialState.WAITING
                            for t in c.trials):
            raise Rejected("duplicate")
    return lam


def _suggest_lam(trial, spec: SearchSpec) -> float:
    if spec.mode == "grid":
        return trial.suggest_float("lam", min(spec.grid), max(spec.grid))
    return trial.suggest_float("lam", spec.low, spec.high, log=True)


# ------------------------------------------------------------------------------------------- workers
def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not); unknown counts as alive."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Heartbeats:
    """The heartbeats of this worker's running trials: every ``interval`` seconds a thread sets each
    trial's user attribute ``heartbeat`` to the time (seconds since the epoch, this host's clock); the
    trial also records ``heartbeat_interval``, so other workers judge it by its own worker's interval, never
    by theirs. ``interval`` None or 0: no heartbeat (the trial is then failed by others only when its
    worker on their host is gone)."""

    def __init__(self, interval: int | None) -> None:
        self.interval = interval or None
        self._trials: dict[int, optuna.Trial] = {}
        self._lock = threading.Lock()  # a beat round and a removal never overlap: no beat after a tell
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, trial: optuna.Trial) -> None:
        trial.set_user_attr("heartbeat_interval", self.interval)
        if not self.interval:
            return
        trial.set_user_attr("heartbeat", time.time())
        with self._lock:
            self._trials[trial.number] = trial
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="ewcstab-heartbeat", daemon=True)
            self._thread.start()

    def remove(self, number: int) -> None:
        with self._lock:
            self._trials.pop(number, None)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for trial in self._trials.values():
                    try:
                        trial.set_user_attr("heartbeat", time.time())
                    except Exception as err:  # noqa: BLE001 (a missed beat is retried; the run goes on)
                        log.warning("heartbeat of trial %d not recorded (%s)", trial.number, _one_line(err))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class Worker:
    """One process's part of a study: reap dead workers' trials, ask, admit, train, tell."""

    def __init__(self, study, sampler: LambdaSampler, spec: SearchSpec, base: RunConfig, runs_dir: Path,
                 progress: bool, heartbeat: int | None, poll_seconds: float) -> None:
        self.study, self.sampler, self.spec, self.base = study, sampler, spec, base
        self.runs_dir, self.progress, self.poll_seconds = runs_dir, progress, poll_seconds
        self.claim_timeout = timedelta(seconds=CLAIM_SECONDS)
        self.n_tasks = base.resolved().n_tasks
        self.beats = Heartbeats(heartbeat)
        self._given_up: set[int] = set()

    def run(self, trials_per_batch: int) -> None:
        """Until the study holds n_trials finished trials (and no queued trial waits)."""
        n = self.spec.n_trials
        log.info("study %s: %d of %d trials finished", self.study.study_name, self._count(FINISHED), n)
        try:
            while True:
                if self._count(FINISHED) >= n and not self._count((TrialState.WAITING,)):
                    return
                self.reap()
                trials = self.study.get_trials(deepcopy=False)
                waiting = sum(t.state == TrialState.WAITING for t in trials)
                free = n - sum(c.holds_slot() for c in chains(trials).values())
                if free <= 0 and not waiting:
                    time.sleep(self.poll_seconds)  # others run the last trials; take over any whose worker dies
                    continue
                self._run_batch(min(trials_per_batch, max(free, 0) + waiting))
        finally:
            self.beats.close()

    def _count(self, states) -> int:
        return len(self.study.get_trials(deepcopy=False, states=states))

    # ----------------------------------------------------------------------------------- dead workers
    def reap(self) -> None:
        """Fail the running trials of dead workers, then queue again every lambda that waits for a retry."""
        now = datetime.now()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            why = self._dead(t, now)
            if why:
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                log.warning("trial %d: %s; marked FAIL", t.number, why)
        for chain in chains(self.study.get_trials(deepcopy=False)).values():
            if chain.waits_for_retry():
                last = max(chain.trials, key=lambda t: t.number)
                self.study.enqueue_trial({"lam": chain.lam}, user_attrs={
                    "retry_of": chain.key, "attempt": chain.attempts + 1, "stream": last.user_attrs.get("stream")})
                log.warning("trial %d (lam %.6g) was cut short: its lambda is queued again (start %d of at most "
                            "%d)", last.number, chain.lam, chain.attempts + 1, MAX_ATTEMPTS)
            elif not chain.live and chain.attempts >= MAX_ATTEMPTS and chain.key not in self._given_up:
                self._given_up.add(chain.key)
                log.warning("lam %.6g was cut short %d times (trials %s): given up", chain.lam, chain.attempts,
                            [t.number for t in chain.trials])

    def _dead(self, trial: FrozenTrial, now: datetime) -> str | None:
        owner = trial.user_attrs.get("worker")
        if owner == worker_id():
            return None
        if owner is None:
            if trial.datetime_start is not None and now - trial.datetime_start > self.claim_timeout:
                return f"no worker claimed it within {self.claim_timeout.total_seconds():g} s"
            return None
        host, _, pid = owner.rpartition(":")
        if host == HOST and pid.isdigit() and not _pid_alive(int(pid)):
            return f"its worker {owner} is gone"
        beat, interval = trial.user_attrs.get("heartbeat"), trial.user_attrs.get("heartbeat_interval")
        if beat is not None and interval and time.time() - beat > 3 * interval + CLOCK_SLACK:
            return f"its worker {owner} has sent no heartbeat for {time.time() - beat:.0f} s (it beats every {interval} s)"
        return None

    # ----------------------------------------------------------------------------------- trials
    def _ask(self) -> tuple[optuna.Trial, float] | None:
        """A new or queued trial, claimed and admitted with its lambda; None if it was rejected."""
        trial = self.study.ask()
        trial.set_user_attr("worker", worker_id())
        self.beats.add(trial)
        try:
            lam = admit(self.study, trial, self.spec)
        except Rejected as why:
            trial.set_user_attr(str(why), True)
            self._tell(trial, state=TrialState.FAIL)
            log.info("trial %d not run: %s", trial.number, why)
            return None
        except BaseException:
            self._tell(trial, state=TrialState.FAIL)
            raise
        if "retry_of" not in trial.user_attrs:
            trial.set_user_attr("stream", self.sampler.stream)
        return trial, lam

    def _tell(self, trial, value: float | None = None, state: TrialState | None = None) -> None:
        self.beats.remove(trial.number)
        self.study.tell(trial, value, state=state, skip_if_finished=True)

    def _run_batch(self, k: int) -> None:
        asked: list[tuple[optuna.Trial, float]] = []
        try:
            for _ in range(k):
                got = self._ask()
                if got is not None:
                    asked.append(got)
            if len(asked) == 1:
                self._train_one(*asked[0])
            elif asked:
                self._train_together(asked)
        except BaseException:
            for trial, _ in asked:  # what this worker cannot finish is retried (by itself or another worker)
                self._tell(trial, state=TrialState.FAIL)
            raise

    def _train_one(self, trial, lam: float) -> None:
        """The trial's seeds one after another through the single-run path; the pruner judges after every task."""
        from ewcstab.io import write_json_atomic
        from ewcstab.runner import execute

        finals = []
        for s in range(self.spec.seeds_per_trial):
            seed = TRIAL_SEED_OFFSET + s
            cfg = self.base.replace(lam=lam, seed=seed)
            out = self.runs_dir / f"trial{trial.number:04d}_seed{seed}.json"
            rows: list[list[float]] = []

            def report(t: int, accs: list[float], s: int = s, seed: int = seed, cfg: RunConfig = cfg,
                       out: Path = out, rows: list = rows) -> None:
                rows.append(accs)
                trial.report(sum(accs) / len(accs), step=s * self.n_tasks + t)
                if trial.should_prune():
                    trial.set_user_attr(f"pruned_after_task_seed{seed}", t)
                    write_json_atomic(out, pruned_record(cfg, rows, trial.number))
                    raise optuna.TrialPruned(f"pruned after task {t} of seed {seed}")

            try:
                rec = execute(cfg, progress=self.progress, after_task=report)
            except optuna.TrialPruned:
                self._tell(trial, state=TrialState.PRUNED)
                return
            rec["trial"] = trial.number
            write_json_atomic(out, rec)
            if rec["diverged"]:
                trial.set_user_attr("diverged", True)
                trial.set_user_attr("diverged_at", rec["diverged_at"])
                self._tell(trial, state=TrialState.PRUNED)
                return
            finals.append(rec["final_mean_acc"])
            trial.set_user_attr(f"final_mean_acc_seed{seed}", rec["final_mean_acc"])
        self._tell(trial, float(np.mean(finals)))
        log.info("trial %d: lam %.6g, mean accuracy %.4f", trial.number, lam, float(np.mean(finals)))

    def _train_together(self, asked: list[tuple[optuna.Trial, float]]) -> None:
        """All runs of the asked trials (trial-major, seeds 1000, 1001, ... each) as one batch.

        The intermediate value of a trial at step t is its seeds' mean accuracy after task t averaged over
        the seeds (the seeds run side by side, not one after another as in ``_train_one``; with one seed per
        trial both report the same values). After every task the pruner judges each trial; a pruned trial's
        runs stop there (``ewcstab.engine.BatchAfterTask``) and each gets the short record ``_train_one``
        writes. A trial with a diverged run is PRUNED with ``diverged``.
        """
        from ewcstab.runner import execute_batched
        from ewcstab.io import write_json_atomic

        trials = [t for t, _ in asked]
        seeds = [TRIAL_SEED_OFFSET + s for s in range(self.spec.seeds_per_trial)]
        cfgs = [self.base.replace(lam=lam, seed=seed) for _, lam in asked for seed in seeds]
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
                trials[pos].report(float(np.mean(means)), step=t)
                if trials[pos].should_prune():
                    pruned[pos] = t
                    stop += [i for i in accs if owner[i] == pos]
            return stop

        records = execute_batched(cfgs, progress=self.progress, after_task=after_task)
        finals: dict[int, list[float]] = {i: [] for i in range(len(trials))}
        diverged: dict[int, dict] = {}
        for i, (cfg, rec) in enumerate(zip(cfgs, records)):
            pos, trial = owner[i], trials[owner[i]]
            out = self.runs_dir / f"trial{trial.number:04d}_seed{cfg.seed}.json"
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
                self._tell(trial, state=TrialState.PRUNED)
            elif pos in pruned:
                self._tell(trial, state=TrialState.PRUNED)
            else:
                self._tell(trial, float(np.mean(finals[pos])))
        log.info("batch of %d trial(s) told: %s", len(trials), ", ".join(
            f"#{t.number} lam {lam:.4g}" for t, lam in asked))


def run_search(
    name: str,
    storage_url: str,
    base: RunConfig,
    spec: SearchSpec,
    runs_dir: Path,
    progress: bool = False,
    heartbeat: int | None = 60,
    poll_seconds: float | None = None,
    trials_per_batch: int = 1,
):
    """Run (or resume) the study until it holds exactly ``spec.n_trials`` finished trials; returns it.

    Several workers (processes, cluster jobs) may run this on the same storage at once; see the module
    docstring for what they guarantee together. ``trials_per_batch`` > 1: the worker asks that many
    trials at once and trains all their runs (trials x seeds) stacked in the training engine
    (``ewcstab.runner.execute_batched``). ``heartbeat``: seconds between this worker's
    heartbeats (``Heartbeats``; None or 0: none). ``poll_seconds``: how often a worker with nothing to
    start looks for dead workers' trials (default: the heartbeat, at most 5 s).
    """
    spec.validate()
    base.validate()
    study, sampler = make_study(name, storage_url, spec)
    check_same_settings(study, base, spec)
    poll = poll_seconds if poll_seconds is not None else min(5.0, heartbeat or 5.0)
    Worker(study, sampler, spec, base, Path(runs_dir), progress, heartbeat, poll).run(trials_per_batch)
    return study


def pruned_record(cfg: RunConfig, acc_rows: list[list[float]], trial_number: int) -> dict[str, object]:
    """The short record of a run its trial's pruner stopped: settings and the accuracies it reached."""
    return {"schema": "ewcstab.run/1", "pruned": True, "config": cfg.resolved().to_dict(), "seed": cfg.seed,
            "acc_matrix": acc_rows, "trial": trial_number}


def summarize(study, spec: SearchSpec, meta: dict[str, object]) -> tuple[dict[str, object], "object"]:
    """best_lambda record and the trials table (pandas DataFrame)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"study {study.study_name!r} has no completed trial: cannot choose lambda "
                        "(run or finish 'ewcstab search' first)")
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
        "lambda_range": spec.lambda_range,
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
