"""Model registries: classifiers and perturbation generators, created by name.

``create_classifier("dc_cnn", in_channels=1, image_size=28, num_classes=10)``;
an unknown name raises a ``ConfigError`` listing the known ones.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from poison.errors import ConfigError
from poison.models.classifiers import DCCNN, MLP, ResNet
from poison.models.generators import ClassConditional, DCAutoencoder, UNet

__all__ = ["CLASSIFIERS", "GENERATORS", "create_classifier", "create_generator", "is_conditional", "check_classifiers", "MIN_IMAGE_SIZE"]

CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "dc_cnn": DCCNN,
    "dc_cnn_small": partial(DCCNN, widths=(10, 25), hidden=250),
    "dc_cnn_large": partial(DCCNN, widths=(32, 64, 128), hidden=1000),
    "mlp": MLP,
    "resnet8": partial(ResNet, blocks=1),
    "resnet20": partial(ResNet, blocks=3),
    # Tiny variants keep the test suite fast (as timm's test_* models do).
    "test_cnn": partial(DCCNN, widths=(4, 8), hidden=16),
}

GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "dc_autoencoder": DCAutoencoder,
    "unet": UNet,
    "unet16": partial(UNet, width=16),
    "test_autoencoder": partial(DCAutoencoder, width=2),
    "test_unet": partial(UNet, width=4),
    # Class-conditional: the generator also sees the label (ClassConditional).
    "unet16_cond": partial(ClassConditional, partial(UNet, width=16)),
    "test_unet_cond": partial(ClassConditional, partial(UNet, width=4)),
}

#: Smallest square input each model accepts (all sizes above work).
MIN_IMAGE_SIZE: dict[str, int] = {
    "dc_cnn": 16, "dc_cnn_small": 16, "dc_cnn_large": 20, "mlp": 1, "resnet8": 8, "resnet20": 8,
    "test_cnn": 16, "dc_autoencoder": 16, "unet": 8, "unet16": 8, "test_autoencoder": 16, "test_unet": 8,
    "unet16_cond": 8, "test_unet_cond": 8,
}


def _check(kind: str, registry: dict[str, Callable[..., nn.Module]], name: str, key: str,
           in_channels: int, image_size: int) -> None:
    if name not in registry:
        raise ConfigError(f"{key}: unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
    if in_channels not in (1, 3):
        raise ConfigError(f"{key}: {name!r} takes 1 or 3 input channels, got {in_channels}")
    if image_size < MIN_IMAGE_SIZE[name]:
        raise ConfigError(
            f"{key}: {name!r} needs images of at least {MIN_IMAGE_SIZE[name]} pixels, got {image_size}; "
            "choose another model or larger images"
        )


def check_classifiers(names: tuple[str, ...], key: str) -> None:
    """Raise a ``ConfigError`` naming ``key`` unless ``names`` is a non-empty list of known classifiers."""
    if not names:
        raise ConfigError(f"{key}: expected at least one classifier name")
    for name in names:
        if name not in CLASSIFIERS:
            raise ConfigError(f"{key}: unknown classifier {name!r}; known: {', '.join(sorted(CLASSIFIERS))}")


def create_classifier(name: str, in_channels: int, image_size: int, num_classes: int,
                      key: str = "model") -> nn.Module:
    """Return a freshly initialised classifier ``name`` (parameters from torch's global RNG
    unless the caller wraps construction in ``torch.random.fork_rng``; see ``poison.train``)."""
    _check("classifier", CLASSIFIERS, name, key, in_channels, image_size)
    return CLASSIFIERS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes)


def create_generator(name: str, in_channels: int, image_size: int, key: str = "generator",
                     num_classes: int | None = None) -> nn.Module:
    """Return a freshly initialised perturbation generator ``name``.

    Class-conditional generators (``is_conditional``) also need ``num_classes`` (labels, for multi-label data).
    """
    _check("generator", GENERATORS, name, key, in_channels, image_size)
    if is_conditional(name):
        if num_classes is None:
            raise ConfigError(f"{key}: {name!r} is class-conditional and needs the number of classes")
        return GENERATORS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    return GENERATORS[name](in_channels=in_channels, image_size=image_size)


def is_conditional(name: str) -> bool:
    """Whether generator ``name`` takes the labels too, g(x, y)."""
    factory = GENERATORS[name]
    while isinstance(factory, partial):
        factory = factory.func
    return bool(getattr(factory, "conditional", False))
