"""poison/attacks/semantic.py: the SIA transforms, the attack loop and the diagnosis."""

from __future__ import annotations

import math

import pytest
import torch

from poison.attacks import semantic as S
from poison.errors import ConfigError
from poison.train import build_model


def _images(n=3, c=1, h=6, w=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, h, w, generator=g, dtype=dtype) * 0.8 + 0.1)


@pytest.mark.parametrize("name, fn, value, channels", [
    ("brightness", S.brightness, 0.1, 1),
    ("contrast", S.contrast, 1.2, 1),
    ("gamma", S.gamma, 0.9, 1),
    ("saturation", S.saturation, 0.8, 3),
    ("hue", S.hue, 0.5, 3),
])
def test_photometric_transforms_pass_gradcheck(name, fn, value, channels):
    x = _images(2, channels).requires_grad_(True)
    p = torch.full((2,), value, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, p)), name


def test_affine_passes_gradcheck():
    # interior, non-degenerate parameters (bilinear sampling is piecewise linear in them)
    x = _images(2, 1, 7, 6).requires_grad_(True)
    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for v in ([7.3, -4.1], [0.37, -0.61], [0.23, 0.41], [1.03, 0.96])]
    assert torch.autograd.gradcheck(S.affine, (x, *args), atol=1e-5)


def test_apply_attributes_passes_gradcheck_in_images_and_values():
    names = ("brightness", "contrast", "gamma", "rotation", "translate_x", "translate_y", "scale")
    x = _images(2, 1, 7, 6).requires_grad_(True)
    v = torch.tensor([[0.01, 1.1, 0.95, 6.7, 0.31, -0.27, 1.02], [-0.02, 0.9, 1.05, -3.3, -0.43, 0.19, 0.97]],
                     dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: S.apply_attributes(a, names, b), (x, v), atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_identity_parameters_return_the_input(channels):
    x = _images(4, channels, 8, 8, dtype=torch.float32)
    names = tuple(k for k, a in S.ATTRIBUTES.items() if channels == 3 or not a.colour_only)
    out = S.apply_attributes(x, names, S.identity(names, 4))
    assert torch.allclose(out, x, atol=1e-6)
    n = torch.zeros(4)
    assert torch.equal(S.affine(x, n, n, n, torch.ones(4)), x)
    assert torch.equal(S.brightness(x, n), x) and torch.allclose(S.contrast(x, n + 1), x, atol=1e-7)


def test_affine_moves_pixels_as_documented():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 3] = 1
    z, o = torch.zeros(1), torch.ones(1)
    assert (S.affine(x, z, torch.tensor([2.0]), z, o)[0, 0] > 0.5).nonzero().tolist() == [[2, 5]]
    assert (S.affine(x, z, z, torch.tensor([1.0]), o)[0, 0] > 0.5).nonzero().tolist() == [[3, 3]]
    turned = S.affine(x, torch.tensor([180.0]), z, z, o)
    assert (turned[0, 0] > 0.5).nonzero().tolist() == [[5, 4]]  # point reflection about the centre


def _model(seed=0):
    return build_model("test_cnn", 1, 28, 10, seed, torch.device("cpu")).eval()


def _digits(n=16):
    from poison.data import load_source

    ds = load_source("mnist5k", None, 1)
    idx = torch.arange(0, 5000, 5000 // n)[:n]
    return ds.images[idx].float() / 255.0, ds.labels[idx]


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN fit to 64 digits (every _digits(16) and _digits(32) image among them, all classified
    correctly), so an attack's successes are its own, not an untrained model's errors."""
    from poison.train import TrainConfig, train_classifier

    x, y = _digits(64)
    model = train_classifier(_model(), x, y, TrainConfig(lr=0.01, epochs=20, batch_size=16),
                             torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        assert bool((model(x).argmax(1) == y).all())
    return model


def test_sia_respects_ranges_and_budget_and_freezes_successes(trained):
    x, y = _digits(16)
    model = trained
    cfg = S.SIAConfig(eps=0.1, steps=5)
    before = [p.clone() for p in model.parameters()]
    r = S.sia(model, x, y, cfg, torch.Generator().manual_seed(0))
    half = torch.tensor(cfg.half_ranges())
    ident = S.identity(cfg.attributes, 16)
    assert bool(((r.attributes - ident).abs() <= half + 1e-6).all())
    assert float(r.delta.abs().max()) <= 0.1 + 1e-6
    assert float(r.images.min()) >= 0 and float(r.images.max()) <= 1
    assert torch.allclose(r.images, (S.apply_attributes(x, cfg.attributes, r.attributes) + r.delta).clamp(0, 1), atol=1e-6)
    with torch.no_grad():
        assert torch.equal(r.success, model(r.images).argmax(1) != y)
    assert bool((r.steps <= cfg.steps).all()) and bool((r.steps[~r.success] == cfg.steps).all())
    assert bool(r.success.any()) and bool((r.steps[r.success] < cfg.steps).all())  # stopped once successful
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_sia_is_stronger_than_its_random_start_and_seeded(trained):
    x, y = _digits(32)
    model = trained
    cfg = S.SIAConfig(eps=0.1, steps=10)
    r1 = S.sia(model, x, y, cfg, torch.Generator().manual_seed(3))
    r2 = S.sia(model, x, y, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(r1.images, r2.images) and torch.equal(r1.attributes, r2.attributes)
    start = S.sia(model, x, y, S.SIAConfig(eps=0.1, steps=1, step_scale=1e-9), torch.Generator().manual_seed(3))
    assert int(r1.success.sum()) > int(start.success.sum())


def test_targeted_sia_reaches_the_target(trained):
    x, y = _digits(16)
    model = trained
    t = (y + 1) % 10
    r = S.sia(model, x, y, S.SIAConfig(eps=0.2, steps=10), torch.Generator().manual_seed(0), targets=t)
    with torch.no_grad():
        assert torch.equal(r.success, model(r.images).argmax(1) == t)
    assert float(r.success.float().mean()) >= 0.75  # 15 of 16 when written


def test_single_attribute_attack_changes_only_that_attribute_and_no_pixels_directly():
    x, y = _digits(8)
    cfg = S.SIAConfig(eps=0.1, steps=3)
    r = S.sia(_model(), x, y, cfg, torch.Generator().manual_seed(0), only="rotation")
    ident = S.identity(cfg.attributes, 8)
    k = cfg.attributes.index("rotation")
    others = [i for i in range(len(cfg.attributes)) if i != k]
    assert torch.equal(r.attributes[:, others], ident[:, others])
    assert float(r.delta.abs().max()) == 0.0
    with pytest.raises(ConfigError, match="'hue' is not one of the attributes"):
        S.sia(_model(), x, y, cfg, torch.Generator(), only="hue")


def test_diagnosis_counts_equal_the_successes():
    x, y = _digits(32)
    cfg = S.SIAConfig(eps=0.05, steps=4)
    r = S.sia(_model(), x, y, cfg, torch.Generator().manual_seed(1))
    d = S.diagnose(r, y, cfg, 10, single={"rotation": 0.25})
    assert sum(d["dominant_counts"].values()) == d["successes"] == int(r.success.sum())
    assert d["samples"] == 32 and d["single_attribute_success_rate"] == {"rotation": 0.25}
    for c, row in enumerate(d["mean_usage_per_class"]):
        has = bool((r.success & (y == c)).any())
        assert (row is None) == (not has)
        if row is not None:
            assert all(0.0 <= v <= 1.0 for v in row.values())


@pytest.mark.parametrize("kwargs, message", [
    ({"attributes": ("blur",)}, "attributes: unknown"),
    ({"attributes": ("rotation", "rotation")}, "repeated"),
    ({"ranges": {"hue": 1.0}}, "ranges.hue: not one of the attributes"),
    ({"ranges": {"rotation": 0}}, "ranges.rotation: expected a half-range > 0"),
    ({"ranges": {"scale": 1.0}}, "ranges.scale: expected < 1"),
    ({"eps": 1.5}, "eps: expected 0 <= eps <= 1"),
    ({"steps": 0}, "steps: expected an integer >= 1"),
])
def test_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        S.SIAConfig(**kwargs)


def test_colour_attributes_need_colour_images():
    with pytest.raises(ConfigError, match=r"\['hue'\] need colour"):
        S.SIAConfig(attributes=("hue", "rotation")).check_channels(1)
    S.SIAConfig(attributes=("hue", "rotation")).check_channels(3)
    assert math.isclose(S.ATTRIBUTES["hue"].half_range, math.pi)


def test_pgd_and_fgsm_stay_in_budget_and_hurt_a_model():
    from poison.attacks.pgd import fgsm, pgd
    from poison.train import TrainConfig, train_classifier

    x, y = _digits(64)
    model = train_classifier(_model(), x, y, TrainConfig(lr=0.01, epochs=20, batch_size=16), torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean_acc = float((model(x).argmax(1) == y).float().mean())
    adv = pgd(model, x, y, 0.1, 10, torch.Generator().manual_seed(0))
    one = fgsm(model, x, y, 0.1)
    for a in (adv, one):
        assert float((a - x).abs().max()) <= 0.1 + 1e-6 and float(a.min()) >= 0 and float(a.max()) <= 1
    with torch.no_grad():
        assert float((model(adv).argmax(1) == y).float().mean()) < clean_acc
    assert torch.equal(adv, pgd(model, x, y, 0.1, 10, torch.Generator().manual_seed(0)))
    assert not model.training
