"""Model registry: config name -> constructor. One module per architecture."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ewcstab.models.mlp import MLP

REGISTRY: dict[str, Callable[[], nn.Module]] = {"mlp": MLP}


def register(name: str, factory: Callable[[], nn.Module]) -> None:
    REGISTRY[name] = factory


def build_model(name: str) -> nn.Module:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise ValueError(f"arch: {name!r} is not allowed; allowed: {', '.join(sorted(REGISTRY))}") from None
