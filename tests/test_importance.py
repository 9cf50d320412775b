"""Importances against slow one-sample-at-a-time references (docs/protocol.md formulas)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import slow_reference
from ewcstab.importance import SI, build_importance, network_importance
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
    fisher = network_importance(build_importance("fisher"), model, x, y)
    assert model.training, "end_task must restore the training mode"
    assert_close(fisher, slow_reference(model.eval(), x, y, log_likelihood, torch.square))
    mas = network_importance(build_importance("mas"), model, x, y)
    assert_close(mas, slow_reference(model.eval(), x, y, squared_output_norm, torch.abs))


def test_fisher_predicted_label_uses_argmax():
    model = tiny_mlp()
    x, y = data((12,))
    predicted = model(x).argmax(-1)
    got = network_importance(build_importance("fisher", label="predicted"), model, x, y)
    assert_close(got, slow_reference(model, x, predicted, log_likelihood, torch.square))


def test_signal_matches_hand_computation():
    model = tiny_mlp()
    x, y = data((12,))
    got = network_importance(build_importance("signal"), model, x, y)
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
        network_importance(build_importance("signal"), tiny_conv(), *data((1, 6, 6)))


def test_magnitude_is_absolute_value():
    model = tiny_mlp()
    got = network_importance(build_importance("magnitude"), model, *data((12,)))
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
    def stacked(tensors):  # SI works on stacks of runs: here one run, (1, *shape)
        return [t.unsqueeze(0) for t in tensors]

    si.begin_task(stacked(params))
    for step in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x[step * 8 : step * 8 + 8]), y[step * 8 : step * 8 + 8]).backward()
        grads = [p.grad for p in params]
        before = [p.detach().clone() for p in params]
        g_copy = [g.clone() for g in grads]
        si.before_step(stacked(params), stacked(grads))
        opt.step()
        si.after_step(stacked(params))
        for a, g, p, b in zip(accum, g_copy, params, before):
            a -= g * (p.detach() - b)
    names = [k for k, _ in model.named_parameters()]
    runs = SimpleNamespace(params=stacked(params), names=names, count=1)
    got = dict(zip(names, (o[0] for o in si.end_task(runs, x, y))))
    want = {k: a / ((p.detach() - s) ** 2 + 0.1) for k, a, p, s in zip(names, accum, params, start)}
    assert_close(got, want)
    assert any(v.abs().sum() > 0 for v in got.values())


def test_registry_rejects_unknown_method():
    with pytest.raises(ValueError, match="allowed: fisher, mas, si, signal, magnitude"):
        build_importance("ewc++")


# --------------------------------------------------------------------------------------------------
# Signal importance beyond linear layers (rules in importance/signal.py's docstring)


class TinySignalConvNet(nn.Module):
    """Grouped, strided, padded conv -> BatchNorm -> leaky ReLU -> linear -> softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)  # (B, 2, 5, 5) -> (B, 4, 3, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(F.leaky_relu(self.bn(self.conv(x)), 0.01).flatten(1))

    def signal_activations(self):
        return {
            "conv": lambda z: F.leaky_relu(self.bn.forward(z), 0.01),
            "bn": lambda z: F.leaky_relu(z, 0.01),
            "fc": lambda z: z.softmax(-1),
        }


def test_signal_conv_and_batchnorm_match_hand_computation():
    torch.manual_seed(0)
    model = TinySignalConvNet().double()
    model.bn.running_mean.uniform_(-0.3, 0.3)
    model.bn.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        model.bn.weight.uniform_(-1.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    x, y = data((2, 5, 5), n=6)
    got = network_importance(build_importance("signal"), model, x, y)

    conv, bn = model.conv, model.bn
    w_in = torch.zeros(4, 1, 3, 3, dtype=torch.float64)  # sum of |input element| each weight multiplies
    conv_out = torch.zeros(4, dtype=torch.float64)
    bn_in = torch.zeros(4, dtype=torch.float64)
    positions = 0
    with torch.no_grad():
        padded = F.pad(x, (1, 1, 1, 1))
        for n in range(x.shape[0]):
            for i in range(3):
                for j in range(3):
                    positions += 1
                    for o in range(4):
                        c = o // 2  # groups=2: output channels 0,1 read input channel 0; 2,3 read 1
                        patch = padded[n, c, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]  # (3, 3)
                        w_in[o, 0] += patch.abs()
                        z = (conv.weight[o, 0] * patch).sum() + conv.bias[o]
                        x_hat = (z - bn.running_mean[o]) / torch.sqrt(bn.running_var[o] + bn.eps)
                        a = bn.weight[o] * x_hat + bn.bias[o]
                        a = a if a > 0 else 0.01 * a
                        conv_out[o] += a.abs()
                        bn_in[o] += x_hat.abs()
    assert_close(
        {k: got[k] for k in ("conv.weight", "conv.bias", "bn.weight", "bn.bias")},
        {
            "conv.weight": conv.weight.abs() * w_in / positions,
            "conv.bias": conv_out / positions,
            "bn.weight": bn.weight.abs() * bn_in / positions,
            "bn.bias": conv_out / positions,  # conv bias and BN beta feed the same block output
        },
    )


def test_signal_attention_matches_hand_computation():
    """A one-block attention model, every layer's input and output formed by hand, sample by sample."""
    from ewcstab.models.attention import AttentionNet

    torch.manual_seed(0)
    model = AttentionNet(dim=4, depth=1, heads=2, mlp_hidden=6, patch=2, image=4, classes=3).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    x, y = data((1, 4, 4), n=5)
    got = network_importance(build_importance("signal"), model, x, y)

    blk = model.blocks[0]
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def see(name, inp, out):  # inp/out: (rows, features) of one sample
        for key, val in ((f"{name}/in", inp.abs().sum(0)), (f"{name}/out", out.abs().sum(0))):
            sums[key] = sums.get(key, 0) + val
        rows[name] = rows.get(name, 0) + inp.shape[0]

    def linear(name, m, h, act=lambda z: z):
        out = act(h @ m.weight.T + m.bias)
        see(name, h, out)
        return h @ m.weight.T + m.bias

    def layer_norm(name, m, h):
        x_hat = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + m.eps)
        out = m.weight * x_hat + m.bias
        see(name, x_hat, out)
        return out

    with torch.no_grad():
        for n in range(x.shape[0]):
            img = x[n, 0]
            # (4 tokens, 4 pixels), tokens in row-major patch order like the conv's flatten
            patches = torch.stack([img[r : r + 2, c : c + 2].reshape(-1) for r in (0, 2) for c in (0, 2)])
            proj = model.embed.proj
            tokens = patches @ proj.weight.reshape(4, 4).T + proj.bias  # (T, D)
            see("embed.proj", patches, tokens)
            h = tokens + model.embed.pos
            sums["embed/out"] = sums.get("embed/out", 0) + h.abs()  # per (token, channel): no sharing
            rows["embed"] = rows.get("embed", 0) + 1
            u = layer_norm("blocks.0.norm1", blk.norm1, h)
            q = linear("blocks.0.attn.q", blk.attn.q, u)
            k = linear("blocks.0.attn.k", blk.attn.k, u)
            v = linear("blocks.0.attn.v", blk.attn.v, u)
            heads = []
            for head in range(2):
                sl = slice(2 * head, 2 * head + 2)
                att = (q[:, sl] @ k[:, sl].T / 2**0.5).softmax(-1)
                heads.append(att @ v[:, sl])
            h = h + linear("blocks.0.attn.out", blk.attn.out, torch.cat(heads, -1))
            u = layer_norm("blocks.0.norm2", blk.norm2, h)
            hid = F.gelu(linear("blocks.0.mlp.fc1", blk.mlp.fc1, u, F.gelu))
            h = h + linear("blocks.0.mlp.fc2", blk.mlp.fc2, hid)
            u = layer_norm("norm", model.norm, h)
            linear("head", model.head, u.mean(0, keepdim=True), lambda z: z.softmax(-1))

    want = {}
    modules = dict(model.named_modules())
    for name, count in rows.items():
        if name == "embed":
            want["embed.pos"] = sums["embed/out"] / count
            continue
        m = modules[name]
        weight = m.weight.reshape(m.weight.shape[0], -1) if name == "embed.proj" else m.weight
        w = weight.abs() * sums[f"{name}/in"] / count
        want[f"{name}.weight"] = w.reshape(m.weight.shape)
        want[f"{name}.bias"] = sums[f"{name}/out"] / count
    assert_close(got, want)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "attention"])
def test_signal_covers_every_parameter_of_every_registry_model(arch):
    from ewcstab.models import build_model

    torch.manual_seed(0)
    model = build_model(arch)
    params = dict(model.named_parameters())
    got = network_importance(build_importance("signal"), model, torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    assert list(got) == list(params)
    for k, v in got.items():
        assert v.shape == params[k].shape and torch.isfinite(v).all() and (v >= 0).all(), k


def test_signal_refuses_a_parameter_without_a_rule():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 4)
            self.scale = nn.Parameter(torch.ones(4))  # multiplicative: no rule for it

        def forward(self, x):
            return self.fc(x) * self.scale

        def signal_activations(self):
            return {"fc": lambda z: z}

    with pytest.raises(ValueError, match=r"no rule for parameters \['scale'\]"):
        network_importance(build_importance("signal"), Scaled(), *data((12,)))

    class Listed(Scaled):
        def signal_activations(self):
            return {"fc": lambda z: z, "": lambda z: z}  # the root module: neither layer nor additive

    with pytest.raises(ValueError, match="no rule for module"):
        network_importance(build_importance("signal"), Listed(), *data((12,)))
