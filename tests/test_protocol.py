"""The protocol loop: learning, forgetting, EWC's effect, divergence, and the run record."""

from __future__ import annotations

import json

import pytest
import torch

from ewcstab.config import RunConfig
from ewcstab.device import resolve_device
from ewcstab.engine import train_stack
from ewcstab.records import run_record
from ewcstab.runner import execute

CPU = torch.device("cpu")


def run(cfg, tasks):
    (out,), info = train_stack([cfg], tasks, CPU)
    return out, info


@pytest.mark.parametrize("method", ["fisher", "mas", "si", "signal"])
@pytest.mark.parametrize("variant", ["original", "stabilized", "clipped"])
def test_every_method_and_variant_runs(synthetic_tasks, method, variant):
    cfg = RunConfig(method=method, variant=variant, lam=1.0, epochs=1, batch_size=50, importance_samples=200)
    out, _ = run(cfg, synthetic_tasks)
    assert out.divergence is None
    assert [len(r) for r in out.acc_matrix] == [1, 2, 3]
    assert len(out.importance_seconds) == 2 and len(out.train_seconds) == 3
    assert all(0.0 <= a <= 1.0 for row in out.acc_matrix for a in row)


def test_forced_divergence_is_recorded_not_raised(synthetic_tasks):
    """Plain EWC, plain SGD, 2 alpha lam Omega >> 2 on important weights: the loss must blow up."""
    cfg = RunConfig(method="mas", variant="original", optimizer="sgd", lr=0.1, lam=1e7, epochs=2,
                    batch_size=50, importance_samples=200)
    out, info = run(cfg, synthetic_tasks)
    assert out.divergence is not None
    assert out.divergence.task == 2 and out.divergence.step >= 1
    assert len(out.acc_matrix) == 1  # only task 1 finished
    rec = run_record(cfg.resolved().to_dict(), [t.name for t in synthetic_tasks], out, 0.0, info, {})
    assert rec["diverged"] is True
    assert rec["diverged_at"]["task"] == 2
    assert rec["mean_acc_after_task"][1:] == [None, None]
    assert rec["final_mean_acc"] is None
    json.dumps(rec, allow_nan=False)  # no NaN ever reaches the record

    # the same lambda with the stabilized penalty stays finite
    stable, _ = run(cfg.replace(variant="stabilized", alpha=0.1), synthetic_tasks)
    assert stable.divergence is None


def test_cpu_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")


def small_permuted(data_root, **changes):
    base = dict(arch="mlp", method="mas", variant="original", n_tasks=3, epochs=2, train_subset=5000,
                test_subset=2000, importance_samples=1000, data_root=str(data_root), download=False, device="cpu")
    base.update(changes)
    return RunConfig(**base)


def test_real_mnist_learns_forgets_and_ewc_reduces_forgetting(data_root):
    plain = execute(small_permuted(data_root, lam=0.0))
    ewc = execute(small_permuted(data_root, lam=30.0))
    # learns: the task just trained is well above chance
    assert plain["acc_matrix"][0][0] > 0.8
    # forgets: task 1 accuracy after task 3 drops clearly without consolidation
    forgetting_plain = plain["acc_matrix"][0][0] - plain["acc_matrix"][2][0]
    forgetting_ewc = ewc["acc_matrix"][0][0] - ewc["acc_matrix"][2][0]
    assert forgetting_plain > 0.10
    assert forgetting_ewc < forgetting_plain / 2
    assert ewc["final_mean_acc"] > plain["final_mean_acc"]
    # the record carries what the issue asks for
    for key in ("config", "seed", "acc_matrix", "mean_acc_after_task", "diverged", "diverged_at",
                "train_seconds", "importance_seconds", "provenance"):
        assert key in ewc
    assert ewc["config"]["n_tasks"] == 3 and ewc["config"]["sequence"] == "permuted_mnist"
    assert set(ewc["provenance"]["data_sha256"]) == {
        "MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte",
        "MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte",
    }
    assert ewc["provenance"]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert ewc["provenance"]["git"].keys() == {"commit", "dirty"}
    assert ewc["provenance"]["numerics"]["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert ewc["engine"] == {"runs_in_batch": 1, "forward": "stacked", "cuda_graphs": False, "runs_per_batch": 1}
    assert ewc["config"]["optimizer_state"] == "fresh" and "chain" not in ewc
