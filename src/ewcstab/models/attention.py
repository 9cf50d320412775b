"""A small vision transformer for 28x28 images: our design (the authors published no attention model).

The paper reports that plain EWC explodes in deeper networks with convolutional and self-attention
layers; this is the self-attention network we test that claim on. Design, and why:

- Patch embedding: a 7x7 convolution with stride 7 (the usual ViT patchify), 1 -> 64 channels:
  (B, 1, 28, 28) -> 16 tokens of width 64. 16 tokens (not 49 from 4x4 patches) keeps attention and the
  per-sample gradients of Fisher/MAS cheap on a CPU; 7x7 patches are enough for MNIST-like digits.
- Learned position embedding (16, 64), added to the patch tokens, initialised N(0, 0.02^2) as in ViT.
- Mean pooling over tokens instead of a class token: one fewer special parameter whose importance
  would need its own rule (a prepended token is no layer's input or bias), and global average
  pooling works as well or better for small ViTs (Beyer et al. 2022, "Better plain ViT baselines").
- 3 pre-norm encoder blocks: x += Attn(LN(x)); x += MLP(LN(x)), 4 heads of width 16, MLP 64 -> 128
  -> 64 with GELU. Attention is written out with explicit ``nn.Linear`` q/k/v/out projections (not
  ``nn.MultiheadAttention``), so per-layer pruning and the signal importance see each projection as
  an ordinary linear layer, and ``torch.func`` (vmap/grad/functional_call) handles the model.
- The key projection keeps its bias (PyTorch's default) although it has no effect: q.b_k is the same
  for every key, and softmax ignores a shift shared by all keys, so its gradient (hence its Fisher/MAS
  importance) is exactly zero. Every parameter is protected and counted all the same.
- No dropout: the protocol trains 6 epochs with Adam and importances are per-sample and
  deterministic in eval mode.
- Final LayerNorm on the tokens, mean over tokens, linear head 64 -> 10 (one head shared by all tasks).
- PyTorch default initialisation everywhere else (docs/protocol.md: a fresh default init per run).

Parameter count (defaults): patch embedding 3,200 + position 1,024 + 3 blocks x 33,472 + final
LayerNorm 128 + head 650 = 105,418.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class PatchEmbedding(nn.Module):
    """Image -> tokens: non-overlapping patches projected by a strided conv, plus a learned position term."""

    #: The signal importance treats ``pos`` as an additive term of this module's output (a per-token
    #: bias): importance = mean over samples of |output| (see importance/signal.py).
    signal_rule = "additive"

    def __init__(self, image: int, patch: int, channels: int, dim: int) -> None:
        super().__init__()
        if image % patch:
            raise ValueError(f"patch: {patch} must divide the image size {image}")
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros((image // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, T, D)
        return tokens + self.pos


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit q/k/v/out projections: softmax(q k^T / sqrt(d_h)) v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: {heads} must divide the width {dim}")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(z: Tensor) -> Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)  # (B, T, D) -> (B, H, T, D/H)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)  # (B, H, T, T)
        y = scores.softmax(-1) @ v  # (B, H, T, D/H)
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLPBlock(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionNet(nn.Module):
    """Small ViT: 7x7 patches -> 16 tokens of width 64, 3 pre-norm blocks (4 heads, MLP 128),
    final LayerNorm, mean over tokens, linear head to 10. 105,418 parameters with the defaults.

    The size arguments exist for tiny test instances; the registry uses the defaults.
    """

    def __init__(
        self,
        dim: int = 64,
        depth: int = 3,
        heads: int = 4,
        mlp_hidden: int = 128,
        patch: int = 7,
        image: int = 28,
        channels: int = 1,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = PatchEmbedding(image, patch, channels, dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))  # (B, T, D) -> (B, D) -> (B, classes)

    def signal_activations(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """What follows each layer's output up to its nonlinearity, for the signal importance.

        Identity everywhere except the MLP's first layer (GELU) and the head (softmax, docs/protocol.md).
        q, k and v: identity -- their outputs go into the attention product, which mixes tokens and
        has no element-wise nonlinearity of its own (the softmax acts on the q.k scores, not on any
        projection's channels), so the projection's own output is the signal it passes on. The out
        projection and the MLP's second layer feed a residual sum (no nonlinearity); LayerNorm
        outputs feed linear layers; the patch embedding's output is the token stream.
        """

        def identity(z: Tensor) -> Tensor:
            return z

        acts: dict[str, Callable[[Tensor], Tensor]] = {"embed": identity, "embed.proj": identity}
        for i in range(len(self.blocks)):
            p = f"blocks.{i}"
            for name in ("norm1", "attn.q", "attn.k", "attn.v", "attn.out", "norm2", "mlp.fc2"):
                acts[f"{p}.{name}"] = identity
            acts[f"{p}.mlp.fc1"] = F.gelu
        acts["norm"] = identity
        acts["head"] = lambda z: z.softmax(-1)
        return acts
