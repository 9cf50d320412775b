"""Carried optimizer state (RunConfig.optimizer_state = carried): the authors' runs started from the Adam
state of the run before them. A carried run's first step uses its predecessor's moments and step count;
the single-run path and the batched path train the same chains."""

from __future__ import annotations

import math

import pytest
import torch

from ewcstab.config import DONOR_SEED_OFFSET, RunConfig, chain_of
from ewcstab.engine import Engine, train_stack
from ewcstab.runner import train_configs
from ewcstab.telemetry import TaskMonitor

CPU = torch.device("cpu")
QUICK = dict(method="mas", lam=1.0, epochs=1, batch_size=50, importance_samples=200)


def first_step(engine: Engine, task) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run one step of the engine on the task's first batch; returns the parameter change and the gradient
    the optimizer was given."""
    before = [p.detach().clone() for p in engine.runs.params]
    monitor = TaskMonitor(1, 1, 1, CPU, [], None)
    engine.importance.begin_task(engine.runs.params)
    seen: list[torch.Tensor] = []
    step = engine.optimizer.step

    def spy(params, grads):
        seen.extend(g.clone() for g in grads)
        step(params, grads)

    engine.optimizer.step = spy
    engine._step(torch.arange(50).unsqueeze(0), task, monitor)
    return [p.detach() - b for p, b in zip(engine.runs.params, before)], seen


def adam_update(grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.Adam's update (no weight decay, no amsgrad) from the state before the step."""
    m = betas[0] * exp_avg + (1 - betas[0]) * grad
    v = betas[1] * exp_avg_sq + (1 - betas[1]) * grad * grad
    t = step + 1
    return -lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)


def test_a_carried_runs_first_step_uses_the_donors_moments_and_step_count(synthetic_tasks):
    cfg = RunConfig(**QUICK)
    (donor,), _ = train_stack([cfg.replace(seed=DONOR_SEED_OFFSET)], synthetic_tasks, CPU)
    state = donor.final_optimizer_state
    steps = 3 * 12  # 3 tasks x 1 epoch x 600 / 50
    assert all(s["step"] == steps for s in state)

    carried = Engine([cfg], CPU, optimizer_states=[state])
    change, grads = first_step(carried, synthetic_tasks[0])
    for step_count, g, s, delta in zip(carried.optimizer.steps, grads, state, change):
        assert float(step_count) == steps + 1
        want = adam_update(g[0], s["exp_avg"], s["exp_avg_sq"], steps)
        torch.testing.assert_close(delta[0], want, rtol=1e-4, atol=1e-8)  # delta: float32 ulps of theta

    fresh = Engine([cfg], CPU)
    change_fresh, grads_fresh = first_step(fresh, synthetic_tasks[0])
    for step_count, g, delta in zip(fresh.optimizer.steps, grads_fresh, change_fresh):
        assert float(step_count) == 1
        zeros = torch.zeros_like(g[0])
        torch.testing.assert_close(delta[0], adam_update(g[0], zeros, zeros, 0), rtol=1e-4, atol=1e-8)
    # the same initial parameters and batch, other steps: the inherited state changes the update
    assert any(not torch.allclose(a, b) for a, b in zip(change, change_fresh))


def test_the_chain_of_a_seed():
    assert chain_of(0, 1) == [DONOR_SEED_OFFSET, 0]
    assert chain_of(5, 4) == [DONOR_SEED_OFFSET + 4, 4, 5]
    assert chain_of(1001, 2) == [DONOR_SEED_OFFSET + 1000, 1000, 1001]


def test_single_and_batched_paths_train_the_same_chain(synthetic_tasks):
    base = RunConfig(**QUICK, optimizer_state="carried", chain_length=2)
    (alone,), _ = train_configs([base.replace(seed=1)], synthetic_tasks, CPU)  # trains donor, 0, then 1
    batched, _ = train_configs([base.replace(seed=s) for s in range(4)], synthetic_tasks, CPU, runs_per_batch=2)
    assert alone.acc_matrix == batched[1].acc_matrix
    assert alone.chain == batched[1].chain
    assert alone.chain == {
        "seeds": [DONOR_SEED_OFFSET, 0, 1], "position": 2, "predecessor_seed": 0, "donor_seed": DONOR_SEED_OFFSET,
        "inherited_optimizer_steps": 2 * 36.0, "donor_final_mean_acc": alone.chain["donor_final_mean_acc"],
        "donor_diverged": False,
    }
    assert 0 < alone.chain["donor_final_mean_acc"] < 1
    assert batched[2].chain["seeds"] == [DONOR_SEED_OFFSET + 2, 2]
    assert batched[3].chain["predecessor_seed"] == 2 and batched[3].chain["inherited_optimizer_steps"] == 72.0


def test_carried_and_fresh_runs_differ_and_rerun_the_same(synthetic_tasks):
    base = RunConfig(**QUICK, seed=3)
    (fresh,), _ = train_configs([base], synthetic_tasks, CPU)
    (carried,), _ = train_configs([base.replace(optimizer_state="carried")], synthetic_tasks, CPU)
    (again,), _ = train_configs([base.replace(optimizer_state="carried")], synthetic_tasks, CPU)
    assert carried.acc_matrix == again.acc_matrix and carried.telemetry == again.telemetry
    assert carried.acc_matrix != fresh.acc_matrix
    assert fresh.chain is None and carried.chain["predecessor_seed"] == DONOR_SEED_OFFSET + 3


def test_chains_at_several_lambdas_keep_their_own_donors(synthetic_tasks):
    base = RunConfig(**QUICK, optimizer_state="carried")
    cfgs = [base.replace(seed=0, lam=1.0), base.replace(seed=0, lam=5.0)]
    outs, _ = train_configs(cfgs, synthetic_tasks, CPU)
    (alone,), _ = train_configs([cfgs[1]], synthetic_tasks, CPU)
    assert outs[1].acc_matrix == alone.acc_matrix
    assert outs[1].telemetry[2]["penalty_grad_norm_max"] == pytest.approx(alone.telemetry[2]["penalty_grad_norm_max"],
                                                                          rel=1e-4)
    assert outs[0].telemetry[1]["penalty_grad_norm_max"] < outs[1].telemetry[1]["penalty_grad_norm_max"]


def test_a_run_after_a_stopped_run_is_not_trained(synthetic_tasks):
    base = RunConfig(**QUICK, optimizer_state="carried", chain_length=2)
    cfgs = [base.replace(seed=0), base.replace(seed=1)]
    asked = []

    def stop_seed_0(t, accs):
        asked.append(sorted(accs))
        return [0] if 0 in accs else []

    outs, _ = train_configs(cfgs, synthetic_tasks, CPU, after_task=stop_seed_0)
    assert asked == [[0]]  # the donor is never asked about; seed 1 never trained
    assert outs[0].stopped_after_task == 1
    assert outs[1].stopped_after_task == 0 and outs[1].acc_matrix == []


def test_carried_seeds_must_stay_below_the_donors():
    with pytest.raises(ValueError, match="seed: 1000000 is not allowed with optimizer_state carried"):
        RunConfig(optimizer_state="carried", seed=DONOR_SEED_OFFSET).validate()
    with pytest.raises(ValueError, match="chain_length"):
        RunConfig(chain_length=0).validate()


def test_adam_forgets_an_inherited_state_quickly():
    """Why the chain length hardly matters (runner docstring): Adam's moments decay as 0.9**k and
    0.999**k, so after one run's 36,000 steps nothing of the state it started from is left."""
    assert 0.999**36_000 < 1e-15 and math.isclose(1 - 0.999**36_000, 1.0)


@pytest.mark.parametrize("arch", ["cnn", "attention"])
def test_other_architectures_carry_the_state_alone_and_side_by_side(arch):
    """The authors' CNN scripts carry Adam the same way: a CNN or attention chain trains alone as it does with
    a second chain beside it (vmap over the stacked runs), and carrying changes the run."""
    from conftest import synthetic_task

    tasks = [synthetic_task(f"syn{i}", 200, 100, seed=i) for i in range(2)]
    base = RunConfig(arch=arch, method="mas", variant="stabilized", lam=1.0, epochs=1, batch_size=50,
                     importance_samples=60, eval_batch_size=50, sequence="permuted_mnist",
                     optimizer_state="carried", chain_length=2)
    (alone,), _ = train_configs([base.replace(seed=1)], tasks, CPU)
    side_by_side, _ = train_configs([base.replace(seed=s) for s in range(4)], tasks, CPU)
    (fresh,), _ = train_configs([base.replace(seed=1, optimizer_state="fresh")], tasks, CPU)
    assert alone.chain == side_by_side[1].chain
    assert alone.chain["inherited_optimizer_steps"] == 2 * 2 * 4.0  # two runs of 2 tasks x 4 steps before it
    for a, b in zip(alone.acc_matrix, side_by_side[1].acc_matrix):
        assert a == pytest.approx(b, abs=1.5 / 100)  # within one test sample (vmap vs one run: float order)
    assert alone.acc_matrix != fresh.acc_matrix
