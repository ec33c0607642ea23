"""Cheap training-data defenses against availability poisons (ALGORITHMS.md section 6).

A defender who suspects the training set is poisoned can preprocess every training image
before fitting: JPEG compression at a low quality, bit-depth reduction (posterize) and
grayscale undo most published perturbative poisons on CIFAR-10 ("Image Shortcut
Squeezing", Liu et al., ICML 2023: JPEG quality 10 restores >= 79% accuracy for most;
2-bit posterize; grayscale against colour-coded shortcuts). A poison worth publishing is
measured with and without them (``benchmarks/defenses.py``).

Each defense maps a batch of stored images to images of the same shape and dtype:

Shape:
    images: (N, C, H, W) uint8, C in {1, 3}
    returns: (N, C, H, W) uint8

A defense is named by a spec string: ``jpeg:Q`` (quality Q in 1..100), ``posterize:B``
(keep the B most significant bits, 1..8) or ``grayscale``.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["jpeg", "posterize", "grayscale", "parse_defense", "apply_defense", "DEFENSES"]


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected an (N, C, H, W) uint8 tensor with C 1 or 3 (stored shard images), got "
                         f"{images.dtype} of shape {tuple(images.shape)}; defend the images as stored, before any "
                         "normalisation")


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Compress and decompress each image with JPEG at ``quality`` (1-100; libjpeg via torchvision)."""
    from torchvision.io import decode_jpeg, encode_jpeg

    _check_images(images)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"jpeg quality: expected an integer in 1..100, got {quality}")
    if len(images) == 0:
        return images.clone()
    decoded = decode_jpeg(encode_jpeg(list(images.cpu().contiguous()), quality=int(quality)))
    return torch.stack(decoded).to(images.device)


def posterize(images: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the ``bits`` most significant bits of every pixel (1-8; 8 changes nothing)."""
    _check_images(images)
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"posterize bits: expected an integer in 1..8, got {bits}")
    return images & ((0xFF << (8 - int(bits))) & 0xFF)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, repeated on every channel (a 1-channel image is returned unchanged)."""
    _check_images(images)
    if images.shape[1] == 1:
        return images.clone()
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    luma = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return luma.expand_as(images).contiguous()


#: name -> (function, whether it takes an integer argument, its range)
DEFENSES: dict[str, tuple[Callable[..., torch.Tensor], tuple[int, int] | None]] = {
    "jpeg": (jpeg, (1, 100)),
    "posterize": (posterize, (1, 8)),
    "grayscale": (grayscale, None),
}


def parse_defense(spec: str, key: str = "defense") -> tuple[str, int | None]:
    """``"jpeg:10"`` -> ``("jpeg", 10)``; ``"grayscale"`` -> ``("grayscale", None)``.

    ``key`` names the setting the spec came from in the error message.
    """
    name, _, arg = str(spec).partition(":")
    known = ", ".join(f"{n}:N (N in {r[0]}..{r[1]})" if r else n for n, (_, r) in DEFENSES.items())
    if name not in DEFENSES:
        raise ValueError(f"{key}: unknown defense {spec!r}; expected one of {known}, e.g. jpeg:10 or posterize:2")
    needs = DEFENSES[name][1]
    if needs is None:
        if spec != name:
            raise ValueError(f"{key}: {name} takes no argument, got {spec!r}; write {name}")
        return name, None
    if not (arg.isascii() and arg.isdigit()):
        raise ValueError(f"{key}: {name} needs an integer argument in {needs[0]}..{needs[1]}, got {spec!r}; "
                         f"write e.g. {name}:{2 if name == 'posterize' else 10}")
    value = int(arg)
    if not needs[0] <= value <= needs[1]:
        raise ValueError(f"{key}: {name} takes {needs[0]}..{needs[1]}, got {value} in {spec!r}")
    if spec != f"{name}:{value}":  # one spelling per defense: it names a metrics section and a cache key
        raise ValueError(f"{key}: write {spec!r} as {name}:{value}")
    return name, value


def apply_defense(spec: str, images: torch.Tensor, key: str = "defense") -> torch.Tensor:
    """Apply the defense ``spec`` (``jpeg:10``, ``posterize:2``, ``grayscale``) to uint8 images."""
    name, value = parse_defense(spec, key)
    fn = DEFENSES[name][0]
    return fn(images) if value is None else fn(images, value)
