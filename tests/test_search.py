"""Optuna search in one process: resume after a dead worker, distinct lambdas, sampling streams, settings
bound to the study, grid mode, batched trials, best-lambda summary.

Most tests replace training by ``fake_execute`` (accuracy a smooth function of lambda), so they test the
study's bookkeeping in milliseconds; grid mode and batched trials train for real on tiny data.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from ewcstab import search
from ewcstab.config import ConfigError, RunConfig
from ewcstab.search import SearchSpec, grid_values, run_search, summarize

optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny_base(data_root=None) -> RunConfig:
    return RunConfig(method="mas", n_tasks=2, epochs=1, train_subset=600, test_subset=300, importance_samples=200,
                     data_root=str(data_root) if data_root else None, download=False, device="cpu")


def fake_execute(cfg: RunConfig, progress: bool = False, after_task=None, **kwargs) -> dict:
    """A run record without training: accuracy peaks at lambda = 3."""
    acc = 0.9 - 0.05 * math.log(cfg.lam / 3.0) ** 2 if cfg.lam > 0 else 0.5
    n = cfg.resolved().n_tasks
    for t in range(1, n + 1):
        if after_task is not None:
            after_task(t, [acc] * t)
    return {"schema": "ewcstab.run/1", "config": cfg.resolved().to_dict(), "seed": cfg.seed,
            "acc_matrix": [[acc] * t for t in range(1, n + 1)], "final_mean_acc": acc, "diverged": False,
            "diverged_at": None}


@pytest.fixture
def fake_training(monkeypatch):
    import ewcstab.runner

    monkeypatch.setattr(ewcstab.runner, "execute", fake_execute)


def exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lams(study, states=(TrialState.COMPLETE, TrialState.PRUNED)) -> list[float]:
    return [t.params["lam"] for t in study.get_trials(states=states)]


def leave_running_trial(storage: str, name: str, worker: str, **attrs) -> tuple[int, float]:
    """What a worker leaves behind when it is killed mid-trial: a RUNNING trial with its lambda drawn."""
    study = optuna.load_study(study_name=name, storage=search.open_storage(storage))
    trial = study.ask()
    lam = trial.suggest_float("lam", 0.1, 100.0, log=True)
    for key, value in {"worker": worker, **attrs}.items():
        trial.set_user_attr(key, value)
    return trial.number, lam


@pytest.mark.parametrize("kind", ["sqlite:///{}/study.db", "journal:///{}/study.log"])
def test_dead_workers_trial_is_retried_with_its_lambda_and_finished_trials_untouched(tmp_path, fake_training, kind):
    storage, runs = kind.format(tmp_path), tmp_path / "runs"
    spec = SearchSpec("tpe", 0.1, 100.0, n_trials=2, seeds_per_trial=1, pruner="none")
    study = run_search("s", storage, tiny_base(), spec, runs)
    first = {t.number: (t.params["lam"], t.value) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(first) == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}

    killed, killed_lam = leave_running_trial(storage, "s", f"{search.HOST}:{exited_pid()}")
    spec.n_trials = 4
    study = run_search("s", storage, tiny_base(), spec, runs)
    trials = study.get_trials()
    done = lams(study)
    assert len(done) == 4 and len(set(done)) == 4 and killed_lam in done
    assert trials[killed].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retry) == 1 and retry[0].params["lam"] == killed_lam and retry[0].user_attrs["attempt"] == 2
    for number, (lam, value) in first.items():  # finished trials untouched
        assert trials[number].params["lam"] == lam and trials[number].value == value
    for name, mtime in mtimes.items():  # and their run records were not rewritten
        assert (runs / name).stat().st_mtime_ns == mtime
    assert len(list(runs.glob("trial*_seed1000.json"))) == 4

    # rerunning a finished study runs nothing
    assert len(run_search("s", storage, tiny_base(), spec, runs).get_trials()) == len(trials)


def test_reap_fails_only_dead_workers_trials(tmp_path, fake_training):
    """A live worker's running trial is never failed, whatever another worker does; a dead one's is failed
    and its lambda queued again; a trial no worker claimed is failed after the grace period."""
    import os
    from datetime import datetime, timedelta

    storage = f"sqlite:///{tmp_path}/study.db"
    spec = SearchSpec("tpe", 0.1, 100.0, n_trials=4, seeds_per_trial=1, pruner="none")
    study, sampler = search.make_study("s", storage, spec)
    live, _ = leave_running_trial(storage, "s", f"{search.HOST}:{os.getppid()}")  # pytest's parent: alive
    other_host, _ = leave_running_trial(storage, "s", "elsewhere:1")  # no heartbeat: cannot be judged from here
    # 30 s silent: alive if its worker beats every 60 s, dead if every 5 s (the reaper's own interval: none)
    beating, _ = leave_running_trial(storage, "s", "elsewhere:2", heartbeat=time.time() - 30, heartbeat_interval=60)
    silent, _ = leave_running_trial(storage, "s", "elsewhere:3", heartbeat=time.time() - 30, heartbeat_interval=5)
    dead, dead_lam = leave_running_trial(storage, "s", f"{search.HOST}:{exited_pid()}")
    unclaimed = study.ask().number  # asked, then killed before it was marked with its worker
    worker = search.Worker(study, sampler, spec, tiny_base(), tmp_path / "runs", False, None, 0.1)
    worker.reap()
    states = {t.number: t.state for t in study.get_trials()}
    assert states[live] == states[other_host] == states[beating] == states[unclaimed] == TrialState.RUNNING
    assert states[dead] == states[silent] == TrialState.FAIL
    assert [t.user_attrs["retry_of"] for t in study.get_trials(states=(TrialState.WAITING,))] == [silent, dead]
    worker.reap()  # a second look queues nothing more
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2
    worker.claim_timeout = timedelta(0)  # the grace period is over
    worker.reap()
    assert study.trials[unclaimed].state == TrialState.FAIL and study.trials[live].state == TrialState.RUNNING
    assert datetime.now() > study.trials[unclaimed].datetime_start
    study.tell(study.ask(), state=TrialState.FAIL)  # the queued retries come first: the silent one's
    retry = study.ask()  # then the dead one's, with its lambda
    assert retry.user_attrs["retry_of"] == dead and retry.suggest_float("lam", 0.1, 100.0, log=True) == dead_lam


def test_admission_surplus_duplicate_and_abandoned_chains():
    """Slots: chains with a smaller key that hold one; duplicates: a lambda another chain holds."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    dist = {"lam": FloatDistribution(0.1, 100.0, log=True)}
    spec = SearchSpec("tpe", 0.1, 100.0, n_trials=2, seeds_per_trial=1)
    study = optuna.create_study(direction="maximize", sampler=search.LambdaSampler(spec))
    study.add_trial(create_trial(params={"lam": 1.0}, distributions=dist, value=0.5))  # chain 0: finished
    study.add_trial(create_trial(state=TrialState.FAIL, params={"lam": 2.0}, distributions=dist))  # chain 1: waits
    chains = search.chains(study.get_trials())
    assert chains[0].holds_slot() and chains[1].waits_for_retry() and chains[1].holds_slot()
    surplus = study.ask()
    with pytest.raises(search.Rejected, match="surplus"):
        search.admit(study, surplus, spec)  # two chains ahead hold the two slots
    assert "lam" not in study.trials[surplus.number].params  # rejected before a lambda is drawn
    surplus.set_user_attr("surplus", True)
    study.tell(surplus, state=TrialState.FAIL)
    # chain 1 given up after MAX_ATTEMPTS starts: its slot is free again
    for attempt in range(2, search.MAX_ATTEMPTS + 1):
        study.add_trial(create_trial(state=TrialState.FAIL, params={"lam": 2.0}, distributions=dist,
                                     user_attrs={"retry_of": 1, "attempt": attempt}))
    assert not search.chains(study.get_trials())[1].holds_slot()
    trial = study.ask()
    lam = search.admit(study, trial, spec)
    assert lam not in (1.0, 2.0)  # never a lambda the study already holds
    # a retry whose chain is already running again is a duplicate
    study.enqueue_trial({"lam": 5.0}, user_attrs={"retry_of": trial.number, "attempt": 2})
    with pytest.raises(search.Rejected, match="duplicate"):
        search.admit(study, study.ask(), spec)
    # marked trials belong to no chain
    assert surplus.number not in {t.number for c in search.chains(study.get_trials()).values() for t in c.trials}


def test_grid_duplicate_is_rejected_when_two_trials_race():
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    spec = SearchSpec("grid", 0.0, 2.0, n_trials=3, seeds_per_trial=1, grid=[0.0, 1.0, 2.0])
    study = optuna.create_study(direction="maximize", sampler=search.LambdaSampler(spec))
    # another worker's trial has 1.0
    study.add_trial(create_trial(state=TrialState.COMPLETE, params={"lam": 1.0},
                                 distributions={"lam": FloatDistribution(0.0, 2.0)}, value=0.4))
    study.enqueue_trial({"lam": 1.0})  # the same value reached a second trial
    second = study.ask()
    with pytest.raises(search.Rejected, match="duplicate"):
        search.admit(study, second, spec)
    second.set_user_attr("duplicate", True)
    study.tell(second, state=TrialState.FAIL)
    trial = study.ask()
    assert search.admit(study, trial, spec) in (0.0, 2.0)  # the sampler picks a free grid value


def test_streams_are_reproducible_distinct_and_never_repeat_a_held_lambda():
    spec = SearchSpec("tpe", 0.1, 100.0, n_trials=6, seeds_per_trial=1)

    def draws(stream_start: int, n: int, held=()) -> list[float]:
        from optuna.distributions import FloatDistribution
        from optuna.trial import create_trial

        storage = optuna.storages.InMemoryStorage()
        study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                    sampler=search.LambdaSampler(spec))
        others = optuna.load_study(study_name="s", storage=storage)  # other workers
        for lam in held:
            others.add_trial(create_trial(params={"lam": lam}, value=0.5,
                                          distributions={"lam": FloatDistribution(0.1, 100.0, log=True)}))
        for _ in range(stream_start - len(held)):  # trials of other workers before this one's first
            others.tell(others.ask(), state=TrialState.FAIL)
        out = []
        for _ in range(n):
            trial = study.ask()
            out.append(trial.suggest_float("lam", 0.1, 100.0, log=True))
            study.tell(trial, 0.5)
        assert study.sampler.stream == stream_start
        return out

    assert draws(0, 3) == draws(0, 3)  # one stream: reproducible
    assert not set(draws(0, 3)) & set(draws(3, 3))  # a restart (or another worker) draws new values
    first = draws(1, 1)[0]
    redrawn = draws(1, 1, held=[first])[0]  # the stream's first draw is held already: its next draw instead
    assert redrawn != first and redrawn == draws(1, 2)[1]
    assert search.stream_seed(0, 1) != search.stream_seed(0, 2) != search.stream_seed(1, 1)


def test_spec_validation():
    with pytest.raises(ValueError, match="0 < low < high"):
        SearchSpec("tpe", 0.0, 1.0, 2, 1).validate()
    with pytest.raises(ConfigError, match="allowed: tpe, grid"):
        SearchSpec("random", 0.1, 1.0, 2, 1).validate()
    with pytest.raises(ConfigError, match=r"grid: -1.0 is not allowed; allowed: finite numbers >= 0"):
        SearchSpec("grid", 0.0, 1.0, 2, 1, grid=[0.5, -1.0]).validate()
    with pytest.raises(ConfigError, match="more than once"):
        SearchSpec("grid", 0.0, 1.0, 2, 1, grid=[0.5, 0.5]).validate()
    with pytest.raises(ConfigError, match=r"n_trials: 3 is more than the 2 grid values"):
        SearchSpec("grid", 0.0, 1.0, 3, 1, grid=[0.5, 1.0]).validate()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(base={"epochs": 2}), r"epochs: 1 -> 2"),
        (dict(spec={"mode": "grid", "grid": [1.0, 2.0]}), r"mode: 'tpe' -> 'grid'"),
        (dict(spec={"high": 50.0}), r"high: 100.0 -> 50.0"),
        (dict(spec={"seeds_per_trial": 2}), r"seeds_per_trial: 1 -> 2"),
        (dict(spec={"pruner": "median"}), r"pruner: 'none' -> 'median'"),
    ],
)
def test_resuming_with_other_settings_is_refused_before_any_trial(tmp_path, fake_training, change, message):
    import dataclasses

    storage = f"sqlite:///{tmp_path}/study.db"
    spec = SearchSpec("tpe", 0.1, 100.0, n_trials=1, seeds_per_trial=1, pruner="none")
    run_search("s", storage, tiny_base(), spec, tmp_path / "runs")
    other_spec = dataclasses.replace(spec, **change.get("spec", {}), n_trials=2)
    with pytest.raises(ConfigError, match=message):
        run_search("s", storage, tiny_base().replace(**change.get("base", {})), other_spec, tmp_path / "runs")
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1  # nothing asked


def test_grid_mode_visits_each_value_once(tmp_path, data_root):
    grid = grid_values(0.0, 20.0, 3)
    assert grid == [0.0, 10.0, 20.0]
    spec = SearchSpec("grid", 0.0, 20.0, n_trials=3, seeds_per_trial=1, grid=grid)
    study = run_search("g", f"sqlite:///{tmp_path}/g.db", tiny_base(data_root), spec, tmp_path / "runs")
    assert sorted(lams(study, states=(TrialState.COMPLETE,))) == grid
    best, table = summarize(study, spec, {"arch": "mlp"})
    assert best["best_lambda"] in grid and best["n_trials"]["complete"] == 3
    assert list(table["lam"].sort_values()) == grid


def test_batched_trials_finish_the_study_with_pruning_and_records(tmp_path, data_root, monkeypatch):
    """trials_per_batch: trials asked together and trained as one batch; pruned ones stop early with the
    short record, finished ones with the full run record; the study ends with exactly n_trials."""
    from ewcstab import runner

    storage, runs = f"sqlite:///{tmp_path}/b.db", tmp_path / "runs"
    base = tiny_base(data_root).replace(n_tasks=3)
    spec = SearchSpec("tpe", 0.1, 100.0, n_trials=5, seeds_per_trial=2, pruner="median")
    batches = []
    # the pruner's verdict, forced: trial 3 stops after task 2 (what the median pruner decides is its business)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune",
                        lambda self: self.number == 3 and max(self.study.trials[3].intermediate_values) == 2)
    real = runner.train_configs

    def spy(cfgs, *args, **kwargs):
        batches.append([(c.lam, c.seed) for c in cfgs])
        return real(cfgs, *args, **kwargs)

    monkeypatch.setattr(runner, "train_configs", spy)
    study = run_search("b", storage, base, spec, runs, trials_per_batch=3)
    assert [len(b) for b in batches] == [6, 4]  # 3 trials x 2 seeds, then the 2 trials left
    assert all(b[0][0] == b[1][0] and (b[0][1], b[1][1]) == (1000, 1001) for b in batches)  # seeds per trial
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 5 and len(trials) == 5
    assert len({t.params["lam"] for t in trials}) == 5
    assert {t.user_attrs["stream"] for t in trials} == {0}  # one worker: one stream
    for t in trials:
        recs = [json.loads((runs / f"trial{t.number:04d}_seed{s}.json").read_text()) for s in (1000, 1001)]
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(sum(r["final_mean_acc"] for r in recs) / 2)
            assert all(r["batch"]["runs"] in (4, 6) and len(r["acc_matrix"]) == 3 for r in recs)
            assert set(t.intermediate_values) == {1, 2, 3}
        else:
            assert all(r["pruned"] and len(r["acc_matrix"]) == max(t.intermediate_values) for r in recs)
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[3].user_attrs["pruned_after_task_seed1000"] == 2 and set(trials[3].intermediate_values) == {1, 2}
    best, table = summarize(study, spec, {"arch": "mlp"})
    assert best["n_trials"]["complete"] + best["n_trials"]["pruned"] == 5
