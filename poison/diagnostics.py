"""Diagnostics of a poison: does it work as a shortcut, and how separable is it?

- Noise-only accuracy (Feng et al., "Learning to Confuse", arXiv 1905.09027, Table 2):
  a model trained on the poison is fed the perturbation alone; high accuracy means it
  learned the perturbation, not the digits.
- Linear separability of the perturbations (Liu et al., "Adversarial Attacks and
  Defenses: An Interpretation Perspective", arXiv 2004.11488; the shortcut test of
  availability poisons): a linear or one-hidden-layer probe trained on the perturbations
  alone, with clean images and i.i.d. noise of the same budget as controls.

Shape conventions: images (N, C, H, W); perturbations float in [-eps, eps].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from poison.attacks.perturbation import budget_levels
from poison.train import predict
from poison.utils import GLOBAL_RNG_LOCK

__all__ = ["perturbations", "noise_only_accuracy", "uniform_noise", "probe_accuracy"]


def perturbations(clean: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
    """Return the stored perturbation (poisoned - clean) / 255 as float32.

    Shape:
        clean, poisoned: (N, C, H, W) uint8
        returns: (N, C, H, W) float32 in [-1, 1]
    """
    if clean.shape != poisoned.shape:
        raise ValueError(f"poisoned: expected the shape of clean {tuple(clean.shape)}, got {tuple(poisoned.shape)}; "
                         "pass the poison of exactly these clean images, in the same order")
    return (poisoned.float() - clean.float()) / 255.0


def noise_only_accuracy(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the accuracy of ``model`` on the perturbations alone, against the true labels.

    Shape:
        noise: (N, C, H, W) float in [-eps, eps]; labels: (N,) int64
    """
    pred = predict(model, noise).argmax(1)
    return float((pred == labels.to(pred.device)).float().mean())


def uniform_noise(shape: tuple[int, ...], eps: float, generator: torch.Generator) -> torch.Tensor:
    """Return i.i.d. noise uniform on the uint8 levels within ``eps`` (the probe's control)."""
    levels = budget_levels(eps)
    return torch.randint(-levels, levels + 1, shape, generator=generator).float() / 255.0


def probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int,
    hidden: int = 0,
    steps: int = 300,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Return train and test accuracy of a probe fitted to (train_x, train_y).

    ``hidden == 0``: a linear (multinomial logistic) probe; otherwise one ReLU hidden
    layer of that width. Features are standardised with the training statistics;
    full-batch Adam for ``steps`` steps, initialised from ``seed`` (global RNG untouched).

    Shape:
        train_x: (N, ...) float; test_x: (M, ...) float; train_y: (N,), test_y: (M,) int64
    """
    if steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps}")
    a, b = train_x.flatten(1).double(), test_x.flatten(1).double()
    mean, std = a.mean(0), a.std(0).clamp_min(1e-6)
    a, b = ((a - mean) / std).float(), ((b - mean) / std).float()
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        if hidden:
            probe: nn.Module = nn.Sequential(nn.Linear(a.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            probe = nn.Linear(a.shape[1], num_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(probe(a), train_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_acc = float((probe(a).argmax(1) == train_y).float().mean())
        test_acc = float((probe(b).argmax(1) == test_y).float().mean())
    return {"train_accuracy": train_acc, "test_accuracy": test_acc}
