"""Semantically augmented datasets from the semantic image attack (SIA, ``poison.attacks.semantic``).

Two products, both stored as shards of kind ``semantic`` (one dataset, two splits):

- ``adversarial``: an SIA adversarial example of every clean training image against a
  ``victim`` trained on the clean training split, labelled with its true label, for
  adversarial training and robustness tests;
- ``longtail``: a long-tailed subset of the training split (class c keeps
  n_max * ratio ** (-r_c / (C - 1)) images, r_c the class's rank in a seeded order), then
  SIA variants of each tail class's images, label kept, until every class has
  ``share * n_max``; the attacked model is one trained on the long-tailed subset.

Every sample's json records the attribute values and the image-space budget used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from poison.attacks.semantic import SIAConfig, diagnose, sia
from poison.errors import ConfigError
from poison.train import TrainConfig, build_model, to_float, train_classifier
from poison.utils import derive_seed, make_generator

__all__ = ["AugmentConfig", "TailConfig", "long_tail_indices", "attack_dataset", "tail_plan", "train_victim",
           "diagnosis_png"]


@dataclass(frozen=True)
class TailConfig:
    """``augment.tail``: the long-tailed split and how far its tail is filled."""

    imbalance_ratio: float = 100.0  # n_max / n_min of the long-tailed split
    share: float = 1.0              # fill each class up to share * n_max with SIA variants

    def __post_init__(self) -> None:
        if not self.imbalance_ratio >= 1:
            raise ConfigError(f"imbalance_ratio: expected >= 1, got {self.imbalance_ratio}")
        if not 0 < self.share <= 1:
            raise ConfigError(f"share: expected 0 < share <= 1, got {self.share}")


@dataclass(frozen=True)
class AugmentConfig:
    """The ``augment`` section of params.yaml."""

    victim: str = "dc_cnn"          # the model attacked, trained from scratch with evaluate.recipe
    attack: SIAConfig = field(default_factory=SIAConfig)
    targeted: bool = False          # true: aim at (y + target_shift) mod C
    target_shift: int = 1
    tail: TailConfig = field(default_factory=TailConfig)
    diagnosis_samples: int = 1000   # training images (a seeded random subset) for single-attribute rates
    batch_size: int = 500
    shard_size: int = 1000
    threads: int | None = 1         # torch CPU threads: part of the bytes, as poison.threads

    def __post_init__(self) -> None:
        from poison.models import check_classifiers

        check_classifiers((self.victim,), "victim")
        for key in ("batch_size", "shard_size", "diagnosis_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: expected null (torch's default) or an integer >= 1, got {self.threads}")


def long_tail_indices(labels: torch.Tensor, num_classes: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of a long-tailed subset: class c keeps max(1, round(n_max * ratio ** (-c / (C - 1)))).

    The usual exponential profile (class 0 the head, the last class the tail; n_max = the
    smallest class size, so every class has enough); the images kept are a seeded choice.
    """
    n_max = min(int((labels == k).sum()) for k in range(num_classes))
    if n_max == 0:
        raise ConfigError("augment.tail: every class needs training images for a long-tailed split")
    keep = []
    for k in range(num_classes):
        n = max(1, round(n_max * ratio ** (-k / max(num_classes - 1, 1))))
        members = torch.nonzero(labels == k).flatten()
        keep.append(members[torch.randperm(members.numel(), generator=generator)[:n]])
    return torch.sort(torch.cat(keep)).values


def train_victim(x: torch.Tensor, y: torch.Tensor, arch: str, recipe: TrainConfig, seed: int, num_classes: int,
                 device: torch.device, purpose: str) -> nn.Module:
    """A classifier trained from scratch on (x, y) with its own seed streams (``purpose``)."""
    model = build_model(arch, x.shape[1], x.shape[-1], num_classes, derive_seed(seed, purpose, "init"), device,
                        key="augment.victim")
    return train_classifier(model, x, y, recipe, make_generator(seed, purpose, "order"))


def attack_dataset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, num_classes: int,
                   generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """SIA on every image of uint8 ``x`` in batches; returns the stored (uint8) images and the records.

    Success is judged on the image as stored (uint8), like every poison in this project.
    """
    images, attrs, linf, success, steps = [], [], [], [], []
    for i in range(0, x.shape[0], cfg.batch_size):
        xb = to_float(x[i : i + cfg.batch_size]).to(device)
        yb = y[i : i + cfg.batch_size].to(device)
        tb = (yb + cfg.target_shift) % num_classes if cfg.targeted else None
        r = sia(model, xb, yb, cfg.attack, generator, targets=tb)
        stored = (r.images * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        with torch.no_grad():
            pred = model(to_float(stored).to(device)).argmax(1).cpu()
        images.append(stored)
        attrs.append(r.attributes.cpu())
        linf.append(r.delta.abs().flatten(1).amax(1).cpu())
        success.append(pred != yb.cpu() if tb is None else pred == tb.cpu())
        steps.append(r.steps.cpu())
    if not images:
        k = len(cfg.attack.attributes)
        return {"images": x[:0].clone(), "attributes": torch.zeros(0, k), "image_linf": torch.zeros(0),
                "success": torch.zeros(0, dtype=torch.bool), "steps": torch.zeros(0, dtype=torch.long)}
    return {"images": torch.cat(images), "attributes": torch.cat(attrs), "image_linf": torch.cat(linf),
            "success": torch.cat(success), "steps": torch.cat(steps)}


def tail_plan(labels: torch.Tensor, num_classes: int, share: float) -> list[int]:
    """Positions (into ``labels``) of the source image of each variant to make, class by class.

    Class c with n_c images gets max(0, ceil(share * n_max) - n_c) variants, cycling over
    its images in order.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    goal = int(torch.ceil(torch.tensor(share * float(counts.max()))))
    plan: list[int] = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten().tolist()
        if members:
            plan += [members[j % len(members)] for j in range(max(0, goal - len(members)))]
    return plan


def single_attribute_rates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig,
                           num_classes: int, seed: int, device: torch.device) -> dict[str, float]:
    """Success rate of SIA restricted to each attribute alone, without image-space perturbation."""
    rates = {}
    for name in cfg.attack.attributes:
        gen = make_generator(seed, "augment-single", name)
        ok = 0
        for i in range(0, x.shape[0], cfg.batch_size):
            xb = to_float(x[i : i + cfg.batch_size]).to(device)
            yb = y[i : i + cfg.batch_size].to(device)
            tb = (yb + cfg.target_shift) % num_classes if cfg.targeted else None
            ok += int(sia(model, xb, yb, cfg.attack, gen, targets=tb, only=name).success.sum())
        rates[name] = ok / max(x.shape[0], 1)
    return rates


def diagnosis(result: dict[str, torch.Tensor], labels: torch.Tensor, cfg: AugmentConfig, num_classes: int,
              single: dict[str, float]) -> dict[str, Any]:
    from poison.attacks.semantic import SIAResult

    r = SIAResult(images=torch.zeros(0), attributes=result["attributes"], delta=torch.zeros(0),
                  success=result["success"], steps=result["steps"], names=cfg.attack.attributes)
    return diagnose(r, labels, cfg.attack, num_classes, single)


def diagnosis_png(diag: dict[str, Any], classes: list[str], path: Any, title: str) -> None:
    """The attribute histogram: dominant-attribute counts, single-attribute success, usage per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from poison.utils import atomic_path

    names = diag["attributes"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    axes[0].bar(range(len(names)), [diag["dominant_counts"][k] for k in names], color="tab:red")
    axes[0].set_title(f"dominant attribute of {diag['successes']} successes", fontsize=9)
    axes[1].bar(range(len(names)), [diag["single_attribute_success_rate"].get(k, 0.0) for k in names], color="tab:blue")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("success rate, that attribute alone", fontsize=9)
    for ax in axes[:2]:
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    grid = np.array([[np.nan] * len(names) if row is None else [row[k] for k in names]
                     for row in diag["mean_usage_per_class"]])
    im = axes[2].imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
    axes[2].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axes[2].set_yticks(range(len(classes)), classes, fontsize=8)
    axes[2].set_title("mean usage |a - id| / half-range, per true class", fontsize=9)
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
