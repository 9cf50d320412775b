"""Pruning by weight importance: counts, scopes, ties, torch.prune masks, the fast curve, summaries."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from test_latex import check_latex_table
from ewcstab.config import RunConfig
from ewcstab.importance import build_importance, network_importance
from ewcstab.interfaces import Task
from ewcstab.metrics import accuracy
from ewcstab.models.mlp import MLP
from ewcstab.pruning import (
    CURVE_COLUMNS,
    PruneConfig,
    StepObservers,
    apply_pruning,
    compare_at,
    make_permanent,
    n_to_prune,
    prune_network,
    pruned_counts,
    pruning_curve,
    read_curves,
    sparsity_levels,
    summarise_curves,
    threshold_sparsity,
    thresholds_markdown,
    thresholds_table,
    train_network,
    write_curves,
)
from ewcstab.engine import train_stack
CPU = torch.device("cpu")
SIZES = (784, 24, 16, 10)
LEVELS = (0.0, 0.001, 0.1, 0.37, 0.5, 0.8, 0.95, 0.999, 1.0)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared machine two OpenMP threads
    waiting on each other make a loop of small ops many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prototype_task(n_train: int, n_test: int, seed: int) -> Task:
    """MNIST-like and quickly learnable: each class is a sparse binary prototype image (~20% of the
    pixels on), each sample its class prototype with a random 30% of those pixels switched off."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(10, 784, generator=g) < 0.2).float()
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    x = (protos[y] * (torch.rand(n_train + n_test, 784, generator=g) > 0.3)).view(-1, 1, 28, 28)
    return Task("proto", x[:n_train], y[:n_train], x[n_train:], y[n_train:])


@pytest.fixture(scope="module")
def task() -> Task:
    return prototype_task(1000, 400, seed=7)


@pytest.fixture(scope="module")
def trained(task):
    """The paper's MLP trained one epoch on the prototype task, with SI observing the training."""
    cfg = RunConfig(epochs=1, batch_size=50, seed=1)
    si = build_importance("si")
    torch.manual_seed(0)
    model, runs = train_network(cfg, task, CPU, StepObservers({"si": si}))
    return model, dict(zip(runs.names, (o[0] for o in si.end_task(runs, task.test_x, task.test_y))))


def small_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(SIZES).eval()


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}


# ---------------------------------------------------------------------------
# counts and ranking


def test_n_to_prune_is_exact_round_half_even():
    assert n_to_prune(0.003, 1500) == 4  # 4.5 -> 4 (half to even, as Python's round and torch.prune)
    assert n_to_prune(0.001 * 5, 1500) == 8  # 7.5 -> 8, despite 0.001 * 5 = 0.005000000000000001
    assert n_to_prune(0.001 * 7, 1000) == 7
    assert n_to_prune(1.0, 282160) == 282160 and n_to_prune(0.0, 10) == 0
    grid = sparsity_levels(0.001)
    assert len(grid) == 1001 and float(grid[300]) == 0.3
    counts = [n_to_prune(q, 1500) for q in grid]
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    with pytest.raises(ValueError):
        sparsity_levels(0.0003)


@pytest.mark.parametrize("p", LEVELS)
def test_global_prunes_exactly_round_pN_lowest_ranked(p):
    model = small_mlp()
    scores = random_scores(model)
    pruned = apply_pruning(model, scores, "global", p)
    n = sum(t.numel() for t in model.parameters())
    counts = pruned_counts(pruned)
    assert set(counts) == {k for k, _ in model.named_parameters()}  # weights and biases alike
    assert sum(counts.values()) == round(p * n) == n_to_prune(p, n)
    # the pruned entries are exactly the lowest-scored ones
    masks = dict(pruned.named_buffers())
    flat_scores = torch.cat([scores[k].flatten() for k in counts])
    flat_mask = torch.cat([masks[f"{k}_mask"].flatten() for k in counts])
    if 0 < p < 1:
        assert flat_scores[flat_mask == 0].max() <= flat_scores[flat_mask == 1].min()
    assert not torch.nn.utils.prune.is_pruned(model)  # apply_pruning works on a copy


@pytest.mark.parametrize("p", LEVELS)
def test_per_layer_prunes_same_fraction_per_layer_and_never_biases(p):
    model = small_mlp()
    pruned = apply_pruning(model, random_scores(model), "per_layer", p)
    counts = pruned_counts(pruned)
    assert set(counts) == {f"layers.{i}.weight" for i in range(3)}
    for i, layer in enumerate(model.layers):
        assert counts[f"layers.{i}.weight"] == n_to_prune(p, layer.weight.numel())
        assert torch.equal(pruned.layers[i].bias, layer.bias)


def test_ties_are_broken_by_parameter_order_and_position():
    """Equal scores: the stable ranking prunes the first entries in named_parameters order, and the
    fast curve zeroes the very same set as torch.prune."""
    model = small_mlp()
    ones = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    for p in (0.05, 0.97):
        pruned = apply_pruning(model, ones, "global", p)
        buffers = dict(pruned.named_buffers())
        mask = torch.cat([buffers[f"{k}_mask"].flatten() for k, _ in model.named_parameters()])
        n = n_to_prune(p, mask.numel())
        assert bool((mask[:n] == 0).all()) and bool((mask[n:] == 1).all())

    x = torch.rand(300, 1, 28, 28)
    y = torch.randint(0, 10, (300,))
    curve = pruning_curve(model, ones, "global", x, y, sparsity_step=0.05)
    for i in (3, 9, 16, 19):
        ref = accuracy(apply_pruning(model, ones, "global", float(curve.sparsity[i])), x, y)
        assert curve.accuracy[i] == ref


def test_signed_scores_rank_by_value_not_absolute_value():
    """torch's L1Unstructured ranks |score|; handing it rank positions keeps SI's negative Omega lowest."""
    model = MLP((4, 3, 2)).eval()
    scores = {k: torch.arange(p.numel(), dtype=torch.float32).view(p.shape) + 1 for k, p in model.named_parameters()}
    scores["layers.1.weight"] = -scores["layers.1.weight"] * 100  # very negative: least important
    pruned = apply_pruning(model, scores, "global", 6 / 23)  # 23 parameters, the 6 negative ones go first
    assert pruned_counts(pruned)["layers.1.weight"] == 6


def test_importance_with_nan_is_refused():
    model = small_mlp()
    scores = random_scores(model)
    scores["layers.0.bias"][0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        apply_pruning(model, scores, "global", 0.5)


# ---------------------------------------------------------------------------
# accuracy at the ends, and the model after pruning


def test_magnitude_p0_unchanged_p1_one_class(trained, task):
    model, _ = trained
    mag = network_importance(build_importance("magnitude"), model, task.test_x, task.test_y)
    base = accuracy(model, task.test_x, task.test_y)
    assert base > 0.5  # learned something
    assert accuracy(apply_pruning(model, mag, "global", 0.0), task.test_x, task.test_y) == base
    empty = apply_pruning(model, mag, "global", 1.0)
    with torch.no_grad():
        logits = empty(task.test_x)
    assert torch.count_nonzero(logits) == 0  # everything zeroed: argmax is class 0 for every image
    assert accuracy(empty, task.test_x, task.test_y) == pytest.approx(float((task.test_y == 0).float().mean()))
    per_layer = apply_pruning(model, mag, "per_layer", 1.0)
    with torch.no_grad():
        preds = per_layer(task.test_x).argmax(-1)
    assert bool((preds == preds[0]).all())  # only biases left: one class for every image
    curve = pruning_curve(model, mag, "global", task.test_x, task.test_y, sparsity_step=0.01)
    assert curve.accuracy[0] == base and curve.accuracy[-1] == accuracy(empty, task.test_x, task.test_y)


def test_pruned_model_survives_remove_and_state_dict_round_trip(trained, task):
    model, _ = trained
    mag = network_importance(build_importance("magnitude"), model, task.test_x, task.test_y)
    pruned = apply_pruning(model, mag, "global", 0.7)
    acc = accuracy(pruned, task.test_x, task.test_y)
    zeros = sum(pruned_counts(pruned).values())
    make_permanent(pruned)
    keys = set(pruned.state_dict())
    assert keys == set(model.state_dict())  # no *_orig / *_mask left
    assert sum(int((p == 0).sum()) for p in pruned.parameters()) == zeros
    buf = io.BytesIO()
    torch.save(pruned.state_dict(), buf)
    buf.seek(0)
    fresh = MLP().eval()
    fresh.load_state_dict(torch.load(buf))
    assert accuracy(fresh, task.test_x, task.test_y) == acc
    assert model.layers[0].weight.count_nonzero() == model.layers[0].weight.numel()  # original untouched


# ---------------------------------------------------------------------------
# the fast curve


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_fast_curve_equals_torch_prune_masked_model(trained, task, scope):
    model, si_omega = trained
    fisher = network_importance(build_importance("fisher"), model, task.test_x, task.test_y)
    for scores in (fisher, si_omega):
        curve = pruning_curve(model, scores, scope, task.test_x, task.test_y, sparsity_step=0.001)
        assert curve.method == "fast" and len(curve.sparsity) == 1001
        for p in LEVELS:
            i = int(round(p * 1000))
            masked = apply_pruning(model, scores, scope, p)
            assert curve.n_pruned[i] == sum(pruned_counts(masked).values())
            assert curve.accuracy[i] == accuracy(masked, task.test_x, task.test_y), (scope, p)


def test_fast_curve_equals_direct_at_every_level():
    model = small_mlp(3)
    x = torch.rand(400, 1, 28, 28) * (torch.rand(400, 1, 28, 28) > 0.7)  # MNIST-like: mostly zero pixels
    with torch.no_grad():
        y = model(x).argmax(-1)
    scores = random_scores(model, 5)
    for scope in ("global", "per_layer"):
        fast = pruning_curve(model, scores, scope, x, y, sparsity_step=0.01, method="fast")
        direct = pruning_curve(model, scores, scope, x, y, sparsity_step=0.01, method="direct")
        assert direct.method == "direct"
        np.testing.assert_array_equal(fast.accuracy, direct.accuracy)
        np.testing.assert_array_equal(fast.n_pruned, direct.n_pruned)


def test_fast_curve_keeps_exact_ties_of_nearly_empty_networks():
    """Biases pruned first, then weights by magnitude: near p = 1 many images reach no unpruned weight,
    the masked model's logits are exactly 0 and tie (argmax 0). The running first-layer sum must give
    exactly 0 there too, not a rounding residue that breaks the tie another way."""
    model = small_mlp(4)
    x = torch.rand(500, 1, 28, 28) * (torch.rand(500, 1, 28, 28) > 0.9)
    y = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    scores = {k: (p.detach().abs() if k.endswith("weight") else torch.full_like(p, -1.0))
              for k, p in model.named_parameters()}
    curve = pruning_curve(model, scores, "global", x, y, sparsity_step=0.002)
    tied = 0
    for k in range(475, 501):
        masked = apply_pruning(model, scores, "global", float(curve.sparsity[k]))
        with torch.no_grad():
            tied += int((masked(x) == 0).all(1).sum())
        assert curve.accuracy[k] == accuracy(masked, x, y), float(curve.sparsity[k])
    assert tied > 0  # the check above did meet exact ties


def test_direct_curve_for_other_models_matches_torch_prune():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 20), nn.Tanh(), nn.Linear(20, 10)).eval()
    x = torch.rand(200, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(-1)
    scores = random_scores(model, 2)
    with pytest.raises(ValueError, match="not a plain"):
        pruning_curve(model, scores, "global", x, y, sparsity_step=0.1, method="fast")
    curve = pruning_curve(model, scores, "per_layer", x, y, sparsity_step=0.1)
    assert curve.method == "direct"
    for i in (0, 3, 7, 10):
        assert curve.accuracy[i] == accuracy(apply_pruning(model, scores, "per_layer", i / 10), x, y)


# ---------------------------------------------------------------------------
# the experiment


def test_train_network_is_task_one_of_a_run(task):
    cfg = RunConfig(method="si", lam=0.0, epochs=1, batch_size=50, seed=2)
    model, _ = train_network(cfg, task, CPU, StepObservers({}))
    (out,), _ = train_stack([cfg], [task], CPU)
    assert accuracy(model, task.test_x, task.test_y) == out.acc_matrix[0][0]


def test_si_observes_training(trained):
    _, si_omega = trained
    assert all(torch.isfinite(v).all() for v in si_omega.values())
    assert any(bool((v != 0).any()) for v in si_omega.values())


@pytest.mark.parametrize("importance_data", ["test", "heldout"])
def test_experiment_on_mnist_subset(data_root, tmp_path, importance_data):
    from ewcstab.pruning.experiment import load_task

    cfg = PruneConfig(
        seed=0, importance_data=importance_data, heldout_size=500, epochs=1, train_subset=1500, test_subset=400,
        sparsity_step=0.05, data_root=str(data_root), device="cpu",
    )
    task, _ = load_task(cfg, CPU)
    result = prune_network(cfg, task, CPU)
    df = result.curves
    assert list(df.columns) == CURVE_COLUMNS
    assert len(df) == 5 * 2 * 21
    assert set(df["importance"]) == {"magnitude", "fisher", "mas", "si", "signal"}
    at0 = df[df["sparsity"] == 0.0]["accuracy"]
    assert (at0 == result.unpruned_accuracy).all() and result.unpruned_accuracy > 0.5
    assert (df[df["sparsity"] == 1.0].query("scope == 'global'")["accuracy"]
            == int((task.test_y == 0).sum()) / len(task.test_y)).all()
    path = tmp_path / "seed0.csv"
    meta_path = write_curves(df, {"seed": 0}, path)
    assert meta_path == tmp_path / "seed0.json"
    pd.testing.assert_frame_equal(pd.read_csv(path), df)


# ---------------------------------------------------------------------------
# summaries


def fake_curves(seeds: list[int]) -> pd.DataFrame:
    s = np.round(np.arange(0, 101) / 100, 2)
    rows = []
    for seed in seeds:
        for imp, drop_at in (("magnitude", 0.8), ("fisher", 0.5)):
            acc = np.where(s <= drop_at, 0.98, 0.98 - (s - drop_at)) + 0.001 * seed
            rows.append(pd.DataFrame({"arch": "mlp", "importance_data": "test", "seed": seed, "importance": imp,
                                      "scope": "global", "sparsity": s, "n_pruned": (s * 1000).astype(int),
                                      "accuracy": acc}))
    return pd.concat(rows, ignore_index=True)


def test_threshold_is_first_crossing():
    s = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    acc = np.array([0.98, 0.975, 0.96, 0.975, 0.90])
    assert threshold_sparsity(s, acc, 0.01) == 0.1  # the recovery at 0.3 does not count
    assert threshold_sparsity(s, acc, 0.05) == 0.3
    assert threshold_sparsity(s, acc, 0.5) == 0.4


def test_summary_thresholds_and_paper_grid(tmp_path):
    curves = fake_curves([0, 1, 2])
    paths = []
    for seed, part in curves.groupby("seed"):
        paths.append(tmp_path / f"seed{seed}.csv")
        part.to_csv(paths[-1], index=False)
    summary = summarise_curves(read_curves(paths))
    assert set(summary["n_runs"]) == {3}
    row = summary[(summary["importance"] == "fisher") & (summary["sparsity"] == 0.6)].iloc[0]
    assert row["mean_acc"] == pytest.approx(0.98 - 0.1 + 0.001)
    assert row["ci95"] == pytest.approx(4.303 * np.std([0, 0.001, 0.002]) / math.sqrt(3), rel=1e-3)
    paper = pd.DataFrame({"scope": "global", "importance": "magnitude", "sparsity": [0, 0.5, 0.8, 0.9],
                          "mean_acc": [0.97, 0.97, 0.965, 0.90], "ci95": 0.001, "n_runs": 10})
    thr = thresholds_table(summary, paper).set_index("importance")  # one row per (importance, scope)
    assert len(thr) == 2
    assert thr.loc["magnitude", "threshold_0.01"] == pytest.approx(0.8 + 0.01)
    assert thr.loc["magnitude", "threshold_paper_grid_0.01"] == 0.8
    assert thr.loc["magnitude", "paper_threshold_0.05"] == 0.8
    assert thr.loc["magnitude", "paper_grid"] == "0 0.5 0.8 0.9"
    assert thr.loc["fisher", "threshold_0.05"] == pytest.approx(0.55)
    assert np.isnan(thr.loc["fisher", "paper_threshold_0.05"])
    comp = compare_at(summary, paper, [0.5, 0.9])
    assert len(comp) == 4
    md = thresholds_markdown(thresholds_table(summary, paper), comp)
    assert "| mlp | test | magnitude | global |" in md
    assert "n/a" in thresholds_markdown(thresholds_table(summary), compare_at(summary))  # without the paper
    with pytest.raises(ValueError, match="twice"):
        read_curves(paths + paths[:1])


def test_cli_prune_summary(tmp_path):
    curves = fake_curves([0, 1])
    inputs = []
    for seed, part in curves.groupby("seed"):
        inputs.append(str(tmp_path / f"seed{seed}.csv"))
        part.to_csv(inputs[-1], index=False)
    paper = tmp_path / "paper.csv"
    pd.DataFrame({"scope": "global", "importance": "fisher", "sparsity": [0, 0.5], "mean_acc": [0.98, 0.9],
                  "ci95": 0.01, "n_runs": 10}).to_csv(paper, index=False)
    from ewcstab.cli import build_parser

    parser = build_parser()
    args = parser.parse_args([
        "prune-summary", "--inputs", *inputs, "--curves-out", str(tmp_path / "c.csv"),
        "--thresholds-out", str(tmp_path / "t.csv"), "--thresholds-md", str(tmp_path / "t.md"),
        "--thresholds-tex", str(tmp_path / "t.tex"), "--paper", str(paper), "--all-out", str(tmp_path / "all.csv"),
    ])
    assert args.func(args) == 0
    assert len(pd.read_csv(tmp_path / "c.csv")) == 2 * 101
    assert len(pd.read_csv(tmp_path / "t.csv")) == 2  # one row per (importance, scope)
    assert len(pd.read_csv(tmp_path / "all.csv")) == len(curves)
    assert (tmp_path / "t.md").read_text().startswith("# Pruning")
    tex = check_latex_table((tmp_path / "t.tex").read_text())
    assert len(tex) == 3 and tex[1][:4] == ["mlp", "test", "fisher", "global"]
    args = parser.parse_args(["prune", "--out", str(tmp_path / "x.csv"), "--importance-data", "heldout",
                              "--importances", "magnitude", "nonsense"])
    from ewcstab.config import ConfigError
    from ewcstab.cli.prune import config_from_args

    with pytest.raises(ConfigError, match="nonsense"):
        config_from_args(args)
