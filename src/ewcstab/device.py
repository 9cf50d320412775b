"""Device selection: auto | cpu | cuda | cuda:N (the names ``RunConfig.device`` allows)."""

from __future__ import annotations

import logging

import torch

from ewcstab.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """The torch device for a validated device name. ``auto``: the first CUDA device if torch sees one,
    else the CPU (logged). A CUDA device torch does not see is a ``ConfigError``, raised before any work."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device auto: %s", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu "
                 "(torch sees no CUDA device)")
        return device
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} was asked for, but torch sees no CUDA device; allowed here: "
                              "cpu, auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device: {name!r} was asked for, but torch sees {count} CUDA device(s); allowed "
                              f"here: cpu, auto, cuda, cuda:0..cuda:{count - 1}")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
