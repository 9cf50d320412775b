"""Provenance stamped on every result: versions, git commit, device, data checksums."""

from __future__ import annotations

import datetime as _dt
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import torch

import ewcstab

PACKAGES = ("torch", "torchvision", "numpy", "optuna", "pandas", "snakemake")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "ewcstab": ewcstab.__version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict[str, object]:
    """HEAD of the repository holding the package source (or the working directory)."""
    for where in (Path(ewcstab.__file__).resolve().parent, Path.cwd()):
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=where, capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
            return {"commit": sha, "dirty": bool(dirty)}
        except (OSError, subprocess.SubprocessError):
            continue
    return {"commit": None, "dirty": None}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def set_numerics(device: torch.device) -> None:
    """Deterministic kernels where the device offers a choice: on CUDA, cuDNN's deterministic algorithms and
    no autotuning (the same seed and config then give the same numbers on the same device). TF32 stays at
    PyTorch's defaults (off for float32 matrix products, on for cuDNN convolutions); ``numerics`` records it."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def numerics(device: torch.device) -> dict[str, object]:
    """The settings that change float results: matmul precision, TF32, cuDNN determinism, CPU threads."""
    out: dict[str, object] = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out.update(cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   cudnn_deterministic=torch.backends.cudnn.deterministic,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    return out


def collect(device: torch.device, data_checksums: dict[str, str], data_root: str) -> dict[str, object]:
    return {
        "packages": package_versions(),
        "git": git_commit(),
        "device": device_description(device),
        "numerics": numerics(device),
        "host": socket.gethostname(),
        "data_root": data_root,
        "data_sha256": data_checksums,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
