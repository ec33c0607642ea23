"""poison.models: every registered classifier and generator, shapes, ranges, registry errors."""

from __future__ import annotations

import pytest
import torch

from poison.errors import ConfigError
from poison.models import CLASSIFIERS, GENERATORS, MIN_IMAGE_SIZE, create_classifier, create_generator, is_conditional
from poison.train import build_model


def _generator(name: str, channels: int, size: int) -> torch.nn.Module:
    return create_generator(name, channels, size, num_classes=10 if is_conditional(name) else None)


def _direction(gen: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """g(x), or g(x, y) with arbitrary labels for a class-conditional generator."""
    if getattr(gen, "conditional", False):
        return gen(x, torch.arange(x.shape[0]) % 10)
    return gen(x)


CLASSIFIER_CASES = [(n, c, s) for n in CLASSIFIERS for c in (1, 3) for s in (28, 32)]
GENERATOR_CASES = [(n, c, s) for n in GENERATORS for c in (1, 3) for s in (28, 32)]


def test_min_image_size_covers_every_registered_model():
    assert set(MIN_IMAGE_SIZE) == set(CLASSIFIERS) | set(GENERATORS)


@pytest.mark.parametrize("name, channels, size", CLASSIFIER_CASES)
def test_classifier_output_shape(name, channels, size):
    torch.manual_seed(0)
    model = create_classifier(name, in_channels=channels, image_size=size, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name, channels, size", GENERATOR_CASES)
def test_generator_output_shape_and_range(name, channels, size):
    torch.manual_seed(0)
    gen = _generator(name, channels, size).eval()
    with torch.no_grad():
        # extreme inputs too: the tanh output must stay in [-1, 1]
        x = torch.cat([torch.rand(1, channels, size, size), torch.ones(1, channels, size, size)])
        out = _direction(gen, x)
    assert out.shape == x.shape
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    assert out.std() > 0, "a generator that outputs a constant cannot perturb anything"


@pytest.mark.parametrize("name", sorted(MIN_IMAGE_SIZE))
def test_model_works_at_its_declared_min_size(name):
    # MIN_IMAGE_SIZE promises that this size and every size above it work.
    size = MIN_IMAGE_SIZE[name]
    torch.manual_seed(0)
    for channels in (1, 3):
        if name in CLASSIFIERS:
            model = create_classifier(name, channels, size, 10).eval()
            expected = (2, 10)
        else:
            model = _generator(name, channels, size).eval()
            expected = (2, channels, size, size)
        with torch.no_grad():
            try:
                x = torch.rand(2, channels, size, size)
                out = model(x) if name in CLASSIFIERS else _direction(model, x)
            except RuntimeError as exc:
                pytest.fail(f"{name} rejects its declared MIN_IMAGE_SIZE {size} ({channels} channels): {exc}")
        assert out.shape == expected


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_trains_on_a_batch_of_two(name):
    torch.manual_seed(0)
    gen = _generator(name, 1, 28).train()
    out = _direction(gen, torch.rand(2, 1, 28, 28))
    out.sum().backward()
    assert all(p.grad is not None for p in gen.parameters() if p.requires_grad)


def test_unknown_classifier_lists_known_names():
    with pytest.raises(ConfigError) as info:
        create_classifier("nope", 1, 28, 10, key="evaluate.archs")
    msg = str(info.value)
    assert msg.startswith("evaluate.archs:") and "'nope'" in msg
    assert all(name in msg for name in CLASSIFIERS)


def test_unknown_generator_lists_known_names():
    with pytest.raises(ConfigError) as info:
        create_generator("nope", 1, 28)
    msg = str(info.value)
    assert "'nope'" in msg and all(name in msg for name in GENERATORS)


def test_too_small_images_and_bad_channels_are_config_errors():
    with pytest.raises(ConfigError, match=r"at least 8 pixels, got 4"):
        create_classifier("resnet8", 1, 4, 10)
    with pytest.raises(ConfigError, match=r"1 or 3 input channels, got 2"):
        create_generator("test_unet", 2, 28)


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = build_model("test_cnn", 1, 28, 10, seed=5, device=torch.device("cpu"))
    b = build_model("test_cnn", 1, 28, 10, seed=5, device=torch.device("cpu"))
    c = build_model("test_cnn", 1, 28, 10, seed=6, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_class_conditional_generator_depends_on_the_label_and_takes_multi_hot_labels():
    torch.manual_seed(0)
    gen = create_generator("test_unet_cond", 1, 28, num_classes=4).eval()
    x = torch.rand(1, 1, 28, 28).expand(4, -1, -1, -1)
    with torch.no_grad():
        out = gen(x, torch.arange(4))
        # same image, four labels: four different perturbations
        assert all(not torch.allclose(out[i], out[j]) for i in range(4) for j in range(i))
        # a one-hot label vector is the same label; several labels sum their planes
        assert torch.allclose(gen(x[:1], torch.tensor([[0, 0, 1, 0]])), out[2:3], atol=1e-6)
        assert gen(x[:1], torch.tensor([[1, 0, 1, 0]])).shape == (1, 1, 28, 28)
    assert is_conditional("test_unet_cond") and not is_conditional("test_unet")


@pytest.mark.parametrize("labels, message", [
    (torch.zeros(3, 1, dtype=torch.long), r"expected shape \(3,\) class indices or \(3, 4\) multi-hot"),
    (torch.zeros(3, 5, dtype=torch.long), r"got \(3, 5\)"),
    (torch.zeros(2, dtype=torch.long), r"got \(2,\)"),
    (torch.tensor([0, 4, 1]), r"class indices must be in \[0, 3\], got 0..4"),
])
def test_class_conditional_generator_refuses_labels_of_the_wrong_shape_or_range(labels, message):
    # an (N, 1) column of indices would otherwise broadcast into a sum of every class's planes
    gen = create_generator("test_unet_cond", 1, 28, num_classes=4)
    with pytest.raises(ValueError, match=message):
        gen(torch.rand(3, 1, 28, 28), labels)


def test_class_conditional_generator_needs_the_number_of_classes():
    with pytest.raises(ConfigError, match=r"class-conditional and needs the number of classes"):
        create_generator("test_unet_cond", 1, 28, key="train_generator.generator")
