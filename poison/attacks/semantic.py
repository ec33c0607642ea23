"""Semantic Image Attack (SIA): a joint attack in a semantic attribute space and in image space.

Luo, Wang, Wu, Huang, De la Torre, "Semantic Image Attack for Visual Model Diagnosis",
arXiv 2303.13010. The paper edits faces with a generative model; here [adapt] the
attributes are differentiable parametric transforms (ALGORITHMS.md section 4):
photometric (brightness, contrast, gamma; hue and saturation on colour images) and
geometric (rotation, translation, scale: one affine warp through ``affine_grid`` /
``grid_sample``). Each transform is a pure function of (images, parameters).

The attack (``sia``): from a random start in ``start_fraction`` (default half) of each attribute's range, ``steps``
signed-gradient steps jointly on the attributes a (clipped to their ranges) and on an
image-space perturbation delta (|delta|_inf <= eps), on

    x_adv = clip(T_a(x) + delta, 0, 1)

ascending the cross-entropy of the true label (untargeted) or descending that of the
target label (targeted). Step sizes are 2.5 * half-range / steps (attributes) and
2.5 * eps / steps (image). A sample is frozen as soon as it succeeds.

Diagnosis (``diagnose``): per success, the usage u_k = |a_k - identity_k| / half-range_k of
each attribute; counts of the dominant attribute, mean usage per class, and the
single-attribute success rate (only attribute k, no delta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from poison.errors import ConfigError
from poison.utils import frozen

__all__ = ["ATTRIBUTES", "Attribute", "SIAConfig", "SIAResult", "apply_attributes", "random_attributes", "identity", "sia", "diagnose",
           "brightness", "contrast", "gamma", "saturation", "hue", "affine"]


# ------------------------------------------------------------------ transforms
def brightness(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x + b per image. x: (N, C, H, W) in [0, 1]; b: (N,). Identity b = 0."""
    return x + b.view(-1, 1, 1, 1)


def contrast(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Scale each image's deviation from its mean intensity by c: (N,). Identity c = 1."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c.view(-1, 1, 1, 1) + mean


def gamma(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x ** g per image, g: (N,). Identity g = 1. Inputs are clamped to [1e-6, 1] first
    (x ** g has an infinite slope at 0 for g < 1)."""
    return x.clamp(1e-6, 1.0) ** g.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def saturation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Blend colour images (N, 3, H, W) with their luma by s: (N,). Identity s = 1."""
    g = _gray(x)
    return g + (x - g) * s.view(-1, 1, 1, 1)


def hue(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma of colour images (N, 3, H, W) by h radians in YIQ space. Identity h = 0."""
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=x.dtype, device=x.device)
    yiq2rgb = torch.linalg.inv(rgb2yiq)
    yiq = torch.einsum("ij,njhw->nihw", rgb2yiq, x)
    cos, sin = torch.cos(h).view(-1, 1, 1), torch.sin(h).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    rotated = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,njhw->nihw", yiq2rgb, rotated)


def affine(x: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate by ``angle`` degrees, scale by ``scale`` about the centre, then shift by (tx, ty)
    pixels; all (N,). Bilinear sampling, zeros outside. Identity: 0, 0, 0, 1."""
    n, _, h, w = x.shape
    rad = angle * (math.pi / 180.0)
    c, s = torch.cos(rad) / scale, torch.sin(rad) / scale
    # theta maps each output pixel to where it samples the input, in coordinates normalised
    # to [-1, 1]: the inverse warp p_in = R(-angle) (p_out - t) / scale, done in pixel units
    theta = torch.stack([
        torch.stack([c, s * h / w, -(c * tx + s * ty) * 2 / w], 1),
        torch.stack([-s * w / h, c, -(-s * tx + c * ty) * 2 / h], 1),
    ], 1)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Attribute:
    """One semantic attribute: its identity value, default half-range, and whether it needs colour."""

    name: str
    identity: float
    half_range: float
    colour_only: bool = False


#: The attributes and their default ranges (identity +- half_range), ALGORITHMS.md section 4.
ATTRIBUTES: dict[str, Attribute] = {a.name: a for a in (
    Attribute("brightness", 0.0, 0.2),
    Attribute("contrast", 1.0, 0.3),
    Attribute("gamma", 1.0, 0.225),        # 0.775 .. 1.225 (the table's 0.8 .. 1.25, made symmetric)
    Attribute("rotation", 0.0, 15.0),      # degrees (digits; 10 on natural images)
    Attribute("translate_x", 0.0, 3.0),    # pixels
    Attribute("translate_y", 0.0, 3.0),
    Attribute("scale", 1.0, 0.1),
    Attribute("hue", 0.0, math.pi, colour_only=True),
    Attribute("saturation", 1.0, 0.3, colour_only=True),
)}
_GEOMETRIC = ("rotation", "translate_x", "translate_y", "scale")


def identity(names: tuple[str, ...], n: int, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Attribute values (N, K) that leave every image unchanged."""
    return torch.tensor([ATTRIBUTES[k].identity for k in names], dtype=dtype, device=device).expand(n, -1).clone()


def random_attributes(n: int, names: tuple[str, ...], half_ranges: list[float], generator: torch.Generator
                      ) -> torch.Tensor:
    """Attribute values (N, K) drawn uniformly in identity +- half-range (the random-attribute baseline)."""
    half = torch.tensor(half_ranges)
    ident = torch.tensor([ATTRIBUTES[k].identity for k in names])
    return ident + (torch.rand(n, len(names), generator=generator) * 2 - 1) * half


def apply_attributes(x: torch.Tensor, names: tuple[str, ...], values: torch.Tensor) -> torch.Tensor:
    """T_a(x): the photometric attributes in ``names`` order, then one affine warp; clipped to [0, 1].

    x: (N, C, H, W) in [0, 1]; values: (N, len(names)). Differentiable in both.
    """
    if values.shape != (x.shape[0], len(names)):
        raise ValueError(f"attribute values: expected shape {(x.shape[0], len(names))}, got {tuple(values.shape)}")
    col = {k: values[:, i] for i, k in enumerate(names)}
    out = x
    for name, fn in (("brightness", brightness), ("contrast", contrast), ("gamma", gamma),
                     ("saturation", saturation), ("hue", hue)):
        if name in col:
            out = fn(out, col[name])
    if any(k in col for k in _GEOMETRIC):
        ones, zeros = torch.ones_like(values[:, 0]), torch.zeros_like(values[:, 0])
        out = affine(out, col.get("rotation", zeros), col.get("translate_x", zeros), col.get("translate_y", zeros),
                     col.get("scale", ones))
    return out.clamp(0.0, 1.0)


# ----------------------------------------------------------------------- attack
@dataclass(frozen=True)
class SIAConfig:
    """The attack's settings (params.yaml ``augment.attack``)."""

    attributes: tuple[str, ...] = ("brightness", "contrast", "gamma", "rotation", "translate_x", "translate_y", "scale")
    ranges: dict[str, float] = field(default_factory=dict)  # half-range overrides, by attribute
    eps: float = 0.1            # image-space L-inf budget on [0, 1] (0 = attributes only)
    steps: int = 10
    step_scale: float = 2.5     # step = step_scale * half-range / steps (and * eps / steps)
    random_start: bool = True   # start uniformly in start_fraction of each range
    start_fraction: float = 0.5 # random start: identity +- start_fraction * half-range (delta: +- start_fraction * eps)

    def __post_init__(self) -> None:
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown:
            raise ConfigError(f"attributes: unknown {unknown}; known: {', '.join(ATTRIBUTES)}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ConfigError(f"attributes: repeated names in {list(self.attributes)}")
        for k, v in self.ranges.items():
            if k not in self.attributes:
                raise ConfigError(f"ranges.{k}: not one of the attributes {list(self.attributes)}")
            if not v > 0:
                raise ConfigError(f"ranges.{k}: expected a half-range > 0, got {v}")
        if "contrast" in self.ranges and self.ranges["contrast"] >= 1:
            raise ConfigError("ranges.contrast: expected < 1 (contrast must stay positive)")
        if "scale" in self.ranges and self.ranges["scale"] >= 1:
            raise ConfigError("ranges.scale: expected < 1 (scale must stay positive)")
        if "gamma" in self.ranges and self.ranges["gamma"] >= 1:
            raise ConfigError("ranges.gamma: expected < 1 (gamma must stay positive)")
        if not 0 <= self.eps <= 1:
            raise ConfigError(f"eps: expected 0 <= eps <= 1, got {self.eps}")
        if self.steps < 1:
            raise ConfigError(f"steps: expected an integer >= 1, got {self.steps}")
        if not self.step_scale > 0:
            raise ConfigError(f"step_scale: expected > 0, got {self.step_scale}")
        if not 0 <= self.start_fraction <= 1:
            raise ConfigError(f"start_fraction: expected 0 <= start_fraction <= 1, got {self.start_fraction}")

    def half_ranges(self) -> list[float]:
        return [self.ranges.get(k, ATTRIBUTES[k].half_range) for k in self.attributes]

    def check_channels(self, channels: int, key: str = "attributes") -> None:
        colour = [k for k in self.attributes if ATTRIBUTES[k].colour_only]
        if channels != 3 and colour:
            raise ConfigError(f"{key}: {colour} need colour (3-channel) images, these have {channels} channel(s)")


@dataclass
class SIAResult:
    """What ``sia`` returns; every tensor has the batch first."""

    images: torch.Tensor      # (N, C, H, W) float in [0, 1]: clip(T_a(x) + delta)
    attributes: torch.Tensor  # (N, K) attribute values
    delta: torch.Tensor       # (N, C, H, W) image-space perturbation, |delta| <= eps
    success: torch.Tensor     # (N,) bool: misclassified (untargeted) / classified as the target
    steps: torch.Tensor       # (N,) int: steps taken before the sample was frozen (steps if never)
    names: tuple[str, ...] = ()


def _success(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred != labels if targets is None else pred == targets


def sia(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SIAConfig, generator: torch.Generator,
        targets: torch.Tensor | None = None, only: str | None = None) -> SIAResult:
    """Run SIA on a batch against ``model`` (eval mode, its parameters untouched).

    x: (N, C, H, W) float in [0, 1]; y: (N,) true labels; targets: (N,) target labels for a
    targeted attack (None: untargeted). ``only``: attack with that single attribute and no
    image-space perturbation (the diagnosis' single-attribute success rate).
    The random start draws from ``generator`` (CPU), so results are reproducible.
    """
    names = cfg.attributes
    half = torch.tensor(cfg.half_ranges(), dtype=x.dtype, device=x.device)
    ident = identity(names, x.shape[0], x.dtype, x.device)
    lo, hi = ident - half, ident + half
    mask = torch.ones(len(names), dtype=x.dtype, device=x.device)
    eps = cfg.eps
    if only is not None:
        if only not in names:
            raise ConfigError(f"only: {only!r} is not one of the attributes {list(names)}")
        mask = (torch.tensor([k == only for k in names], device=x.device)).to(x.dtype)
        eps = 0.0
    n = x.shape[0]
    if cfg.random_start:
        u = torch.rand(n, len(names), generator=generator, dtype=torch.float64).to(x.device, x.dtype)
        a = ident + (u * 2 - 1) * half * cfg.start_fraction * mask
        d = (torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device, x.dtype) * 2 - 1) * eps * cfg.start_fraction
    else:
        a, d = ident.clone(), torch.zeros_like(x)
    step_a = cfg.step_scale * half / cfg.steps * mask
    step_x = cfg.step_scale * eps / cfg.steps
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    taken = torch.full((n,), cfg.steps, dtype=torch.long, device=x.device)
    with frozen(model):
        for step in range(cfg.steps + 1):
            a_var = a.detach().requires_grad_(True)
            d_var = d.detach().requires_grad_(True)
            out = (apply_attributes(x, names, a_var) + d_var).clamp(0, 1)
            logits = model(out)
            done = _success(logits.detach(), y, targets)
            newly = done & active
            taken[newly] = step
            active &= ~done
            if step == cfg.steps or not bool(active.any()):
                break
            loss = (F.cross_entropy(logits, y, reduction="sum") if targets is None
                    else -F.cross_entropy(logits, targets, reduction="sum"))
            ga, gd = torch.autograd.grad(loss, [a_var, d_var])
            keep = active.to(x.dtype)
            a = torch.maximum(torch.minimum(a + keep[:, None] * step_a * ga.sign(), hi), lo)
            d = (d + keep.view(-1, 1, 1, 1) * step_x * gd.sign()).clamp(-eps, eps)
    with torch.no_grad():
        final = (apply_attributes(x, names, a) + d).clamp(0, 1)
        success = _success(model(final), y, targets)
    return SIAResult(final, a.detach(), (final - apply_attributes(x, names, a)).detach(), success, taken, names)


# -------------------------------------------------------------------- diagnosis
def usage(result: SIAResult, cfg: SIAConfig) -> torch.Tensor:
    """u_k = |a_k - identity_k| / half-range_k for every sample: (N, K) in [0, 1]."""
    half = torch.tensor(cfg.half_ranges(), dtype=result.attributes.dtype)
    ident = identity(cfg.attributes, result.attributes.shape[0], result.attributes.dtype)
    return ((result.attributes.cpu() - ident).abs() / half).clamp(0, 1)


def diagnose(result: SIAResult, labels: torch.Tensor, cfg: SIAConfig, num_classes: int,
             single: dict[str, float] | None = None) -> dict:
    """The attribute histogram of the successes of ``result`` (JSON-ready).

    ``dominant_counts[k]``: successes whose largest usage is attribute k (they sum to the
    number of successes); ``mean_usage_per_class[c][k]``: mean usage over successes of true
    class c (None for a class without successes); ``single_attribute_success_rate``: as given.
    """
    u = usage(result, cfg)
    ok = result.success.cpu()
    names = list(cfg.attributes)
    dominant = u[ok].argmax(1) if bool(ok.any()) else torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(dominant, minlength=len(names)).tolist()
    per_class = []
    for c in range(num_classes):
        sel = ok & (labels.cpu() == c)
        per_class.append(None if not bool(sel.any()) else dict(zip(names, u[sel].mean(0).tolist())))
    return {
        "attributes": names,
        "samples": int(ok.numel()),
        "successes": int(ok.sum()),
        "success_rate": float(ok.float().mean()) if ok.numel() else 0.0,
        "dominant_counts": dict(zip(names, counts)),
        "mean_usage": dict(zip(names, (u[ok].mean(0).tolist() if bool(ok.any()) else [0.0] * len(names)))),
        "mean_usage_per_class": per_class,
        "single_attribute_success_rate": single or {},
    }
