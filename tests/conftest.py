"""Shared fixtures: tiny synthetic tasks, and the real data root when it is present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ewcstab.interfaces import Task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """MNIST/Fashion-MNIST root from $EWCSTAB_DATA; CI must have it, elsewhere the test is skipped."""
    root = os.environ.get("EWCSTAB_DATA")
    if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        return Path(root)
    if os.environ.get("CI"):
        pytest.fail("EWCSTAB_DATA must point at a torchvision data root with MNIST in CI")
    pytest.skip("set EWCSTAB_DATA to a torchvision data root holding MNIST and FashionMNIST")


def synthetic_task(name: str, n_train: int, n_test: int, seed: int) -> Task:
    """A learnable 10-class problem: class = argmax of a fixed random projection of the image."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(784, 10, generator=g)
    xs = torch.rand(n_train + n_test, 1, 28, 28, generator=g)
    ys = ((xs.flatten(1) - 0.5) @ proj).argmax(1)  # centred: balanced classes
    return Task(name, xs[:n_train], ys[:n_train], xs[n_train:], ys[n_train:])


@pytest.fixture
def synthetic_tasks() -> list[Task]:
    return [synthetic_task(f"syn{i}", 600, 200, seed=i) for i in range(3)]
