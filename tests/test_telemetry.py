"""Gradient-explosion telemetry: summaries in every record, clipping counts, divergence and blow-up."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ewcstab.config import RunConfig
from ewcstab.engine import train_stack
from ewcstab.penalty import build_penalty
from ewcstab.records import run_record as make_record
from ewcstab.telemetry import COLUMNS, BlowupRule, TaskMonitor, run_norms

from conftest import synthetic_task

CPU = torch.device("cpu")
QUICK = dict(epochs=1, batch_size=50, importance_samples=200)


@pytest.fixture(scope="module")
def tasks():
    """Three small synthetic tasks: 6 steps each at batch 50."""
    return [synthetic_task(f"syn{i}", 300, 100, seed=i) for i in range(3)]
SUMMARY_KEYS = {
    "task", "steps", "loss_first", "loss_last", "loss_max",
    "grad_norm_mean", "grad_norm_p50", "grad_norm_p90", "grad_norm_p99", "grad_norm_max",
    "task_grad_norm_p50", "task_grad_norm_max", "penalty_grad_norm_p50", "penalty_grad_norm_max",
    "penalty_share_p50", "penalty_share_p90", "penalty_share_p99", "penalty_share_max", "nonfinite_grad_steps",
    "kappa_max", "kappa_frac_ge1", "kappa_frac_ge2", "anchor_dist_mean", "anchor_dist_max",
    "clip_norm", "clipped_steps", "clipped_fraction", "diverged", "diverged_step", "divergence_reason",
}


def run_record(tasks, trace=False, **changes):
    cfg = RunConfig(**{**QUICK, **changes})
    (out,), info = train_stack([cfg], tasks, CPU, trace=trace)
    rec = make_record(cfg.resolved().to_dict(), [t.name for t in tasks], out, 0.0, info, {})
    json.dumps(rec, allow_nan=False)  # telemetry never puts NaN/inf into a record
    return out, rec


def test_every_record_carries_a_sane_summary_per_task(tasks):
    _, rec = run_record(tasks, method="mas", variant="original", lam=50.0)
    tel = rec["telemetry"]
    assert [s["task"] for s in tel] == [1, 2, 3]
    assert "telemetry_trace" not in rec  # only when asked
    assert rec["divergence_rule"] == {"factor": 100.0, "floor": math.log(10.0), "cap": 1e4}
    for s in tel:
        assert set(s) == SUMMARY_KEYS
        assert s["steps"] == 6 and s["diverged"] is False and s["nonfinite_grad_steps"] == 0
        assert s["clip_norm"] is None and s["clipped_steps"] is None
        for key in ("grad_norm_p50", "grad_norm_p90", "grad_norm_p99", "grad_norm_max", "loss_first"):
            assert math.isfinite(s[key]) and s[key] > 0
        assert s["grad_norm_p50"] <= s["grad_norm_p90"] <= s["grad_norm_p99"] <= s["grad_norm_max"]
        assert 0.0 <= s["penalty_share_p50"] <= s["penalty_share_max"] <= 1.0
    first, later = tel[0], tel[1:]
    assert first["kappa_max"] == 0.0 and first["penalty_grad_norm_max"] == 0.0  # no penalty yet
    assert first["anchor_dist_mean"] is None
    for s in later:
        assert s["kappa_max"] > 0 and s["penalty_grad_norm_max"] > 0 and s["penalty_share_max"] > 0
        assert 0 < s["anchor_dist_mean"] <= s["anchor_dist_max"]


def test_run_norms_are_each_runs_norm_over_all_parameters():
    grads = [torch.randn(3, 7, 3) * 10, torch.randn(3, 5) * 10]
    want = [torch.cat([g[r].flatten() for g in grads]).norm() for r in range(3)]
    torch.testing.assert_close(run_norms(grads), torch.stack(want))


def test_clipping_bounds_the_norm_and_every_firing_is_counted(tasks):
    pen = build_penalty("clipped", [1.0, 1.0], alpha=1e-3, clip_norm=0.5)
    grads = [torch.randn(2, 7, 3) * 10, torch.randn(2, 5) * 10]
    before = run_norms(grads)
    assert torch.equal(pen.clip_(grads, before), before)  # clip_ returns the pre-clip norms
    assert (run_norms(grads) <= 0.5 + 1e-6).all()

    _, rec = run_record(tasks, trace=True, method="mas", variant="clipped", lam=10.0, clip_norm=0.8)
    for s, tr in zip(rec["telemetry"], rec["telemetry_trace"]):
        fired = sum(g > 0.8 for g in tr["grad_norm"])  # pre-clip norms in the trace
        assert s["clip_norm"] == 0.8 and s["clipped_steps"] == fired
        assert s["clipped_fraction"] == pytest.approx(fired / s["steps"])
    assert 0 < sum(s["clipped_steps"] for s in rec["telemetry"]) < sum(s["steps"] for s in rec["telemetry"])


def test_trace_holds_every_step_and_agrees_with_the_summary(tasks):
    _, rec = run_record(tasks, trace=True, method="fisher", variant="original", lam=100.0)
    for s, tr in zip(rec["telemetry"], rec["telemetry_trace"]):
        assert tr["task"] == s["task"] and set(tr) == {"task", *COLUMNS}
        assert all(len(tr[c]) == s["steps"] for c in COLUMNS)
        assert max(tr["grad_norm"]) == pytest.approx(s["grad_norm_max"])
        assert tr["loss"][0] == pytest.approx(s["loss_first"])
        for g, t, p in zip(tr["grad_norm"], tr["task_grad_norm"], tr["penalty_grad_norm"]):
            assert g <= t + p + 1e-5  # triangle inequality: the full gradient is their sum


def test_forced_divergence_is_recorded_with_task_and_step(tasks):
    """Plain EWC under SGD with kappa >> 2: diverged, where, and kappa shows why; nothing raised."""
    out, rec = run_record(tasks, method="mas", variant="original", optimizer="sgd", lr=0.1, lam=1e7, epochs=2)
    assert rec["diverged"] is True and rec["diverged_at"]["task"] == 2
    last = rec["telemetry"][-1]
    assert len(rec["telemetry"]) == 2 and last["task"] == 2 and last["diverged"] is True
    assert last["diverged_step"] == rec["diverged_at"]["step"] >= 1
    assert last["divergence_reason"] == rec["diverged_at"]["reason"]
    assert last["divergence_reason"] in ("loss blow-up", "non-finite loss", "non-finite gradient")
    assert last["kappa_max"] > 2 and last["kappa_frac_ge2"] > 0
    assert last["penalty_share_max"] > 0.9  # the penalty's gradient dominates when it explodes


def test_loss_blowup_rule_thresholds():
    rule = BlowupRule(factor=100.0, floor=math.log(10.0), cap=1e4)
    assert rule.threshold(torch.tensor(3.0)) == pytest.approx(300.0)
    assert rule.threshold(torch.tensor(0.01)) == pytest.approx(100 * math.log(10.0))  # floor
    assert rule.threshold(torch.tensor(500.0)) == pytest.approx(1e4)  # cap


def feed(monitor: TaskMonitor, losses, grad_norms=None):
    for i, loss in enumerate(losses):
        g = torch.tensor([1.0 if grad_norms is None else grad_norms[i]])
        monitor.record(torch.tensor([loss]), g, None, g)


@pytest.mark.parametrize(
    "losses,grad_norms,expected",
    [
        ([2.3, 2.0, 1.5, 1.0], None, None),
        ([2.3, 2.0, 231.0, 1.0], None, (3, "loss blow-up")),
        ([0.01, 0.5, 200.0, 2.0], None, None),  # below the floor's threshold 100 ln 10 = 230
        ([2.3, 2.0, float("nan"), 1e9], None, (3, "non-finite loss")),
        ([2.3, 2.0, 2.0, 2.0], [1.0, float("inf"), 1.0, 1.0], (2, "non-finite gradient")),
    ],
)
def test_monitor_finds_the_first_bad_step(losses, grad_norms, expected):
    monitor = TaskMonitor(1, 1, 4, CPU, [], blowup=BlowupRule())
    feed(monitor, losses[:2], grad_norms and grad_norms[:2])
    first = monitor.check(2)
    feed(monitor, losses[2:], grad_norms and grad_norms[2:])
    found = first or monitor.check(4)
    assert found.get(0) == expected
    steps = expected[0] if expected else 4
    (summary,) = monitor.summaries([0], [steps], [expected], [], [])
    assert summary["diverged"] is (expected is not None) and summary["steps"] == steps
    json.dumps(summary, allow_nan=False)


def test_monitor_tells_runs_apart():
    """Two runs, one blows up at step 2: only that run is reported, with its own first loss as reference."""
    monitor = TaskMonitor(1, 2, 3, CPU, [], blowup=BlowupRule())
    for losses in ([2.3, 0.01], [2.0, 100.0], [1.9, 0.5]):  # run 1: 100 < 100 ln 10 (its floor): no blow-up
        monitor.record(torch.tensor(losses), torch.ones(2), None, torch.ones(2))
    assert monitor.check(3) == {}
    monitor = TaskMonitor(1, 2, 2, CPU, [], blowup=BlowupRule())
    for losses in ([2.3, 2.3], [2.0, 1e9]):
        monitor.record(torch.tensor(losses), torch.ones(2), None, torch.ones(2))
    assert monitor.check(2) == {1: (2, "loss blow-up")}


def test_blowup_stops_the_run_through_the_engine(tasks):
    """A rule that calls any loss above half the first one a blow-up fires on step 1 of task 1."""
    (out,), _ = train_stack([RunConfig(**QUICK)], tasks, CPU, blowup=BlowupRule(factor=0.5, floor=0.0))
    assert (out.divergence.task, out.divergence.step, out.divergence.reason) == (1, 1, "loss blow-up")
    assert out.acc_matrix == [] and out.telemetry[0]["diverged_step"] == 1
    assert out.divergence_rule["factor"] == 0.5


def test_kappa_and_anchor_distance_summaries():
    pen = build_penalty("original", [10.0], alpha=0.1)
    omega = [torch.tensor([[0.1, 0.5, 1.0, 2.0]]), torch.tensor([[[0.0, 0.2]]])]
    anchor = [torch.zeros(1, 4), torch.zeros(1, 1, 2)]
    pen.consolidate(anchor, omega)  # kappa = 2 * 0.1 * 10 * Omega = 2 Omega
    params = [torch.tensor([[1.0, -2.0, 0.0, 0.5]]), torch.tensor([[[0.0, 3.0]]])]
    monitor = TaskMonitor(2, 1, 3, CPU, pen.step_gain())
    feed(monitor, [2.0, 1.9, 1.8])
    (s,) = monitor.summaries([0], [3], [None], params, pen.anchor)
    assert s["kappa_max"] == pytest.approx(4.0)
    assert s["kappa_frac_ge1"] == pytest.approx(3 / 6)  # 1.0, 2.0, 4.0
    assert s["kappa_frac_ge2"] == pytest.approx(2 / 6)  # 2.0, 4.0
    assert s["anchor_dist_mean"] == pytest.approx(6.5 / 6) and s["anchor_dist_max"] == pytest.approx(3.0)
    stab = build_penalty("stabilized", [10.0], alpha=0.1)
    stab.consolidate(anchor, omega)
    monitor = TaskMonitor(2, 1, 1, CPU, stab.step_gain())
    feed(monitor, [2.0])
    assert monitor.summaries([0], [1], [None], [], [])[0]["kappa_frac_ge1"] == 0.0  # kappa < 1 always
