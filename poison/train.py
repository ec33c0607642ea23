"""Classifier training loop shared by the surrogate victims and downstream evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from poison.errors import ConfigError
from poison.models import create_classifier
from poison.utils import GLOBAL_RNG_LOCK

__all__ = ["TrainConfig", "build_model", "train_classifier", "predict", "to_float"]


@dataclass(frozen=True)
class TrainConfig:
    """How a classifier is trained (a recipe): mirrors ``evaluate.recipe`` in params.yaml."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.lr <= 10:
            raise ConfigError(f"lr: expected 0 < lr <= 10, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: expected 0 <= momentum < 1, got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: expected >= 0, got {self.weight_decay}")
        if self.epochs < 1:
            raise ConfigError(f"epochs: expected >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {self.batch_size}")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Return images as float32 in [0, 1] (uint8 inputs are divided by 255)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def build_model(arch: str, in_channels: int, image_size: int, num_classes: int, seed: int,
                device: torch.device, key: str = "arch") -> nn.Module:
    """Return classifier ``arch`` initialised from ``seed`` (global RNG state is restored)."""
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        # CPU generator only: torch.manual_seed would also reseed (and not restore) CUDA's.
        torch.random.default_generator.manual_seed(seed)
        model = create_classifier(arch, in_channels, image_size, num_classes, key=key)
    return model.to(device)


def _optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
    class_weights: torch.Tensor | None = None,
    adversary: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Return ``model`` trained in place with cross-entropy on (images, labels).

    Multi-hot ``labels`` (N, L) train a multi-label model instead: binary cross-entropy on
    its sigmoid outputs (``F.binary_cross_entropy_with_logits``), label l predicted iff z_l > 0.
    ``class_weights`` (C,): weighted cross-entropy (class-balanced reweighting).
    ``adversary(model, x, y) -> x_adv``: adversarial training, loss 0.5 CE(x) + 0.5 CE(x_adv)
    (the adversary gets the model in eval mode and must leave its parameters alone).

    Shape:
        images: (N, C, H, W), uint8 or float in [0, 1]
        labels: (N,) int64, or (N, L) in {0, 1} (multi-label)
    """
    device = next(model.parameters()).device
    x_all = to_float(images)
    multi = labels.ndim == 2
    if multi and (class_weights is not None or adversary is not None):
        raise ConfigError("class_weights / adversary: only for single-label training (labels (N,)), "
                          f"got multi-hot labels of shape {tuple(labels.shape)}")
    y_all = labels.float() if multi else labels.long()
    loss_fn = F.binary_cross_entropy_with_logits if multi else F.cross_entropy
    weight = None if class_weights is None else class_weights.to(device, torch.float32)
    opt = _optimizer(model.parameters(), cfg)
    model.train()
    n = x_all.shape[0]
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if idx.numel() < 2:  # BatchNorm cannot train on a single sample
                continue
            x = x_all[idx].to(device, non_blocking=True)
            y = y_all[idx].to(device, non_blocking=True)
            if multi:
                loss = loss_fn(model(x), y)
            elif adversary is None:
                loss = F.cross_entropy(model(x), y, weight=weight)
            else:
                x_adv = adversary(model, x, y).detach()
                model.train()
                loss = 0.5 * F.cross_entropy(model(x), y, weight=weight) + 0.5 * F.cross_entropy(model(x_adv), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Return the model's logits for ``images`` (eval mode), on the CPU.

    Shape:
        images: (N, C, H, W) uint8 or float in [0, 1]
        returns: (N, num_classes) float32
    """
    device = next(model.parameters()).device
    model.eval()
    outs = [model(to_float(images[i : i + batch_size]).to(device)).float().cpu()
            for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs)
