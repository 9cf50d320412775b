"""Device selection: auto | cpu | cuda | cuda:N (the names ``RunConfig.device`` allows)."""

from __future__ import annotations

import logging

import torch

from ewcstab.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """The torch device for a validated device name (``check_device``); ``auto``'s choice is logged."""
    device = check_device(name)
    if name == "auto":
        log.info("device auto: %s", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu "
                 "(torch sees no CUDA device)")
    return device


def check_device(name: str) -> torch.device:
    """The torch device for a validated device name, without a word: ``auto`` is the first CUDA device if
    torch sees one, else the CPU. A CUDA device torch does not see is a ``ConfigError`` (commands call this
    before any work, so nothing is written)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
