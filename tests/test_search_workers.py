"""Several worker processes on one Optuna study: exact trial count, and a killed worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)


def worker_cmd(tmp_path, data_root, n_trials: int) -> list[str]:
    return [
        sys.executable, "-m", "ewcstab.cli", "search", "--arch", "mlp", "--method", "si", "--tasks", "2",
        "--epochs", "1", "--train-subset", "1500", "--test-subset", "300", "--importance-samples", "200",
        "--device", "cpu", "--data-root", str(data_root), "--threads", "1",
        "--low", "0.01", "--high", "10", "--n-trials", str(n_trials), "--seeds-per-trial", "1", "--pruner", "none",
        "--storage", f"sqlite:///{tmp_path}/study.db", "--study-name", "shared", "--shared", "--heartbeat", "1",
        "--runs-dir", str(tmp_path / "runs"), "--no-progress",
    ]


def finished(study) -> list:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def test_concurrent_workers_finish_exactly_n_trials(tmp_path, data_root):
    n = 6
    procs = [
        subprocess.Popen(worker_cmd(tmp_path, data_root, n) + ["--worker-out", str(tmp_path / f"w{k}.json")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for k in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path}/study.db")
    done = finished(study)
    assert len(done) == n
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert len({t.number for t in done}) == n
    # every finished trial has its run record, written once
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        f"trial{t.number:04d}_seed1000.json" for t in done
    )
    # anything else is a surplus trial that was never evaluated
    for t in study.get_trials(states=(TrialState.FAIL,)):
        assert t.user_attrs.get("surplus") and "lam" not in t.params
    workers = {t.user_attrs["worker"] for t in done}
    assert len(workers) >= 2, "the trials should be spread over the workers"


def test_killed_worker_loses_at_most_its_running_trial(tmp_path, data_root):
    n = 4
    storage = f"sqlite:///{tmp_path}/study.db"
    procs = [subprocess.Popen(worker_cmd(tmp_path, data_root, n), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(2)]
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline:
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
        except KeyError:  # study not created yet
            continue
        # a trial that has drawn its lambda (killed before that, it would have no params to retry)
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "lam" in t.params]
        if running:
            victim = running[0]
    assert victim is not None, "no trial started"
    pid = int(victim.user_attrs["worker"].split(":")[1])
    os.kill(pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=600)
    survivor_codes = [p.returncode for p in procs if p.pid != pid]
    assert survivor_codes == [0]

    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(finished(study)) == n
    assert not study.get_trials(states=(TrialState.RUNNING,)), "a trial was left running"
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL
    # retried with the same lambda (Optuna's RetryFailedTrialCallback), by the surviving worker
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params["lam"] == killed.params["lam"]
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
