"""Classifier zoo: the DeepConfuse MNIST victim and its variants, an MLP, small ResNets.

Every classifier takes images in [0, 1] (N, C, H, W) and returns logits (N, num_classes);
any normalisation happens inside the model.
"""

from __future__ import annotations

import torch
from torch import nn


def _flat_features(body: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1])


class DCCNN(nn.Module):
    """The DeepConfuse MNIST victim: 2 conv (k5) + BN + pool, FC hidden, FC out.

    Feng et al., "Learning to Confuse", arXiv 1905.09027 (authors' code: 20/50
    channels, FC 500). ``widths`` and ``hidden`` give the small and large variants.

    Shape:
        x: (N, C, H, W) in [0, 1], H = W >= 16 (20 for three conv layers)
        returns: (N, num_classes) logits
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        widths: tuple[int, ...] = (20, 50),
        hidden: int = 500,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            # Later convs of deeper variants pad to keep small inputs from vanishing.
            layers += [nn.Conv2d(c, w, 5, padding=0 if i < 2 else 2), nn.BatchNorm2d(w), nn.ReLU()]
            if i < 2:
                layers.append(nn.AvgPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, in_channels, image_size), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A two-hidden-layer perceptron on flattened, centred pixels.

    Shape:
        x: (N, C, H, W) in [0, 1]
        returns: (N, num_classes) logits
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.5)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, 6n+2 layers) for 28- or 32-pixel inputs.

    Shape:
        x: (N, C, H, W) in [0, 1], H = W >= 8
        returns: (N, num_classes) logits
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        blocks: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        del image_size  # global pooling makes the network size-agnostic
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                stages.append(_BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem((x - 0.5) / 0.5)))
