"""Shared fixtures: tiny synthetic tasks, and the real data root when it is present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from ewcstab.interfaces import Task

REPO = Path(__file__).resolve().parents[1]

# Subprocesses (Snakemake jobs) must find this environment's `ewcstab` console script even
# when the environment is not activated (CI calls .venv/bin/python -m pytest).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# The tests train tiny models: one thread avoids oversubscribing the CPU when Snakemake
# jobs run beside them (2 threads on a loaded 2-core machine were 30x slower here).
torch.set_num_threads(1)


# Groups that change the machine or download gigabytes run only when asked for by name; the README's test
# command (`pytest -m "not slow"`) shows them as skipped with the option that runs them.
OPT_IN = {
    "slurm": ("--run-slurm", "installs and starts a one-node SLURM cluster as root (apt-get: slurm-wlm, munge, "
                             "mariadb-server; daemons)"),
    "conda": ("--run-conda", "creates the conda environment envs/ewcstab.yaml (downloads about 2 GB)"),
}


def pytest_addoption(parser):
    for marker, (option, what) in OPT_IN.items():
        parser.addoption(option, action="store_true", help=f"run the '{marker}' tests: {what}")


def pytest_collection_modifyitems(config, items):
    for marker, (option, what) in OPT_IN.items():
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"opt-in group '{marker}' ({what}): run with {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


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


def slow_reference(model, x, y, scalar_fn, reduce):
    """Mean over samples of ``reduce(d scalar_fn / d theta)``, one sample at a time with plain autograd:
    the definition of a per-sample importance, no tricks (the fast estimators are tested against it)."""
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad()
        scalar_fn(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        for k, p in model.named_parameters():
            total[k] += reduce(p.grad)
    return {k: v / x.shape[0] for k, v in total.items()}


def copy_workflow(work: Path) -> Path:
    """Copy the workflow's files (Snakefile, rules, configs, profiles, envs) and the tiny test config
    (as ``tiny.yaml``) into ``work``; the package itself is installed."""
    import shutil

    for item in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / item)
    shutil.copy(REPO / "tests" / "workflow_tiny.yaml", work / "tiny.yaml")
    return work


@pytest.fixture
def synthetic_tasks() -> list[Task]:
    return [synthetic_task(f"syn{i}", 600, 200, seed=i) for i in range(3)]


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory, data_root) -> Path:
    """The workflow's default target (tables, figures, report pages) built once per session on
    config/quick.yaml + tests/workflow_tiny.yaml in a temporary copy, for tests that read its results
    (report, notebooks). Snakemake is called as ``snakemake ... --configfile config/quick.yaml tiny.yaml``."""
    import subprocess
    import sys

    work = copy_workflow(tmp_path_factory.mktemp("wf_tiny"))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/quick.yaml", "tiny.yaml"],
        cwd=work, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work
