"""The generator's goals for DeepConfuse: what the poison should do, and the outer objectives.

``Target`` turns a ``DeepConfuseConfig`` into the generator's loss on the unrolled victim's
clean logits and the score a validation victim is judged by (untargeted, label-specific,
ordered top-k, multi-label). ``unroll_objective`` (the authors' one-step unrolled loss)
and ``align_objective`` (gradient alignment) are the outer objectives
``DeepConfuseConfig.objective`` names; ``victim_loss`` is the surrogate victim's training
loss. The training loop that uses them is ``poison.attacks.deepconfuse``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from poison.errors import ConfigError

if TYPE_CHECKING:
    from poison.attacks.deepconfuse_config import DeepConfuseConfig

__all__ = ["Target", "victim_loss", "unroll_objective", "align_objective", "OBJECTIVES", "GeneratorLoss"]


@dataclass(frozen=True)
class Target:
    """What the poison should make a trained model do, and the generator loss that says so.

    ``target_map is None``: untargeted, scored by clean accuracy (lower is stronger).
    Otherwise label-specific: a model trained on the poison should predict
    ``target_map[y]``, scored by that target rate. ``push_map`` is the label map the
    generator's loss pushes the unrolled victim towards (label-specific: the target map;
    untargeted ``derangement``: a fixed wrong class per class), None for the losses that
    only push away from the true label (``ce``: the authors' -CE; ``log_not_true``).
    """

    target_map: torch.Tensor | None = None
    push_map: torch.Tensor | None = None
    untargeted_loss: str = "ce"
    topk_lists: torch.Tensor | None = None  # ordered_topk: (C, k) the list of each true class
    topk_dist: torch.Tensor | None = None   # ordered_topk: (C, C) its AD distribution (``with_distribution``)
    flip: torch.Tensor | None = None        # multi-label, label-specific: (L,) 1 on the labels flipped
    multi_label: bool = False

    @classmethod
    def from_config(cls, cfg: DeepConfuseConfig, num_classes: int, multi_label: bool = False) -> "Target":
        """Return the target of ``cfg`` for ``num_classes`` classes (labels, for multi-label data)."""
        if multi_label:
            if cfg.target == "ordered_topk":
                raise ConfigError("target: ordered_topk needs single-label data; use untargeted or label_specific "
                                  "(with flip_labels) on multi-label data")
            if cfg.target == "label_specific":
                if cfg.flip_labels is None or max(cfg.flip_labels) >= num_classes:
                    raise ConfigError(f"flip_labels: multi-label label_specific needs the labels to flip, indices in "
                                      f"[0, {num_classes - 1}], got {cfg.flip_labels}")
                flip = torch.zeros(num_classes, dtype=torch.long)
                flip[list(cfg.flip_labels)] = 1
                return cls(flip=flip, multi_label=True)
            if cfg.untargeted_loss != "ce":
                raise ConfigError(f"untargeted_loss: {cfg.untargeted_loss!r} is single-label only; use ce on multi-label data")
            return cls(multi_label=True)
        if cfg.flip_labels is not None:
            raise ConfigError("flip_labels: only for multi-label data (labels (N, L)); use target_map / target_shift")
        if cfg.target == "ordered_topk":
            from poison.attacks.topk import shifted_targets

            if cfg.topk > num_classes - 1:
                raise ConfigError(f"topk: expected at most {num_classes - 1} (the classes other than the true one), "
                                  f"got {cfg.topk}")
            _shift_map(num_classes, cfg.target_shift, "target_shift")
            lists = shifted_targets(torch.arange(num_classes), cfg.topk, num_classes, cfg.target_shift)
            # the top-1 target doubles as target_map: evaluation reports its rate like label-specific poisons
            return cls(target_map=lists[:, 0].clone(), topk_lists=lists)
        if cfg.target == "untargeted":
            push = None
            if cfg.untargeted_loss == "derangement":
                push = _shift_map(num_classes, cfg.target_shift, "target_shift")
            return cls(None, push, cfg.untargeted_loss)
        if cfg.target_map is not None:
            if len(cfg.target_map) != num_classes or not all(0 <= t < num_classes for t in cfg.target_map):
                raise ConfigError(
                    f"target_map: expected {num_classes} labels in [0, {num_classes - 1}], got {list(cfg.target_map)}"
                )
            mapping = torch.tensor(cfg.target_map, dtype=torch.long)
            if bool((mapping == torch.arange(num_classes)).any()):
                raise ConfigError(
                    f"target_map: a label-specific target must differ from the true label for every class, "
                    f"got {mapping.tolist()}"
                )
        else:
            mapping = _shift_map(num_classes, cfg.target_shift, "target_shift")
        return cls(mapping, mapping, "ce")

    @property
    def label_specific(self) -> bool:
        return self.target_map is not None or self.flip is not None

    def with_distribution(self, similarity: torch.Tensor | None, alpha: float, beta: float) -> "Target":
        """Return this ordered top-k target with its AD distributions (similarity None: knowledge-free)."""
        from poison.attacks.topk import target_distribution

        assert self.topk_lists is not None
        dist = target_distribution(self.topk_lists, similarity, alpha, beta, num_classes=self.topk_lists.shape[0])
        return Target(self.target_map, self.push_map, self.untargeted_loss, self.topk_lists, dist, self.flip,
                      self.multi_label)

    def goal(self, y: torch.Tensor) -> torch.Tensor | None:
        """The label vectors a label-specific multi-label poison aims at (y XOR flip); else None."""
        return None if self.flip is None else (y.long() + self.flip.to(y.device)) % 2

    def generator_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the loss the generator minimises, from the unrolled victim's clean logits."""
        if self.multi_label:
            if self.flip is not None:
                return F.binary_cross_entropy_with_logits(logits, self.goal(y).float())
            return -F.binary_cross_entropy_with_logits(logits, y.float())
        if self.topk_lists is not None:
            if self.topk_dist is None:
                raise ConfigError("target: ordered_topk needs its distributions (Target.with_distribution) first")
            p = self.topk_dist.to(logits.device)[y]
            return (p * (p.log() - F.log_softmax(logits, dim=1))).sum(1).mean()
        if self.push_map is not None:
            return F.cross_entropy(logits, self.push_map.to(y.device)[y])
        if self.untargeted_loss == "log_not_true":
            # -log(1 - p_y): bounded below by 0 once a sample is confidently wrong, so the
            # generator spreads its effort over every sample instead of a few (unbounded -CE).
            log_py = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
            return -torch.log1p(-log_py.exp().clamp(max=1 - 1e-6)).mean()
        return -F.cross_entropy(logits, y)

    def score(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float | None]:
        """Return (score, accuracy, target rate) of a victim's logits; the lower the score the stronger.

        Accuracy is exact-match for multi-label data; the rate is that of the goal: the
        target label, the ordered top-k list, or the flipped label vector (None untargeted).
        """
        if self.multi_label:
            pred = (logits > 0).long()
            acc = float((pred == y.long()).all(1).float().mean())
            if self.flip is None:
                return acc, acc, None
            rate = float((pred == self.goal(y)).all(1).float().mean())
            return 1.0 - rate, acc, rate
        acc = float((logits.argmax(1) == y).float().mean())
        if self.topk_lists is not None:
            from poison.attacks.topk import topk_success

            rate = float(topk_success(logits, self.topk_lists.to(y.device)[y]).float().mean())
            return 1.0 - rate, acc, rate
        if self.target_map is not None:
            rate = float((logits.argmax(1) == self.target_map.to(y.device)[y]).float().mean())
            return 1.0 - rate, acc, rate
        return acc, acc, None

    def feature_map(self, num_classes: int, shift: int) -> torch.Tensor:
        """Return, per label c, the class whose features the poison of class c should carry.

        A model that learns "features of class f(c) -> label c" predicts f^-1(y) on a clean
        image of class y. With a push map p, f = p^-1, so the term agrees with the
        generator's main loss (p must be a permutation); otherwise f(c) = (c + shift) mod C.
        """
        if self.multi_label:
            raise ConfigError("adversarial_weight: the targeted-adversarial term is single-label only; set it to 0")
        push = self.push_map if self.push_map is not None else self.target_map  # ordered_topk: its first target
        if push is None:
            return _shift_map(num_classes, shift, "adversarial_shift")
        if sorted(push.tolist()) != list(range(num_classes)):
            raise ConfigError(
                f"adversarial_weight: the targeted-adversarial term needs a target map that is a "
                f"permutation, got {push.tolist()}; set adversarial_weight: 0"
            )
        return torch.argsort(push)


def _shift_map(num_classes: int, shift: int, key: str) -> torch.Tensor:
    if shift % num_classes == 0:
        raise ConfigError(
            f"{key}: must not be a multiple of {num_classes} (the number of classes), got {shift}; "
            "every class needs a different label"
        )
    return (torch.arange(num_classes) + shift) % num_classes


GeneratorLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def victim_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The victim's training loss: cross-entropy, or binary cross-entropy for multi-hot y (N, L)."""
    if y.ndim == 2:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y)


def unroll_objective(victim: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                     x: torch.Tensor, x_p: torch.Tensor, y: torch.Tensor, loss: GeneratorLoss,
                     lr: float) -> torch.Tensor:
    """Return the authors' outer loss: ``loss`` of the victim after one SGD step on the poison.

    theta' = theta - lr * grad_theta CE(f_theta(x_p), y), kept differentiable in x_p;
    returns loss(f_theta'(x), y) on the clean batch.

    Shape:
        x, x_p: (N, C, H, W) in [0, 1]; y: (N,) int64 (or (N, L) multi-hot); returns a scalar
    """
    inner = victim_loss(functional_call(victim, (params, buffers), (x_p,)), y)
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    unrolled = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    return loss(functional_call(victim, (unrolled, buffers), (x,)), y)


def align_objective(victim: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                    x: torch.Tensor, x_p: torch.Tensor, y: torch.Tensor, loss: GeneratorLoss,
                    lr: float) -> torch.Tensor:
    """Return 1 - cos(training gradient on the poison, gradient of ``loss`` on clean data).

    [adapt] The authors' unrolled step is, to first order, loss(theta) - lr * <g_target, g_poison>:
    an inner product the generator can raise by inflating the poison's gradient rather than
    pointing it the right way. Gradient matching (Geiping et al., "Witches' Brew",
    arXiv 2009.02276; Fowl et al., arXiv 2103.02683) drops the scale: a victim step on the
    poison should move theta as a step on ``loss`` over the clean batch would (for a
    label-specific target, as training on clean images relabelled t(y)). ``lr`` is unused.
    ``buffers`` (BatchNorm statistics) are updated in place by the poison pass: pass copies.

    Shape:
        x, x_p: (N, C, H, W) in [0, 1]; y: (N,) int64; returns a scalar in [0, 2]
    """
    del lr
    names = list(params)
    target = loss(functional_call(victim, (params, {k: b.clone() for k, b in buffers.items()}), (x,)), y)
    g_target = torch.autograd.grad(target, [params[k] for k in names])
    inner = victim_loss(functional_call(victim, (params, buffers), (x_p,)), y)
    g_poison = torch.autograd.grad(inner, [params[k] for k in names], create_graph=True)
    dot = sum((gp * gt).sum() for gp, gt in zip(g_poison, g_target))
    # clamp inside the sqrt: its gradient at an exactly-zero norm would be infinite
    norm_p = torch.sqrt(sum((gp * gp).sum() for gp in g_poison).clamp_min(1e-24))
    norm_t = torch.sqrt(sum((gt * gt).sum() for gt in g_target).clamp_min(1e-24))
    return 1.0 - dot / (norm_p * norm_t)


#: The generator's outer objective, by the name ``DeepConfuseConfig.objective`` gives.
OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {"unroll": unroll_objective, "align": align_objective}
