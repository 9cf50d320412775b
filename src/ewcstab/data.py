"""Task sequences built from torchvision's MNIST and Fashion-MNIST, and the data stage that provides them.

Whole splits are loaded once as float tensors in [0, 1] (pixels / 255, docs/protocol.md)
of shape (N, 1, 28, 28) and moved to the training device; training batches are
index slices of these tensors.

Sequences (docs/protocol.md):
- ``permuted_mnist``: task 1 is plain MNIST; task k >= 2 applies the k-th pixel
  permutation drawn from ``perm_seed`` to train and test images alike.
- ``mnist_fmnist_rot90``: MNIST, Fashion-MNIST, MNIST rotated 90 degrees,
  Fashion-MNIST rotated 90 degrees (``torch.rot90``, counter-clockwise).

The files are torchvision's raw layout, ``<root>/MNIST/raw/*-ubyte`` and ``<root>/FashionMNIST/raw/*-ubyte``
(LeCun's IDX format, uncompressed). Every file is checked before use (``read_idx``: magic number, counts,
28 x 28 images, labels 0..9, exact length), so a damaged or misplaced file stops a run with a ``DataError``
naming it instead of training on it. ``prepare_dataset`` is the workflow's data stage: it finds (or, when
allowed, downloads) a dataset once, checks every file and identifies it by sha256 against the list kept in the
repository (``data_sha256.txt`` beside this module): the official files, or a known offline copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
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

#: The checksum list: one line per known file, ``<sha256>  <path under the data root>  <source>``.
CHECKSUMS_FILE = Path(__file__).with_name("data_sha256.txt")

#: What each source named in the checksum list is (reported by the data stage and kept in its manifest).
SOURCES = {
    "official": "the official files (what torchvision downloads)",
    "near-copy": "an offline near-copy, not the official files: results on it are close to, "
                 "not equal to, results on the official dataset",
}

# IDX format (LeCun): a big-endian header of int32s, then the bytes. Images: magic 2051, count, rows,
# columns; labels: magic 2049, count.
_IDX_MAGIC = {"images": 2051, "labels": 2049}
_IDX_HEADER = {"images": 16, "labels": 8}
IMAGE_SHAPE = (28, 28)
N_CLASSES = 10


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


def raw_files(dataset: str, root: Path | str) -> list[Path]:
    return [Path(root) / DATASETS[dataset] / "raw" / name for name in _RAW_FILES]


def _split_files(dataset: str, root: Path | str, train: bool) -> tuple[Path, Path]:
    """(images, labels) of one split."""
    prefix = "train" if train else "t10k"
    folder = Path(root) / DATASETS[dataset] / "raw"
    return folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"


# ---------------------------------------------------------------------------
# Reading and checking the raw files


def read_idx(path: Path, kind: str) -> Tensor:
    """One IDX file as uint8: images (N, 28, 28) or labels (N,), after checking that it is one.

    A ``DataError`` naming the file when it is missing, empty, too short, has the wrong magic number
    (an image file where labels belong, or the reverse), images that are not 28 x 28, a length that does
    not match its header (truncated or padded), or, for labels, a value outside 0..9.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    header = _IDX_HEADER[kind]
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes, shorter than the {header}-byte IDX {kind} header "
                        "(an empty or cut-off file)")
    fields = [int.from_bytes(data[i : i + 4], "big") for i in range(0, header, 4)]
    magic, count = fields[0], fields[1]
    if magic != _IDX_MAGIC[kind]:
        other = {v: k for k, v in _IDX_MAGIC.items()}.get(magic)
        found = f"the magic number of an IDX {other} file" if other else f"magic number {magic}"
        raise DataError(f"{path}: {found}, not that of IDX {kind} ({_IDX_MAGIC[kind]})")
    if kind == "images" and tuple(fields[2:]) != IMAGE_SHAPE:
        raise DataError(f"{path}: images of {fields[2]} x {fields[3]} pixels, not 28 x 28")
    if count == 0:
        raise DataError(f"{path}: its header announces no {kind}")
    item = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] if kind == "images" else 1
    expected = header + count * item
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes, but its header announces {count} {kind} "
                        f"({expected} bytes): a truncated or damaged file")
    values = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    if kind == "labels":
        if int(values.max()) >= N_CLASSES:
            raise DataError(f"{path}: label {int(values.max())} found; labels must be 0..{N_CLASSES - 1}")
        return values
    return values.reshape(count, *IMAGE_SHAPE)


def read_split(dataset: str, root: Path, train: bool) -> tuple[Tensor, Tensor]:
    """One split's checked (images (N, 28, 28) uint8, labels (N,) int64); the two files must agree in count."""
    images_path, labels_path = _split_files(dataset, root, train)
    missing = [p for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise DataUnavailableError(
            f"{missing[0]}: missing; {DATASETS[dataset]} is not under data root {str(root)!r}. Either let the "
            f"data stage download it (download: true, with internet access), or copy the four uncompressed "
            f"*-ubyte files into {str(missing[0].parent)!r} and point the data root there "
            f"(config key data_root, CLI --data-root, or the {DATA_ENV} environment variable)."
        )
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels "
                        "(a file of another split or dataset copied over it?)")
    return images, labels.long()


def load_split(dataset: str, root: Path | str, train: bool, download: bool = True) -> tuple[Tensor, Tensor]:
    """One split as (x: (N, 1, 28, 28) float32 in [0, 1], y: (N,) int64) on the CPU.

    Missing files are downloaded first when ``download`` is true (``fetch_dataset``); the workflow's
    training jobs run with ``download: false`` and read what its data stage verified.
    """
    x_u8, y = _load_split_uint8(dataset, Path(root), train, download)
    return x_u8.unsqueeze(1).float().div_(255.0), y


def _load_split_uint8(dataset: str, root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    if download and not all(p.is_file() for p in raw_files(dataset, root)):
        fetch_dataset(dataset, root)
    stamps = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
                   for p in _split_files(dataset, root, train))
    return _read_split_cached(dataset, str(root), train, stamps)


@lru_cache(maxsize=8)
def _read_split_cached(dataset: str, root: str, train: bool, stamps: tuple) -> tuple[Tensor, Tensor]:
    """read_split, once per file version (``stamps``: the files' mtime and size)."""
    return read_split(dataset, Path(root), train)


def fetch_dataset(dataset: str, root: Path) -> None:
    """Download a dataset with torchvision and place its four raw files under ``root``.

    The download goes to a temporary folder first: when nothing can be fetched (no internet, a mistyped
    root) nothing is created under ``root``, and a failed download never leaves partial files there.
    """
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[dataset])
    with tempfile.TemporaryDirectory(prefix="ewcstab-download-") as tmp:
        try:
            cls(tmp, train=True, download=True)
        except (RuntimeError, OSError) as err:  # torchvision raises RuntimeError (or URLError) when offline
            reason = " ".join(str(err).split())[:300]
            raise DataUnavailableError(
                f"{DATASETS[dataset]}: not under data root {str(root)!r} and the download failed ({reason}); "
                f"check the data root (config key data_root, CLI --data-root, or {DATA_ENV}) or the internet access"
            ) from None
        fetched = raw_files(dataset, Path(tmp))
        for train in (True, False):
            read_split(dataset, Path(tmp), train)  # never place a damaged download
        target = root / DATASETS[dataset] / "raw"
        target.mkdir(parents=True, exist_ok=True)
        for src in fetched:
            partial = target / f".{src.name}.part"
            shutil.move(src, partial)
            os.replace(partial, target / src.name)


# ---------------------------------------------------------------------------
# Checksums and the data stage


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


def load_checksum_list(path: Path = CHECKSUMS_FILE) -> dict[str, dict[str, str]]:
    """The checksum list: path under the data root -> {sha256: source}. Lines: ``<sha256>  <path>  <source>``."""
    known: dict[str, dict[str, str]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or len(parts[0]) != 64 or parts[2] not in SOURCES:
            raise DataError(f"{path}:{n}: expected '<sha256>  <path>  <source>' with a source in "
                            f"{', '.join(SOURCES)}; got {line!r}")
        known.setdefault(parts[1], {})[parts[0]] = parts[2]
    return known


def identify_files(digests: dict[str, str], root: Path, known: dict[str, dict[str, str]]) -> str:
    """The one source (``SOURCES``) all files come from, by their sha256 (path under root -> digest).

    A ``DataError`` naming the file when a digest is in no list (a damaged, modified or misplaced file), or when
    the files of one dataset come from different sources (e.g. official training files beside a copy's tests).
    """
    sources = None
    for rel, digest in digests.items():
        listed = known.get(rel, {})
        if digest not in listed:
            raise DataError(f"{root / rel}: sha256 {digest} is not in the checksum list ({CHECKSUMS_FILE.name}): "
                            "not the official file nor a known copy (damaged, modified or misplaced?)")
        sources = {listed[digest]} if sources is None else sources & {listed[digest]}
        if not sources:
            raise DataError(f"{root / rel}: from another source ({listed[digest]}) than the other files of "
                            "its dataset; the four files of a dataset must come from one source")
    return sources.pop()


def prepare_dataset(dataset: str, root: Path, download: bool, known: dict[str, dict[str, str]] | None = None
                    ) -> dict[str, object]:
    """The data stage: locate one dataset under ``root`` (downloading it first if it is missing and ``download``),
    check every file (``read_split``) and identify the files by sha256 (``identify_files``).

    Returns the manifest the workflow's training jobs depend on: dataset, absolute root, source and what it
    means, sample counts, per file its path under the root, sha256 and size, and provenance.
    """
    from ewcstab import provenance

    if dataset not in DATASETS:
        raise DataError(f"dataset: {dataset!r} is not known; allowed: {', '.join(DATASETS)}")
    root = Path(root)
    fetched = download and not all(p.is_file() for p in raw_files(dataset, root))
    if fetched:
        fetch_dataset(dataset, root)
    counts = {}
    for train in (True, False):
        images, _ = read_split(dataset, root, train)
        counts["train" if train else "test"] = len(images)
    digests = data_checksums([dataset], root)
    source = identify_files(digests, root, load_checksum_list() if known is None else known)
    return {
        "schema": "ewcstab.data/1",
        "dataset": dataset,
        "name": DATASETS[dataset],
        "root": str(root.resolve()),
        "source": source,
        "official": source == "official",
        "source_note": SOURCES[source],
        "downloaded": fetched,
        "samples": counts,
        "files": {rel: {"sha256": digest, "bytes": (root / rel).stat().st_size} for rel, digest in digests.items()},
        "provenance": provenance.collect(torch.device("cpu"), digests, str(root.resolve())),
    }


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
