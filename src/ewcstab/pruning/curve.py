"""Accuracy-versus-sparsity curves: every sparsity level in one pass, on the data's device.

The importance ranking is computed once (``ranking.pruning_order``); level k of the grid
p_k = k / K zeroes the first ``round(p_k * n)`` entries of each ranking group, so going from one
level to the next only zeroes the few entries ranked in between. Two evaluators walk the grid:

``fast`` (models that are a chain of ``nn.Linear`` layers with one activation between them, e.g.
the paper's 784-300-150-10 MLP). The first layer holds ~83% of the MLP's multiply-adds, so its
pre-activation Z1 = X W1^T + b1, shape (d1, N) here (transposed so each unit is one row), is
updated incrementally instead of recomputed: pruning weight W1[o, i] subtracts X[:, i] * W1[o, i]
from row o, pruning bias b1[o] subtracts b1[o]. The m weights pruned at one level form a sparse
(d1, d0) matrix P, and Z1 -= P @ X^T is one sparse-dense product of m * N multiply-adds (N*d0*d1
for a recomputation). Z1 is kept in float64, so rounding drift over the whole curve stays far
below float32 resolution; where no unpruned input contributes to a unit for a sample (counted
exactly alongside), Z1 is set to the masked bias exactly, as the masked model computes it: at high
sparsity many logits are exactly tied, and a rounding residue would break those ties differently.
The later layers are recomputed in float32 from the masked weights at every level,
as the masked model computes them; for the MLP the 300x150 layer is then most of the work. All
accuracies stay on the device until the walk ends. Before the walk the level-0 logits are checked
against ``model(x)``.

``direct`` (any model): a copy of the model whose parameters are zeroed in place level by level,
evaluated with ``ewcstab.metrics.accuracy``: correct for every architecture, one full forward
pass per level.

Both produce the accuracy of the torch.prune-masked model (``ranking.apply_pruning``) at every
level, up to float32 rounding in near-tied logits (the fast path sums in a different order).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ewcstab.device import synchronize
from ewcstab.interfaces import ParamDict
from ewcstab.metrics import accuracy
from ewcstab.pruning.ranking import group_scores, n_to_prune, pruning_order, prune_groups, sparsity_levels

CURVE_METHODS = ("auto", "fast", "direct")


@dataclass
class PruningCurve:
    """Accuracy at every sparsity level of one (importance, scope) ranking of one network.

    sparsity: (L,) p_k = k / K; n_pruned: (L,) zeroed parameters at p_k (summed over groups);
    n_prunable: parameters the scope may prune; accuracy: (L,) on the evaluation set;
    method: evaluator used (fast | direct); seconds: wall time of the walk.
    """

    sparsity: np.ndarray
    n_pruned: np.ndarray
    n_prunable: int
    accuracy: np.ndarray
    method: str
    seconds: float


@dataclass
class ParamSchedule:
    """When each entry of one parameter is pruned along the sparsity grid.

    order: (n_param,) flat indices of the parameter's entries, least important first (on device);
    offsets: offsets[k] = how many of them are zeroed at level k (non-decreasing, offsets[0] = 0
    since round(0 * n) = 0), so level k zeroes order[offsets[k-1]:offsets[k]].
    """

    name: str
    order: Tensor
    offsets: list[int]

    def new_at(self, k: int) -> Tensor | None:
        lo, hi = (self.offsets[k - 1] if k else 0), self.offsets[k]
        return self.order[lo:hi] if hi > lo else None


def build_schedules(
    model: nn.Module, importances: ParamDict, scope: str, levels: list[Fraction]
) -> tuple[list[ParamSchedule], np.ndarray, int]:
    """Per-parameter pruning schedules of ``scope``, total zeroed per level, and prunable count.

    For a group of n entries, c_k = round(p_k n) entries are zeroed at level k: the first c_k of
    the group's stable ascending order. A parameter's entry with group rank r is therefore zeroed
    at every level with c_k > r; its count at level k is #{its ranks < c_k}.
    """
    params = dict(model.named_parameters())
    schedules, total, n_prunable = [], np.zeros(len(levels), dtype=np.int64), 0
    for group in prune_groups(model, scope):
        scores = group_scores(importances, group, model)
        order = pruning_order(scores).cpu()  # (n,) flat group positions, least important first
        n = order.numel()
        counts = torch.tensor([n_to_prune(q, n) for q in levels], dtype=torch.int64)  # (L,) c_k
        total += counts.numpy()
        n_prunable += n
        start = 0
        for name in group.names:
            size = params[name].numel()
            mine = (order >= start) & (order < start + size)
            ranks = mine.nonzero().squeeze(1)  # (size,) group ranks of this parameter's entries, ascending
            offsets = torch.searchsorted(ranks, counts)  # (L,) #{ranks < c_k}
            device = params[name].device
            schedules.append(ParamSchedule(name, (order[mine] - start).to(device), offsets.tolist()))
            start += size
    return schedules, total, n_prunable


# ---------------------------------------------------------------------------
# direct evaluation (any model)


def _direct_walk(
    model: nn.Module, schedules: list[ParamSchedule], n_levels: int, x: Tensor, y: Tensor, batch_size: int
) -> np.ndarray:
    """Accuracy per level of a copy of ``model`` zeroed in place level by level."""
    work = copy.deepcopy(model)
    flats = {name: p.detach().view(-1) for name, p in work.named_parameters()}  # views share storage
    acc = np.empty(n_levels)
    with torch.no_grad():
        for k in range(n_levels):
            for sch in schedules:
                new = sch.new_at(k)
                if new is not None:
                    flats[sch.name][new] = 0.0
            acc[k] = accuracy(work, x, y, batch_size)
    return acc


# ---------------------------------------------------------------------------
# fast evaluation (chains of nn.Linear)


@dataclass(frozen=True)
class LinearChain:
    """A model computing logits = L_n(act(... act(L_1(flatten(x))))) with ``nn.Linear`` layers.

    names: module names of the layers, in order; activation_: the activation between layers (not
    after the last), applied in place so the walk reuses its buffers.
    """

    names: tuple[str, ...]
    layers: tuple[nn.Linear, ...]
    activation_: Callable[[Tensor], Tensor]


def linear_chain(model: nn.Module) -> LinearChain | None:
    """The chain structure of models known to be plain linear chains, else None.

    Only ``ewcstab.models.mlp.MLP`` with its own forward qualifies (a subclass that overrides
    ``forward`` does not); every other model is evaluated directly.
    """
    from ewcstab.models.mlp import LEAKY_SLOPE, MLP

    if not isinstance(model, MLP) or type(model).forward is not MLP.forward:
        return None
    names = tuple(f"layers.{i}" for i in range(len(model.layers)))
    return LinearChain(names, tuple(model.layers), partial(F.leaky_relu_, negative_slope=LEAKY_SLOPE))


def _csr_rows(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix with the given (unique) entries, rows sorted as CSR requires."""
    key = rows * shape[1] + cols
    order = torch.sort(key).indices
    rows, cols, values = rows[order], cols[order], values[order]
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernel below is stable
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class _ChainWalker:
    """Incremental evaluation of a pruned linear chain; see the module docstring for the scheme.

    State: z1 (d1, N) running first-layer pre-activation in ``acc_dtype``; h1 (d1, N) its
    activation in float32; masked float32 copies of every later layer's weight and bias.
    Pruning the m weights W1[o, i] of one level is one sparse-dense product,
    z1 -= P @ X^T with P (d1, d0) holding those m weights (CSR): m * N multiply-adds.
    """

    def __init__(self, chain: LinearChain, x: Tensor, y: Tensor, acc_dtype: torch.dtype) -> None:
        self.chain = chain
        self.y = y
        first = chain.layers[0]
        self.w1 = first.weight.detach()  # (d1, d0), original values: each entry is subtracted once
        self.d1, self.d0 = self.w1.shape
        self.xt = x.flatten(1).T.to(acc_dtype).contiguous()  # (d0, N)
        self.n = self.xt.shape[1]
        self.b1 = (first.bias.detach() if first.bias is not None else self.w1.new_zeros(self.d1)).to(acc_dtype)
        self.b1_masked = self.b1.clone()
        self.z1 = torch.addmm(self.b1[:, None], self.w1.to(acc_dtype), self.xt)  # (d1, N)
        # support[o, n] = #{unpruned i : W1[o, i] != 0 and x[n, i] != 0}, exact small integers in float32.
        # Where it is 0 the masked model computes z1 = (masked) bias exactly, and so must we: the running
        # sum would leave a rounding residue there, and at high sparsity such exact values decide ties.
        self.x_nonzero = (self.xt != 0).to(torch.float32)  # (d0, N)
        self.support = (self.w1 != 0).to(torch.float32) @ self.x_nonzero  # (d1, N)
        # Once set, an entry without support stays exact: later weight pruning subtracts w * 0 = 0 from it
        # and bias pruning gives b - b = 0. So only entries whose support *reaches* 0 need setting. A lower
        # bound on each row's smallest positive support (pruning one weight lowers it by at most 1) tells
        # which rows may hold such entries; only those rows are searched.
        self.support_bound = _min_positive(self.support)  # (d1,)
        self.later = [
            (layer.weight.detach().clone(), _bias(layer).clone()) for layer in chain.layers[1:]
        ]  # masked copies, zeroed in place
        # Preallocated activations: a fresh multi-MB tensor per level would cost page faults each time.
        self.h1 = torch.empty(self.d1, self.n, dtype=self.w1.dtype, device=x.device)  # (d1, N)
        self.hidden = [torch.empty(w.shape[0], self.n, dtype=w.dtype, device=x.device) for w, _ in self.later[:-1]]
        self.out = torch.empty(self.n, chain.layers[-1].out_features, dtype=self.w1.dtype, device=x.device)
        self.refresh()
        self.slots = {f"{chain.names[0]}.weight": ("w1", 0, 0), f"{chain.names[0]}.bias": ("b1", 0, 0)}
        for j, name in enumerate(chain.names[1:]):
            self.slots[f"{name}.weight"] = ("later", j, 0)
            self.slots[f"{name}.bias"] = ("later", j, 1)

    def covers(self, names: list[str]) -> bool:
        return all(name in self.slots for name in names)

    def prune(self, name: str, idx: Tensor) -> bool:
        """Zero entries ``idx`` (flat) of parameter ``name``; True when the first layer changed."""
        kind, j, t = self.slots[name]
        if kind == "later":
            self.later[j][t].view(-1)[idx] = 0.0
            return False
        if kind == "b1":
            self.z1[idx] -= self.b1[idx, None]  # (m, N); each bias is pruned once, idx has no repeats
            self.b1_masked[idx] = 0.0
            return True
        unit, feature = idx // self.d0, idx % self.d0  # W1[o, i] has flat index o * d0 + i
        weight = self.w1.view(-1)[idx]
        contributes = (weight != 0).to(torch.float32)
        shape = (self.d1, self.d0)
        self.z1.addmm_(_csr_rows(unit, feature, weight.to(self.z1.dtype), shape), self.xt, alpha=-1.0)  # z1 -= P X^T
        self.support.addmm_(_csr_rows(unit, feature, contributes, shape), self.x_nonzero, alpha=-1.0)
        self.support_bound.index_add_(0, unit, contributes, alpha=-1.0)
        return True

    def refresh(self) -> None:
        """Exact masked bias where no unpruned input contributes, then h1 = act(z1) in float32 (no
        activation when the first layer is the last)."""
        rows = (self.support_bound <= 0).nonzero().squeeze(1)
        if rows.numel():
            support = self.support[rows]  # (r, N)
            self.z1[rows] = torch.where(support == 0, self.b1_masked[rows, None], self.z1[rows])
            self.support_bound[rows] = _min_positive(support)
        self.h1.copy_(self.z1)
        if self.later:
            self.chain.activation_(self.h1)

    def logits(self) -> Tensor:
        """(N, C) logits of the current masked network; the last layer is computed as (N, C) so
        the argmax runs along contiguous rows."""
        if not self.later:
            return self.h1.T
        h = self.h1  # (d1, N)
        for (w, b), buf in zip(self.later[:-1], self.hidden):
            h = self.chain.activation_(torch.addmm(b[:, None], w, h, out=buf))  # (d_{l+1}, N)
        w, b = self.later[-1]
        return torch.addmm(b, h.T, w.T, out=self.out)  # (N, C)

    def correct(self) -> Tensor:
        """Number of correct predictions of the current masked network (a device scalar)."""
        return (self.logits().argmax(1) == self.y).sum()


def _min_positive(support: Tensor) -> Tensor:
    """Per row, the smallest positive entry (inf for a row without one)."""
    return torch.where(support > 0, support, torch.inf).amin(1)


def _bias(layer: nn.Linear) -> Tensor:
    return layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(layer.out_features)


def _fast_walk(
    model: nn.Module, chain: LinearChain, schedules: list[ParamSchedule], n_levels: int, x: Tensor, y: Tensor,
    acc_dtype: torch.dtype,
) -> np.ndarray:
    """Accuracy per level with the incremental first layer (module docstring)."""
    with torch.no_grad():
        walker = _ChainWalker(chain, x, y, acc_dtype)
        if not walker.covers([s.name for s in schedules]):
            raise ValueError("the fast evaluator only prunes parameters of the chain's linear layers")
        expected = model(x[: min(512, x.shape[0])])
        got = walker.logits()[: expected.shape[0]]
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
            raise RuntimeError("fast evaluator disagrees with the model's forward; use method='direct'")
        correct = torch.zeros(n_levels, dtype=torch.int64, device=x.device)
        for k in range(n_levels):
            changed = first_changed = False
            for sch in schedules:
                new = sch.new_at(k)
                if new is not None:
                    changed = True
                    first_changed |= walker.prune(sch.name, new)
            if first_changed:
                walker.refresh()
            # a level that zeroes nothing new (possible on small layers) repeats the previous count
            correct[k] = walker.correct() if changed or k == 0 else correct[k - 1]
    return correct.cpu().numpy() / x.shape[0]


# ---------------------------------------------------------------------------


def pruning_curve(
    model: nn.Module,
    importances: ParamDict,
    scope: str,
    x: Tensor,
    y: Tensor,
    sparsity_step: float = 0.001,
    method: str = "auto",
    batch_size: int = 2000,
    acc_dtype: torch.dtype = torch.float64,
) -> PruningCurve:
    """Test accuracy at every sparsity 0, step, ..., 1 when pruning ``model`` by ``importances``.

    scope: global | per_layer (``ranking``). method: auto (fast for linear chains, else direct) |
    fast | direct. x, y: evaluation set on the model's device. ``model`` is not modified.
    acc_dtype: dtype of the fast path's running first-layer pre-activation (float64: no drift).
    The walk is a long loop of small kernels: on a CPU shared with other busy processes one torch
    thread is several times faster than two, whose threads keep waiting on each other.
    """
    if method not in CURVE_METHODS:
        raise ValueError(f"method: {method!r} is not allowed; allowed: {', '.join(CURVE_METHODS)}")
    levels = sparsity_levels(sparsity_step)
    was_training = model.training
    model.eval()
    try:
        device = x.device
        synchronize(device)
        start = time.perf_counter()
        schedules, n_pruned, n_prunable = build_schedules(model, importances, scope, levels)
        chain = linear_chain(model) if method != "direct" else None
        if method == "fast" and chain is None:
            raise ValueError(f"{type(model).__name__} is not a plain nn.Linear chain; use method='direct' or 'auto'")
        if chain is not None:
            acc = _fast_walk(model, chain, schedules, len(levels), x, y, acc_dtype)
        else:
            acc = _direct_walk(model, schedules, len(levels), x, y, batch_size)
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    return PruningCurve(
        sparsity=np.array([float(q) for q in levels]),
        n_pruned=n_pruned,
        n_prunable=n_prunable,
        accuracy=acc,
        method="fast" if chain is not None else "direct",
        seconds=seconds,
    )
