"""Applying a perturbation generator: the poison x' = clip(x + eps * g(x), 0, 1) as it is stored.

Shared by training (``poison.attacks.deepconfuse`` trains through ``perturb``, whose uint8
rounding has a straight-through gradient) and by every stage that materialises a poison
(``poison_images``: uint8 within ``eps`` of the clean image, exactly what the shards hold).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from poison.errors import ConfigError
from poison.train import to_float

__all__ = ["budget_levels", "perturb", "quantize_poison", "poison_images"]


def budget_levels(eps: float) -> int:
    """Return the largest per-pixel change in uint8 levels that stays within ``eps``."""
    return int(math.floor(eps * 255 + 1e-9))


def perturb(generator: nn.Module, x: torch.Tensor, eps: float, quantize: bool = False,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """Return the poison clip(x + eps * g(x), 0, 1), optionally uint8-quantized.

    With ``quantize`` the rounding to 1/255 steps is done with a straight-through
    gradient, so a generator trained this way optimises the poison as it will be stored.
    A class-conditional generator (``ClassConditional``) is g(x, labels) and needs ``labels``.

    Shape:
        x: (N, C, H, W) float in [0, 1] (with ``quantize``: on the 1/255 grid of uint8 images)
        labels: (N,) int64 or (N, L) multi-hot, for a class-conditional generator
        returns: (N, C, H, W) float in [0, 1]
    """
    x_p = torch.clamp(x + eps * _direction(generator, x, labels), 0.0, 1.0)
    if quantize:
        # Exactly what quantize_poison stores (x is on the 1/255 grid of the uint8 source).
        m = budget_levels(eps) / 255.0
        stored = torch.minimum(torch.maximum(torch.round(x_p * 255.0) / 255.0, x - m), x + m).clamp(0.0, 1.0)
        x_p = x_p + (stored - x_p).detach()
    return x_p


def _direction(generator: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Return g(x), or g(x, labels) for a class-conditional generator."""
    if not getattr(generator, "conditional", False):
        return generator(x)
    if labels is None:
        raise ConfigError("labels: this generator is class-conditional (g(x, y)); pass the images' labels")
    return generator(x, labels.to(x.device))


@torch.no_grad()
def quantize_poison(clean: torch.Tensor, poisoned: torch.Tensor, eps: float) -> torch.Tensor:
    """Return the poison as stored: uint8, and within ``eps`` of ``clean`` after rounding.

    Shape:
        clean: (N, C, H, W) uint8
        poisoned: (N, C, H, W) float in [0, 1]
        returns: (N, C, H, W) uint8 with |returns - clean| <= floor(eps * 255)
    """
    m = budget_levels(eps)
    c = clean.to(torch.int16)
    q = torch.round(poisoned.float() * 255.0).to(torch.int16)
    q = torch.maximum(torch.minimum(q, c + m), c - m).clamp_(0, 255)
    return q.to(torch.uint8)


@torch.no_grad()
def poison_images(generator: nn.Module, images: torch.Tensor, eps: float,
                  device: torch.device | str = "cpu", batch_size: int = 500,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """Return the stored (uint8) poison of uint8 ``images`` under ``generator`` in eval mode.

    Shape:
        images: (N, C, H, W) uint8
        labels: (N,) or (N, L), the images' labels (a class-conditional generator needs them)
        returns: (N, C, H, W) uint8, |returns - images| <= floor(eps * 255)
    """
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise ConfigError(f"labels: {labels.shape[0]} labels for {images.shape[0]} images; pass one per image")
    was_training = generator.training
    generator.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        clean = images[i : i + batch_size]
        x = to_float(clean).to(device)
        y = None if labels is None else labels[i : i + batch_size]
        out.append(quantize_poison(clean, perturb(generator, x, eps, labels=y).cpu(), eps))
    generator.train(was_training)
    return torch.cat(out) if out else images.clone()
