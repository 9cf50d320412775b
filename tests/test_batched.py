"""Batched training (issue 8): every run of a batch equals the single-run path for its seed and lambda."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import ewcstab.train as train_mod
from ewcstab.batched import check_batchable, execute_batched, train_batched, train_batched_with_params
from ewcstab import memory
from ewcstab.batched import engine
from ewcstab.batched.engine import epoch_batches
from ewcstab.config import ConfigError, RunConfig
from ewcstab.train import execute, record, run_sequence

CPU = torch.device("cpu")
# Per run (seed, lam): three seeds, a consolidating run, a strong one, and plain fine-tuning.
RUNS = [(0, 1.0), (1, 10.0), (2, 0.0)]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the numbers do not depend on it, and on a shared 2-core machine OpenMP's
    thread hand-offs would make these many tiny steps ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def single(cfg: RunConfig, tasks, monkeypatch) -> tuple[train_mod.RunOutcome, dict[str, torch.Tensor]]:
    """The single-run path's outcome and its model's final parameters."""
    built = []
    real = train_mod.build_model

    def spy(name):
        built.append(real(name))
        return built[-1]

    monkeypatch.setattr(train_mod, "build_model", spy)
    outcome = run_sequence(cfg, tasks, CPU)
    monkeypatch.setattr(train_mod, "build_model", real)
    return outcome, {k: p.detach().clone() for k, p in built[0].named_parameters()}


def assert_same_run(got, got_params, want, want_params, n_test: int):
    assert len(got.acc_matrix) == len(want.acc_matrix)
    for row_got, row_want in zip(got.acc_matrix, want.acc_matrix):
        assert len(row_got) == len(row_want)
        for a, b in zip(row_got, row_want):
            assert abs(a - b) * n_test <= 1 + 1e-9, (got.acc_matrix, want.acc_matrix)  # within one test sample
    assert (got.divergence is None) == (want.divergence is None)
    if want.divergence is not None:
        assert got.divergence == want.divergence
    assert got_params.keys() == want_params.keys()
    for k in want_params:
        torch.testing.assert_close(got_params[k], want_params[k], rtol=1e-4, atol=1e-6, msg=k, equal_nan=True)
    assert len(got.telemetry) == len(want.telemetry)
    for s_got, s_want in zip(got.telemetry, want.telemetry):
        assert s_got.keys() == s_want.keys()
        for key, value in s_want.items():
            if isinstance(value, float):
                assert s_got[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
            else:
                assert s_got[key] == value, key
    assert len(got.train_seconds) == len(want.train_seconds)
    assert len(got.importance_seconds) == len(want.importance_seconds)


@pytest.mark.parametrize("method", ["fisher", "mas", "si", "signal"])
@pytest.mark.parametrize("variant", ["original", "stabilized", "clipped"])
def test_each_run_equals_the_single_run_path(synthetic_tasks, monkeypatch, method, variant):
    base = RunConfig(method=method, variant=variant, epochs=2, batch_size=100, importance_samples=200,
                     clip_norm=0.5, divergence_check_every=5)
    cfgs = [base.replace(seed=seed, lam=lam) for seed, lam in RUNS]
    outcomes, params = train_batched_with_params(cfgs, synthetic_tasks, CPU)
    for cfg, got, got_params in zip(cfgs, outcomes, params):
        want, want_params = single(cfg, synthetic_tasks, monkeypatch)
        assert want.divergence is None
        assert_same_run(got, got_params, want, want_params, n_test=200)
    if variant == "clipped":  # clipping fired, on each run's own norm
        assert all(o.telemetry[0]["clipped_steps"] > 0 for o in outcomes)


@pytest.mark.parametrize("method,options", [("fisher", {}), ("fisher", {"label": "predicted"}), ("mas", {}),
                                            ("signal", {})])
@pytest.mark.parametrize("one_run_per_pass", [False, True])
def test_stacked_importances_equal_the_single_run_estimators(monkeypatch, method, options, one_run_per_pass):
    """Batched closed forms against ``ewcstab.importance`` on each run's own model (and passes split over runs)."""
    from ewcstab.batched import importance as stacked
    from ewcstab.batched.stack import Layout
    from ewcstab.importance import build_importance
    from ewcstab.models import build_model

    if one_run_per_pass:
        monkeypatch.setattr(stacked, "run_groups", lambda runs, *a, **k: [slice(r, r + 1) for r in range(runs)])
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model("mlp"))
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(300, 1, 28, 28, generator=g), torch.randint(0, 10, (300,), generator=g)
    layout = Layout.of(models[0], 3)
    theta = layout.stack([list(m.parameters()) for m in models], CPU)
    label = options.get("label", "true")
    got = stacked.build_stacked_importance(method, fisher_label=label).end_task(layout, theta, x, y)
    for r, model in enumerate(models):
        want = build_importance(method, **options).end_task(model, x, y)
        for (name, w), v in zip(want.items(), layout.run_views(got, r)):
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "changes,diverging_lam",
    [
        # plain EWC, plain SGD, 2 alpha lam Omega >> 2: growing oscillation (as test_train's forced divergence)
        (dict(method="mas", optimizer="sgd", lr=0.1, batch_size=50), 1e7),
        # the same without the loss blow-up rule (config fields): it runs on until the loss is non-finite
        (dict(method="mas", optimizer="sgd", lr=0.1, batch_size=50, blowup_factor=1e30, blowup_cap=1e30), 1e7),
        # Adam: a coefficient that overflows float32 makes the gradient non-finite within the task; the
        # others then carry on with their Adam moments after the diverged run left the batch
        (dict(method="fisher", batch_size=50), 1e38),
    ],
    ids=["sgd-blowup", "sgd-nonfinite", "adam-overflow"],
)
def test_a_diverging_run_leaves_the_others_unchanged(synthetic_tasks, monkeypatch, changes, diverging_lam):
    base = RunConfig(variant="original", epochs=2, importance_samples=200, divergence_check_every=7, **changes)
    cfgs = [base.replace(seed=0, lam=1.0), base.replace(seed=1, lam=diverging_lam), base.replace(seed=2, lam=0.0)]
    outcomes, params = train_batched_with_params(cfgs, synthetic_tasks, CPU)
    assert outcomes[1].divergence is not None and outcomes[1].divergence.task == 2
    for cfg, got, got_params in zip(cfgs, outcomes, params):
        want, want_params = single(cfg, synthetic_tasks, monkeypatch)
        if cfg.lam == diverging_lam:  # same task, epoch, step and reason; parameters are NaN/huge: not compared
            assert got.divergence == want.divergence
            assert got.acc_matrix == want.acc_matrix
            assert got.telemetry[-1]["diverged"] and got.telemetry[-1]["diverged_step"] == want.divergence.step
            continue
        assert got.divergence is None
        assert_same_run(got, got_params, want, want_params, n_test=200)
    rec = record(cfgs[1].resolved(), [t.name for t in synthetic_tasks], outcomes[1], 0.0, {})
    assert rec["diverged"] and rec["final_mean_acc"] is None
    json.dumps(rec, allow_nan=False)  # no NaN reaches the record


def test_divergence_step_is_exact_in_a_batch(synthetic_tasks, monkeypatch):
    """A NaN loss at one step of one run is reported at that step, whatever the check interval."""
    from ewcstab.batched.monitor import StackedMonitor

    real = StackedMonitor.record
    calls = {"n": 0}

    def poisoned(self, loss, norms):
        calls["n"] += 1
        if calls["n"] == 20:  # step 8 of task 2 (12 steps per task): poison run 1's loss only
            loss = loss.clone()
            loss[1] = float("nan")
        real(self, loss, norms)

    monkeypatch.setattr(StackedMonitor, "record", poisoned)
    base = RunConfig(method="fisher", lam=1.0, epochs=1, batch_size=50, importance_samples=200,
                     divergence_check_every=5)
    outcomes = train_batched([base.replace(seed=s) for s in range(3)], synthetic_tasks, CPU)
    d = outcomes[1].divergence
    assert (d.task, d.epoch, d.step, d.reason) == (2, 1, 8, "non-finite loss")
    assert outcomes[0].divergence is None and outcomes[2].divergence is None
    assert [len(o.acc_matrix) for o in outcomes] == [3, 1, 3]


def test_runs_per_batch_changes_the_speed_not_the_results(synthetic_tasks):
    base = RunConfig(method="si", variant="stabilized", epochs=1, batch_size=100, importance_samples=200)
    cfgs = [base.replace(seed=seed, lam=lam) for seed, lam in RUNS]
    one_batch, params = train_batched_with_params(cfgs, synthetic_tasks, CPU, runs_per_batch=3)
    split, split_params = train_batched_with_params(cfgs, synthetic_tasks, CPU, runs_per_batch=2)
    assert [o.acc_matrix for o in one_batch] == [o.acc_matrix for o in split]
    for a, b in zip(params, split_params):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_runs_may_differ_only_in_seed_and_lam():
    base = RunConfig(method="mas", epochs=1)
    assert check_batchable([base.replace(seed=1, lam=2.0), base.replace(seed=5, lam=0.0)]).method == "mas"
    with pytest.raises(ConfigError, match=r"epochs: run 1 has 2 but run 0 has 1; .* only in seed and lam"):
        check_batchable([base, base.replace(epochs=2)])
    with pytest.raises(ConfigError, match=r"variant: run 2 has 'stabilized'"):
        check_batchable([base, base.replace(seed=3), base.replace(variant="stabilized")])
    with pytest.raises(ConfigError, match="at least one"):
        check_batchable([])
    # None defaults are compared resolved: the sequence spelled out equals the arch's default
    check_batchable([base, base.replace(sequence="permuted_mnist", n_tasks=10, alpha=base.lr)])


def test_other_architectures_fall_back_to_the_single_run_path(synthetic_tasks, monkeypatch):
    seen = []
    monkeypatch.setattr(engine, "run_sequence", lambda cfg, *a, **k: seen.append(cfg) or train_mod.RunOutcome())
    cfgs = [RunConfig(arch="cnn", method="si", lam=lam, seed=s) for s, lam in RUNS]
    outcomes, params = train_batched_with_params(cfgs, synthetic_tasks, CPU)
    assert seen == cfgs and len(outcomes) == 3 and params == [None] * 3


def test_execute_batched_writes_the_single_run_records(data_root):
    base = RunConfig(method="fisher", n_tasks=2, epochs=1, train_subset=1000, test_subset=500,
                     importance_samples=300, data_root=str(data_root), download=False, device="cpu")
    cfgs = [base.replace(seed=4, lam=5.0), base.replace(seed=9, lam=50.0)]
    records = execute_batched(cfgs)
    want = execute(cfgs[1])
    got = records[1]
    assert got.keys() - {"batch"} == want.keys()
    assert got["batch"] == {"runs": 2, "index": 1, "wall_seconds": got["batch"]["wall_seconds"], "runs_per_batch": 4}
    assert got["config"] == want["config"] and got["tasks"] == want["tasks"]
    for row_got, row_want in zip(got["acc_matrix"], want["acc_matrix"], strict=True):
        assert all(abs(a - b) * 500 <= 1 for a, b in zip(row_got, row_want, strict=True))
    assert got["provenance"]["data_sha256"] == want["provenance"]["data_sha256"]
    json.dumps(records, allow_nan=False)


def batched_cli(argv: list[str]) -> int:
    """The batched subcommands on a parser of their own (``ewcstab.cli`` lists them once wired)."""
    import argparse

    from ewcstab.batched import benchmark, command

    parser = argparse.ArgumentParser(prog="ewcstab")
    sub = parser.add_subparsers(dest="command", required=True)
    command.register(sub)
    benchmark.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_run_batched_command_writes_one_record_per_run(data_root, tmp_path):
    outs = [tmp_path / f"seed{s}_lam{lam}.json" for s in (0, 1) for lam in (0.0, 20.0)]
    code = batched_cli(["run-batched", "--method", "mas", "--tasks", "2", "--epochs", "1", "--train-subset", "500",
                        "--test-subset", "200", "--importance-samples", "100", "--device", "cpu",
                        "--data-root", str(data_root), "--seeds", "0", "1", "--lams", "0", "20", "--no-progress",
                        "--out", *map(str, outs)])
    assert code == 0
    recs = [json.loads(p.read_text()) for p in outs]
    assert [(r["seed"], r["config"]["lam"]) for r in recs] == [(0, 0.0), (0, 20.0), (1, 0.0), (1, 20.0)]
    assert all(len(r["acc_matrix"]) == 2 and r["batch"]["runs"] == 4 for r in recs)
    # the workflow's form: lambda from a search result, several seeds
    best = tmp_path / "best_lambda.json"
    best.write_text(json.dumps({"best_lambda": 3.5}))
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    assert batched_cli(["run-batched", "--method", "mas", "--tasks", "2", "--epochs", "1", "--train-subset", "300",
                        "--test-subset", "100", "--importance-samples", "100", "--device", "cpu",
                        "--data-root", str(data_root), "--seeds", "3", "4", "--lam-from", str(best), "--no-progress",
                        "--out", *map(str, outs)]) == 0
    assert [(json.loads(p.read_text())["seed"], json.loads(p.read_text())["config"]["lam"]) for p in outs] == [
        (3, 3.5), (4, 3.5)]
    with pytest.raises(ConfigError, match="either --lams or --lam-from"):
        batched_cli(["run-batched", "--lams", "1", "--lam-from", str(best), "--out", "x.json"])


def test_run_batched_command_needs_one_out_per_run(tmp_path):
    with pytest.raises(ConfigError, match=r"out: 1 file\(s\) given for 2 runs"):
        batched_cli(["run-batched", "--seeds", "0", "1", "--out", str(tmp_path / "a.json")])


def test_floor_counts_the_paper_protocol():
    from ewcstab.batched.benchmark import extrapolate, protocol_flops

    flops = protocol_flops("fisher")
    assert flops["steps"] == 36_000
    assert flops["train"] == pytest.approx(36_000 * 3 * 2 * 100 * (784 * 300 + 300 * 150 + 150 * 10))
    assert flops["evaluation"] == pytest.approx(55 * 10_000 * 2 * 281_700)
    assert protocol_flops("si")["importance"] == 0.0
    # 2 measured tasks of 100 steps: 1 ms/step, then 2 ms/step; 0.5 s importance; 0.3 s per test set
    ext = extrapolate([0.1, 0.2], [0.5], wall=0.1 + 0.2 + 0.5 + 3 * 0.3, steps_per_task=100)
    assert ext["full_run_seconds"] == pytest.approx(0.001 * 3600 + 0.002 * 3600 * 9 + 0.5 * 9 + 0.3 * 55)
    # with the evaluations timed (0.6 s for the 3 test sets), the other 0.3 s is per task: 10 tasks, not 55 sets
    ext = extrapolate([0.1, 0.2], [0.5], wall=0.1 + 0.2 + 0.5 + 0.9, steps_per_task=100, evaluation=0.6)
    assert ext["eval_seconds_per_test_set"] == pytest.approx(0.2)
    assert ext["other_seconds_per_task"] == pytest.approx(0.15)
    assert ext["full_run_seconds"] == pytest.approx(0.001 * 3600 + 0.002 * 3600 * 9 + 0.5 * 9 + 0.2 * 55 + 0.15 * 10)


def test_memory_floor_counts_the_paper_mlp():
    from ewcstab.batched.benchmark import MLP_PARAMS, copy_bandwidth
    from ewcstab.models import build_model

    assert MLP_PARAMS == sum(p.numel() for p in build_model("mlp").parameters())
    assert copy_bandwidth(10_000, reps=3) > 1e6  # bytes/s: anything slower is a broken timer


def test_after_task_stops_runs_and_leaves_the_others_unchanged(synthetic_tasks, monkeypatch):
    """A run stopped after task 1 (a pruned trial) keeps its outcome so far; the others equal the single path."""
    base = RunConfig(method="mas", variant="original", epochs=1, batch_size=100, importance_samples=200)
    cfgs = [base.replace(seed=seed, lam=lam) for seed, lam in RUNS]
    seen: list[tuple[int, list[int]]] = []

    def after_task(t, accs):
        seen.append((t, sorted(accs)))
        return [1] if t == 1 else []

    outcomes, params = train_batched_with_params(cfgs, synthetic_tasks, CPU, after_task=after_task)
    assert seen == [(1, [0, 1, 2]), (2, [0, 2]), (3, [0, 2])]
    assert outcomes[1].stopped_after_task == 1 and len(outcomes[1].acc_matrix) == 1
    assert outcomes[1].divergence is None and len(outcomes[1].telemetry) == 1
    want, _ = single(cfgs[1], synthetic_tasks[:1], monkeypatch)
    assert outcomes[1].acc_matrix == want.acc_matrix
    for i in (0, 2):
        want, want_params = single(cfgs[i], synthetic_tasks, monkeypatch)
        assert outcomes[i].stopped_after_task is None
        assert_same_run(outcomes[i], params[i], want, want_params, n_test=200)
    rec = record(cfgs[1].resolved(), [t.name for t in synthetic_tasks], outcomes[1], 0.0, {})
    assert rec["stopped_after_task"] == 1 and rec["final_mean_acc"] is None
    # split into batches of 2, the hook still sees (and stops) the caller's run indices
    seen.clear()
    split = train_batched(cfgs, synthetic_tasks, CPU, runs_per_batch=2, after_task=after_task)
    assert [o.stopped_after_task for o in split] == [None, 1, None]
    assert [o.acc_matrix for o in split] == [o.acc_matrix for o in outcomes]


def test_after_task_stops_runs_of_the_single_run_fallback(synthetic_tasks, monkeypatch):
    from ewcstab.train import StopRun

    calls = []

    def fake_run_sequence(cfg, tasks, device, progress, hook, **kwargs):
        out = train_mod.RunOutcome()
        for t in range(1, len(tasks) + 1):
            out.acc_matrix.append([0.5] * t)
            calls.append((cfg.seed, t))
            try:
                hook(t, out.acc_matrix[-1])
            except StopRun:
                out.stopped_after_task = t
                break
        return out

    monkeypatch.setattr(engine, "run_sequence", fake_run_sequence)
    cfgs = [RunConfig(arch="cnn", method="si", lam=lam, seed=s) for s, lam in RUNS]
    outcomes = train_batched(cfgs, synthetic_tasks, CPU, after_task=lambda t, accs: [i for i in accs if i == 2])
    assert [o.stopped_after_task for o in outcomes] == [None, None, 1]
    assert calls.count((2, 1)) == 1 and (2, 2) not in calls


def test_execute_trains_the_mlp_stacked_and_equal_to_autograd(data_root):
    """``ewcstab run``'s default engine (the batched engine with one run) gives the autograd path's record."""
    cfg = RunConfig(method="si", variant="stabilized", lam=0.5, n_tasks=2, epochs=1, train_subset=400,
                    test_subset=200, importance_samples=100, data_root=str(data_root), download=False, device="cpu")
    stacked, autograd = execute(cfg), execute(cfg, engine="autograd")
    assert (stacked["engine"], autograd["engine"]) == ("stacked", "autograd")
    assert stacked["acc_matrix"] == autograd["acc_matrix"]  # one thread: bitwise
    assert stacked["telemetry"][1]["grad_norm_max"] == pytest.approx(autograd["telemetry"][1]["grad_norm_max"], rel=1e-5)
    stops = []

    def stop_after_first(t, accs):
        stops.append(t)
        raise train_mod.StopRun()

    rec = execute(cfg, after_task=stop_after_first)
    assert stops == [1] and rec["stopped_after_task"] == 1 and len(rec["acc_matrix"]) == 1
    with pytest.raises(ValueError, match="engine: 'fast' is not allowed"):
        execute(cfg, engine="fast")


def test_a_batch_whose_runs_all_diverge_ends_cleanly(synthetic_tasks):
    base = RunConfig(method="mas", variant="original", optimizer="sgd", lr=0.1, batch_size=50, epochs=2,
                     importance_samples=200, divergence_check_every=7)
    outcomes = train_batched([base.replace(seed=s, lam=1e7) for s in (0, 1)], synthetic_tasks, CPU)
    assert all(o.divergence is not None and o.divergence.task == 2 for o in outcomes)
    assert [len(o.acc_matrix) for o in outcomes] == [1, 1]


@pytest.mark.parametrize("n", [600, 650])
def test_epoch_batches_are_the_single_runs_slices(n):
    """Each step's rows are every run's ``order[s*B : (s+1)*B]``, run after run, with their labels; a last
    short batch when B does not divide N."""
    gen = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(n, generator=gen) for _ in range(3)])
    labels = torch.randint(0, 10, (n,), generator=gen)
    batches = epoch_batches(orders, labels, 100)
    assert len(batches) == math.ceil(n / 100)
    for s, (rows, y) in enumerate(batches):
        want = orders[:, s * 100 : (s + 1) * 100]
        assert torch.equal(rows, want.reshape(-1)) and rows.is_contiguous()
        assert torch.equal(y, labels[want])


def test_image_copies_keep_their_values_on_aligned_memory():
    images = torch.randint(0, 256, (3000, 784), dtype=torch.uint8)
    copy = memory.copy_of(images)
    assert torch.equal(copy, images) and copy.shape == images.shape and copy.is_contiguous()
    assert copy.data_ptr() != images.data_ptr()
    if sys.platform == "linux":  # 2.4 MB: an mmap advised to huge pages, at a 2 MB boundary
        assert copy.data_ptr() % memory.HUGE_PAGE == 0
    small = torch.arange(10, dtype=torch.uint8)
    assert torch.equal(memory.copy_of(small), small)


def test_built_tasks_keep_their_byte_images_on_huge_pages(data_root):
    """build_tasks places the byte images once (the engine gathers from them directly, no copy per task)."""
    from ewcstab.data import build_tasks

    tasks = build_tasks("permuted_mnist", 2, 0, data_root, CPU, train_subset=3000, test_subset=100, download=False)
    for task in tasks:
        assert torch.equal(task.train_bytes.float().div_(255.0), task.train_x)
        if sys.platform == "linux":  # 2.4 MB each
            assert task.train_bytes.data_ptr() % memory.HUGE_PAGE == 0
