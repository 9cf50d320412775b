"""The penalty's defining facts (docs/protocol.md, 'Penalties'), as properties; every tensor stacked over runs."""

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


def f64(*values) -> torch.Tensor:
    """One run's parameter as a stack of one run, (1, n), in float64."""
    return torch.tensor([list(values)], dtype=torch.float64)


def one_sgd_step_on_penalty(variant: str, omega: float, lam: float, alpha: float, d: float) -> float:
    """theta - theta* after one plain gradient step of size alpha on the penalty alone."""
    pen = build_penalty(variant, [lam], alpha)
    pen.consolidate([f64(0.0)], [f64(omega)])
    theta = f64(d)
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
    stab, orig = build_penalty("stabilized", [lam], alpha), build_penalty("original", [lam], alpha)
    for pen in (stab, orig):
        pen.consolidate([f64(0.0)], [f64(omega)])
    k = alpha * lam * omega
    assert float(stab.twice_coef[0]) == pytest.approx(0.5 * float(orig.twice_coef[0]) / (k + 1), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("lam", [1e39, 1e300, 3.4e38])
def test_stabilized_coefficient_is_finite_for_every_finite_lambda(lam):
    """0.5 / (alpha + 1 / (lam Omega)): no inf / inf at lambdas beyond float32's range, 0 where Omega is 0."""
    pen = build_penalty("stabilized", [lam], 1e-3)
    pen.consolidate([torch.zeros(1, 3)], [torch.tensor([[0.0, 1e-30, 5.0]])])
    c = pen.twice_coef[0] / 2
    assert torch.isfinite(c).all()
    assert c[0, 0] == 0 and c[0, 2] == pytest.approx(0.5 / 1e-3)


def test_each_run_has_its_own_lambda():
    pen = build_penalty("original", [0.0, 2.0, 5.0], 1e-3)
    pen.consolidate([torch.zeros(3, 2)], [torch.ones(3, 2)])
    params, grads = [torch.ones(3, 2)], [torch.zeros(3, 2)]
    pen.add_grad_(params, grads)
    assert grads[0][:, 0].tolist() == [0.0, 4.0, 10.0]  # 2 lam Omega (theta - theta*)
    assert pen.value(params).tolist() == [0.0, 4.0, 10.0]  # per run: sum lam Omega d^2 over 2 elements
    pen.select(torch.tensor([2, 0]))
    assert pen.lams == [5.0, 0.0] and pen.twice_coef[0][:, 0].tolist() == [10.0, 0.0]


@pytest.mark.parametrize("variant", ["original", "stabilized", "clipped"])
def test_direct_gradient_equals_autograd_of_value(variant):
    torch.manual_seed(0)
    params = [torch.randn(2, 5, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
    anchor = [torch.randn(2, 5, 3), torch.randn(2, 3)]
    omega = [torch.rand(2, 5, 3) * 100, torch.rand(2, 3) * 100]
    pen = build_penalty(variant, [7.0, 0.5], alpha=1e-3)
    pen.consolidate(anchor, omega)
    pen.value(params).sum().backward()
    grads = [torch.zeros_like(p) for p in params]
    pen.add_grad_(params, grads)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad)


def test_inactive_before_first_consolidation_and_at_zero_lambda():
    p = [torch.ones(1, 3)]
    g = [torch.zeros(1, 3)]
    pen = build_penalty("original", [5.0], alpha=1e-3)
    assert pen.add_grad_(p, g) is None
    assert g[0].abs().sum() == 0 and float(pen.value(p)) == 0
    pen0 = build_penalty("original", [0.0], alpha=1e-3)
    pen0.consolidate([torch.zeros(1, 3)], [torch.ones(1, 3)])
    assert pen0.add_grad_(p, g) is None and g[0].abs().sum() == 0


def test_clipped_variant_bounds_each_runs_gradient_norm():
    """clip_grad_norm_'s rule per run: a run below the bound is left alone."""
    pen = build_penalty("clipped", [1.0, 1.0], alpha=1e-3, clip_norm=0.5)
    grads = [torch.stack([torch.full((10,), 3.0), torch.full((10,), 0.01)])]
    norms = torch.linalg.vector_norm(grads[0], dim=1)
    pre = pen.clip_(grads, norms)
    assert pre.tolist() == pytest.approx([3.0 * 10**0.5, 0.01 * 10**0.5])
    after = torch.linalg.vector_norm(grads[0], dim=1)
    assert after[0] == pytest.approx(0.5, rel=1e-5) and after[1] == pytest.approx(0.01 * 10**0.5)
    assert build_penalty("original", [1.0], 1e-3).clip_(grads, norms) is None


def test_unknown_variant_and_negative_lambda_rejected():
    with pytest.raises(ValueError, match="allowed: original, stabilized, clipped"):
        build_penalty("fancy", [1.0], 1e-3)
    with pytest.raises(ValueError, match="lam"):
        build_penalty("original", [1.0, -1.0], 1e-3)
