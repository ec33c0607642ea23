"""Ordered top-k targeted attacks: adversarial distillation (AD) and the CW^k baseline.

Zhang, Wu, "Adversarial Distillation for Ordered Top-k Attacks", arXiv 1905.10695
(ALGORITHMS.md section 2). The attacker picks an ordered list T = (t_1, ..., t_k) of
classes (never the true label) and succeeds when the model's top-k predictions are T,
in that order.

AD turns T into a target distribution [code]: logits s_j = mean_i sim(t_i, j) for every
class j, then s_{t_i} = alpha - (i - 1) * beta, and P = softmax(s); it then solves

    min_delta  ||delta||_2^2 + c * KL(P || softmax(z(x + delta))),   x + delta in [0, 1]

with the shared Carlini-Wagner search (``poison.attacks.cw.cw_search``: tanh space, Adam,
per-sample binary search on c). CW^k, the paper's baseline, swaps only the loss:

    (1/k) sum_i max(0, max_{j not in {t_1..t_i}} z_j - min_{l <= i} z_{t_l} + kappa).

Adaptations:
- [adapt] The paper's ``sim`` is the cosine similarity of GloVe embeddings of ImageNet
  class names; digits have no such names, so ``class_similarity`` uses the cosine
  similarity of class-mean penultimate features of a clean-trained model. ``sim = 0``
  (``similarity: none``) is the paper's knowledge-free variant.
- [adapt] Search defaults (200 Adam steps, 6 values of c) fit our CPU budget; the paper
  and C&W use about 1000 steps and 9-10 binary-search steps.
- [adapt] Targets: ``ordered_targets`` draws random ordered lists as the paper does;
  ``shifted_targets`` is the deterministic label-specific map (k = 1: y -> y + 1) used
  by the poisoning stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from poison.attacks.cw import CWConfig, CWResult, cw_search
from poison.errors import ConfigError

__all__ = ["SIMILARITIES", "TopKConfig", "ordered_targets", "shifted_targets", "class_similarity",
           "target_distribution", "topk_success", "ad_loss", "cwk_loss", "ad_attack", "cwk_attack",
           "attack_metrics"]

#: Where the label similarity of AD comes from: a clean model's features, or none (sim = 0).
SIMILARITIES = ("data", "none")

Loss = Callable[[torch.Tensor], torch.Tensor]


def _check_order(alpha: float, beta: float, k: int) -> None:
    # Similarities lie in [-1, 1], so the last target's logit must exceed 1 for the
    # targets to stay above every other class, and beta > 0 keeps them strictly ordered.
    if not beta > 0:
        raise ConfigError(f"beta: expected > 0 (the targets' logits must strictly decrease), got {beta}")
    if not alpha - (k - 1) * beta > 1:
        raise ConfigError(f"alpha: expected alpha - (k - 1) * beta > 1 (the last target above every "
                          f"similarity), got alpha={alpha}, beta={beta}, k={k}; raise alpha or lower beta")


@dataclass(frozen=True)
class TopKConfig:
    """The attack's settings: the target distribution, then the C&W search.

    The search defaults are our CPU budget [adapt]; the paper runs about 1000 Adam steps
    per value of c and 9-10 binary-search steps.
    """

    k: int = 3                  # length of the ordered target list
    alpha: float = 10.0         # logit of t_1 in the target distribution
    beta: float = 0.3           # logit decrement from t_i to t_{i+1}
    similarity: str = "data"    # "data": class_similarity of a clean model; "none": sim = 0
    iterations: int = 200       # Adam steps per value of c (paper: ~1000)
    lr: float = 0.1             # Adam learning rate in tanh space (0.01 barely moves saturated pixels in 200 steps)
    binary_steps: int = 6       # values of c tried per sample (paper: 9-10)
    c_init: float = 10.0        # first c
    kappa: float = 0.0          # CW^k margin
    abort_early: bool = True    # stop a run when the objective stops improving

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k: expected an integer >= 1, got {self.k!r}")
        _check_order(self.alpha, self.beta, self.k)
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"similarity: expected one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        if not self.kappa >= 0:
            raise ConfigError(f"kappa: expected >= 0, got {self.kappa}")
        self.search()  # CWConfig validates the search keys, under the same names

    def search(self) -> CWConfig:
        """The C&W search settings."""
        return CWConfig(iterations=self.iterations, lr=self.lr, binary_steps=self.binary_steps,
                        c_init=self.c_init, abort_early=self.abort_early)


# ---------------------------------------------------------------------- targets
def _check_labels(labels: torch.Tensor, k: int, num_classes: int) -> None:
    if labels.dim() != 1:
        raise ValueError(f"labels: expected shape (N,), got {tuple(labels.shape)}")
    if k < 1 or k > num_classes - 1:
        raise ConfigError(f"k: expected 1 <= k <= num_classes - 1 = {num_classes - 1} "
                          f"(the true label is excluded), got {k}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: expected values in [0, {num_classes}), "
                         f"got [{int(labels.min())}, {int(labels.max())}]")


def ordered_targets(labels: torch.Tensor, k: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Random ordered target lists: k distinct classes per sample, never its label.

    Each row is uniform over the ordered k-subsets of the other classes (the first k of a
    random ranking in which the label's key is +inf). Reproducible from ``generator``.

    Shape:
        labels: (N,) int in [0, num_classes)
        returns: (N, k) long, on labels' device
    """
    _check_labels(labels, k, num_classes)
    n = labels.shape[0]
    keys = torch.rand(n, num_classes, generator=generator, dtype=torch.float64, device=generator.device)
    keys[torch.arange(n, device=keys.device), labels.to(keys.device)] = float("inf")
    return keys.argsort(dim=1)[:, :k].to(labels.device)


def shifted_targets(labels: torch.Tensor, k: int, num_classes: int, shift: int = 1) -> torch.Tensor:
    """Deterministic ordered targets t(y) = (y + shift, y + shift + 1, ...) mod C, skipping y.

    k = 1, shift = 1 is the label-specific map y -> y + 1 of DeepConfuse.

    Shape:
        labels: (N,) int in [0, num_classes)
        returns: (N, k) long, on labels' device
    """
    _check_labels(labels, k, num_classes)
    # t = y + offset (mod C) equals y exactly when offset = 0 (mod C): drop that offset
    offsets = [o for o in ((shift + m) % num_classes for m in range(num_classes)) if o != 0][:k]
    off = torch.tensor(offsets, dtype=torch.long, device=labels.device)
    return (labels.long().unsqueeze(1) + off) % num_classes


# ------------------------------------------------------------------- similarity
def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"model: expected a classifier ending with an nn.Linear (its input is the "
                          f"penultimate feature), got {type(model).__name__} without one")
    return linears[-1]


def class_similarity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                     batch_size: int = 500) -> torch.Tensor:
    """Cosine similarity (C, C) of the class-mean penultimate features of ``model`` [adapt].

    The features are the input of the model's last ``nn.Linear`` (registration order, which
    for the registry's classifiers is the output layer), caught by a forward pre-hook.
    No gradients; the model's mode is restored. Symmetric, in [-1, 1], ones on the diagonal.

    Shape:
        x: (N, C, H, W) float in [0, 1]; y: (N,) int in [0, num_classes)
        returns: (num_classes, num_classes) float32, on x's device
    """
    if y.shape != (x.shape[0],):
        raise ValueError(f"y: expected shape ({x.shape[0]},), got {tuple(y.shape)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size}")
    y = y.to(x.device).long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y: expected values in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    counts = torch.bincount(y, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ConfigError(f"y: classes {empty} have no samples; class_similarity needs at least one "
                          f"sample of each of the {num_classes} classes")
    caught: list[torch.Tensor] = []
    handle = _last_linear(model).register_forward_pre_hook(lambda _m, inputs: caught.append(inputs[0]))
    was_training = model.training
    model.eval()
    sums: torch.Tensor | None = None
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                caught.clear()
                model(x[start:start + batch_size])
                feats = caught[-1].flatten(1).double()
                if sums is None:
                    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, device=x.device)
                sums.index_add_(0, y[start:start + batch_size], feats)
    finally:
        handle.remove()
        model.train(was_training)
    assert sums is not None
    means = F.normalize(sums / counts.unsqueeze(1).double(), dim=1)
    sim = (means @ means.T).clamp(-1.0, 1.0)
    sim.fill_diagonal_(1.0)  # also for an all-zero class mean (dead features)
    return sim.float()


# ------------------------------------------------------------------ distribution
def target_distribution(targets: torch.Tensor, similarity: torch.Tensor | None, alpha: float = 10.0,
                        beta: float = 0.3, num_classes: int | None = None) -> torch.Tensor:
    """AD's target distribution P (N, C): t_1 > ... > t_k > every other class.

    Logits s_j = mean_i sim(t_i, j), then s_{t_i} = alpha - (i - 1) * beta; P = softmax(s).
    ``similarity=None`` is the knowledge-free variant (sim = 0: equal mass on non-targets);
    then ``num_classes`` is required (with a matrix it is optional and must agree).

    Shape:
        targets: (N, k) long, distinct per row; similarity: (C, C) in [-1, 1] or None
        returns: (N, C) float, rows summing to 1, on targets' device
    """
    if targets.dim() != 2:
        raise ValueError(f"targets: expected shape (N, k), got {tuple(targets.shape)}")
    k = targets.shape[1]
    _check_order(alpha, beta, k)
    if similarity is None:
        if num_classes is None:
            raise ConfigError("num_classes: required when similarity is None (the knowledge-free variant)")
        s = torch.zeros(targets.shape[0], num_classes, device=targets.device)
    else:
        c = similarity.shape[0]
        if similarity.shape != (c, c) or (num_classes is not None and c != num_classes):
            raise ValueError(f"similarity: expected shape ({num_classes or 'C'}, {num_classes or 'C'}), "
                             f"got {tuple(similarity.shape)}")
        if float(similarity.abs().max()) > 1 + 1e-6:
            raise ValueError(f"similarity: expected values in [-1, 1], got max |sim| {float(similarity.abs().max())}")
        s = similarity.float().to(targets.device)[targets].mean(dim=1)
    values = alpha - beta * torch.arange(k, dtype=s.dtype, device=s.device)
    s = s.scatter(1, targets, values.expand(targets.shape[0], k))
    return torch.softmax(s, dim=1)


# ------------------------------------------------------------- success and loss
def topk_success(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether each sample's top-k predictions are ``targets`` in order: (N,) bool.

    Shape:
        logits: (N, C); targets: (N, k) long
    """
    top = logits.topk(targets.shape[1], dim=1, sorted=True).indices
    return (top == targets.to(top.device)).all(dim=1)


def ad_loss(distribution: torch.Tensor) -> Loss:
    """The AD loss for ``cw_search``: logits (N, C) -> KL(P || softmax(logits)) per sample (N,).

    Never exactly 0 (P is not one-hot), so the search keeps pulling towards P; success
    is judged by ``topk_success``, as in the paper.
    """
    plogp = torch.special.xlogy(distribution, distribution).sum(dim=1)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        p = distribution.to(logits.device, logits.dtype)
        return plogp.to(logits.device, logits.dtype) - (p * F.log_softmax(logits, dim=1)).sum(dim=1)

    return loss


def cwk_loss(targets: torch.Tensor, kappa: float = 0.0) -> Loss:
    """The CW^k loss for ``cw_search``: logits (N, C) -> per sample (N,)

    (1/k) sum_i max(0, max_{j not in {t_1..t_i}} z_j - min_{l <= i} z_{t_l} + kappa),
    0 exactly when z_{t_1} >= ... >= z_{t_k} >= every other logit, each with margin kappa.
    """
    k = targets.shape[1]

    def loss(logits: torch.Tensor) -> torch.Tensor:
        t = targets.to(logits.device)
        # chosen[n, i, j]: class j is one of t_1..t_i of sample n
        chosen = F.one_hot(t, logits.shape[1]).cumsum(dim=1) > 0
        others = logits.unsqueeze(1).masked_fill(chosen, float("-inf")).amax(dim=2)   # (N, k)
        lowest = logits.gather(1, t).cummin(dim=1).values                             # (N, k)
        return (others - lowest + kappa).clamp(min=0).sum(dim=1) / k

    return loss


# ---------------------------------------------------------------------- attacks
def _check_targets(targets: torch.Tensor, x: torch.Tensor, k: int) -> None:
    if targets.shape != (x.shape[0], k):
        raise ValueError(f"targets: expected shape ({x.shape[0]}, {k}) (N, k), got {tuple(targets.shape)}")
    ordered = targets.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("targets: expected k distinct classes per sample, got repeats")


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(x[:1]).shape[1])
    finally:
        model.train(was_training)


def ad_attack(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, cfg: TopKConfig,
              similarity: torch.Tensor | None = None) -> CWResult:
    """Adversarial distillation towards the ordered targets (the model's parameters and mode kept).

    ``similarity`` (C, C) from ``class_similarity`` is required when ``cfg.similarity`` is
    "data" and refused when it is "none" (the knowledge-free variant).

    Shape:
        x: (N, C, H, W) float in [0, 1]; targets: (N, cfg.k) long, distinct per row
    """
    _check_targets(targets, x, cfg.k)
    if cfg.similarity == "data" and similarity is None:
        raise ConfigError("similarity: 'data' needs a similarity matrix; pass class_similarity(clean model, "
                          "images, labels, C) or set similarity: none")
    if cfg.similarity == "none" and similarity is not None:
        raise ConfigError("similarity: 'none' (knowledge-free) but a similarity matrix was passed; "
                          "drop it or set similarity: data")
    num_classes = _num_classes(model, x)
    if similarity is not None and tuple(similarity.shape) != (num_classes, num_classes):
        raise ConfigError(f"similarity: expected a ({num_classes}, {num_classes}) matrix for a model of "
                          f"{num_classes} classes, got {tuple(similarity.shape)}; compute it with "
                          "class_similarity(model, images, labels, num_classes) for this model")
    dist = target_distribution(targets.to(x.device), similarity, cfg.alpha, cfg.beta, num_classes=num_classes)
    return cw_search(model, x, ad_loss(dist), lambda z: topk_success(z, targets), cfg.search())


def cwk_attack(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, cfg: TopKConfig) -> CWResult:
    """The CW^k baseline towards the ordered targets (the model's parameters and mode kept).

    Shape:
        x: (N, C, H, W) float in [0, 1]; targets: (N, cfg.k) long, distinct per row
    """
    _check_targets(targets, x, cfg.k)
    return cw_search(model, x, cwk_loss(targets, cfg.kappa), lambda z: topk_success(z, targets), cfg.search())


def attack_metrics(result: CWResult) -> dict:
    """JSON-ready summary: success_rate (None if nothing was attacked), mean_l2 and mean_linf
    over successes (None if none), count (samples attacked) and successes."""
    ok = result.success.cpu()
    count, hits = int(ok.numel()), int(ok.sum())
    return {
        "success_rate": hits / count if count else None,
        "mean_l2": float(result.l2.cpu()[ok].double().mean()) if hits else None,
        "mean_linf": float(result.linf.cpu()[ok].double().mean()) if hits else None,
        "count": count,
        "successes": hits,
    }
