"""Downstream evaluation: train a classifier on a dataset, test it on the clean test split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from poison.train import TrainConfig, build_model, predict, train_classifier
from poison.utils import atomic_path, derive_seed, make_generator

__all__ = ["confusion_matrix", "classification_metrics", "multilabel_metrics", "fit_classifier", "train_and_test", "save_confusion_png", "summarise"]


def confusion_matrix(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return the (true, predicted) count matrix, shape (num_classes, num_classes)."""
    idx = true.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(pred: torch.Tensor, true: torch.Tensor, num_classes: int,
                           target_map: torch.Tensor | None = None) -> dict[str, Any]:
    """Return accuracy, per-class accuracy, the confusion matrix and (if given) the target-label rate."""
    cm = confusion_matrix(pred, true, num_classes)
    support = cm.sum(1)
    per_class = [None if int(n) == 0 else float(c) / int(n) for c, n in zip(cm.diag().tolist(), support.tolist())]
    out: dict[str, Any] = {
        "accuracy": float((pred == true).float().mean()),
        "per_class_accuracy": per_class,  # None for a class absent from the test split
        "confusion_matrix": cm.tolist(),
        "samples": int(true.numel()),
    }
    if target_map is not None:
        out["target_rate"] = float((pred == target_map[true]).float().mean())
    return out


def multilabel_metrics(pred: torch.Tensor, true: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, Any]:
    """Return exact-match accuracy, Hamming loss, per-label and macro F1 of multi-label predictions.

    ``target`` (N, L): a label-specific goal; adds ``target_rate``, the share of samples whose
    predicted label vector equals it exactly (chosen labels flipped, all others kept).

    Shape:
        pred, true, target: (N, L) in {0, 1} (pred = logits > 0)
    """
    p, t = pred.bool(), true.bool()
    tp = (p & t).sum(0).double()
    fp = (p & ~t).sum(0).double()
    fn = (~p & t).sum(0).double()
    denom = 2 * tp + fp + fn
    # F1 of a label never present nor predicted is undefined: None, left out of the macro mean
    f1 = [None if float(d) == 0 else float(2 * a / d) for a, d in zip(tp, denom)]
    defined = [v for v in f1 if v is not None]
    out: dict[str, Any] = {
        "exact_match": float((p == t).all(1).float().mean()),
        "hamming_loss": float((p != t).float().mean()),
        "per_label_f1": f1,
        "macro_f1": sum(defined) / len(defined) if defined else None,
        "samples": int(t.shape[0]),
    }
    if target is not None:
        out["target_rate"] = float((p == target.bool()).all(1).float().mean())
    return out


def fit_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    arch: str,
    recipe: TrainConfig,
    seed: int,
    num_classes: int,
    device: torch.device,
) -> torch.nn.Module:
    """Return classifier ``arch`` trained from scratch on the data (eval mode).

    ``seed`` drives the initialisation and batch order (derived streams, so evaluation
    seeds never coincide with those of generator training).
    """
    c, s = train_images.shape[1], train_images.shape[-1]
    model = build_model(arch, c, s, num_classes, derive_seed(seed, "downstream-init", arch), device, key="evaluate.archs")
    order = make_generator(seed, "downstream-order", arch)
    return train_classifier(model, train_images, train_labels, recipe, order)


def train_and_test(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    arch: str,
    recipe: TrainConfig,
    seed: int,
    num_classes: int,
    device: torch.device,
    target_map: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Return the test metrics of classifier ``arch`` trained from scratch on the training data."""
    model = fit_classifier(train_images, train_labels, arch=arch, recipe=recipe, seed=seed,
                           num_classes=num_classes, device=device)
    pred = predict(model, test_images).argmax(1)
    return classification_metrics(pred, test_labels, num_classes, target_map)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return mean / min / max of accuracy (and target rate) over seeds."""
    accs = torch.tensor([r["accuracy"] for r in runs], dtype=torch.float64)
    out = {"accuracy_mean": float(accs.mean()), "accuracy_min": float(accs.min()), "accuracy_max": float(accs.max())}
    if runs and "target_rate" in runs[0]:
        rates = torch.tensor([r["target_rate"] for r in runs], dtype=torch.float64)
        out.update(target_rate_mean=float(rates.mean()), target_rate_min=float(rates.min()),
                   target_rate_max=float(rates.max()))
    return out


def save_confusion_png(cm: list[list[int]], classes: list[str], path: str | os.PathLike[str], title: str) -> None:
    """Write a confusion-matrix heat map (rows: true, columns: predicted) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(cm, dtype=torch.float64)
    frac = (m / m.sum(1, keepdim=True).clamp_min(1)).numpy()
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=100)
    im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
