"""The architectures: shapes, parameter counts, what is protected, and torch.func compatibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import slow_reference
from ewcstab.importance.fisher import log_likelihood
from ewcstab.importance.mas import squared_output_norm
from ewcstab.importance.persample import mean_reduced_sample_grads
from ewcstab.models import build_model
from ewcstab.models.mlp import MLP
from ewcstab.models.attention import AttentionNet
from ewcstab.models.cnn import CNN


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,count", [("mlp", 282_160), ("cnn", 535_434), ("attention", 105_418)])
def test_registry_models_map_images_to_ten_logits_with_pinned_sizes(arch, count):
    torch.manual_seed(0)
    model = build_model(arch)
    assert n_params(model) == count
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_layer_shapes_follow_the_protocol():
    """28 -> conv5 24 -> pool 12 -> conv3 10 -> conv3 8; flatten 8*8*256 -> 10."""
    model = CNN().eval()
    seen = {}
    for name in ("conv1", "conv2", "conv3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, (i[0].shape, o.shape))
        )
    model(torch.rand(2, 1, 28, 28))
    assert seen["conv1"] == ((2, 1, 28, 28), (2, 64, 24, 24))
    assert seen["conv2"] == ((2, 64, 12, 12), (2, 128, 10, 10))
    assert seen["conv3"] == ((2, 128, 10, 10), (2, 256, 8, 8))
    assert model.fc.in_features == 8 * 8 * 256 and model.fc.out_features == 10
    kernels = [m.kernel_size for m in (model.conv1, model.conv2, model.conv3)]
    assert kernels == [(5, 5), (3, 3), (3, 3)]


def test_cnn_protects_batchnorm_affine_but_not_running_statistics():
    model = CNN()
    params = {k for k, _ in model.named_parameters()}
    buffers = {k for k, _ in model.named_buffers()}
    assert {"bn1.weight", "bn1.bias", "bn3.weight", "bn3.bias", "conv1.bias"} <= params
    assert {"bn1.running_mean", "bn1.running_var"} <= buffers and not (buffers & params)


def test_attention_uses_explicit_linear_projections_and_no_class_token():
    model = AttentionNet()
    names = {k for k, _ in model.named_parameters()}
    for block in range(3):
        for proj in ("q", "k", "v", "out"):
            assert isinstance(model.get_submodule(f"blocks.{block}.attn.{proj}"), nn.Linear)
            assert f"blocks.{block}.attn.{proj}.weight" in names
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert model.embed.pos.shape == (16, 64)  # 7x7 patches of a 28x28 image: 16 tokens
    assert not any("cls" in k for k in names)


def test_attention_matches_scaled_dot_product_attention():
    """The written-out attention is standard multi-head attention."""
    torch.manual_seed(0)
    attn = AttentionNet(dim=8, heads=2).blocks[0].attn
    x = torch.randn(3, 5, 8)
    split = lambda z: z.view(3, 5, 2, 4).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(attn.q(x)), split(attn.k(x)), split(attn.v(x)))
    want = attn.out(ref.transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x), want)


def test_attention_output_depends_on_token_order():
    """The position embedding breaks the permutation symmetry of attention + mean pooling."""
    torch.manual_seed(0)
    model = AttentionNet().eval()
    x = torch.rand(2, 1, 28, 28)
    rolled = torch.roll(x, shifts=7, dims=3)  # moves whole 7x7 patches one token to the right
    assert not torch.allclose(model(x), model(rolled))


def tiny_attention() -> AttentionNet:
    torch.manual_seed(0)
    return AttentionNet(dim=8, depth=2, heads=2, mlp_hidden=12, patch=7).double().eval()


def full_cnn() -> CNN:
    torch.manual_seed(0)
    model = CNN().double()
    for bn in (model.bn1, model.bn2, model.bn3):  # non-trivial eval-mode statistics
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("make,n", [(full_cnn, 3), (tiny_attention, 9)], ids=["cnn", "attention"])
@pytest.mark.parametrize(
    "scalar_fn,reduction,reduce",
    [(log_likelihood, "square", torch.square), (squared_output_norm, "abs", torch.abs)],
    ids=["fisher", "mas"],
)
def test_torch_func_per_sample_grads_match_reference(make, n, scalar_fn, reduction, reduce):
    model = make()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    got = mean_reduced_sample_grads(model, x, y, scalar_fn, reduction, backend="func", chunk_size=4)
    want = slow_reference(model, x, y, scalar_fn, reduce)
    assert got.keys() == want.keys()
    for k in want:
        # clamp: the attention's key bias has an exactly zero gradient (softmax ignores a shift
        # q.b_k shared by all keys), so both sides are rounding noise there
        err = (got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-9)
        assert err < 1e-8, f"{k}: relative error {err:.2e}"


def test_default_attention_works_under_vmap():
    """The registry's attention model (float32, default size) through the func backend."""
    torch.manual_seed(0)
    model = AttentionNet().eval()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    got = mean_reduced_sample_grads(model, x, y, log_likelihood, "square", backend="auto")
    assert got.keys() == dict(model.named_parameters()).keys()
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in got.values())
    assert got["head.weight"].abs().sum() > 0


@pytest.mark.parametrize("shared", [False, True])
def test_mlp_stacked_forward_equals_forward_run_by_run(shared):
    """``MLP.forward_stacked`` (batched products over runs) is the module's ``forward`` of each run."""
    from torch.func import stack_module_state

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(MLP())
    params, _ = stack_module_state(models)
    x = torch.rand(5, 1, 28, 28) if shared else torch.rand(3, 5, 1, 28, 28)
    got = models[0].forward_stacked(params, x, shared)
    for r, m in enumerate(models):
        torch.testing.assert_close(got[r], m(x if shared else x[r]), rtol=1e-5, atol=1e-6)


def test_stacked_linear_backward_is_the_gradient_and_contiguous():
    from ewcstab.models.mlp import StackedLinear

    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((2, 5, 4), (2, 3, 4), (2, 3)))
    assert torch.autograd.gradcheck(StackedLinear.apply, (h, w, b))
    StackedLinear.apply(h, w, b).square().sum().backward()
    assert w.grad.is_contiguous() and w.grad.shape == (2, 3, 4)
