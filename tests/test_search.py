"""Optuna search: resume after an interruption, grid mode, best-lambda summary."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from ewcstab.config import RunConfig
from ewcstab.search import SearchSpec, grid_values, run_search, summarize

optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny_base(data_root) -> RunConfig:
    return RunConfig(method="mas", n_tasks=2, epochs=1, train_subset=600, test_subset=300, importance_samples=200,
                     data_root=str(data_root), download=False, device="cpu")


def test_interrupted_search_resumes_without_repeating_trials(tmp_path, data_root):
    storage = f"sqlite:///{tmp_path}/study.db"
    runs = tmp_path / "runs"
    spec = SearchSpec("tpe", 0.1, 100.0, n_trials=2, seeds_per_trial=1, pruner="none")
    study = run_search("s", storage, tiny_base(data_root), spec, runs)
    first = {t.number: (t.params["lam"], t.value) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(first) == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}

    # an interrupted worker leaves a trial RUNNING (asked, never told)
    optuna.load_study(study_name="s", storage=storage).ask()

    spec.n_trials = 4
    study = run_search("s", storage, tiny_base(data_root), spec, runs)
    trials = study.get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4
    assert [t.state for t in trials].count(TrialState.FAIL) == 1  # the stale one, not redone in place
    for number, (lam, value) in first.items():  # finished trials untouched
        assert trials[number].params["lam"] == lam and trials[number].value == value
    for name, mtime in mtimes.items():  # and their run records were not rewritten
        assert (runs / name).stat().st_mtime_ns == mtime
    assert len(list(runs.glob("trial*_seed1000.json"))) == 4

    # rerunning a finished study runs nothing
    study = run_search("s", storage, tiny_base(data_root), spec, runs)
    assert len(study.get_trials()) == 5


def test_grid_mode_visits_each_value_once(tmp_path, data_root):
    grid = grid_values(0.0, 20.0, 3)
    assert grid == [0.0, 10.0, 20.0]
    spec = SearchSpec("grid", 0.0, 20.0, n_trials=3, seeds_per_trial=1, grid=grid)
    study = run_search("g", f"sqlite:///{tmp_path}/g.db", tiny_base(data_root), spec, tmp_path / "runs")
    lams = sorted(t.params["lam"] for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert lams == grid
    best, table = summarize(study, spec, {"arch": "mlp"})
    assert best["best_lambda"] in grid and best["n_trials"]["complete"] == 3
    assert list(table["lam"].sort_values()) == grid


def test_spec_validation():
    with pytest.raises(ValueError, match="0 < low < high"):
        SearchSpec("tpe", 0.0, 1.0, 2, 1).validate()
    with pytest.raises(ValueError, match="allowed: tpe, grid"):
        SearchSpec("random", 0.1, 1.0, 2, 1).validate()


def test_resuming_with_other_run_settings_is_refused(tmp_path, data_root):
    from ewcstab.config import ConfigError

    storage = f"sqlite:///{tmp_path}/study.db"
    spec = SearchSpec("tpe", 0.1, 100.0, n_trials=1, seeds_per_trial=1, pruner="none")
    run_search("s", storage, tiny_base(data_root), spec, tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"epochs: 1 -> 2"):
        run_search("s", storage, tiny_base(data_root).replace(epochs=2), spec, tmp_path / "runs")


def test_batched_trials_finish_the_study_with_pruning_and_records(tmp_path, data_root, monkeypatch):
    """trials_per_batch: trials asked together and trained as one batch; pruned ones stop early with the
    short record, finished ones with the full run record; the study ends with exactly n_trials."""
    import json

    from ewcstab import runner

    storage, runs = f"sqlite:///{tmp_path}/b.db", tmp_path / "runs"
    base = tiny_base(data_root).replace(n_tasks=3)
    spec = SearchSpec("tpe", 0.1, 100.0, n_trials=5, seeds_per_trial=2, pruner="median")
    batches = []
    # the pruner's verdict, forced: trial 3 stops after task 2 (what the median pruner decides is its business)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune",
                        lambda self: self.number == 3 and max(self.storage.get_trial(self._trial_id).intermediate_values) == 2)
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
