"""Minimal-perturbation search in the style of Carlini & Wagner, shared by the multi-label and top-k attacks.

Carlini, Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017
(arXiv 1608.04644): optimise in tanh space, x' = (tanh(w) + 1) / 2 (so x' stays in [0, 1]),

    min_w  ||x' - x||_2^2 + c * loss(model(x'))

with Adam, and binary-search the trade-off c per sample: after a run, a sample that
succeeded halves towards its lower bound, one that failed doubles (x10 while no upper
bound is known). Each sample keeps its smallest successful perturbation over all runs
(and, given a ``secondary`` success test, also its smallest perturbation passing that one:
Rank I/II search for a ranking and report the exact matches they met on the way).

The attacks differ only by ``loss`` and ``success`` (STYLE: pass the loss in):
ML-CW and Rank I/II (``poison.attacks.multilabel``), AD and CW^k (``poison.attacks.topk``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from poison.errors import ConfigError
from poison.utils import frozen

__all__ = ["CWConfig", "CWResult", "cw_search", "norms"]

#: loss(logits (N, L)) -> per-sample loss (N,), >= 0, and 0 once the goal is met with margin
Loss = Callable[[torch.Tensor], torch.Tensor]
#: success(logits (N, L)) -> (N,) bool
Success = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CWConfig:
    """Settings of the search (each attack's params.yaml section carries its own defaults)."""

    iterations: int = 1000      # Adam steps per value of c
    lr: float = 0.01            # Adam learning rate in tanh space
    binary_steps: int = 10      # values of c tried per sample
    c_init: float = 1e5         # first c
    abort_early: bool = True    # stop a run when the total objective stops improving

    def __post_init__(self) -> None:
        for key in ("iterations", "binary_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        for key in ("lr", "c_init"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: expected > 0, got {getattr(self, key)}")


@dataclass
class CWResult:
    """What ``cw_search`` returns; every tensor has the batch first.

    images: (N, C, H, W) in [0, 1], the smallest successful adversarial image per sample
    (the input itself where no run succeeded); success: (N,) bool; l2, linf: (N,) norms of
    images - x (0 where unsuccessful); c: (N,) the c of the kept image (nan if none).
    secondary: the same for the ``secondary`` success test of ``cw_search`` (None without
    one): the smallest iterate of the whole search that passed it.
    """

    images: torch.Tensor
    success: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor
    c: torch.Tensor
    secondary: "CWResult | None" = field(default=None, kw_only=True)


def norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2, L-inf) per sample of a batch of perturbations (N, ...)."""
    flat = delta.flatten(1)
    return flat.norm(dim=1), flat.abs().amax(dim=1)


def _atanh(x: torch.Tensor) -> torch.Tensor:
    return torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))


def cw_search(model: nn.Module, x: torch.Tensor, loss: Loss, success: Success, cfg: CWConfig,
              secondary: Success | None = None) -> CWResult:
    """Run the search on a batch against ``model`` (set to eval, its parameters and mode restored).

    Shape:
        x: (N, C, H, W) float in [0, 1]; ``loss``, ``success`` and ``secondary`` see the
        model's logits for the whole batch, in order, so targets can be bound by the caller.

    ``secondary`` only observes: the search (c updates, kept image) follows ``success``; the
    result's ``secondary`` holds each sample's smallest iterate that passed ``secondary``.

    Deterministic: no random draws (the start is x itself).
    """
    n = x.shape[0]
    x = x.detach()
    w0 = _atanh(x)
    lower = torch.zeros(n, dtype=torch.float64, device=x.device)
    upper = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
    c = torch.full((n,), cfg.c_init, dtype=torch.float64, device=x.device)
    best = x.clone()
    best_l2 = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    best_c = torch.full((n,), float("nan"), dtype=torch.float64, device=x.device)
    if secondary is not None:
        best2, best2_l2, best2_c = best.clone(), best_l2.clone(), best_c.clone()
    with frozen(model):
        for _ in range(cfg.binary_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=cfg.lr)
            run_ok = torch.zeros(n, dtype=torch.bool, device=x.device)
            cx = c.to(x.dtype)
            window, previous = max(cfg.iterations // 10, 1), float("inf")
            for it in range(cfg.iterations + 1):
                adv = (torch.tanh(w) + 1) / 2
                logits = model(adv)
                with torch.no_grad():
                    ok = success(logits)
                    l2 = (adv - x).flatten(1).norm(dim=1)
                    better = ok & (l2 < best_l2)
                    best[better] = adv[better].detach()
                    best_l2[better] = l2[better]
                    best_c[better] = c[better]
                    run_ok |= ok
                    if secondary is not None:
                        better = secondary(logits) & (l2 < best2_l2)
                        best2[better] = adv[better].detach()
                        best2_l2[better] = l2[better]
                        best2_c[better] = c[better]
                if it == cfg.iterations:
                    break
                objective = ((adv - x).flatten(1).pow(2).sum(1) + cx * loss(logits)).sum()
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()
                if cfg.abort_early and (it + 1) % window == 0:
                    value = float(objective.detach())
                    if value > previous * 0.9999:
                        break
                    previous = value
            # the classic update: success -> the smaller half; failure -> larger (x10 with no bound)
            upper = torch.where(run_ok, torch.minimum(upper, c), upper)
            lower = torch.where(run_ok, lower, torch.maximum(lower, c))
            c = torch.where(torch.isinf(upper), c * 10, (lower + upper) / 2)
    second = None if secondary is None else _result(x, best2, best2_l2, best2_c)
    return _result(x, best, best_l2, best_c, secondary=second)


def _result(x: torch.Tensor, best: torch.Tensor, best_l2: torch.Tensor, best_c: torch.Tensor,
            secondary: CWResult | None = None) -> CWResult:
    found = torch.isfinite(best_l2)
    l2, linf = norms(best - x)
    return CWResult(images=best, success=found, l2=torch.where(found, l2, torch.zeros_like(l2)),
                    linf=torch.where(found, linf, torch.zeros_like(linf)), c=best_c, secondary=secondary)
