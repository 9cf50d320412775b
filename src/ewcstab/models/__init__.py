"""Model registry: config name -> constructor. One module per architecture.

- ``mlp``: the paper's 784-300-150-10 MLP (permuted MNIST).
- ``cnn``: the paper's 3-conv BatchNorm network (MNIST / Fashion-MNIST / rotated).
- ``attention``: our small vision transformer (the paper publishes no attention model).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ewcstab.models.attention import AttentionNet
from ewcstab.models.cnn import CNN
from ewcstab.models.mlp import MLP

REGISTRY: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "cnn": CNN, "attention": AttentionNet}


def register(name: str, factory: Callable[[], nn.Module]) -> None:
    REGISTRY[name] = factory


def build_model(name: str) -> nn.Module:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise ValueError(f"arch: {name!r} is not allowed; allowed: {', '.join(sorted(REGISTRY))}") from None
