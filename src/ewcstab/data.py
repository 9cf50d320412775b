"""Task sequences built from torchvision's MNIST and Fashion-MNIST.

Whole splits are loaded once as float tensors in [0, 1] (pixels / 255, PROTOCOL.md)
of shape (N, 1, 28, 28) and moved to the training device; training batches are
index slices of these tensors.

Sequences (PROTOCOL.md):
- ``permuted_mnist``: task 1 is plain MNIST; task k >= 2 applies the k-th pixel
  permutation drawn from ``perm_seed`` to train and test images alike.
- ``mnist_fmnist_rot90``: MNIST, Fashion-MNIST, MNIST rotated 90 degrees,
  Fashion-MNIST rotated 90 degrees (``torch.rot90``, counter-clockwise).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from ewcstab.errors import DataError
from ewcstab.interfaces import Task

DATA_ENV = "EWCSTAB_DATA"
DEFAULT_DATA_ROOT = "data"

#: torchvision class name and raw folder for each dataset we use.
DATASETS = {"mnist": "MNIST", "fmnist": "FashionMNIST"}
_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_SEQUENCE_LENGTH = {"permuted_mnist": 10, "mnist_fmnist_rot90": 4}


class DataUnavailableError(DataError):
    """A dataset is neither on disk nor downloadable."""


def sequence_length(sequence: str) -> int:
    """Full number of tasks of a named sequence."""
    try:
        return _SEQUENCE_LENGTH[sequence]
    except KeyError:
        allowed = ", ".join(_SEQUENCE_LENGTH)
        raise ValueError(f"sequence: {sequence!r} is not allowed; allowed: {allowed}") from None


def resolve_data_root(configured: str | None = None) -> Path:
    """Data root: the config value, else $EWCSTAB_DATA, else ./data."""
    return Path(configured or os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT).expanduser()


def raw_files(dataset: str, root: Path) -> list[Path]:
    return [root / DATASETS[dataset] / "raw" / name for name in _RAW_FILES]


def load_split(dataset: str, root: Path, train: bool, download: bool = True) -> tuple[Tensor, Tensor]:
    """One split as (x: (N, 1, 28, 28) float32 in [0, 1], y: (N,) int64) on the CPU."""
    x_u8, y = _load_split_uint8(dataset, str(root), train, download)
    return x_u8.unsqueeze(1).float().div_(255.0), y


@lru_cache(maxsize=8)
def _load_split_uint8(dataset: str, root: str, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[dataset])
    try:
        ds = cls(root, train=train, download=download)
    except (RuntimeError, OSError) as err:  # torchvision raises RuntimeError when offline/missing
        expected = Path(root) / DATASETS[dataset] / "raw"
        reason = " ".join(str(err).split())
        raise DataUnavailableError(
            f"{DATASETS[dataset]} is not available under data root {root!r} ({reason}). "
            f"Either allow downloads (download: true, with internet access), or copy the four "
            f"uncompressed *-ubyte files into {str(expected)!r} and point the data root there "
            f"(config key data_root, CLI --data-root, or the {DATA_ENV} environment variable)."
        ) from err
    return ds.data.clone(), ds.targets.clone().long()


def sha256_of(path: Path) -> str:
    return _sha256_cached(str(path), path.stat().st_mtime_ns, path.stat().st_size)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_checksums(datasets: list[str], root: Path) -> dict[str, str]:
    """sha256 of every raw file of the given datasets, keyed by path relative to the root."""
    return {str(p.relative_to(root)): sha256_of(p) for d in datasets for p in raw_files(d, root) if p.exists()}


# ---------------------------------------------------------------------------
# Transforms: (N, 1, 28, 28) -> (N, 1, 28, 28)


def permute_pixels(perm: Tensor) -> Callable[[Tensor], Tensor]:
    def apply(x: Tensor) -> Tensor:
        n = x.shape[0]
        return x.reshape(n, -1)[:, perm.to(x.device)].reshape(x.shape)  # (N, 784) gather

    return apply


def rotate90(x: Tensor) -> Tensor:
    return torch.rot90(x, k=1, dims=(-2, -1)).contiguous()


def identity(x: Tensor) -> Tensor:
    return x


def permutations(n_tasks: int, perm_seed: int, n_pixels: int = 784) -> list[Tensor | None]:
    """None for task 1 (plain), then one fixed permutation per later task."""
    gen = torch.Generator().manual_seed(perm_seed)
    return [None] + [torch.randperm(n_pixels, generator=gen) for _ in range(n_tasks - 1)]


def task_specs(sequence: str, n_tasks: int, perm_seed: int) -> list[tuple[str, str, Callable[[Tensor], Tensor]]]:
    """(task name, dataset, transform) for the first n_tasks tasks of a sequence."""
    if sequence == "permuted_mnist":
        specs = []
        for k, perm in enumerate(permutations(n_tasks, perm_seed), start=1):
            transform = identity if perm is None else permute_pixels(perm)
            specs.append((f"mnist_perm{k}" if perm is not None else "mnist", "mnist", transform))
        return specs
    if sequence == "mnist_fmnist_rot90":
        full = [
            ("mnist", "mnist", identity),
            ("fmnist", "fmnist", identity),
            ("mnist_rot90", "mnist", rotate90),
            ("fmnist_rot90", "fmnist", rotate90),
        ]
        return full[:n_tasks]
    sequence_length(sequence)  # raises with the allowed names
    raise AssertionError("unreachable")


def build_tasks(
    sequence: str,
    n_tasks: int,
    perm_seed: int,
    root: Path,
    device: torch.device,
    train_subset: int | None = None,
    test_subset: int | None = None,
    download: bool = True,
) -> list[Task]:
    """Materialise a task sequence on ``device``; subsets take the first N samples."""
    tasks = []
    for name, dataset, transform in task_specs(sequence, n_tasks, perm_seed):
        parts = []
        for train, subset in ((True, train_subset), (False, test_subset)):
            x, y = load_split(dataset, root, train, download)
            if subset is not None:
                x, y = x[:subset], y[:subset]
            parts += [transform(x.to(device)), y.to(device)]
        tasks.append(Task(name, *parts))
    return tasks


def datasets_of(sequence: str, n_tasks: int) -> list[str]:
    return sorted({d for _, d, _ in task_specs(sequence, n_tasks, perm_seed=0)})
