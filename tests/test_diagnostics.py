"""poison.diagnostics: noise-only accuracy and separability probes on constructed cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poison.diagnostics import noise_only_accuracy, perturbations, probe_accuracy, uniform_noise


def test_perturbations_are_the_stored_difference():
    clean = torch.tensor([[[[0, 10], [255, 3]]]], dtype=torch.uint8)
    poisoned = torch.tensor([[[[76, 0], [179, 3]]]], dtype=torch.uint8)
    d = perturbations(clean, poisoned)
    assert torch.allclose(d * 255, torch.tensor([[[[76.0, -10.0], [-76.0, 0.0]]]]))
    with pytest.raises(ValueError, match="poisoned: expected the shape"):
        perturbations(clean, poisoned[..., :1])


def test_uniform_noise_stays_on_the_budget_levels():
    n = uniform_noise((50, 1, 4, 4), 0.1, torch.Generator().manual_seed(0))
    levels = n * 255
    assert torch.allclose(levels, levels.round()) and int(levels.abs().max()) == 25


def _class_patterns(n: int, k: int, seed: int, noise_seed: int):
    proto = torch.randn(k, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(n) % k
    return proto[y] + 0.1 * torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(noise_seed)), y


def test_linear_probe_separates_class_patterns_and_not_noise():
    x, y = _class_patterns(200, 5, 0, noise_seed=1)
    x2, y2 = _class_patterns(100, 5, 0, noise_seed=2)  # same classes, unseen samples
    assert not any(torch.equal(a, b) for a in x2[:5] for b in x)
    assert probe_accuracy(x, y, x2, y2, num_classes=5, steps=100)["test_accuracy"] == 1.0
    noise = uniform_noise((200, 1, 4, 4), 0.3, torch.Generator().manual_seed(1))
    noise2 = uniform_noise((1000, 1, 4, 4), 0.3, torch.Generator().manual_seed(2))
    chance = probe_accuracy(noise, y, noise2, torch.arange(1000) % 5, num_classes=5, hidden=8, steps=100)
    assert chance["test_accuracy"] < 0.35


def test_probe_is_deterministic_for_a_seed():
    x, y = _class_patterns(60, 3, 3, noise_seed=4)
    a = probe_accuracy(x, y, x, y, num_classes=3, hidden=4, steps=5, seed=7)
    assert a == probe_accuracy(x, y, x, y, num_classes=3, hidden=4, steps=5, seed=7)


def test_noise_only_accuracy_counts_correct_predictions():
    class Sign(nn.Module):  # predicts class 1 where the mean is positive
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([-m, m], 1) + 0 * self.w

    noise = torch.tensor([0.1, -0.1, 0.2, -0.3]).view(4, 1, 1, 1)
    assert noise_only_accuracy(Sign(), noise, torch.tensor([1, 0, 0, 0])) == 0.75
