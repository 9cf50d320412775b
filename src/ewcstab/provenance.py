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


def collect(device: torch.device, data_checksums: dict[str, str], data_root: str) -> dict[str, object]:
    return {
        "packages": package_versions(),
        "git": git_commit(),
        "device": device_description(device),
        "host": socket.gethostname(),
        "data_root": data_root,
        "data_sha256": data_checksums,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
