"""Importances against slow one-sample-at-a-time references (PROTOCOL.md formulas)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ewcstab.importance import SI, build_importance
from ewcstab.importance.fisher import log_likelihood
from ewcstab.importance.mas import squared_output_norm
from ewcstab.importance.persample import mean_reduced_sample_grads
from ewcstab.models.mlp import MLP

torch.set_default_dtype(torch.float32)


def tiny_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(sizes=(12, 7, 5, 4)).double().eval()


class TinyConvNet(nn.Module):
    """Conv + BatchNorm + linear: exercises the torch.func backend on non-linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(F.leaky_relu(self.bn(self.conv(x)), 0.01).flatten(1))


def tiny_conv() -> TinyConvNet:
    torch.manual_seed(0)
    net = TinyConvNet().double()
    net.bn.running_mean.uniform_(-0.2, 0.2)  # non-trivial eval-mode statistics
    net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def slow_reference(model, x, y, scalar_fn, reduce):
    """One sample at a time with plain autograd: the definition, no tricks."""
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad()
        scalar_fn(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        for k, p in model.named_parameters():
            total[k] += reduce(p.grad)
    return {k: v / x.shape[0] for k, v in total.items()}


def assert_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        err = (got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)
        assert err < 1e-5, f"{k}: relative error {err:.2e}"


def data(shape, n=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("backend", ["linear", "func"])
@pytest.mark.parametrize(
    "scalar_fn,reduction,reduce",
    [(log_likelihood, "square", torch.square), (squared_output_norm, "abs", torch.abs)],
    ids=["fisher", "mas"],
)
def test_mlp_per_sample_reductions_match_reference(backend, scalar_fn, reduction, reduce):
    model = tiny_mlp()
    x, y = data((12,))
    got = mean_reduced_sample_grads(model, x, y, scalar_fn, reduction, backend=backend, chunk_size=10)
    assert_close(got, slow_reference(model, x, y, scalar_fn, reduce))


@pytest.mark.parametrize(
    "scalar_fn,reduction,reduce",
    [(log_likelihood, "square", torch.square), (squared_output_norm, "abs", torch.abs)],
    ids=["fisher", "mas"],
)
def test_conv_per_sample_reductions_match_reference(scalar_fn, reduction, reduce):
    model = tiny_conv()
    x, y = data((1, 6, 6))
    got = mean_reduced_sample_grads(model, x, y, scalar_fn, reduction, backend="auto", chunk_size=8)
    assert_close(got, slow_reference(model, x, y, scalar_fn, reduce))


def test_linear_backend_refuses_non_linear_models():
    with pytest.raises(ValueError, match="backend 'linear'"):
        mean_reduced_sample_grads(tiny_conv(), *data((1, 6, 6)), log_likelihood, "square", backend="linear")


def test_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        mean_reduced_sample_grads(tiny_mlp().train(), *data((12,)), log_likelihood, "square")


def test_fisher_and_mas_estimators_use_the_protocol_formulas():
    model = tiny_mlp().train()
    x, y = data((12,))
    fisher = build_importance("fisher").end_task(model, x, y)
    assert model.training, "end_task must restore the training mode"
    assert_close(fisher, slow_reference(model.eval(), x, y, log_likelihood, torch.square))
    mas = build_importance("mas").end_task(model, x, y)
    assert_close(mas, slow_reference(model.eval(), x, y, squared_output_norm, torch.abs))


def test_fisher_predicted_label_uses_argmax():
    model = tiny_mlp()
    x, y = data((12,))
    predicted = model(x).argmax(-1)
    got = build_importance("fisher", label="predicted").end_task(model, x, y)
    assert_close(got, slow_reference(model, x, predicted, log_likelihood, torch.square))


def test_signal_matches_hand_computation():
    model = tiny_mlp()
    x, y = data((12,))
    got = build_importance("signal").end_task(model, x, y)
    # Hand computation, sample by sample: |W| * mean |input|; bias: mean |activation output|.
    layers = list(model.layers)
    in_abs = [torch.zeros(m.in_features, dtype=torch.float64) for m in layers]
    out_abs = [torch.zeros(m.out_features, dtype=torch.float64) for m in layers]
    with torch.no_grad():
        for i in range(x.shape[0]):
            h = x[i]
            for j, m in enumerate(layers):
                in_abs[j] += h.abs()
                z = m.weight @ h + m.bias
                h = z.softmax(-1) if j == len(layers) - 1 else torch.where(z > 0, z, 0.01 * z)
                out_abs[j] += h.abs()
    want = {}
    for j, m in enumerate(layers):
        want[f"layers.{j}.weight"] = m.weight.abs() * in_abs[j] / x.shape[0]
        want[f"layers.{j}.bias"] = out_abs[j] / x.shape[0]
    assert_close(got, want)


def test_signal_refuses_uncovered_parameters():
    with pytest.raises(ValueError, match="signal_activations"):
        build_importance("signal").end_task(tiny_conv(), *data((1, 6, 6)))


def test_magnitude_is_absolute_value():
    model = tiny_mlp()
    got = build_importance("magnitude").end_task(model, *data((12,)))
    assert_close(got, {k: p.detach().abs() for k, p in model.named_parameters()})


def test_si_matches_path_integral_reference():
    """SI through its hooks equals the explicit sum of -g * delta over SGD steps, then the damping."""
    model = tiny_mlp().train()
    x, y = data((12,), n=40)
    si = SI(xi=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    accum = [torch.zeros_like(p) for p in params]
    si.begin_task(model)
    for step in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x[step * 8 : step * 8 + 8]), y[step * 8 : step * 8 + 8]).backward()
        grads = [p.grad for p in params]
        before = [p.detach().clone() for p in params]
        g_copy = [g.clone() for g in grads]
        si.before_step(params, grads)
        opt.step()
        si.after_step(params)
        for a, g, p, b in zip(accum, g_copy, params, before):
            a -= g * (p.detach() - b)
    got = si.end_task(model, x, y)
    names = [k for k, _ in model.named_parameters()]
    want = {k: a / ((p.detach() - s) ** 2 + 0.1) for k, a, p, s in zip(names, accum, params, start)}
    assert_close(got, want)
    assert any(v.abs().sum() > 0 for v in got.values())


def test_registry_rejects_unknown_method():
    with pytest.raises(ValueError, match="allowed: fisher, mas, si, signal, magnitude"):
        build_importance("ewc++")
