"""Ranking parameters by importance and pruning them with ``torch.nn.utils.prune``.

Section 4 of Kutalev & Lapina (arXiv:2109.10021), docs/protocol.md 'Pruning by weight importance':

- ``global`` ("entire network"): every parameter of the model, weights and biases together,
  is ranked by its importance; at sparsity p the ``round(p * N)`` lowest-ranked are zeroed
  (N = all parameters).
- ``per_layer``: the weights of each weight matrix (a parameter named ``weight`` with two or more
  dimensions) are ranked on their own and ``round(p * n_layer)`` of them are zeroed in every
  layer; biases (and any 1-D parameter) are never touched.

Determinism. Scores are ranked with a *stable* ascending sort of the flattened scores (model
parameter order, then row-major position breaks ties), and torch.prune is handed the rank
positions 0..n-1 as ``importance_scores``. Rank positions are distinct, so torch's own
``topk(|scores|, k, largest=False)`` selects exactly the k first-ranked entries, the same set
the fast curve evaluator (``ewcstab.pruning.curve``) zeroes. This also keeps signed scores (SI's
Omega may be negative) ranked by value: L1Unstructured would rank raw scores by ``|score|``.

Counts. ``n_to_prune(p, n) = round(p * n)`` with Python's ``round`` (half to even, the rule
torch.prune itself uses for a float amount), evaluated in exact rational arithmetic on the
decimal value of p, so that float noise in p = 0.001 * k can never move a count. The count is
passed to torch as an int, so torch does no rounding of its own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from ewcstab.interfaces import ParamDict

SCOPES = ("global", "per_layer")

#: Largest denominator used to read a float sparsity as the decimal it stands for (p = k / K).
_MAX_DENOMINATOR = 1_000_000


@dataclass(frozen=True)
class PruneGroup:
    """Parameters ranked together: one group for ``global``, one per weight matrix for ``per_layer``.

    names: parameter names in ``model.named_parameters()`` order; their flattened values are
    concatenated in this order to form the group's ranking vector.
    """

    names: tuple[str, ...]


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope: {scope!r} is not allowed; allowed: {', '.join(SCOPES)}")


def prune_groups(model: nn.Module, scope: str) -> list[PruneGroup]:
    """The ranking groups of ``scope`` (see the module docstring)."""
    check_scope(scope)
    named = list(model.named_parameters())
    if scope == "global":
        return [PruneGroup(tuple(name for name, _ in named))]
    groups = [PruneGroup((name,)) for name, p in named if name.rsplit(".", 1)[-1] == "weight" and p.dim() >= 2]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no weight matrix to prune per layer")
    return groups


def as_fraction(p: float) -> Fraction:
    """The sparsity as the exact decimal it stands for (0.001 * 3 -> 3/1000); must lie in [0, 1]."""
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"sparsity: {p!r} is not allowed; allowed: a number in [0, 1]")
    return Fraction(p).limit_denominator(_MAX_DENOMINATOR)


def n_to_prune(p: float | Fraction, n: int) -> int:
    """round(p * n), half to even as Python's round, in exact rational arithmetic."""
    q = p if isinstance(p, Fraction) else as_fraction(p)
    return round(q * n)


def sparsity_levels(step: float) -> list[Fraction]:
    """The sparsity grid 0, step, 2 step, ..., 1 as exact fractions k / K (K = 1 / step).

    The paper's grid is step = 0.001 (1001 levels); 1 / step must be a whole number.
    """
    if not 0.0 < step <= 1.0:
        raise ValueError(f"sparsity_step: {step!r} is not allowed; allowed: a number in (0, 1]")
    levels = round(1.0 / step)
    if abs(levels * step - 1.0) > 1e-9:
        raise ValueError(f"sparsity_step: {step!r} is not allowed; 1 / step must be a whole number (e.g. 0.001)")
    return [Fraction(k, levels) for k in range(levels + 1)]


def group_scores(importances: ParamDict, group: PruneGroup, model: nn.Module) -> list[Tensor]:
    """The group's score tensors, checked against the parameters' shapes and for NaN."""
    params = dict(model.named_parameters())
    scores = []
    for name in group.names:
        if name not in importances:
            raise KeyError(f"no importance for parameter {name!r}; importances cover {sorted(importances)}")
        score = importances[name].detach()
        if score.shape != params[name].shape:
            raise ValueError(
                f"importance of {name!r} has shape {tuple(score.shape)}, parameter {tuple(params[name].shape)}"
            )
        if bool(torch.isnan(score).any()):
            raise ValueError(f"importance of {name!r} contains NaN; a NaN cannot be ranked")
        scores.append(score)
    return scores


def pruning_order(scores: list[Tensor]) -> Tensor:
    """Flat positions of the group's entries, least important first: stable argsort ascending.

    Positions index the concatenation of the flattened score tensors (in the given order).
    """
    flat = torch.cat([s.reshape(-1) for s in scores])  # (n,)
    return torch.sort(flat, stable=True).indices


def rank_positions(scores: list[Tensor]) -> list[Tensor]:
    """For every entry its 0-based position in ``pruning_order``, shaped like its score tensor.

    float64 (exact up to 2**53 entries) because torch.prune takes floating importance scores.
    """
    order = pruning_order(scores)
    ranks = torch.empty(order.numel(), dtype=torch.float64, device=order.device)
    ranks[order] = torch.arange(order.numel(), dtype=torch.float64, device=order.device)
    out, start = [], 0
    for s in scores:
        out.append(ranks[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, attribute) that holds the parameter called ``name``."""
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


def apply_pruning(
    model: nn.Module, importances: ParamDict, scope: str, sparsity: float, inplace: bool = False
) -> nn.Module:
    """Prune ``model`` to ``sparsity`` with torch.prune, ranking by ``importances``.

    Returns the pruned module (a deep copy unless ``inplace``): torch.prune's reparametrisation,
    ``weight = weight_orig * weight_mask`` applied by a forward pre-hook, so the model stays an
    ordinary ``nn.Module`` that trains, evaluates and saves as usual; ``make_permanent`` folds the
    masks into the parameters (``prune.remove``). The model must not be pruned already.
    """
    check_scope(scope)
    if prune.is_pruned(model):
        raise ValueError("the model is already pruned; prune an unpruned copy")
    q = as_fraction(sparsity)
    target = model if inplace else copy.deepcopy(model)
    for group in prune_groups(target, scope):
        ranks = rank_positions(group_scores(importances, group, target))
        owners = [_owner(target, name) for name in group.names]
        count = n_to_prune(q, sum(r.numel() for r in ranks))
        if len(owners) == 1:
            module, attr = owners[0]
            prune.l1_unstructured(module, attr, amount=count, importance_scores=ranks[0])
        else:
            prune.global_unstructured(
                owners,
                pruning_method=prune.L1Unstructured,
                importance_scores=dict(zip(owners, ranks)),
                amount=count,
            )
    return target


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every torch.prune mask into its parameter (``prune.remove``); returns the model.

    Afterwards the state dict holds plain ``weight``/``bias`` tensors with zeros where pruned.
    """
    pruned = [
        (module, hook._tensor_name)
        for module in model.modules()
        for hook in list(module._forward_pre_hooks.values())
        if isinstance(hook, prune.BasePruningMethod)
    ]
    for module, attr in pruned:
        prune.remove(module, attr)
    return model


def pruned_counts(model: nn.Module) -> dict[str, int]:
    """Number of zeroed entries per pruned parameter (from torch.prune's ``*_mask`` buffers)."""
    return {
        name[: -len("_mask")]: int((buf == 0).sum())
        for name, buf in model.named_buffers()
        if name.endswith("_mask")
    }
