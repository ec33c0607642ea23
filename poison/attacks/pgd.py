"""Image-space baselines for the semantic attack: PGD and FGSM under an L-inf budget.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018
(PGD: random start in the eps-ball, signed-gradient steps, projection); Goodfellow et al.,
ICLR 2015 (FGSM: one signed step of size eps). Images are float in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pgd", "fgsm"]


def _loss(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum") if targets is None else -F.cross_entropy(logits, targets, reduction="sum")


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, generator: torch.Generator,
        step_size: float | None = None, targets: torch.Tensor | None = None, random_start: bool = True) -> torch.Tensor:
    """Return PGD adversarial images (N, C, H, W) in [0, 1] with |x_adv - x|_inf <= eps.

    Step size defaults to 2.5 * eps / steps (as SIA's image-space part). The model's mode
    and parameters are left as they were.
    """
    step = 2.5 * eps / steps if step_size is None else step_size
    was_training = model.training
    model.eval()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device, x.dtype)
        adv = (x + (noise * 2 - 1) * eps).clamp(0, 1)
    else:
        adv = x.clone()
    try:
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(_loss(model(adv), y, targets), [adv])
            adv = torch.minimum(torch.maximum(adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    finally:
        model.train(was_training)
    return adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         targets: torch.Tensor | None = None) -> torch.Tensor:
    """Return FGSM adversarial images: one signed-gradient step of size eps, clipped to [0, 1]."""
    was_training = model.training
    model.eval()
    try:
        adv = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_loss(model(adv), y, targets), [adv])
    finally:
        model.train(was_training)
    return (x + eps * grad.sign()).clamp(0, 1).detach()
