"""Semantically augmented datasets from the semantic image attack (SIA, ``poison.attacks.semantic``).

Two products, both stored as shards of kind ``semantic`` (one dataset, two splits):

- ``adversarial``: an SIA adversarial example of every clean training image against a
  ``victim`` trained on the clean training split, labelled with its true label, for
  adversarial training and robustness tests;
- ``longtail``: a long-tailed subset of the training split (class c keeps
  max(1, round(n_max * ratio ** (-c / (C - 1)))) images: class 0 the head, the last class
  the tail; which images, a seeded choice), then SIA variants of each tail class's images,
  label kept, until every class has ``share * n_max``; the attacked model is one trained on
  the long-tailed subset.

Every sample's json records the attribute values and the image-space budget used.
``augment(params)`` is the pipeline stage that writes both (``poison.stages.STAGES``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from poison.attacks.semantic import SIAConfig, diagnose, sia
from poison.errors import ConfigError
from poison.shards import SplitSamples, load_split, manifest_sha256, read_manifest, sample_key, write_dataset
from poison.train import TrainConfig, build_model, predict, to_float, train_classifier
from poison.utils import atomic_write_json, derive_seed, make_generator, resolve_device, torch_threads
from poison.variants import report_dir

if TYPE_CHECKING:
    from poison.config import Params

__all__ = ["AugmentConfig", "TailConfig", "augment", "long_tail_indices", "attack_dataset", "tail_plan", "train_victim",
           "diagnosis_png", "success_rates"]


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

    Success is judged on the image as stored (uint8), like every poison in this project;
    ``already`` marks images that succeed before the attack (the victim already misclassifies
    them, or already predicts the target); ``success_rates`` reports them apart.
    """
    images, attrs, linf, success, steps, already = [], [], [], [], [], []
    for i in range(0, x.shape[0], cfg.batch_size):
        xb = to_float(x[i : i + cfg.batch_size]).to(device)
        yb = y[i : i + cfg.batch_size].to(device)
        tb = (yb + cfg.target_shift) % num_classes if cfg.targeted else None
        already.append(_stored_success(model, xb, yb, tb)[1])
        r = sia(model, xb, yb, cfg.attack, generator, targets=tb)
        stored, ok = _stored_success(model, r.images, yb, tb)
        images.append(stored)
        attrs.append(r.attributes.cpu())
        linf.append(r.delta.abs().flatten(1).amax(1).cpu())
        success.append(ok)
        steps.append(r.steps.cpu())
    if not images:
        k = len(cfg.attack.attributes)
        return {"images": x[:0].clone(), "attributes": torch.zeros(0, k), "image_linf": torch.zeros(0),
                "success": torch.zeros(0, dtype=torch.bool), "steps": torch.zeros(0, dtype=torch.long),
                "already": torch.zeros(0, dtype=torch.bool)}
    return {"images": torch.cat(images), "attributes": torch.cat(attrs), "image_linf": torch.cat(linf),
            "success": torch.cat(success), "steps": torch.cat(steps), "already": torch.cat(already)}


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


def _stored_success(model: nn.Module, images: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the images as stored (uint8, CPU), whether each succeeds as stored: misclassified / the target)."""
    stored = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    with torch.no_grad():
        pred = model(to_float(stored).to(images.device)).argmax(1).cpu()
    return stored, (pred != y.cpu() if targets is None else pred == targets.cpu())


def _rate(flags: torch.Tensor) -> float | None:
    """The share of true flags; None for none."""
    return float(flags.float().mean()) if flags.numel() else None


def success_rates(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], targeted: bool
                  ) -> dict[str, float | None]:
    """The summary's attack rates from ``attack_dataset`` results on the training and test splits.

    Success rates are over every image, as attacked and stored; ``already_successful_test`` is
    the share of test images that succeeded before the attack (untargeted: the victim's clean
    errors), and ``adversarial_success_rate_test_attacked`` the success rate on the others
    (the attack's own doing). None where there is no image to count.
    """
    return {
        "adversarial_success_rate_train": _rate(train["success"]),
        "adversarial_success_rate_test": _rate(test["success"]),
        "already_successful_test": _rate(test["already"]),
        "adversarial_success_rate_test_attacked": _rate(test["success"][~test["already"]]),
        "victim_accuracy_under_sia_test": None if targeted else _rate(~test["success"]),
    }


def single_attribute_rates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig,
                           num_classes: int, seed: int, device: torch.device) -> dict[str, float]:
    """Success rate of SIA restricted to each attribute alone, without image-space perturbation.

    Judged on the images as stored (uint8), like ``attack_dataset``'s successes.
    """
    rates = {}
    for name in cfg.attack.attributes:
        gen = make_generator(seed, "augment-single", name)
        ok = 0
        for i in range(0, x.shape[0], cfg.batch_size):
            xb = to_float(x[i : i + cfg.batch_size]).to(device)
            yb = y[i : i + cfg.batch_size].to(device)
            tb = (yb + cfg.target_shift) % num_classes if cfg.targeted else None
            r = sia(model, xb, yb, cfg.attack, gen, targets=tb, only=name)
            ok += int(_stored_success(model, r.images, yb, tb)[1].sum())
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


# ------------------------------------------------------------------------ the stage
def _augment_adversarial(params: Params, cfg: Any, x: torch.Tensor, y: torch.Tensor, x_te: torch.Tensor,
                         y_te: torch.Tensor, k: int, recipe: Any, device: torch.device) -> tuple[Any, ...]:
    """(a) of the augment stage: SIA examples of the training split against a clean-trained victim,
    the single-attribute diagnosis and the test-split attack: (adv, single-attribute rates, diagnosis,
    test_adv, the victim's clean test accuracy)."""
    with torch_threads(cfg.threads):
        victim = train_victim(x, y, cfg.victim, recipe, params.seed, k, device, "augment-victim")
        adv = attack_dataset(victim, x, y, cfg, k, make_generator(params.seed, "augment-sia"), device)
        # single-attribute rates on a seeded random subset (the split is ordered by class)
        sub = torch.randperm(x.shape[0], generator=make_generator(params.seed, "augment-diagnosis"))
        sub = torch.sort(sub[: min(cfg.diagnosis_samples, x.shape[0])]).values
        single = single_attribute_rates(victim, x[sub], y[sub], cfg, k, params.seed, device)
        diag = diagnosis(adv, y, cfg, k, single) | {"single_attribute_samples": int(sub.numel())}
        test_adv = attack_dataset(victim, x_te, y_te, cfg, k, make_generator(params.seed, "augment-sia-test"), device)
        clean_acc = float((predict(victim, x_te).argmax(1) == y_te).float().mean())
    return adv, single, diag, test_adv, clean_acc


def augment(params: Params) -> dict[str, Any]:
    """SIA-augmented shards (kind ``semantic``): adversarial training examples and a filled long tail.

    Also writes the attack's diagnosis (attribute histogram JSON and PNG) and a summary.
    """
    from poison.config import to_dict  # poison.config imports this module

    cfg = params.augment
    clean = read_manifest(params.paths.clean)
    classes = clean["classes"]
    k = len(classes)
    if cfg.targeted and cfg.target_shift % k == 0:
        # the target would be the true label: "success" would mean the victim is right
        raise ConfigError(f"augment.target_shift: must not be a multiple of {k} (the number of classes) with "
                          f"targeted: true, got {cfg.target_shift}; every class needs another target class")
    cfg.attack.check_channels(clean["image"]["channels"], "augment.attack.attributes")
    x, y, meta = load_split(params.paths.clean, "train")
    x_te, y_te, _ = load_split(params.paths.clean, "test")
    clean_sha = manifest_sha256(params.paths.clean)
    recipe = params.evaluate.recipe
    device = resolve_device(params.device)

    def long_tail() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        # (b) a long-tailed training split, its tail filled with SIA variants against a model trained on it
        with torch_threads(cfg.threads):
            lt = long_tail_indices(y, k, cfg.tail.imbalance_ratio, make_generator(params.seed, "augment-longtail"))
            lt_model = train_victim(x[lt], y[lt], cfg.victim, recipe, params.seed, k, device, "augment-longtail-model")
            src = lt[torch.tensor(tail_plan(y[lt], k, cfg.tail.share), dtype=torch.long)]
            return lt, src, attack_dataset(lt_model, x[src], y[src], cfg, k,
                                           make_generator(params.seed, "augment-tail"), device)

    # (b) shares nothing with (a) but the inputs (own seeds, own models, fixed torch threads),
    # so it runs beside it on a second worker with the same bytes as one after the other
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="augment-longtail") \
        if params.orchestration.workers > 1 else None
    tail_job = pool.submit(long_tail) if pool is not None else None
    try:
        adv, single, diag, test_adv, clean_acc = _augment_adversarial(params, cfg, x, y, x_te, y_te, k, recipe, device)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    lt, src, tail = tail_job.result() if tail_job is not None else long_tail()

    names = cfg.attack.attributes

    def record(i: int, split: str, r: dict[str, torch.Tensor] | None, j: int, source_key: str) -> dict[str, Any]:
        rec = {"kind": "semantic", "split": split, "source": clean["dataset"], "source_index": meta[i]["source_index"],
               "source_key": source_key, "label": int(y[i]), "true_label": int(y[i]), "augmented": r is not None}
        if r is not None:
            rec.update(method="sia", attributes={n: float(v) for n, v in zip(names, r["attributes"][j].tolist())},
                       image_linf=float(r["image_linf"][j]), eps=cfg.attack.eps, success=bool(r["success"][j]),
                       steps=int(r["steps"][j]),
                       target_label=int((y[i] + cfg.target_shift) % k) if cfg.targeted else None)
        return rec

    adv_meta = [record(i, "adversarial", adv, i, sample_key("train", i)) for i in range(x.shape[0])]
    lt_list, src_list = lt.tolist(), src.tolist()
    tail_meta = ([record(i, "longtail", None, 0, sample_key("train", i)) for i in lt_list]
                 + [record(i, "longtail", tail, j, sample_key("train", i)) for j, i in enumerate(src_list)])
    tail_images = torch.cat([x[lt], tail["images"]])
    tail_labels = torch.cat([y[lt], y[src]])
    name = Path(params.paths.augmented).name
    manifest = write_dataset(
        params.paths.augmented,
        {"adversarial": SplitSamples(adv["images"], y, adv_meta), "longtail": SplitSamples(tail_images, tail_labels, tail_meta)},
        # the victim's training recipe decides the bytes as much as the augment section does
        dataset=name, kind="semantic", classes=classes, seed=params.seed, method="sia",
        config=to_dict(cfg) | {"victim_recipe": to_dict(recipe)},
        budget={"norm": "linf", "eps": cfg.attack.eps, "attributes": dict(zip(names, cfg.attack.half_ranges())),
                "max_image_linf_used": float(adv["image_linf"].max()) if adv["image_linf"].numel() else 0.0},
        source={"dataset": clean["dataset"], "path": params.paths.clean, "manifest_sha256": clean_sha},
        shard_size=cfg.shard_size,
    )
    reports = report_dir(params, "augment")
    lt_counts = torch.bincount(y[lt], minlength=k).tolist()
    summary = {
        "victim": cfg.victim, "device": str(device), "victim_clean_test_accuracy": clean_acc,
        **success_rates(adv, test_adv, cfg.targeted),
        "single_attribute_success_rate": single,
        "longtail": {"imbalance_ratio": cfg.tail.imbalance_ratio, "class_counts": lt_counts,
                     "variants": len(src_list), "variant_success_rate": _rate(tail["success"])},
        "samples": {s: v["samples"] for s, v in manifest["splits"].items()},
    }
    atomic_write_json(reports / "summary.json", summary)
    atomic_write_json(reports / "diagnosis.json", diag)
    diagnosis_png(diag, classes, reports / "diagnosis.png",
                  f"SIA against {cfg.victim} (clean-trained): {diag['successes']}/{diag['samples']} successes")
    return {"path": params.paths.augmented, "samples": summary["samples"],
            "success_rate_test": summary["adversarial_success_rate_test"], "victim_clean_test_accuracy": clean_acc}
