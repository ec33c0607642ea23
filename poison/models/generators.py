"""Perturbation generators: the DeepConfuse MNIST autoencoder and a U-Net.

Both map images in [0, 1] to a perturbation direction in [-1, 1] (tanh) of the
same shape; the attack scales it by eps.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class DCAutoencoder(nn.Module):
    """The DeepConfuse MNIST generator (authors' code: conv autoencoder, BN, tanh).

    Feng et al., "Learning to Confuse", arXiv 1905.09027. Encoder 16 (k3 s3) ->
    maxpool -> 64 (k3 s2) -> maxpool; decoder transposed convs 64 -> 128 -> 64 -> C.
    The decoder yields 28x28; other sizes are resized back to the input size.

    Shape:
        x: (N, C, H, W) in [0, 1], H = W >= 16
        returns: (N, C, H, W) in [-1, 1]
    """

    def __init__(self, in_channels: int, image_size: int, width: int = 16) -> None:
        super().__init__()
        del image_size
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, stride=3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2, stride=2),
            nn.Conv2d(w, 4 * w, 3, stride=2, padding=1),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.MaxPool2d(2, stride=1),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 8 * w, 3, stride=2),
            nn.BatchNorm2d(8 * w),
            nn.ReLU(),
            nn.ConvTranspose2d(8 * w, 4 * w, 5, stride=3, padding=1),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.ConvTranspose2d(4 * w, in_channels, 2, stride=2, padding=1),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(x))
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """The DeepConfuse CIFAR-10 generator: a U-Net (64/128/256/512) with tanh output.

    Inputs of any size are reflect-padded to a multiple of 8 and cropped back.

    Shape:
        x: (N, C, H, W) in [0, 1], H = W >= 8
        returns: (N, C, H, W) in [-1, 1]
    """

    def __init__(self, in_channels: int, image_size: int, width: int = 64, out_channels: int | None = None) -> None:
        super().__init__()
        del image_size
        w = width
        self.down = nn.ModuleList([_double_conv(in_channels, w), _double_conv(w, 2 * w), _double_conv(2 * w, 4 * w)])
        self.bottom = _double_conv(4 * w, 8 * w)
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(8 * w, 4 * w, 2, 2), nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), nn.ConvTranspose2d(2 * w, w, 2, 2)]
        )
        self.merge = nn.ModuleList([_double_conv(8 * w, 4 * w), _double_conv(4 * w, 2 * w), _double_conv(2 * w, w)])
        self.out = nn.Conv2d(w, in_channels if out_channels is None else out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 8, (-w) % 8
        y = F.pad(x, (0, pw, 0, ph), mode="reflect") if (ph or pw) else x
        skips = []
        for block in self.down:
            y = block(y)
            skips.append(y)
            y = F.max_pool2d(y, 2)
        y = self.bottom(y)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            y = merge(torch.cat([up(y), skip], dim=1))
        return torch.tanh(self.out(y))[..., :h, :w]


class ClassConditional(nn.Module):
    """A generator that also sees each image's label: g(x, y) [adapt].

    The poisoner knows the labels of the data it releases, and what a poison should do
    depends on the label; an unconditional g(x) must first recognise the class from the
    pixels. Each label owns ``planes`` learned maps of the image's size, concatenated to the
    input channels of ``base`` (multi-hot labels sum the maps of their labels), so the poison
    can also carry a pattern per label or label combination. Measured (BENCHMARKS.md 4.8 and
    8): no stronger on single-label MNIST poisons; on the multi-label composites the untargeted
    poison cuts exact match to 22% where g(x) leaves 50% (6 trials, three generator seeds
    pooled; per seed 9-44%: whether training finds the label shortcut varies from run to run),
    and to 9% with 12 trials (per seed 1-16%).

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,) int64 labels, or (N, L) in {0, 1}
        returns: (N, C, H, W) in [-1, 1]
    """

    conditional = True

    def __init__(self, base: Callable[..., nn.Module], in_channels: int, image_size: int, num_classes: int,
                 planes: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Parameter(torch.zeros(num_classes, planes, image_size, image_size))
        nn.init.normal_(self.embed, std=0.1)
        self.base = base(in_channels=in_channels + planes, image_size=image_size, out_channels=in_channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, k = x.shape[0], self.num_classes
        if y.shape not in ((n,), (n, k)):
            raise ValueError(f"labels: expected shape ({n},) class indices or ({n}, {k}) multi-hot for {n} "
                             f"images and {k} classes, got {tuple(y.shape)}; pass one label (vector) per image")
        if y.ndim == 1 and y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(f"labels: class indices must be in [0, {k - 1}], got {int(y.min())}..{int(y.max())}")
        onehot = y.to(self.embed.dtype) if y.ndim == 2 else F.one_hot(y.long(), k).to(self.embed.dtype)
        planes = torch.einsum("nk,kphw->nphw", onehot, self.embed)
        if planes.shape[-2:] != x.shape[-2:]:
            planes = F.interpolate(planes, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.base(torch.cat([x, planes.to(x.dtype)], dim=1))
