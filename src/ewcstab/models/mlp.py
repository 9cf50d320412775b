"""The paper's MLP for permuted MNIST: 784-300-150-10, leaky ReLU (slope 0.01), no output activation."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.01


class MLP(nn.Module):
    """784 -> 300 -> 150 -> 10; 282,160 parameters (PROTOCOL.md)."""

    def __init__(self, sizes: tuple[int, ...] = (784, 300, 150, 10)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        for layer in self.layers[:-1]:
            h = F.leaky_relu(layer(h), LEAKY_SLOPE)
        return self.layers[-1](h)  # logits (B, 10)

    def signal_activations(self) -> dict[str, object]:
        """Nonlinearity applied to each linear layer's output, for the signal importance.

        The last layer's output is taken after softmax (PROTOCOL.md, 'signal').
        """
        acts: dict[str, object] = {
            f"layers.{i}": (lambda z: F.leaky_relu(z, LEAKY_SLOPE)) for i in range(len(self.layers) - 1)
        }
        acts[f"layers.{len(self.layers) - 1}"] = lambda z: z.softmax(-1)
        return acts
