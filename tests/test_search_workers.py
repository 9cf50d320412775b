"""Several `ewcstab search` processes on one study, kills and restarts: exactly n finished trials with n
distinct lambdas, a killed trial's lambda tried again, a live worker's trial never failed by another, and
a worker with other settings refused in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def worker_cmd(tmp_path, data_root, n_trials: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ewcstab", "search", "--arch", "mlp", "--method", "si", "--tasks", "2",
        "--epochs", "1", "--train-subset", "1500", "--test-subset", "300", "--importance-samples", "200",
        "--device", "cpu", "--data-root", str(data_root), "--threads", "1",
        "--low", "0.01", "--high", "10", "--n-trials", str(n_trials), "--seeds-per-trial", "1", "--pruner", "none",
        "--storage", f"sqlite:///{tmp_path}/study.db", "--study-name", "shared", "--heartbeat", "2",
        "--runs-dir", str(tmp_path / "runs"), "--no-progress", *extra,
    ]


def load(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path}/study.db")


def wait_for_running(tmp_path, count: int = 1, first: int = 0, timeout: float = 300) -> list:
    """The running trials numbered ``first`` or later that have drawn their lambda, once there are ``count``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.1)
        try:
            study = load(tmp_path)
        except KeyError:  # study not created yet
            continue
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "lam" in t.params
                   and t.number >= first]
        if len(running) >= count:
            return running
    raise AssertionError(f"never saw {count} running trial(s)")


def check_study(tmp_path, n: int) -> optuna.Study:
    """n finished trials with n distinct lambdas, each with its run record; nothing left running or
    queued; every failed trial is a surplus or duplicate one, or one whose worker was killed."""
    study = load(tmp_path)
    done = study.get_trials(states=FINISHED)
    assert len(done) == n
    assert len({t.params["lam"] for t in done}) == n, sorted(t.params["lam"] for t in done)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    records = {p.name for p in (tmp_path / "runs").iterdir()}
    assert {f"trial{t.number:04d}_seed1000.json" for t in done} <= records
    for t in study.get_trials(states=(TrialState.FAIL,)):
        assert t.user_attrs.get("surplus") or t.user_attrs.get("duplicate") or "lam" in t.params
        if t.user_attrs.get("surplus"):
            assert "lam" not in t.params
    return study


@pytest.mark.parametrize("workers", [2, 3])
def test_concurrent_workers_finish_exactly_n_distinct_trials(tmp_path, data_root, workers):
    n = 4
    procs = [subprocess.Popen(worker_cmd(tmp_path, data_root, n, "--worker-out", str(tmp_path / f"w{k}.json")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in range(workers)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    study = check_study(tmp_path, n)
    assert not study.get_trials(states=(TrialState.FAIL,)) or all(
        t.user_attrs.get("surplus") or t.user_attrs.get("duplicate") for t in study.get_trials(states=(TrialState.FAIL,)))
    done = study.get_trials(states=FINISHED)
    # each worker drew from its own stream, named in its trials
    by_worker = {}
    for t in done:
        by_worker.setdefault(t.user_attrs["worker"], set()).add(t.user_attrs["stream"])
    assert all(len(streams) == 1 for streams in by_worker.values())
    assert len({s for streams in by_worker.values() for s in streams}) == len(by_worker)


def test_killed_worker_trial_is_retried_by_the_survivor(tmp_path, data_root):
    n = 4
    procs = [subprocess.Popen(worker_cmd(tmp_path, data_root, n), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    victim = wait_for_running(tmp_path)[0]
    pid = int(victim.user_attrs["worker"].split(":")[1])
    os.kill(pid, signal.SIGKILL)
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.pid != pid:
            assert p.returncode == 0, err[-2000:]
    study = check_study(tmp_path, n)
    assert study.trials[victim.number].state == TrialState.FAIL
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number and t.state in FINISHED]
    assert len(retries) == 1 and retries[0].params["lam"] == victim.params["lam"]
    assert retries[0].user_attrs["worker"] != victim.user_attrs["worker"]


@pytest.mark.parametrize("trials_per_batch", [1, 2])
def test_killed_search_resumes_with_every_lambda_tried(tmp_path, data_root, trials_per_batch):
    """Kill the only worker in its second trial (batch), start it again: the killed lambdas are tried, no
    finished lambda is drawn again (the restart samples a stream of its own)."""
    n = 4
    cmd = worker_cmd(tmp_path, data_root, n, "--trials-per-batch", str(trials_per_batch))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = wait_for_running(tmp_path, count=trials_per_batch, first=trials_per_batch)
    proc.kill()
    proc.wait()
    first_run = {t.number: t.params.get("lam") for t in load(tmp_path).trials}
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    study = check_study(tmp_path, n)
    done = {t.params["lam"] for t in study.get_trials(states=FINISHED)}
    assert {t.params["lam"] for t in killed} <= done
    assert {study.trials[t.number].state for t in killed} == {TrialState.FAIL}
    fresh = [t for t in study.trials if t.number not in first_run and "retry_of" not in t.user_attrs
             and t.state in FINISHED]
    assert all(t.user_attrs["stream"] != 0 for t in fresh)  # the restart's own stream


def test_second_worker_leaves_a_live_worker_alone_and_a_mismatching_one_is_refused(tmp_path, data_root):
    """A second worker (no --shared, as a mistaken second start would be) must not fail the first's
    running trial; a worker with another search mode is refused in one line before it touches the study."""
    n = 2
    first = subprocess.Popen(worker_cmd(tmp_path, data_root, n), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    running = wait_for_running(tmp_path)[0]
    second = subprocess.run(worker_cmd(tmp_path, data_root, n), capture_output=True, text=True, timeout=600)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    study = check_study(tmp_path, n)
    assert study.trials[running.number].state in FINISHED
    assert not [t for t in study.get_trials(states=(TrialState.FAIL,)) if "lam" in t.params
                and not t.user_attrs.get("duplicate")]

    before = len(study.trials)
    refused = subprocess.run(worker_cmd(tmp_path, data_root, n, "--mode", "grid", "--grid", "1", "2"),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "was created with other settings" in refused.stderr and "mode: 'tpe' -> 'grid'" in refused.stderr
    assert len(load(tmp_path).trials) == before
