"""Task sequences: permutations, rotations, data root, offline errors."""

from __future__ import annotations

import pytest
import torch

from ewcstab.data import (
    DATA_ENV,
    DataUnavailableError,
    build_tasks,
    load_split,
    permutations,
    resolve_data_root,
    rotate90,
    task_specs,
)


def test_permutations_fixed_by_seed_and_task_one_plain():
    a, b, c = permutations(4, 7), permutations(4, 7), permutations(4, 8)
    assert a[0] is None
    assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    assert not torch.equal(a[1], c[1])
    assert all(sorted(p.tolist()) == list(range(784)) for p in a[1:])
    assert not torch.equal(a[1], a[2])


def test_specs_names_and_lengths():
    assert [n for n, _, _ in task_specs("mnist_fmnist_rot90", 4, 0)] == ["mnist", "fmnist", "mnist_rot90", "fmnist_rot90"]
    assert len(task_specs("permuted_mnist", 10, 0)) == 10
    with pytest.raises(ValueError, match="allowed: permuted_mnist, mnist_fmnist_rot90"):
        task_specs("split", 2, 0)


def test_rotation_is_a_quarter_turn():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    assert rotate90(x).flatten().tolist() == [1.0, 3.0, 0.0, 2.0]
    assert torch.equal(rotate90(rotate90(rotate90(rotate90(x)))), x)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert resolve_data_root("cfg") == resolve_data_root("cfg")
    assert str(resolve_data_root("cfg")) == "cfg"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv(DATA_ENV)
    assert str(resolve_data_root(None)) == "data"


def test_missing_data_offline_names_the_root(tmp_path):
    with pytest.raises(DataUnavailableError, match=str(tmp_path)) as info:
        load_split("mnist", tmp_path, train=False, download=False)
    assert "EWCSTAB_DATA" in str(info.value)


def test_permuted_tasks_on_real_mnist(data_root):
    tasks = build_tasks("permuted_mnist", 3, 0, data_root, torch.device("cpu"), train_subset=100, test_subset=50,
                        download=False)
    assert [t.train_x.shape for t in tasks] == [torch.Size([100, 1, 28, 28])] * 3
    assert tasks[0].train_x.max() == 1.0 and tasks[0].train_x.min() == 0.0
    perm = permutations(3, 0)[1]
    assert torch.equal(tasks[1].train_x.flatten(1), tasks[0].train_x.flatten(1)[:, perm])
    assert torch.equal(tasks[1].test_x.flatten(1), tasks[0].test_x.flatten(1)[:, perm])
    assert torch.equal(tasks[0].train_y, tasks[1].train_y)


def test_rotated_sequence_on_real_data(data_root):
    tasks = build_tasks("mnist_fmnist_rot90", 4, 0, data_root, torch.device("cpu"), 64, 32, download=False)
    assert torch.equal(tasks[2].train_x, rotate90(tasks[0].train_x))
    assert torch.equal(tasks[3].test_x, rotate90(tasks[1].test_x))
    assert not torch.equal(tasks[0].train_x, tasks[1].train_x)
