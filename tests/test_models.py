"""Tests for gradguard.experiments.models: shapes, BatchNorm-free ResNet, seeding, safety."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap
from torchvision.models import resnet18

from gradguard.experiments.models import MODEL_NAMES, make_model, mlp, resnet18_groupnorm, small_cnn

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_for_each_input_shape(name, shape):
    model = make_model(name, shape, 7, seed=0)
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_mlp_on_flat_features_and_hidden_layout():
    model = mlp((20,), 4, hidden=(16, 8), activation="tanh")
    assert model(torch.randn(5, 20)).shape == (5, 4)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(20, 16), (16, 8), (8, 4)]
    assert sum(isinstance(m, nn.Tanh) for m in model) == 2
    # An empty hidden tuple is a plain linear (logistic-regression) model.
    assert [type(m) for m in mlp((1, 8, 8), 10, hidden=())] == [nn.Flatten, nn.Linear]


@pytest.mark.parametrize("shape, side", [((1, 8, 8), 2), ((1, 28, 28), 7), ((3, 32, 32), 8)])
def test_small_cnn_head_matches_final_feature_map(shape, side):
    model = small_cnn(shape, 10, channels=(4, 6), norm="group")
    head = model[-1]
    assert isinstance(head, nn.Linear) and head.in_features == 6 * side * side
    assert sum(isinstance(m, nn.GroupNorm) for m in model) == 2
    assert model(torch.rand(2, *shape)).shape == (2, 10)
    # Three blocks on 8x8 would shrink past 1x1; pooling must stop at 1x1 instead.
    deep = small_cnn((1, 8, 8), 10, channels=(4, 4, 4, 4))
    assert deep(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_resnet18_has_groupnorm_where_torchvision_has_batchnorm():
    reference = resnet18(weights=None, num_classes=10)
    n_batchnorm = sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    # Opacus flags the unmodified torchvision model: the control for the check below.
    assert ModuleValidator.validate(reference, strict=False)

    model = resnet18_groupnorm((3, 32, 32), 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    groupnorms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groupnorms) == n_batchnorm
    assert all(m.num_groups == 32 for m in groupnorms)
    assert ModuleValidator.validate(model, strict=False) == []
    # GroupNorm has BatchNorm's affine parameters, so only the 3x3 stem (64*3*3*3
    # weights instead of 64*3*7*7) changes the count; a large input keeps the 7x7 stem.
    n_reference = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_reference - 64 * 3 * (49 - 9)
    large = resnet18_groupnorm((3, 64, 64), 10)
    assert sum(p.numel() for p in large.parameters()) == n_reference


def test_resnet18_stem_follows_input():
    small = resnet18_groupnorm((1, 28, 28), 10)
    assert small.conv1.in_channels == 1 and small.conv1.kernel_size == (3, 3)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)

    large = resnet18_groupnorm((1, 64, 64), 5)
    assert large.conv1.in_channels == 1 and large.conv1.kernel_size == (7, 7)
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, nn.MaxPool2d)
    assert large(torch.rand(2, 1, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seeded_construction_is_deterministic_and_keeps_global_rng(name):
    torch.manual_seed(1234)
    state_before = torch.get_rng_state()
    a = make_model(name, (1, 8, 8), 10, seed=7)
    b = make_model(name, (1, 8, 8), 10, seed=7)
    c = make_model(name, (1, 8, 8), 10, seed=8)
    assert torch.equal(torch.get_rng_state(), state_before)

    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Every randomly initialised weight differs under another seed.
    weights = [k for k in sa if k.endswith("weight") and sa[k].dim() > 1]
    assert weights and all(not torch.equal(sa[k], sc[k]) for k in weights)


def test_unseeded_construction_draws_from_global_rng():
    torch.manual_seed(3)
    a = make_model("mlp", (1, 8, 8), 10)
    torch.manual_seed(3)
    b = make_model("mlp", (1, 8, 8), 10)
    c = make_model("mlp", (1, 8, 8), 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a[1].weight, c[1].weight)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="mlp, cnn, resnet18"):
        make_model("vgg", (1, 8, 8), 10)
    with pytest.raises(TypeError):
        make_model("mlp", (1, 8, 8), 10, channels=(4,))
    with pytest.raises(TypeError, match="seed"):
        make_model("mlp", (1, 8, 8), 10, seed=1.5)
    with pytest.raises(ValueError, match="activation"):
        mlp((4,), 2, activation="swish")
    with pytest.raises(ValueError, match="input_shape"):
        mlp((0, 8), 2)
    with pytest.raises(ValueError, match="num_classes"):
        mlp((4,), 0)
    with pytest.raises(ValueError, match="mlp"):
        small_cnn((64,), 10)
    with pytest.raises(ValueError, match="norm"):
        small_cnn((1, 8, 8), 10, norm="batch")
    with pytest.raises(ValueError, match="channels"):
        small_cnn((1, 8, 8), 10, channels=())
    with pytest.raises(ValueError, match="C, H, W"):
        resnet18_groupnorm((3, 32), 10)


# ----------------------------------------------------------------- per-example safety

SAFE_MODELS = [
    ("mlp", {}),
    ("cnn", {}),
    ("cnn", {"norm": "group"}),
    ("resnet18", {}),
]


def _batchnorm_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


@pytest.mark.parametrize("name, kwargs", SAFE_MODELS)
def test_train_mode_output_of_one_example_ignores_the_rest_of_the_batch(name, kwargs):
    gen = torch.Generator().manual_seed(0)
    model = make_model(name, (1, 8, 8), 10, seed=0, **kwargs).train()
    x = torch.rand(4, 1, 8, 8, generator=gen)
    x_other = x.clone()
    x_other[1:] = torch.rand(3, 1, 8, 8, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(x_other)[0])


def test_batch_dependence_check_detects_batchnorm():
    # Control: the check above must fail for a model that is not per-example safe.
    gen = torch.Generator().manual_seed(0)
    model = _batchnorm_cnn().train()
    x = torch.rand(4, 1, 8, 8, generator=gen)
    x_other = x.clone()
    x_other[1:] = torch.rand(3, 1, 8, 8, generator=gen)
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], model(x_other)[0], atol=1e-4)


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, xi, yi):
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0), reduction="sum")

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("name, kwargs", SAFE_MODELS)
def test_vmap_per_example_gradients_match_ordinary_backward(name, kwargs):
    gen = torch.Generator().manual_seed(1)
    model = make_model(name, (1, 8, 8), 10, seed=1, **kwargs).train()
    x = torch.rand(3, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (3,), generator=gen)
    per_example = _per_example_grads(model, x, y)
    # Non-trivial: every example has its own, non-zero gradient.
    flat = torch.cat([g.reshape(3, -1) for g in per_example.values()], dim=1)
    assert (flat.norm(dim=1) > 0).all() and not torch.allclose(flat[0], flat[1])

    # Reference 1: the gradient of the summed batch loss is the sum of per-example ones.
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(per_example[k].sum(0), p.grad, rtol=1e-4, atol=1e-5)

    # Reference 2: example 0's gradient from a batch holding only example 0.
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:1]), y[:1], reduction="sum").backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(per_example[k][0], p.grad, rtol=1e-4, atol=1e-5)

    # And it does not move when the other examples in the batch change.
    x_other, y_other = x.clone(), y.clone()
    x_other[1:] = torch.rand(2, 1, 8, 8, generator=gen)
    y_other[1:] = (y[1:] + 1) % 10
    per_example_other = _per_example_grads(model, x_other, y_other)
    for k in per_example:
        torch.testing.assert_close(per_example_other[k][0], per_example[k][0])
