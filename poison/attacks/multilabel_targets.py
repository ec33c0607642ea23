"""Target label vectors of the multi-label attacks (Song et al., ICDM 2018; ALGORITHMS.md section 3).

Strategies, each applied to the labels (or a model's prediction) of every sample: random (flip
one positive and one negative), extreme (flip all), reduction (remove one label),
augmentation (add one label). ``make_targets`` returns the targets and which samples admit one.
"""

from __future__ import annotations

from typing import Callable

import torch

from poison.errors import ConfigError

__all__ = ["STRATEGIES", "LABELLED", "as_bool", "make_targets"]


def as_bool(t: torch.Tensor) -> torch.Tensor:
    """Label vectors as bool: a bool tensor as is, else entries > 0.5."""
    return t if t.dtype == torch.bool else t > 0.5


def _random_pick(mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One-hot (N, L) of a uniformly random True entry of each row of ``mask`` (garbage where none)."""
    idx = torch.where(mask, keys, -1.0).argmax(1)
    return torch.nn.functional.one_hot(idx, mask.shape[1]).bool()


def _keys(pos: torch.Tensor, generator: torch.Generator | None, strategy: str) -> torch.Tensor:
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator: expected a torch.Generator for strategy {strategy!r}, got {generator!r}")
    return torch.rand(pos.shape, generator=generator, device=generator.device).to(pos.device)


def _random(pos: torch.Tensor, generator: torch.Generator | None, label: int | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    keys = _keys(pos, generator, "random")
    # the same iid keys choose within two disjoint sets: the two choices are independent
    flip = _random_pick(pos, keys) | _random_pick(~pos, keys)
    return pos ^ flip, pos.any(1) & (~pos).any(1)


def _extreme(pos: torch.Tensor, generator: torch.Generator | None, label: int | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return ~pos, torch.ones(pos.shape[0], dtype=torch.bool, device=pos.device)


def _one_flip(side: torch.Tensor, generator: torch.Generator | None, label: int | None, strategy: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip one entry of ``side`` (the labels that may flip) per row: ``label`` or a random one."""
    if label is None:
        return _random_pick(side, _keys(side, generator, strategy)), side.any(1)
    flip = torch.zeros_like(side)
    flip[:, label] = True
    return flip, side[:, label]


def _reduction(pos: torch.Tensor, generator: torch.Generator | None, label: int | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    flip, valid = _one_flip(pos, generator, label, "reduction")
    return pos & ~flip, valid


def _augmentation(pos: torch.Tensor, generator: torch.Generator | None, label: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    flip, valid = _one_flip(~pos, generator, label, "augmentation")
    return pos | flip, valid


#: strategy(positives (N, L) bool, generator, label) -> (targets (N, L) bool, valid (N,) bool)
STRATEGIES: dict[str, Callable[[torch.Tensor, torch.Generator | None, int | None],
                               tuple[torch.Tensor, torch.Tensor]]] = {
    "random": _random, "extreme": _extreme, "reduction": _reduction, "augmentation": _augmentation,
}
#: the strategies that accept a chosen ``label``
LABELLED = ("reduction", "augmentation")


def make_targets(labels: torch.Tensor, strategy: str, generator: torch.Generator | None,
                 label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (targets (N, L) float {0, 1}, valid (N,) bool) for ``strategy`` applied to ``labels``.

    Shape:
        labels: (N, L) {0, 1}, float or bool.

    random: flip one random positive to 0 and one random negative to 1 (valid iff the row has
    both); extreme: flip every label (always valid); reduction: set ``label`` (or a random
    positive) to 0, valid iff it was 1; augmentation: set ``label`` (or a random negative)
    to 1, valid iff it was 0. Invalid rows keep targets = labels. ``label`` is only
    accepted by reduction and augmentation. Random choices draw N * L uniforms from
    ``generator`` (None is accepted where nothing is drawn).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if labels.dim() != 2:
        raise ValueError(f"labels: expected shape (N, L), got {tuple(labels.shape)}")
    if label is not None:
        if strategy not in LABELLED:
            raise ConfigError(f"label: only used by {' and '.join(LABELLED)}, got {label} with strategy {strategy!r}")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < labels.shape[1]:
            raise ConfigError(f"label: expected an int in [0, {labels.shape[1]}), got {label!r}")
    pos = as_bool(labels)
    targets, valid = STRATEGIES[strategy](pos, generator, label)
    targets = torch.where(valid[:, None], targets, pos)
    return targets.float(), valid
