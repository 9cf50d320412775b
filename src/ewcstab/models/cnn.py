"""The paper's CNN for MNIST / Fashion-MNIST / rotated (docs/protocol.md, 'Section 2/3 experiments').

    conv 1->64 k5, BN, leaky ReLU, max-pool 2     (B, 1, 28, 28) -> (B, 64, 24, 24) -> (B, 64, 12, 12)
    conv 64->128 k3, BN, leaky ReLU               -> (B, 128, 10, 10)
    conv 128->256 k3, BN, leaky ReLU              -> (B, 256, 8, 8)
    flatten 8*8*256 -> linear 10                  -> (B, 10) logits

Convolutions keep PyTorch's default bias (as the authors' ``nn.Conv2d`` layers do), although a
BatchNorm right after makes it redundant in training mode: every parameter tensor is protected
(docs/protocol.md), so the bias is part of what EWC protects. BN affine weights and biases are parameters
(protected); running statistics are buffers (not protected). 535,434 parameters.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.01

#: (in channels, out channels, kernel) of the three convolutions.
CONV_SPECS = ((1, 64, 5), (64, 128, 3), (128, 256, 3))


class CNN(nn.Module):
    """conv(1->64,k5)-BN-lrelu-pool2, conv(64->128,k3)-BN-lrelu, conv(128->256,k3)-BN-lrelu, linear 16384->10.

    535,434 parameters: convs 1,664 + 73,856 + 295,168; BN 128 + 256 + 512; linear 163,850.
    """

    def __init__(self) -> None:
        super().__init__()
        (c1, c2, k1), (_, c3, k2), (_, c4, k3) = CONV_SPECS
        self.conv1, self.bn1 = nn.Conv2d(c1, c2, k1), nn.BatchNorm2d(c2)
        self.conv2, self.bn2 = nn.Conv2d(c2, c3, k2), nn.BatchNorm2d(c3)
        self.conv3, self.bn3 = nn.Conv2d(c3, c4, k3), nn.BatchNorm2d(c4)
        self.fc = nn.Linear(8 * 8 * c4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(self._block(x, self.conv1, self.bn1), 2)  # (B, 64, 24, 24) -> (B, 64, 12, 12)
        h = self._block(h, self.conv2, self.bn2)  # (B, 128, 10, 10)
        h = self._block(h, self.conv3, self.bn3)  # (B, 256, 8, 8)
        return self.fc(h.flatten(1))  # (B, 16384) -> (B, 10)

    @staticmethod
    def _block(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
        return F.leaky_relu(bn(conv(x)), LEAKY_SLOPE)

    def signal_activations(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """What follows each layer's output up to and including its nonlinearity (signal importance).

        A convolution is followed by its BatchNorm and the leaky ReLU, so its bias sees the block's
        post-activation output leaky(BN(conv)) -- the same tensor its BN's beta sees. ``bn.forward`` is
        called directly so the BN's own signal hook does not fire twice. The max-pool is a selection,
        not an element-wise nonlinearity, and is left out. The last layer's output is taken after
        softmax (docs/protocol.md, 'signal').
        """

        def after_conv(bn: nn.BatchNorm2d) -> Callable[[Tensor], Tensor]:
            return lambda z: F.leaky_relu(bn.forward(z), LEAKY_SLOPE)

        def leaky(z: Tensor) -> Tensor:
            return F.leaky_relu(z, LEAKY_SLOPE)

        return {
            "conv1": after_conv(self.bn1), "bn1": leaky,
            "conv2": after_conv(self.bn2), "bn2": leaky,
            "conv3": after_conv(self.bn3), "bn3": leaky,
            "fc": lambda z: z.softmax(-1),
        }
