"""The native element-wise passes and the stacked optimizer (issue 8): the same numbers as the PyTorch ops."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ewcstab.batched import native, train_batched_with_params
from ewcstab.batched.optim import StackedAdam, StackedSGD
from ewcstab.batched.stack import Layout
from ewcstab.config import RunConfig
from ewcstab.models import build_model

CPU = torch.device("cpu")
needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native passes are not built")
# parameter sizes with vector tails of every length (and the paper MLP's first layer)
SIZES = [235200, 300, 45000, 150, 17, 1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _views(flat: torch.Tensor, runs: int) -> list[torch.Tensor]:
    """Per (parameter, run) views, parameter-major (``Layout.tensors``)."""
    out, start = [], 0
    for size in SIZES:
        for _ in range(runs):
            out.append(flat[start : start + size])
            start += size
    return out


def _run_norms(flat: torch.Tensor, runs: int) -> torch.Tensor:
    """Each run's L2 norm over all its parameters, in double (the reference)."""
    per_tensor = torch.stack([v.double().norm() for v in _views(flat, runs)]).view(len(SIZES), runs)
    return per_tensor.norm(dim=0)


@needs_native
@pytest.mark.parametrize("with_penalty", [True, False])
def test_gradient_pass_equals_the_pytorch_ops(with_penalty):
    runs = 3
    n = runs * sum(SIZES)
    gen = torch.Generator().manual_seed(0)
    grad, theta, anchor = (torch.randn(n, generator=gen) for _ in range(3))
    coef = torch.rand(n, generator=gen) * 5
    for run0 in _views(coef, runs)[::runs]:
        run0.zero_()  # a lambda = 0 run inside the batch gets an exact zero penalty gradient
    want_task = _run_norms(grad, runs)
    pen = (theta - anchor) * coef if with_penalty else torch.zeros(n)
    want_grad = grad + pen if with_penalty else grad.clone()
    old = torch.empty(n)
    norms = native.NativeGradient(SIZES, runs).gradient(
        grad, theta, anchor if with_penalty else None, coef if with_penalty else None, old)
    assert torch.equal(grad, want_grad)  # bitwise
    assert torch.equal(old, theta)
    for column, want in enumerate((want_task, _run_norms(pen, runs), _run_norms(want_grad, runs))):
        torch.testing.assert_close(norms[:, column].double(), want, rtol=2e-7, atol=0)  # float32 rounding
    assert norms[0, 1] == 0.0 and (norms[1:, 1] > 0).all() == with_penalty


def _torch_step(grad, theta, m, v, anchor, coef, accum, runs, step):
    """The unfused path: the native gradient pass, torch's fused Adam per (parameter, run) tensor, SI's pass."""
    passes = native.NativeGradient(SIZES, runs)
    full, old = grad.clone(), theta.clone()
    norms = passes.gradient(full, theta, anchor, coef)
    torch._fused_adam_(_views(theta, runs), _views(full, runs), _views(m, runs), _views(v, runs), [],
                       [torch.tensor(float(step))] * len(SIZES) * runs, lr=1e-3, beta1=0.9, beta2=0.999,
                       weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    if accum is not None:
        passes.si_accumulate(accum, theta, old, full)
    return norms


needs_fused = pytest.mark.skipif(native.adam_width() is None, reason="no native Adam matching this torch build")


@needs_fused
@pytest.mark.parametrize("with_penalty,with_si", [(True, True), (True, False), (False, True), (False, False)])
def test_fused_adam_step_equals_the_unfused_path(with_penalty, with_si):
    """Penalty gradient + Adam + SI in one pass: bitwise the gradient pass, torch's Adam kernel and SI's pass."""
    runs = 3
    n = runs * sum(SIZES)
    gen = torch.Generator().manual_seed(3)
    theta, anchor = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    coef = torch.rand(n, generator=gen) * 5 if with_penalty else None
    mine = [theta.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(n) if with_si else None]
    ref = [t.clone() if t is not None else None for t in mine]
    passes = native.NativeGradient(SIZES, runs)
    for step in range(1, 13):
        grad = torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 8 - 6)
        kept = grad.clone()
        got = passes.adam_step(grad, mine[0], mine[1], mine[2], anchor if with_penalty else None, coef, mine[3],
                               1e-3, (0.9, 0.999), 1e-8, step)
        want = _torch_step(grad, ref[0], ref[1], ref[2], anchor if with_penalty else None, coef, ref[3], runs, step)
        assert torch.equal(grad, kept)  # the task gradient is left as it is
        for a, b in zip(mine, ref):
            assert a is None or torch.equal(a, b), step  # bitwise
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the norms: another summation order
        if not with_penalty:
            assert (got[:, 1] == 0).all() and torch.equal(got[:, 2], got[:, 0])


@needs_fused
def test_the_width_check_tells_torchs_vector_split_apart():
    """``adam_width`` is meaningful: the other width splits the tails differently and misses torch's result."""
    lib = native.library()
    n = sum(SIZES)
    sizes = (native.ctypes.c_int64 * len(SIZES))(*SIZES)
    results = {}
    for width in (8, 16):
        theta, m, v = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        sums, norms = torch.zeros(3, dtype=torch.float64), torch.zeros(3)
        for step in range(1, 20):
            grad = torch.randn(n, generator=torch.Generator().manual_seed(step))
            assert lib.ewc_adam_step(len(SIZES), 1, sizes, grad.data_ptr(), theta.data_ptr(), m.data_ptr(),
                                     v.data_ptr(), None, None, None, sums.data_ptr(), norms.data_ptr(), 1e-3, 0.9,
                                     0.999, 1e-8, float(step), width) == 0
        results[width] = theta
    assert not torch.equal(results[8], results[16])
    assert lib.ewc_adam_step(1, 1, sizes, *[None] * 9, 0.0, 0.9, 0.999, 1e-8, 1.0, 4) == -1  # no such width


PAPER_MLP = (784, 300, 150, 10)
needs_mlp_step = pytest.mark.skipif(
    native.library() is None or native._checked_mlp_kernels(native.library(), PAPER_MLP) is None,
    reason="the native MLP step does not reproduce this torch build's kernels (or no C compiler)")


@needs_mlp_step
@pytest.mark.parametrize("runs,batch", [(1, 100), (4, 100), (3, 37), (2, 64)])
def test_native_mlp_step_equals_the_pytorch_ops(runs, batch):
    """One native call gives the very gradients of ``stack.cross_entropy_step`` (bitwise) and its losses (to
    rounding: summed in double), for every run of a batch, also for a batch that is not the paper's 100."""
    from ewcstab.batched.stack import cross_entropy_step

    gen = torch.Generator().manual_seed(runs)
    models = []
    for seed in range(runs):
        torch.manual_seed(seed)
        models.append(build_model("mlp"))
    layout = Layout.of(models[0], runs)
    assert layout.widths == PAPER_MLP
    theta = layout.stack([list(m.parameters()) for m in models], CPU)
    want, got = layout.zeros(CPU), layout.zeros(CPU)
    x = torch.rand(runs * batch, 784, generator=gen)
    y = torch.randint(0, 10, (runs, batch), generator=gen)
    want_loss = cross_entropy_step(layout.views(theta), layout.views(want), x.view(runs, batch, -1), y)
    got_loss = native.NativeMlpStep(PAPER_MLP, runs, native.mlp_kernels(PAPER_MLP))(theta, got, x, y)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)


@needs_mlp_step
def test_the_mlp_step_checks_tell_torchs_kernels_apart():
    """The piece checks are meaningful: the other vector width sums log_softmax's exponentials in another order,
    and an unfused backward or another column-sum split misses torch's bits; tiny products, for which torch
    loops instead of calling BLAS, are refused as a whole."""
    lib = native.library()
    kernels = native.mlp_kernels(PAPER_MLP)
    gen = torch.Generator().manual_seed(0)
    scratch = torch.empty(16 * 300)
    x = torch.randn(64, 10, generator=gen) * 5
    outs = {}
    for width in (8, 16):
        outs[width] = torch.empty_like(x)
        lib.ewc_log_softmax(x.data_ptr(), outs[width].data_ptr(), 64, 10, width, scratch.data_ptr())
    assert torch.equal(outs[kernels.softmax_width], torch.log_softmax(x, 1))
    assert not torch.equal(outs[8], outs[16])
    logp = torch.log_softmax(torch.randn(256, 10, generator=gen) * 5, 1)
    target = torch.randint(0, 10, (256,), generator=gen)
    deltas = []
    for contract in (0, 1):
        deltas.append(torch.empty_like(logp))
        lib.ewc_cross_entropy_backward(logp.data_ptr(), target.data_ptr(), deltas[-1].data_ptr(), 256, 10, -1 / 100,
                                       kernels.softmax_width, contract, scratch.data_ptr())
    assert not torch.equal(deltas[0], deltas[1])  # -1/100 * exp(logp) rounds: fused or not shows
    rows = torch.randn(100, 300, generator=gen)
    sums = {}
    for width in (8, 16):
        sums[width] = torch.empty(300)
        lib.ewc_column_sums(rows.data_ptr(), 100, 300, sums[width].data_ptr(), width, scratch.data_ptr())
    assert torch.equal(sums[kernels.sum_width], rows.sum(0))
    assert not torch.equal(sums[8], sums[16])
    assert native.mlp_kernels((20, 7, 5)) is None


def test_the_mlp_step_is_only_used_on_one_thread():
    """With more threads torch splits its batched products over runs: other sums, so the PyTorch ops are kept."""
    torch.set_num_threads(2)
    assert native.mlp_kernels(PAPER_MLP) is None


@needs_native
def test_norms_see_non_finite_gradients():
    grad = torch.ones(sum(SIZES) * 2)
    grad[5] = float("nan")
    grad[sum(SIZES) + 7] = float("inf")
    norms = native.NativeGradient(SIZES, 2).gradient(grad, torch.zeros_like(grad))
    assert torch.isnan(norms[0, 0]) and torch.isinf(norms[1, 0])


@needs_native
def test_si_accumulate_and_byte_gather_equal_the_pytorch_ops():
    gen = torch.Generator().manual_seed(1)
    accum, theta, old, grad = (torch.randn(1000, generator=gen) for _ in range(4))
    want = accum - (theta - old) * grad
    native.NativeGradient([1000], 1).si_accumulate(accum, theta, old, grad)
    assert torch.equal(accum, want)
    images = torch.randint(0, 256, (50, 784), dtype=torch.uint8, generator=gen)
    rows = torch.randint(0, 50, (300,), generator=gen)
    assert native.bytes_convert_exactly()
    got = native.NativeGradient([1], 1).gather_bytes(images, rows)
    assert torch.equal(got, images.float().div_(255.0).index_select(0, rows))


def test_stacked_optimizers_equal_torch_optim():
    """One flat buffer for all runs, torch's own kernels: bitwise what Adam(fused=True) / SGD(foreach) do."""
    torch.manual_seed(0)
    models = [build_model("mlp") for _ in range(2)]
    layout = Layout.of(models[0], 2)
    for name, make, stacked in (("adam", lambda p: torch.optim.Adam(p, lr=1e-3, fused=True), StackedAdam),
                                ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, foreach=True), StackedSGD)):
        theta = layout.stack([list(m.parameters()) for m in models], CPU)
        grad = layout.zeros(CPU)
        opt = stacked(layout, theta, grad, 1e-3 if name == "adam" else 0.1)
        ref = [p.detach().clone().requires_grad_(True) for p in layout.tensors(theta.clone())]
        ref_opt = make(ref)
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            grad.copy_(torch.randn(grad.shape, generator=gen))
            for p, g in zip(ref, layout.tensors(grad)):
                p.grad = g.clone()
            opt.step()
            ref_opt.step()
        assert all(torch.equal(a, b) for a, b in zip(layout.tensors(theta), ref)), name


@needs_native
@pytest.mark.parametrize("method,variant", [("fisher", "original"), ("si", "stabilized"), ("si", "clipped")])
def test_engine_gives_the_same_runs_with_and_without_native_passes(synthetic_tasks, monkeypatch, method, variant):
    """Training is bitwise the same; only the telemetry norms may differ, by rounding. Without clipping the
    native passes fuse penalty, Adam and SI into one (``adam_step``); with clipping they cannot."""
    base = RunConfig(method=method, variant=variant, epochs=2, batch_size=100, importance_samples=200,
                     clip_norm=0.5, divergence_check_every=5)
    cfgs = [base.replace(seed=s, lam=lam) for s, lam in [(0, 1.0), (1, 10.0), (2, 0.0)]]
    fused_steps, mlp_steps = [], []
    real_step, real_mlp = native.NativeGradient.adam_step, native.NativeMlpStep.__call__
    monkeypatch.setattr(native.NativeGradient, "adam_step",
                        lambda self, *a, **k: fused_steps.append(1) or real_step(self, *a, **k))
    monkeypatch.setattr(native.NativeMlpStep, "__call__", lambda self, *a: mlp_steps.append(1) or real_mlp(self, *a))
    with_native, p_native = train_batched_with_params(cfgs, synthetic_tasks, CPU)
    assert bool(fused_steps) == (variant != "clipped" and native.adam_width() is not None)
    assert bool(mlp_steps) == (native.mlp_kernels(PAPER_MLP) is not None)
    monkeypatch.setattr(native, "available", lambda device: False)
    with_torch, p_torch = train_batched_with_params(cfgs, synthetic_tasks, CPU)
    for a, b, pa, pb in zip(with_native, with_torch, p_native, p_torch):
        assert a.acc_matrix == b.acc_matrix
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
        for sa, sb in zip(a.telemetry, b.telemetry):
            for key, value in sb.items():
                assert sa[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key


@needs_native
def test_byte_images_give_the_same_runs_as_their_floats(data_root):
    """Tasks built from byte images carry train_bytes; gathering them gives exactly train_x's batches."""
    from ewcstab.data import build_tasks

    tasks = build_tasks("permuted_mnist", 2, 0, data_root, CPU, train_subset=300, test_subset=100, download=False)
    assert tasks[1].train_bytes is not None and tasks[1].train_bytes.dtype == torch.uint8
    assert torch.equal(tasks[1].train_bytes.float().div_(255.0), tasks[1].train_x)
    cfgs = [RunConfig(method="mas", lam=1.0, epochs=1, importance_samples=100, seed=s) for s in (0, 1)]
    got, p_got = train_batched_with_params(cfgs, tasks, CPU)
    floats = [dataclasses.replace(t, train_bytes=None) for t in tasks]
    want, p_want = train_batched_with_params(cfgs, floats, CPU)
    assert [o.acc_matrix for o in got] == [o.acc_matrix for o in want]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(p_got, p_want) for k in a)


def test_native_passes_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("EWCSTAB_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and not native.available(CPU)
    finally:
        monkeypatch.delenv("EWCSTAB_NATIVE")
        native.library.cache_clear()


def test_a_failed_build_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("EWCSTAB_NATIVE_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    finally:
        monkeypatch.delenv("CC")
        native.library.cache_clear()


def test_the_benchmark_times_another_checkouts_single_run_path(data_root):
    """``benchmark-batched --baseline-src``: the other checkout's own run_sequence, in a subprocess."""
    from pathlib import Path

    from ewcstab.batched.benchmark import baseline_name, time_baseline

    src = Path(native.__file__).resolve().parents[2]  # this checkout's src folder stands in for an older one
    cfg = RunConfig(method="mas", lam=1.0, n_tasks=2, epochs=1, train_subset=200, test_subset=100)
    timed = time_baseline(str(src), cfg, str(data_root), threads=1)
    assert baseline_name(str(src))  # the checkout's short commit (or its folder's name)
    assert len(timed["train"]) == 2 and len(timed["importance"]) == 1
    assert timed["wall"] >= sum(timed["train"]) > 0
    assert 0 < timed["evaluation"] < timed["wall"] - sum(timed["train"])  # its accuracy calls, timed


def test_the_benchmark_floor_is_the_sittings_best_matmul_speed(data_root, tmp_path):
    """Each engine is timed --repeat times (the fastest reported) and the matmul speed measured after every
    time; each row's ratio uses the best speed measured around it, the strictest view the sitting's best."""
    import json

    from ewcstab.cli import main

    out = tmp_path / "bench.json"
    assert main(["benchmark-batched", "--method", "mas", "--train-subset", "200", "--test-subset", "100",
                 "--importance-samples", "100", "--runs", "1", "2", "--no-single", "--matmul-size", "128",
                 "--repeat", "2", "--threads", "1", "--data-root", str(data_root), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    samples = result["matmul_flops"]["sitting_samples"]
    assert len(samples) == 1 + 2 * len(result["rows"]) == 5
    assert result["floor_seconds"] == pytest.approx(result["protocol_flops"]["total"] / max(samples))
    assert result["floor_seconds"] <= result["floor_seconds_first_matmul"]
    for i, row in enumerate(result["rows"]):
        around = result["protocol_flops"]["total"] / max(samples[2 * i : 2 * i + 3])
        assert row["floor_ratio"] == pytest.approx(row["full_run_seconds"] / around)
        assert row["floor_ratio_sitting_best"] == pytest.approx(row["full_run_seconds"] / result["floor_seconds"])
        assert row["floor_ratio_sitting_best"] >= row["floor_ratio"]
        assert len(row["repeats_wall_seconds"]) == 2
        assert row["eval_seconds_per_test_set"] > 0 and row["other_seconds_per_task"] >= 0  # evaluations timed
        assert row["measured_wall_seconds"] == pytest.approx(min(row["repeats_wall_seconds"]))
