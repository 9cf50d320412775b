"""Accuracy on test sets, and the paper's statistics over runs."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 2000) -> float:
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        correct += (model(x[start : start + batch_size]).argmax(-1) == y[start : start + batch_size]).sum()
    model.train(was_training)
    return correct.item() / x.shape[0]


def mean_ci95(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and 95% half-width t(0.975, n-1) * std / sqrt(n), numpy's std (ddof=0) as the paper.

    The half-width is NaN for a single value (no spread can be estimated).
    """
    from scipy import stats

    arr = np.asarray(values, dtype=float)
    n = arr.size
    if n == 0:
        return math.nan, math.nan
    if n == 1:
        return float(arr[0]), math.nan
    return float(arr.mean()), float(stats.t.ppf(0.975, n - 1) * arr.std() / math.sqrt(n))
