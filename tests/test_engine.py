"""The training engine: R stacked runs equal the same runs trained one at a time, for every architecture,
method and variant, with diverging and stopped runs among healthy ones."""

from __future__ import annotations

import pytest
import torch

from ewcstab.config import RunConfig
from ewcstab.engine import Engine, check_batchable, train_stack
from ewcstab.errors import ConfigError
from ewcstab.runner import train_runs

from conftest import synthetic_task

CPU = torch.device("cpu")
#: (seed, lam) per run: a consolidating run, a strong one, plain fine-tuning
RUNS = [(0, 1.0), (1, 10.0), (2, 0.0)]


@pytest.fixture(scope="module")
def tiny_tasks():
    """Three small tasks (4 steps of 50 per epoch): enough for the CNN and the attention model on a CPU."""
    return [synthetic_task(f"syn{i}", 200, 100, seed=i) for i in range(3)]


def one_at_a_time(cfgs, tasks, **options):
    return [train_stack([c], tasks, CPU, **options)[0][0] for c in cfgs]


def assert_same_run(got, want, n_test: int, moments: float = 1e-3, rel: float = 1e-3) -> None:
    """Equal to float tolerance: accuracies within one test sample, telemetry to ``rel``, and the
    final Adam moments (all parameters together) to ``moments`` in norm. (Adam's update is about lr * sign(g) where |g| is tiny, so
    rounding differences of near-zero gradients -- a convolution's bias before its BatchNorm -- flip single
    steps, and through the penalty the telemetry of the CNN and the attention model agrees to about 1e-2.)"""
    assert len(got.acc_matrix) == len(want.acc_matrix)
    for row_got, row_want in zip(got.acc_matrix, want.acc_matrix):
        assert len(row_got) == len(row_want)
        for a, b in zip(row_got, row_want):
            assert abs(a - b) * n_test <= 1 + 1e-9, (got.acc_matrix, want.acc_matrix)
    assert got.divergence == want.divergence
    assert got.stopped_after_task == want.stopped_after_task
    assert len(got.telemetry) == len(want.telemetry)
    for s_got, s_want in zip(got.telemetry, want.telemetry):
        assert s_got.keys() == s_want.keys()
        for key, value in s_want.items():
            if isinstance(value, float) and not (got.divergence and s_got["diverged"] and key.startswith("anchor")):
                assert s_got[key] == pytest.approx(value, rel=rel, abs=1e-6), key
            elif not isinstance(value, float):
                assert s_got[key] == value, key
    assert len(got.train_seconds) == len(want.train_seconds)
    assert len(got.importance_seconds) == len(want.importance_seconds)
    if got.divergence is None:  # the whole trajectory: both Adam moments at the end, over all parameters
        for key in ("exp_avg", "exp_avg_sq") if "exp_avg" in want.final_optimizer_state[0] else ():
            a = torch.cat([s[key].flatten() for s in got.final_optimizer_state])
            b = torch.cat([s[key].flatten() for s in want.final_optimizer_state])
            assert torch.linalg.vector_norm(a - b) <= moments * torch.linalg.vector_norm(b), key
        assert [s.get("step") for s in got.final_optimizer_state] == [s.get("step") for s in want.final_optimizer_state]


@pytest.mark.parametrize("method", ["fisher", "mas", "si", "signal"])
@pytest.mark.parametrize("variant", ["original", "stabilized", "clipped"])
def test_stacked_mlp_runs_equal_single_runs(synthetic_tasks, method, variant):
    base = RunConfig(method=method, variant=variant, epochs=2, batch_size=100, importance_samples=200, clip_norm=0.5)
    cfgs = [base.replace(seed=seed, lam=lam) for seed, lam in RUNS]
    stacked, info = train_stack(cfgs, synthetic_tasks, CPU)
    assert info["forward"] == "stacked" and info["runs_in_batch"] == 3
    for got, want in zip(stacked, one_at_a_time(cfgs, synthetic_tasks)):
        assert want.divergence is None
        assert_same_run(got, want, n_test=200)
    if variant == "clipped":  # clipping fired, on each run's own norm
        assert all(o.telemetry[0]["clipped_steps"] > 0 for o in stacked)


@pytest.mark.parametrize("arch", ["cnn", "attention"])
@pytest.mark.parametrize("method,variant", [("fisher", "original"), ("si", "stabilized"), ("signal", "clipped")])
def test_stacked_runs_of_other_architectures_equal_single_runs(tiny_tasks, arch, method, variant):
    """vmap over functional_call (BatchNorm statistics kept per run) against each run alone."""
    base = RunConfig(arch=arch, method=method, variant=variant, sequence="permuted_mnist", epochs=1, batch_size=50,
                     importance_samples=60, clip_norm=1.0, eval_batch_size=50)
    cfgs = [base.replace(seed=0, lam=1.0), base.replace(seed=1, lam=0.1)]
    stacked, info = train_stack(cfgs, tiny_tasks[:2], CPU)
    assert info["forward"] == "vmap"
    for got, want in zip(stacked, one_at_a_time(cfgs, tiny_tasks[:2])):
        assert_same_run(got, want, n_test=100, moments=0.05, rel=0.02)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "attention"])
def test_a_diverging_run_leaves_the_others_unchanged(tiny_tasks, arch):
    """A coefficient that overflows float32 makes one run's gradient non-finite in task 2; the others carry
    on with their own Adam moments after it left the batch, exactly as if it had never been there."""
    base = RunConfig(arch=arch, method="fisher", variant="original", sequence="permuted_mnist", epochs=2,
                     batch_size=50, importance_samples=60, eval_batch_size=50)
    cfgs = [base.replace(seed=0, lam=1.0), base.replace(seed=1, lam=1e38), base.replace(seed=2, lam=0.0)]
    stacked, _ = train_stack(cfgs, tiny_tasks, CPU)
    assert stacked[1].divergence is not None and stacked[1].divergence.task == 2
    assert [len(o.acc_matrix) for o in stacked] == [3, 1, 3]
    for got, want in zip(stacked, one_at_a_time(cfgs, tiny_tasks)):
        assert_same_run(got, want, n_test=100, moments=0.05, rel=0.02)
    summary = stacked[1].telemetry[-1]
    assert summary["diverged"] and summary["diverged_step"] == stacked[1].divergence.step
    assert summary["steps"] == stacked[1].divergence.step  # the summary stops at the first bad step


def test_sgd_blowup_is_found_at_its_step_whatever_the_batch(synthetic_tasks):
    """Plain EWC, plain SGD, 2 alpha lam Omega >> 2: growing oscillation, caught by the loss blow-up rule."""
    base = RunConfig(method="mas", optimizer="sgd", lr=0.1, batch_size=50, epochs=2, importance_samples=200)
    cfgs = [base.replace(seed=0, lam=1.0), base.replace(seed=1, lam=1e7)]
    stacked, _ = train_stack(cfgs, synthetic_tasks, CPU)
    div = stacked[1].divergence
    assert div is not None and div.task == 2 and div.reason == "loss blow-up"
    assert div.epoch == (div.step - 1) // 12 + 1
    for got, want in zip(stacked, one_at_a_time(cfgs, synthetic_tasks)):
        assert_same_run(got, want, n_test=200)


def test_divergence_step_is_exact(synthetic_tasks, monkeypatch):
    """The per-step rows report the first non-finite step although the host looks once per epoch."""
    import ewcstab.engine as engine_mod

    real = engine_mod.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, target, reduction="mean"):
        calls["n"] += 1
        loss = real(logits, target, reduction=reduction)
        return loss * float("nan") if calls["n"] == 20 else loss  # step 8 of task 2 (12 steps per task)

    monkeypatch.setattr(engine_mod.F, "cross_entropy", poisoned)
    cfg = RunConfig(method="fisher", lam=1.0, epochs=1, batch_size=50, importance_samples=200)
    (out,), _ = train_stack([cfg], synthetic_tasks, CPU)
    assert (out.divergence.task, out.divergence.epoch, out.divergence.step) == (2, 1, 8)
    assert out.divergence.reason == "non-finite loss"


def test_runs_per_batch_changes_the_speed_not_the_results(synthetic_tasks):
    base = RunConfig(method="si", variant="stabilized", epochs=1, batch_size=50, importance_samples=200)
    cfgs = [base.replace(seed=s, lam=lam) for s, lam in RUNS]
    together, _ = train_runs(cfgs, synthetic_tasks, CPU, runs_per_batch=3)
    apart, info = train_runs(cfgs, synthetic_tasks, CPU, runs_per_batch=2)
    assert info["runs_per_batch"] == 2
    for got, want in zip(apart, together):
        assert_same_run(got, want, n_test=200)


def test_after_task_stops_runs_and_leaves_the_others_unchanged(synthetic_tasks):
    base = RunConfig(method="mas", epochs=1, batch_size=50, importance_samples=200)
    cfgs = [base.replace(seed=s, lam=lam) for s, lam in RUNS]
    seen = []

    def stop_run_1_after_task_1(t, accs):
        seen.append((t, sorted(accs)))
        return [1] if t == 1 else []

    stacked, _ = train_runs(cfgs, synthetic_tasks, CPU, after_task=stop_run_1_after_task_1)
    assert seen == [(1, [0, 1, 2]), (2, [0, 2]), (3, [0, 2])]
    assert stacked[1].stopped_after_task == 1 and len(stacked[1].acc_matrix) == 1
    for i in (0, 2):
        assert_same_run(stacked[i], one_at_a_time([cfgs[i]], synthetic_tasks)[0], n_test=200)


def test_a_batch_whose_runs_all_diverge_ends_cleanly(synthetic_tasks):
    base = RunConfig(method="fisher", epochs=1, batch_size=50, importance_samples=200)
    outs, _ = train_stack([base.replace(seed=0, lam=1e38), base.replace(seed=1, lam=1e38)], synthetic_tasks, CPU)
    assert all(o.divergence is not None and o.divergence.task == 2 for o in outs)


def test_same_seed_same_numbers(synthetic_tasks):
    cfg = RunConfig(method="si", lam=1.0, epochs=1, batch_size=50, importance_samples=200, seed=3)
    (a,), _ = train_stack([cfg], synthetic_tasks, CPU)
    (b,), _ = train_stack([cfg], synthetic_tasks, CPU)
    assert a.acc_matrix == b.acc_matrix and a.telemetry == b.telemetry
    (c,), _ = train_stack([cfg.replace(seed=4)], synthetic_tasks, CPU)
    assert c.acc_matrix != a.acc_matrix


def test_runs_may_differ_only_in_seed_and_lam():
    base = RunConfig(method="mas", epochs=1)
    check_batchable([base.replace(seed=1, lam=2.0), base.replace(seed=5, lam=0.0)])
    with pytest.raises(ConfigError, match="method: run 1 has 'fisher' but run 0 has 'mas'"):
        check_batchable([base, base.replace(method="fisher")])
    with pytest.raises(ConfigError, match="at least one"):
        check_batchable([])


def test_the_engine_has_no_per_step_host_work_in_its_step(synthetic_tasks, monkeypatch):
    """The step (what a CUDA graph captures) never reads a tensor on the host: ``Tensor.item``/``tolist``/
    ``__bool__`` would raise inside a capture. Checked by making them raise during ``_step``."""
    cfg = RunConfig(method="si", variant="clipped", lam=1.0, epochs=1, batch_size=50, importance_samples=200)
    engine = Engine([cfg, cfg.replace(seed=1)], CPU)
    real_step = Engine._step

    def guarded(self, *args):
        def refuse(*_a, **_k):
            raise AssertionError("host read inside the step")

        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
                m.setattr(torch.Tensor, name, refuse)
            real_step(self, *args)

    monkeypatch.setattr(Engine, "_step", guarded)
    for t, task in enumerate(synthetic_tasks[:2], start=1):
        engine.train_task(t, task)
        engine.evaluate(synthetic_tasks[:t])
        engine.consolidate(t, task)
    assert all(len(o.acc_matrix) == 2 for o in engine.outcomes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_cuda_graphs_replay_the_eager_steps(tiny_tasks, arch):
    cuda = torch.device("cuda")
    tasks = [type(t)(t.name, *(v.to(cuda) for v in (t.train_x, t.train_y, t.test_x, t.test_y))) for t in tiny_tasks]
    base = RunConfig(arch=arch, method="si", variant="stabilized", sequence="permuted_mnist", epochs=2,
                     batch_size=50, importance_samples=60, eval_batch_size=50)
    cfgs = [base.replace(seed=s, lam=lam) for s, lam in RUNS]
    graphed, info = train_stack(cfgs, tasks, cuda, cuda_graphs=True)
    assert info["cuda_graphs"] is True
    eager, _ = train_stack(cfgs, tasks, cuda, cuda_graphs=False)
    for got, want in zip(graphed, eager):
        assert_same_run(got, want, n_test=100)
