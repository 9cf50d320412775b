"""Task sequences (permutations, rotations, data root), and the raw files: every damage a DataError naming
the file, the data stage's checksum verdicts, and a failed download that creates nothing. The raw files are
tiny synthetic IDX files written in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ewcstab import data
from ewcstab.data import (
    DATA_ENV,
    DataError,
    DataUnavailableError,
    build_tasks,
    load_split,
    permutations,
    prepare_dataset,
    raw_files,
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


# ---------------------------------------------------------------------------------------------------------
# Raw files: tiny synthetic IDX files


def idx_images(n: int, rows: int = 28, cols: int = 28, magic: int = 2051, seed: int = 0) -> bytes:
    pixels = torch.randint(0, 256, (n * rows * cols,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return b"".join(v.to_bytes(4, "big") for v in (magic, n, rows, cols)) + bytes(pixels.tolist())


def idx_labels(n: int, magic: int = 2049, top: int = 9) -> bytes:
    return magic.to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(i % (top + 1) for i in range(n))


def write_dataset(root: Path, dataset: str = "mnist", n_train: int = 12, n_test: int = 5) -> list[Path]:
    """The four raw files of a tiny dataset under root, in torchvision's layout (train, then test split)."""
    paths = raw_files(dataset, root)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, content in zip(paths, (idx_images(n_train), idx_labels(n_train), idx_images(n_test, seed=1),
                                     idx_labels(n_test))):
        path.write_bytes(content)
    return paths


def listed(root: Path, dataset: str = "mnist", source: str = "official") -> dict[str, dict[str, str]]:
    """A checksum list (as load_checksum_list returns) that knows the files now under root."""
    return {rel: {digest: source} for rel, digest in data.data_checksums([dataset], root).items()}


def test_intact_synthetic_files_load_and_are_identified(tmp_path):
    write_dataset(tmp_path)
    x, y = load_split("mnist", str(tmp_path), train=True, download=False)  # a root given as str works too
    assert x.shape == (12, 1, 28, 28) and y.tolist() == [i % 10 for i in range(12)]
    manifest = prepare_dataset("mnist", tmp_path, download=False, known=listed(tmp_path))
    assert manifest["source"] == "official" and manifest["official"] and manifest["samples"] == {"train": 12,
                                                                                                   "test": 5}
    assert set(manifest["files"]) == {f"MNIST/raw/{p.name}" for p in raw_files("mnist", tmp_path)}


DAMAGE = {
    # name: (file index in raw_files, new content, words the message must have)
    "zero-length": (0, b"", "0 bytes, shorter than the 16-byte IDX images header"),
    "truncated images": (0, idx_images(12)[:-100], "truncated or damaged"),
    "padded labels": (1, idx_labels(12) + b"\0", "truncated or damaged"),
    "labels where images belong": (0, idx_labels(12), "the magic number of an IDX labels file"),
    "header damaged": (2, idx_images(5, magic=0x0803 + 1), "magic number 2052"),
    "not 28 x 28": (2, idx_images(5, rows=32, cols=32), "32 x 32 pixels"),
    "label out of range": (3, idx_labels(5)[:-1] + bytes([10]), "label 10 found"),
    "test images over train images": (0, idx_images(5, seed=1), "5 images but train-labels-idx1-ubyte has 12"),
    "no items": (1, idx_labels(0), "announces no labels"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_damage_is_a_one_line_error_naming_the_file(tmp_path, case):
    index, content, needle = DAMAGE[case]
    paths = write_dataset(tmp_path)
    paths[index].write_bytes(content)
    train = index < 2
    with pytest.raises(DataError) as info:
        load_split("mnist", tmp_path, train=train, download=False)
    message = str(info.value)
    assert message.startswith(str(paths[index] if "over train" not in case else paths[0])), message
    assert needle in message and "\n" not in message
    with pytest.raises(DataError):  # the data stage checks every file too
        prepare_dataset("mnist", tmp_path, download=False, known=listed(tmp_path))


def test_a_replaced_file_is_read_again(tmp_path):
    """The split cache is keyed by the files' mtime and size: a repaired (or damaged) file is not served stale."""
    paths = write_dataset(tmp_path)
    assert len(load_split("mnist", tmp_path, train=False, download=False)[1]) == 5
    paths[2].write_bytes(idx_images(5)[:-1])
    with pytest.raises(DataError, match="truncated"):
        load_split("mnist", tmp_path, train=False, download=False)


def test_checksum_list_verdicts(tmp_path):
    paths = write_dataset(tmp_path)
    known = listed(tmp_path, source="near-copy")
    assert prepare_dataset("mnist", tmp_path, download=False, known=known)["source"] == "near-copy"
    # a file whose digest is in no list: named, with its digest
    paths[3].write_bytes(idx_labels(5, top=3))
    with pytest.raises(DataError, match=f"^{paths[3]}: sha256 [0-9a-f]{{64}} is not in the checksum list"):
        prepare_dataset("mnist", tmp_path, download=False, known=known)
    # every file listed, but from two sources
    rel = f"MNIST/raw/{paths[3].name}"
    known[rel][data.sha256_of(paths[3])] = "official"
    with pytest.raises(DataError, match="from another source"):
        prepare_dataset("mnist", tmp_path, download=False, known=known)


def test_the_repository_checksum_list_parses_and_covers_every_file():
    known = data.load_checksum_list()
    for dataset in data.DATASETS:
        for path in raw_files(dataset, Path(".")):
            sources = set(known[str(path)].values())
            assert "official" in sources, path
    assert set(known["FashionMNIST/raw/train-images-idx3-ubyte"].values()) == {"official", "near-copy"}


def test_missing_data_without_download_creates_nothing(tmp_path):
    root = tmp_path / "mistyped"
    with pytest.raises(DataUnavailableError, match=f"^{root}/MNIST/raw/train-images-idx3-ubyte: missing"):
        prepare_dataset("mnist", root, download=False)
    assert not root.exists()


def test_failed_download_creates_nothing_in_the_root(tmp_path, monkeypatch):
    """download: true with nothing to fetch (offline, or a mistyped root on a machine without internet)."""
    import torchvision

    def offline(self, *args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -2]>")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    root = tmp_path / "mistyped"
    with pytest.raises(DataUnavailableError, match="the download failed") as info:
        load_split("mnist", root, train=True, download=True)
    assert "\n" not in str(info.value)
    assert not root.exists()


def test_download_places_the_four_files(tmp_path, monkeypatch):
    """A (simulated) download lands in the root, every file checked before it is placed."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", lambda self: write_dataset(Path(self.root)))
    monkeypatch.setattr(torchvision.datasets.MNIST, "_load_data", lambda self: (None, None))
    root = tmp_path / "fresh"
    manifest = prepare_dataset("mnist", root, download=True, known=listed_after_write(tmp_path))
    assert manifest["downloaded"] and manifest["samples"] == {"train": 12, "test": 5}
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(data._RAW_FILES)
    assert not prepare_dataset("mnist", root, download=True, known=listed(root))["downloaded"]  # found: kept


def test_a_damaged_download_is_not_placed(tmp_path, monkeypatch):
    import torchvision

    def damaged(self):
        write_dataset(Path(self.root))[1].write_bytes(idx_labels(3))

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", damaged)
    monkeypatch.setattr(torchvision.datasets.MNIST, "_load_data", lambda self: (None, None))
    with pytest.raises(DataError, match="12 images but train-labels-idx1-ubyte has 3 labels"):
        prepare_dataset("mnist", tmp_path / "fresh", download=True)
    assert not (tmp_path / "fresh").exists()


def listed_after_write(tmp_path: Path) -> dict[str, dict[str, str]]:
    """The checksum list of write_dataset's files (written once beside the test's root to hash them)."""
    write_dataset(tmp_path / "reference")
    return listed(tmp_path / "reference")


def test_real_data_is_identified(data_root):
    """The official MNIST; Fashion-MNIST official or the offline near-copy, reported as such."""
    assert prepare_dataset("mnist", data_root, download=False)["source"] == "official"
    fmnist = prepare_dataset("fmnist", data_root, download=False)
    assert fmnist["source"] in ("official", "near-copy") and fmnist["official"] == (fmnist["source"] == "official")
    assert fmnist["samples"] == {"train": 60000, "test": 10000}
