"""The penalty's defining facts (PROTOCOL.md, 'Penalties'), as properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ewcstab.penalty import build_penalty

omega_st = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
lam_st = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
alpha_st = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
dist_st = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False).filter(lambda d: abs(d) > 1e-6)


def one_sgd_step_on_penalty(variant: str, omega: float, lam: float, alpha: float, d: float) -> float:
    """theta - theta* after one plain gradient step of size alpha on the penalty alone."""
    pen = build_penalty(variant, lam, alpha)
    anchor = torch.zeros(1, dtype=torch.float64)
    pen.consolidate({"w": anchor}, {"w": torch.tensor([omega], dtype=torch.float64)})
    theta = torch.tensor([d], dtype=torch.float64)
    grad = torch.zeros_like(theta)
    pen.add_grad_([theta], [grad])
    return float(theta - alpha * grad)


@settings(max_examples=300, deadline=None)
@given(omega=omega_st, lam=lam_st, alpha=alpha_st, d=dist_st)
def test_stabilized_pull_never_exceeds_distance(omega, lam, alpha, d):
    after = one_sgd_step_on_penalty("stabilized", omega, lam, alpha, d)
    pull = abs(d - after)
    assert pull <= abs(d) * (1 + 1e-12)
    assert after * d >= 0  # never crosses the anchor: same side or on it


@settings(max_examples=300, deadline=None)
@given(omega=omega_st, lam=lam_st, alpha=alpha_st, d=dist_st)
def test_original_overshoots_exactly_beyond_threshold(omega, lam, alpha, d):
    """Gradient 2 lam Omega d: the step overshoots theta* iff 2 alpha lam Omega > 1."""
    after = one_sgd_step_on_penalty("original", omega, lam, alpha, d)
    k = 2 * alpha * lam * omega
    if abs(k - 1) < 1e-9:
        return  # on the threshold itself rounding decides
    overshoots = after * d < 0
    assert overshoots == (k > 1)
    # and it moves away (grows) iff k > 2: the 'gradient explosion'
    if abs(k - 2) > 1e-9:
        assert (abs(after) > abs(d)) == (k > 2)


@settings(max_examples=100, deadline=None)
@given(omega=omega_st, lam=lam_st, alpha=alpha_st)
def test_stabilized_is_half_original_in_the_small_step_limit(omega, lam, alpha):
    """c_stab = 0.5 lam Omega / (alpha lam Omega + 1): the factor 2 that doubles the paper's best lambdas."""
    stab, orig = build_penalty("stabilized", lam, alpha), build_penalty("original", lam, alpha)
    for pen in (stab, orig):
        pen.consolidate({"w": torch.zeros(1, dtype=torch.float64)}, {"w": torch.tensor([omega], dtype=torch.float64)})
    k = alpha * lam * omega
    assert float(stab.coef[0]) == pytest.approx(0.5 * float(orig.coef[0]) / (k + 1), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("variant", ["original", "stabilized", "clipped"])
def test_direct_gradient_equals_autograd_of_value(variant):
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    anchor = {"a": torch.randn(5, 3), "b": torch.randn(3)}
    omega = {"a": torch.rand(5, 3) * 100, "b": torch.rand(3) * 100}
    pen = build_penalty(variant, lam=7.0, alpha=1e-3)
    pen.consolidate(anchor, omega)
    pen.value(params).backward()
    grads = [torch.zeros_like(p) for p in params]
    pen.add_grad_(params, grads)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad)


def test_inactive_before_first_consolidation_and_at_zero_lambda():
    p = [torch.ones(3)]
    g = [torch.zeros(3)]
    pen = build_penalty("original", lam=5.0, alpha=1e-3)
    pen.add_grad_(p, g)
    assert g[0].abs().sum() == 0 and float(pen.value(p)) == 0
    pen0 = build_penalty("original", lam=0.0, alpha=1e-3)
    pen0.consolidate({"w": torch.zeros(3)}, {"w": torch.ones(3)})
    pen0.add_grad_(p, g)
    assert g[0].abs().sum() == 0


def test_clipped_variant_bounds_the_gradient_norm():
    pen = build_penalty("clipped", lam=1.0, alpha=1e-3, clip_norm=0.5)
    p = torch.zeros(10, requires_grad=True)
    p.grad = torch.full((10,), 3.0)
    pre = pen.clip_([p])
    assert float(pre) == pytest.approx(3.0 * 10**0.5)
    assert float(p.grad.norm()) == pytest.approx(0.5, rel=1e-5)
    assert build_penalty("original", 1.0, 1e-3).clip_([p]) is None


def test_unknown_variant_and_negative_lambda_rejected():
    with pytest.raises(ValueError, match="allowed: original, stabilized, clipped"):
        build_penalty("fancy", 1.0, 1e-3)
    with pytest.raises(ValueError, match="lam"):
        build_penalty("original", -1.0, 1e-3)
