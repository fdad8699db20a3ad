"""Small image classifiers for gradguard's examples, demo and comparison.

Every model here is *per-example safe*: example j's output depends on input j alone,
in train mode as in eval mode. That is what per-example gradients (and so GNQ and
DP-SGD) require; BatchNorm breaks it, since in train mode it normalises each example
with statistics of the whole batch, so ``resnet18_groupnorm`` swaps it for GroupNorm.
None of the models has dropout, so train-mode outputs are deterministic.

``make_model(name, ...)`` builds one by name, optionally under its own seed without
disturbing the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["MODEL_NAMES", "make_model", "mlp", "resnet18_groupnorm", "small_cnn"]

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "resnet18")

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    # Smooth, so input-curvature probes see a non-zero second derivative everywhere.
    "softplus": nn.Softplus,
}

# Images at most this large get a CIFAR-style ResNet stem (3×3 conv, stride 1, no max
# pool): the ImageNet stem would shrink a 32×32 image to 8×8 before the first block.
_SMALL_IMAGE_SIDE = 32


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (128,),
    activation: str = "relu",
) -> nn.Sequential:
    """A fully connected classifier that flattens its input.

    Args:
        input_shape: shape of one input, e.g. ``(1, 8, 8)`` or ``(20,)``.
        num_classes: number of output logits.
        hidden: widths of the hidden layers (empty: a linear model).
        activation: ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"softplus"``.

    Returns:
        ``nn.Sequential(Flatten, Linear, act, ..., Linear)`` mapping ``[B, *input_shape]``
        to ``[B, num_classes]``.

    Example:
        >>> model = mlp((1, 8, 8), 10, hidden=(32, 32))
        >>> model(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """
    shape = _check_shape(input_shape)
    num_classes = _check_classes(num_classes)
    widths = _check_widths(hidden, "hidden", allow_empty=True)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of "
                         f"{', '.join(_ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = math.prod(shape)
    for width in widths:
        layers += [nn.Linear(width_in, width), _ACTIVATIONS[activation]()]
        width_in = width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)


def small_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    channels: Sequence[int] = (16, 32),
    norm: str | None = None,
) -> nn.Sequential:
    """A small convolutional classifier for 8×8 digits up to 32×32 colour images.

    Each block is a 3×3 convolution (padding 1), an optional GroupNorm, ReLU and a 2×2
    max pool (skipped once the feature map is smaller than 2×2); a linear head reads the
    flattened last feature map. An 8×8 input ends at 2×2, 28×28 at 7×7, 32×32 at 8×8.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of output logits.
        channels: output channels of the convolution blocks.
        norm: None (no normalisation: every parameter sits in a Conv2d or Linear) or
            ``"group"``: GroupNorm with ``gcd(8, channels)`` groups.

    Returns:
        An ``nn.Sequential`` mapping ``[B, C, H, W]`` to ``[B, num_classes]``.

    Example:
        >>> model = small_cnn((3, 32, 32), 10, norm="group")
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    shape = _check_shape(input_shape)
    if len(shape) != 3:
        raise ValueError(f"small_cnn needs image inputs (C, H, W), got input_shape {shape}; "
                         "use mlp for flat features")
    num_classes = _check_classes(num_classes)
    widths = _check_widths(channels, "channels", allow_empty=False)
    if norm not in (None, "group"):
        raise ValueError(f"norm must be None or 'group', got {norm!r}")
    c_in, height, width = shape
    layers: list[nn.Module] = []
    for c_out in widths:
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
        if norm == "group":
            layers.append(nn.GroupNorm(math.gcd(8, c_out), c_out))
        layers.append(nn.ReLU())
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        c_in = c_out
    layers += [nn.Flatten(), nn.Linear(c_in * height * width, num_classes)]
    return nn.Sequential(*layers)


def resnet18_groupnorm(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 (random init) with GroupNorm instead of BatchNorm.

    Every ``BatchNorm2d`` is replaced by Opacus' ``ModuleValidator.fix``, which uses
    ``GroupNorm(gcd(32, C), C)`` (32 groups for all ResNet-18 widths) with the same
    affine initialisation. The stem follows the input: images of side at most 32 get a
    3×3 stride-1 first convolution and no max pool (the usual CIFAR ResNet); larger
    images keep the 7×7 stride-2 stem and max pool, with its input channels adapted.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of output logits.

    Returns:
        The model, mapping ``[B, C, H, W]`` to ``[B, num_classes]``.

    Example:
        >>> model = resnet18_groupnorm((1, 28, 28), 10)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    from opacus.validators import ModuleValidator
    from torchvision.models import resnet18

    shape = _check_shape(input_shape)
    if len(shape) != 3:
        raise ValueError(f"resnet18 needs image inputs (C, H, W), got input_shape {shape}")
    num_classes = _check_classes(num_classes)
    c_in, height, width = shape
    model = resnet18(weights=None, num_classes=num_classes)
    if max(height, width) <= _SMALL_IMAGE_SIDE:
        model.conv1 = nn.Conv2d(c_in, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c_in != 3:
        model.conv1 = nn.Conv2d(c_in, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # torchvision initialises its own first conv with Kaiming normal (fan_out); keep that.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model = ModuleValidator.fix(model)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise RuntimeError("ModuleValidator.fix left a BatchNorm layer in resnet18; "
                           "please report this together with your opacus version")
    return model


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": small_cnn,
    "resnet18": resnet18_groupnorm,
}


def make_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: ``"mlp"`` (:func:`mlp`), ``"cnn"`` (:func:`small_cnn`) or ``"resnet18"``
            (:func:`resnet18_groupnorm`).
        input_shape: shape of one input, e.g. ``split.input_shape``.
        num_classes: number of output logits.
        seed: if given, the weights are drawn from the CPU RNG seeded with it inside
            ``torch.random.fork_rng``, so the same seed gives the same weights and the
            global RNG state is left as it was. None draws from the global RNG.
        **kwargs: passed to the builder (``hidden``, ``activation``, ``channels``,
            ``norm``).

    Returns:
        The model, on the CPU, in train mode.

    Raises:
        ValueError: unknown name, or an argument the builder rejects.
        TypeError: a keyword argument the builder does not take.

    Example:
        >>> a = make_model("cnn", (1, 8, 8), 10, seed=0)
        >>> b = make_model("cnn", (1, 8, 8), 10, seed=0)
        >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        True
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    builder = _BUILDERS[name]
    if seed is None:
        return builder(input_shape, num_classes, **kwargs)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    # devices=[]: initialisation runs on the CPU, so no accelerator RNG is touched; the
    # CPU generator is seeded directly because torch.manual_seed also seeds CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return builder(input_shape, num_classes, **kwargs)


# --------------------------------------------------------------------------- helpers


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a sequence of ints such as (1, 8, 8), got "
                        f"{input_shape!r}") from None
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints (one "
                         f"example's shape, without the batch dimension), got {input_shape!r}")
    return shape


def _check_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _check_widths(widths: Sequence[int], what: str, *, allow_empty: bool) -> tuple[int, ...]:
    values = tuple(widths)
    if (not values and not allow_empty) or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in values):
        raise ValueError(f"{what} must be a {'' if allow_empty else 'non-empty '}sequence of "
                         f"positive ints, got {widths!r}")
    return values
