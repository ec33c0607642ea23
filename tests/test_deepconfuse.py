"""poison.attacks.deepconfuse: budget, quantization, targets, the unrolled step, fit, checkpoints."""

from __future__ import annotations

import copy
import io
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import reload_generator

from poison.attacks import deepconfuse
from poison.attacks.deepconfuse import (
    DeepConfuse,
    DeepConfuseConfig,
    Target,
    budget_levels,
    perturb,
    poison_images,
    quantize_poison,
)
from poison.errors import ConfigError
from poison.models import create_generator
from poison.train import TrainConfig

EPS_LEVELS = [(0.3, 76), (8 / 255, 8), (0.032, 8), (0.1, 25), (0.05, 12), (16 / 255, 16), (0.5, 127), (1.0, 255)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uint8(n: int, c: int = 1, s: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=_gen(seed))


class Constant(nn.Module):
    """A stand-in generator whose direction is a fixed pattern times tanh(w) (w trainable)."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern)
        self.w = nn.Parameter(torch.tensor(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w) * self.pattern.expand_as(x)


def _tiny_config(**kw) -> DeepConfuseConfig:
    base = dict(generator="test_autoencoder", surrogate="test_cnn", eps=0.3, trials=2, batch_size=16,
                validation=TrainConfig(optimizer="adam", lr=0.01, epochs=1, batch_size=16))
    base.update(kw)
    return DeepConfuseConfig(**base)


# ------------------------------------------------------------------ budget
@pytest.mark.parametrize("eps, levels", EPS_LEVELS)
def test_budget_levels_is_floor_of_eps_times_255(eps, levels):
    assert budget_levels(eps) == levels
    assert levels / 255 <= eps + 1e-12 < (levels + 1) / 255


@pytest.mark.parametrize("eps, levels", EPS_LEVELS)
def test_quantize_poison_respects_budget_and_range(eps, levels):
    clean = _uint8(8, 3, 6, seed=1)
    # a poison far outside the budget in both directions, and outside [0, 1]
    wild = torch.rand(clean.shape, generator=_gen(2)) * 1.4 - 0.2
    q = quantize_poison(clean, wild, eps)
    assert q.dtype == torch.uint8 and q.shape == clean.shape
    diff = (q.to(torch.int16) - clean.to(torch.int16)).abs()
    assert int(diff.max()) <= levels
    # clipping at the budget, not below it: wherever the request exceeds it, the full budget is used
    want = torch.round(wild.clamp(0, 1) * 255).to(torch.int16)
    far = (want - clean.to(torch.int16)).abs() > levels
    assert bool(far.any()) or levels == 255  # at eps 1 nothing can exceed the budget
    assert torch.equal(diff[far], torch.full_like(diff[far], levels))


def test_quantize_poison_keeps_in_budget_poison_exactly():
    clean = _uint8(4, 1, 8, seed=3)
    shift = torch.randint(-5, 6, clean.shape, generator=_gen(4), dtype=torch.int16)
    target = (clean.to(torch.int16) + shift).clamp(0, 255)
    poisoned = target.float() / 255 + 0.001  # rounds back to target
    q = quantize_poison(clean, poisoned, 8 / 255)
    assert torch.equal(q.to(torch.int16), target)


def test_quantize_poison_at_range_edges():
    clean = torch.tensor([0, 255, 0, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    poisoned = torch.tensor([-0.5, 1.5, 1.0, 0.0]).reshape(1, 1, 2, 2)
    q = quantize_poison(clean, poisoned, 0.3)
    assert q.flatten().tolist() == [0, 255, 76, 255 - 76]


@pytest.mark.parametrize("eps", [0.3, 8 / 255, 0.1])
def test_perturb_within_eps_and_range(eps):
    x = torch.rand(4, 1, 6, 6, generator=_gen(0))
    pattern = torch.sign(torch.randn(1, 1, 6, 6, generator=_gen(1)))
    gen = Constant(pattern)
    out = perturb(gen, x, eps).detach()  # perturb keeps the graph (the generator trains through it)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert float((out - x).abs().max()) <= eps + 1e-6
    # it really moves: interior pixels move by eps * tanh(3)
    inner = (x > eps) & (x < 1 - eps)
    assert torch.allclose((out - x)[inner].abs(), torch.full_like(x[inner], eps * math.tanh(3.0)), atol=1e-6)


def test_perturb_quantized_is_on_the_uint8_grid_with_straight_through_gradient():
    x = torch.randint(0, 256, (2, 1, 6, 6), generator=_gen(0)).float() / 255  # uint8 source, as in use
    gen = Constant(torch.sign(torch.randn(1, 1, 6, 6, generator=_gen(1))))
    q = perturb(gen, x, 0.1, quantize=True)
    assert torch.allclose(q * 255, torch.round(q * 255), atol=1e-4)
    (g_q,) = torch.autograd.grad((q * torch.arange(72.0).reshape(q.shape)).sum(), gen.w)
    p = perturb(gen, x, 0.1, quantize=False)
    (g_p,) = torch.autograd.grad((p * torch.arange(72.0).reshape(p.shape)).sum(), gen.w)
    assert torch.allclose(g_q, g_p) and float(g_q.abs()) > 0


@pytest.mark.parametrize("eps, levels", [(0.3, 76), (8 / 255, 8), (0.05, 12)])
def test_poison_images_uses_but_never_exceeds_the_budget(eps, levels):
    # A generator pushing every pixel up by the full eps: 0.3 * 255 = 76.5 must store 76, not 77.
    clean = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    clean[1] = 100
    clean[2] = 250
    gen = Constant(torch.ones(1, 1, 4, 4))
    gen.w.data.fill_(50.0)  # tanh saturates to 1.0
    stored = poison_images(gen, clean, eps)
    diff = stored.to(torch.int16) - clean.to(torch.int16)
    assert stored.dtype == torch.uint8
    assert int(diff.abs().max()) <= levels
    assert int(diff[0].min()) == levels and int(diff[1].min()) == levels
    assert int(stored[2].max()) == min(255, 250 + levels)


@pytest.mark.parametrize("eps", [0.3, 0.1, 8 / 255])
def test_poison_images_with_real_generator_within_budget_and_batch_independent(eps):
    torch.manual_seed(0)
    gen = create_generator("test_autoencoder", 1, 28).train()
    for p in gen.parameters():
        p.data.mul_(5)  # a strong random generator
    clean = _uint8(7, seed=5)
    a = poison_images(gen, clean, eps, batch_size=3)
    b = poison_images(gen, clean, eps, batch_size=500)
    assert gen.training, "poison_images must restore the generator's mode"
    assert torch.equal(a, b)
    diff = (a.to(torch.int16) - clean.to(torch.int16)).abs()
    assert int(diff.max()) <= budget_levels(eps)
    assert int(diff.max()) > 0


# ------------------------------------------------------------------ targets
def test_target_untargeted():
    t = Target.from_config(_tiny_config(), 10)
    assert t.target_map is None and not t.label_specific
    logits = torch.randn(5, 10, generator=_gen(0))
    y = torch.tensor([0, 3, 9, 2, 2])
    assert torch.allclose(t.generator_loss(logits, y), -F.cross_entropy(logits, y))


def test_target_default_shift_map():
    t = Target.from_config(_tiny_config(target="label_specific"), 10)
    assert t.label_specific
    assert t.target_map.tolist() == [(y + 1) % 10 for y in range(10)]
    t3 = Target.from_config(_tiny_config(target="label_specific", target_shift=3), 4)
    assert t3.target_map.tolist() == [3, 0, 1, 2]
    logits = torch.randn(4, 10, generator=_gen(0))
    y = torch.tensor([0, 9, 4, 4])
    assert torch.allclose(t.generator_loss(logits, y), F.cross_entropy(logits, torch.tensor([1, 0, 5, 5])))


def test_target_explicit_map():
    cfg = _tiny_config(target="label_specific", target_map=(2, 0, 1))
    assert Target.from_config(cfg, 3).target_map.tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    "kw, k",
    [
        (dict(target_map=(0, 1, 2)), 3),  # identity
        (dict(target_map=(1, 1, 2)), 3),  # class 2 maps to itself
        (dict(target_shift=10), 10),  # shift that is a multiple of C
        (dict(target_shift=0), 10),
    ],
)
def test_target_rejects_maps_with_fixed_points(kw, k):
    with pytest.raises(ConfigError, match=r"^target_(map|shift): "):
        Target.from_config(_tiny_config(target="label_specific", **kw), k)


@pytest.mark.parametrize("target_map", [(1, 2), (1, 2, 3)])
def test_target_rejects_wrong_length_or_range(target_map):
    with pytest.raises(ConfigError, match=r"target_map: expected 3 labels in \[0, 2\]"):
        Target.from_config(_tiny_config(target="label_specific", target_map=target_map), 3)


# ------------------------------------------------------------------ the unrolled generator step
def _outer_objective(attack: DeepConfuse, victim: nn.Module, gen: nn.Module, x, y) -> tuple[float, float]:
    """Independently computed: (generator loss, clean CE) of the victim after one unrolled step."""
    cfg = attack.config
    params = {k: p.detach().requires_grad_(True) for k, p in victim.named_parameters()}
    buffers = {k: b.clone() for k, b in victim.named_buffers()}
    x_p = perturb(copy.deepcopy(gen), x, cfg.eps, cfg.quantize)
    inner = F.cross_entropy(functional_call(victim, (params, buffers), (x_p,)), y)
    grads = torch.autograd.grad(inner, list(params.values()))
    unrolled = {k: (p - cfg.unroll_lr * g).detach() for (k, p), g in zip(params.items(), grads)}
    with torch.no_grad():
        logits = functional_call(victim, (unrolled, buffers), (x,))
    return float(attack.target.generator_loss(logits, y)), float(F.cross_entropy(logits, y))


@pytest.mark.parametrize("target", ["untargeted", "label_specific"])
@pytest.mark.parametrize("seed", [0, 1])
def test_generator_step_lowers_the_unrolled_objective(target, seed):
    cfg = _tiny_config(target=target, generator_lr=1e-2, unroll_lr=0.1)
    attack = DeepConfuse(cfg, 1, 28, 10, seed)
    x = torch.rand(32, 1, 28, 28, generator=_gen(seed))
    y = torch.randint(0, 10, (32,), generator=_gen(seed + 100))
    victim = attack._victim(0, "surrogate").train()
    victim_before = copy.deepcopy(victim.state_dict())
    g_train = copy.deepcopy(attack.generator).train()
    opt = torch.optim.Adam(g_train.parameters(), lr=cfg.generator_lr)

    before, ce_before = _outer_objective(attack, victim, g_train, x, y)
    returned = [attack._unrolled_generator_step([victim], g_train, opt, x, y) for _ in range(5)]
    after, ce_after = _outer_objective(attack, victim, g_train, x, y)

    assert returned[0] == pytest.approx(before, abs=1e-5)  # the step reports the objective it descends
    assert after < before - 1e-4
    if target == "untargeted":
        assert ce_after > ce_before  # the victim's clean loss after its update goes up
    else:
        tgt = attack.target.target_map[y]
        assert after == pytest.approx(_ce_to(attack, victim, g_train, x, y, tgt), abs=1e-5)
    # the victim itself (weights and BatchNorm statistics) is untouched by the generator step
    for k, v in victim.state_dict().items():
        assert torch.equal(v, victim_before[k]), k


def _ce_to(attack, victim, gen, x, y, tgt) -> float:
    cfg = attack.config
    params = {k: p.detach().requires_grad_(True) for k, p in victim.named_parameters()}
    buffers = {k: b.clone() for k, b in victim.named_buffers()}
    x_p = perturb(copy.deepcopy(gen), x, cfg.eps, cfg.quantize)
    grads = torch.autograd.grad(F.cross_entropy(functional_call(victim, (params, buffers), (x_p,)), y),
                                list(params.values()))
    unrolled = {k: (p - cfg.unroll_lr * g).detach() for (k, p), g in zip(params.items(), grads)}
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(victim, (unrolled, buffers), (x,)), tgt))


# ------------------------------------------------------------------ fit
@pytest.fixture(scope="module")
def tiny_data():
    g = _gen(0)
    x_tr = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8, generator=g)
    x_va = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=g)
    return x_tr, torch.arange(48) % 10, x_va, torch.arange(20) % 10


def _fit(data, seed=0, **kw) -> DeepConfuse:
    attack = DeepConfuse(_tiny_config(**kw), 1, 28, 10, seed)
    attack.fit(*data)
    return attack


def test_fit_curve_best_trial_and_global_rng(tiny_data):
    rng = torch.get_rng_state()
    seen = []
    attack = DeepConfuse(_tiny_config(), 1, 28, 10, seed=0)
    curve = attack.fit(*tiny_data, on_trial=seen.append)
    assert torch.equal(torch.get_rng_state(), rng), "library code must not consume the global RNG"
    assert [r.trial for r in curve] == [0, 1] and seen == curve
    assert [r.steps for r in curve] == [3, 6]  # 48 samples / batch 16, per trial
    for r in curve:
        assert r.val_accuracy is not None and 0.0 <= r.val_accuracy <= 1.0
        assert r.val_target_rate is None
    accs = [r.val_accuracy for r in curve]
    assert attack.best_trial == accs.index(min(accs))


def test_fit_select_every_validates_only_selected_trials(tiny_data):
    attack = _fit(tiny_data, trials=3, select_every=2)
    assert [r.val_accuracy is not None for r in attack.curve] == [False, True, True]
    assert attack.best_trial in (1, 2)


def test_scoring_fewer_trials_leaves_the_training_trajectory_unchanged(tiny_data, monkeypatch):
    # select_every only decides which trials are scored: the generator after each trial (and
    # so the one kept when the same trial wins) does not depend on it; params.yaml relies on this
    seen: dict[int, dict[int, list[torch.Tensor]]] = {}
    validate = DeepConfuse._validate

    def spy(self, gen, *args):
        seen.setdefault(self.config.select_every, {})[args[-1]] = [v.clone() for v in gen.state_dict().values()]
        return validate(self, gen, *args)

    monkeypatch.setattr(DeepConfuse, "_validate", spy)
    _fit(tiny_data, trials=4, select_every=1)
    _fit(tiny_data, trials=4, select_every=2)
    assert sorted(seen[1]) == [0, 1, 2, 3] and sorted(seen[2]) == [1, 3]
    for trial in (1, 3):
        assert all(torch.equal(a, b) for a, b in zip(seen[1][trial], seen[2][trial]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[1][1], seen[1][3]))  # the generator did train


def test_fit_label_specific_reports_target_rate(tiny_data):
    attack = _fit(tiny_data, trials=1, target="label_specific")
    (record,) = attack.curve
    assert record.val_target_rate is not None and 0.0 <= record.val_target_rate <= 1.0
    assert attack.best_trial == 0


def test_fit_same_seed_same_generator_other_seed_differs(tiny_data):
    a, b, c = _fit(tiny_data, seed=0), _fit(tiny_data, seed=0), _fit(tiny_data, seed=1)
    sa, sb, sc = a.generator.state_dict(), b.generator.state_dict(), c.generator.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [r.val_accuracy for r in a.curve] == [r.val_accuracy for r in b.curve]


def test_fit_changes_the_generator(tiny_data):
    attack = DeepConfuse(_tiny_config(trials=1, generator_lr=1e-2), 1, 28, 10, seed=0)
    init = copy.deepcopy(attack.generator.state_dict())
    attack.fit(*tiny_data)
    assert not all(torch.equal(init[k], v) for k, v in attack.generator.state_dict().items())


def test_poison_method_within_budget(tiny_data):
    attack = _fit(tiny_data, trials=1)
    stored = attack.poison(tiny_data[0], batch_size=7)
    assert stored.dtype == torch.uint8 and stored.shape == tiny_data[0].shape
    assert int((stored.to(torch.int16) - tiny_data[0].to(torch.int16)).abs().max()) <= budget_levels(0.3)


def test_state_loads_weights_only_and_restores_generator(tiny_data):
    attack = _fit(tiny_data, trials=1, target="label_specific")
    buf = io.BytesIO()
    torch.save(attack.state(), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["format"] == "poison.deepconfuse/1"
    assert ckpt["generator_arch"] == "test_autoencoder"
    assert (ckpt["in_channels"], ckpt["image_size"], ckpt["num_classes"]) == (1, 28, 10)
    assert ckpt["eps"] == 0.3 and ckpt["best_trial"] == 0
    assert ckpt["target_map"] == [(y + 1) % 10 for y in range(10)]
    gen = create_generator(ckpt["generator_arch"], 1, 28)
    gen.load_state_dict(ckpt["state_dict"])
    x = tiny_data[0][:4]
    assert torch.equal(poison_images(gen, x, 0.3), attack.poison(x))


def test_class_conditional_generator_trains_poisons_by_label_and_round_trips(tiny_data):
    attack = _fit(tiny_data, trials=2, generator="test_unet_cond", target="label_specific")
    x, y = tiny_data[0][:10], tiny_data[1][:10]
    stored = attack.poison(x, batch_size=3, labels=y)
    assert int((stored.to(torch.int16) - x.to(torch.int16)).abs().max()) <= budget_levels(0.3)
    # the label is an input: one image, two labels, two poisons
    one = x[:1].expand(2, -1, -1, -1).contiguous()
    pair = attack.poison(one, labels=torch.tensor([3, 4]))
    assert not torch.equal(pair[0], pair[1])
    with pytest.raises(ConfigError, match=r"labels: this generator is class-conditional"):
        attack.poison(x)
    gen = reload_generator(attack.state(), 1, 28)
    assert torch.equal(poison_images(gen, x, 0.3, labels=y), stored)


def test_generator_ema_poisons_with_the_weight_average(tiny_data):
    # each trial's poison (victim training and validation) comes from the average, not the last step
    plain, averaged = _fit(tiny_data, trials=2), _fit(tiny_data, trials=2, generator_ema=0.5)
    a, b = plain.generator.state_dict(), averaged.generator.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    average, model = create_generator("test_unet", 1, 28), create_generator("test_unet", 1, 28)
    before = [p.detach().clone() for p in average.parameters()]
    deepconfuse._ema_update(average, model, 0.75)
    for p0, p, q in zip(before, average.parameters(), model.parameters()):
        assert torch.allclose(p, 0.75 * p0 + 0.25 * q)
    with pytest.raises(ConfigError, match=r"generator_ema: expected 0 <= generator_ema < 1"):
        _tiny_config(generator_ema=1.0)


# ------------------------------------------------------------------ gradient alignment
def _cosine_by_hand(victim, gen, x, y, cfg, push):
    """cos(grad of CE on the poison, grad of CE to push(y) on clean x), computed with plain autograd."""
    v1, v2 = copy.deepcopy(victim).train(), copy.deepcopy(victim).train()
    x_p = perturb(gen, x, cfg.eps, cfg.quantize).detach()
    g_p = torch.autograd.grad(F.cross_entropy(v1(x_p), y), list(v1.parameters()))
    g_t = torch.autograd.grad(F.cross_entropy(v2(x), push), list(v2.parameters()))
    a, b = torch.cat([g.flatten() for g in g_p]), torch.cat([g.flatten() for g in g_t])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("seed", [0, 1])
def test_align_objective_is_one_minus_gradient_cosine_and_descends(seed):
    cfg = _tiny_config(target="label_specific", objective="align", generator_lr=1e-2)
    attack = DeepConfuse(cfg, 1, 28, 10, seed)
    x = torch.rand(32, 1, 28, 28, generator=_gen(seed))
    y = torch.randint(0, 10, (32,), generator=_gen(seed + 100))
    push = attack.target.target_map[y]
    victim = attack._victim(0, "surrogate").train()
    victim_before = copy.deepcopy(victim.state_dict())
    g_train = copy.deepcopy(attack.generator).train()
    opt = torch.optim.Adam(g_train.parameters(), lr=cfg.generator_lr)

    cos_before = _cosine_by_hand(victim, g_train, x, y, cfg, push)
    returned = [attack._unrolled_generator_step([victim], g_train, opt, x, y) for _ in range(5)]
    cos_after = _cosine_by_hand(victim, g_train, x, y, cfg, push)

    # BatchNorm running statistics of the generator move in train mode: compare the first
    # step with the hand computation made before it.
    assert returned[0] == pytest.approx(1.0 - cos_before, abs=1e-4)
    assert 0.0 <= min(returned) and max(returned) <= 2.0
    assert cos_after > cos_before + 1e-3  # the poison's training gradient turns towards the target's
    for k, v in victim.state_dict().items():
        assert torch.equal(v, victim_before[k]), k


def test_unknown_objective_is_rejected_by_the_config_loader():
    from poison.config import from_dict

    with pytest.raises(ConfigError, match="objective"):
        from_dict(DeepConfuseConfig, {"objective": "unrolled"}, "train_generator")


def test_victim_reset_every_keeps_the_victim_between_resets(monkeypatch):
    cfg = _tiny_config(trials=5, victim_reset_every=2, select_every=5)
    attack = DeepConfuse(cfg, 1, 28, 10, seed=0)
    built = []
    real = attack._victim

    def spy(trial, purpose):
        if purpose == "surrogate":
            built.append(trial)
        return real(trial, purpose)

    monkeypatch.setattr(attack, "_victim", spy)
    x = (torch.rand(32, 1, 28, 28, generator=_gen(0)) * 255).to(torch.uint8)
    y = torch.arange(32) % 10
    attack.fit(x, y, x[:16], y[:16])
    assert built == [0, 2, 4]  # fresh victims only at multiples of victim_reset_every


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_precision_autocasts_the_training_steps_only(tiny_data, monkeypatch, precision):
    # bfloat16 is a speed option for the unrolled generator step and the victim step; the
    # validation victim that picks the kept generator, and the stored poison, stay float32
    seen: dict[str, list[bool]] = {"step": [], "victim": [], "validate": []}
    step, validate, victim_loss = DeepConfuse._unrolled_generator_step, DeepConfuse._validate, deepconfuse.victim_loss

    def spy_step(self, *args):
        seen["step"].append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return step(self, *args)

    def spy_victim(logits, y):
        seen["victim"].append(logits.dtype == torch.bfloat16)
        return victim_loss(logits, y)

    def spy_validate(self, *args):
        seen["validate"].append(torch.is_autocast_enabled("cpu"))
        return validate(self, *args)

    monkeypatch.setattr(DeepConfuse, "_unrolled_generator_step", spy_step)
    monkeypatch.setattr(deepconfuse, "victim_loss", spy_victim)
    monkeypatch.setattr(DeepConfuse, "_validate", spy_validate)
    attack = _fit(tiny_data, trials=2, precision=precision)
    on = precision == "bfloat16"
    assert seen["step"] == [on] * 6 and seen["victim"] == [on] * 6 and seen["validate"] == [False, False]
    stored = attack.poison(tiny_data[0])
    assert stored.dtype == torch.uint8
    assert int((stored.to(torch.int16) - tiny_data[0].to(torch.int16)).abs().max()) <= budget_levels(0.3)
    if on:  # a different (lower-precision) trajectory, not the float32 one relabelled
        ref = _fit(tiny_data, trials=2).generator.state_dict()
        assert not all(torch.equal(ref[k], v) for k, v in attack.generator.state_dict().items())


@pytest.mark.parametrize(("precision", "has_bf16", "warned"), [
    ("bfloat16", False, True), ("bfloat16", True, False), ("bfloat16", None, False), ("float32", False, False)])
def test_bfloat16_without_cpu_support_warns_with_the_fix(tiny_data, monkeypatch, caplog, precision, has_bf16, warned):
    # emulated bfloat16 trains 2-15x slower than float32 (BENCHMARKS.md 3): say so, and name the key to set
    monkeypatch.setattr(deepconfuse, "cpu_has_bfloat16", lambda: has_bf16)
    with caplog.at_level(logging.WARNING, logger="poison.attacks.deepconfuse"):
        _fit(tiny_data, trials=1, precision=precision)
    messages = [r.getMessage() for r in caplog.records if "bfloat16 instructions" in r.getMessage()]
    assert len(messages) == int(warned)
    if warned:
        assert "set precision: float32" in messages[0] and "train_generator.precision" in messages[0]


def test_precision_rejects_other_dtypes_naming_the_key():
    from poison.config import from_dict

    with pytest.raises(ConfigError, match=r"train_generator\.precision: expected one of \['float32', 'bfloat16'\]"):
        from_dict(DeepConfuseConfig, {"precision": "float16"}, "train_generator")
    with pytest.raises(ConfigError, match="precision: expected float32 or bfloat16, got 'float16'"):
        DeepConfuseConfig(precision="float16")


def test_several_victims_step_descends_the_mean_of_their_objectives():
    # victims: K > 1 asks one shared perturbation to poison K differently initialised victims:
    # the generator's loss is the mean of the K single-victim objectives
    cfg = _tiny_config(victims=2, generator_lr=1e-2, unroll_lr=0.1)
    attack = DeepConfuse(cfg, 1, 28, 10, seed=0)
    x = torch.rand(32, 1, 28, 28, generator=_gen(0))
    y = torch.randint(0, 10, (32,), generator=_gen(100))
    victims = [attack._victim(0, "surrogate").train(), attack._victim(0, "surrogate-1").train()]
    assert not torch.equal(next(victims[0].parameters()), next(victims[1].parameters()))
    g_train = copy.deepcopy(attack.generator).train()
    opt = torch.optim.Adam(g_train.parameters(), lr=cfg.generator_lr)
    singles = [_outer_objective(attack, v, g_train, x, y)[0] for v in victims]
    assert singles[0] != pytest.approx(singles[1], abs=1e-4)  # two victims, two different objectives
    returned = [attack._unrolled_generator_step(victims, g_train, opt, x, y) for _ in range(5)]
    assert returned[0] == pytest.approx(sum(singles) / 2, abs=1e-5)
    after = [_outer_objective(attack, v, g_train, x, y)[0] for v in victims]
    assert sum(after) < sum(singles) - 1e-4


def test_several_victims_are_built_and_trained_each_trial(monkeypatch):
    cfg = _tiny_config(trials=3, victims=3, select_every=3)
    attack = DeepConfuse(cfg, 1, 28, 10, seed=0)
    built, stepped = [], []
    real = attack._victim

    def spy(trial, purpose):
        model = real(trial, purpose)
        if purpose.startswith("surrogate"):
            built.append((trial, purpose))
            before = copy.deepcopy(model.state_dict())
            stepped.append((model, before))
        return model

    monkeypatch.setattr(attack, "_victim", spy)
    x = (torch.rand(32, 1, 28, 28, generator=_gen(0)) * 255).to(torch.uint8)
    y = torch.arange(32) % 10
    attack.fit(x, y, x[:16], y[:16])
    # victim 0 keeps the single-victim seed stream (victims: 1 is the authors' procedure)
    assert built == [(t, p) for t in range(3) for p in ("surrogate", "surrogate-1", "surrogate-2")]
    for model, before in stepped:  # every victim took its own SGD steps on the poison
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_victims_must_be_a_positive_integer():
    from poison.config import from_dict

    with pytest.raises(ConfigError, match="victims"):
        from_dict(DeepConfuseConfig, {"victims": 0}, "train_generator")


# ------------------------------------------------------------------ restarts
def test_restarts_keep_the_run_that_scores_best_on_validation(tiny_data, monkeypatch):
    from poison.attacks.deepconfuse import restart_seed

    validate = DeepConfuse._validate
    judges = []

    def favour_run_2(self, *args):
        # the run of restart 2 scores best whatever the tiny data says, so the choice is checked
        judges.append((self.seed, self.validation_seed))
        score, acc, rate = validate(self, *args)
        return (score - 1.0 if self.seed == restart_seed(0, 2) else score), acc, rate

    monkeypatch.setattr(DeepConfuse, "_validate", favour_run_2)
    seen = []
    attack = DeepConfuse(_tiny_config(restarts=3), 1, 28, 10, seed=0)
    curve = attack.fit(*tiny_data, on_trial=seen.append)
    assert [(r.restart, r.trial) for r in curve] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)] and seen == curve
    assert attack.best_restart == 2 and attack.state()["best_restart"] == 2
    assert len({restart_seed(0, r) for r in range(3)}) == 3 and restart_seed(0, 0) == 0
    # one judge: every run trains from its own seed, all are scored by run 0's validation victim
    assert sorted(set(judges)) == [(restart_seed(0, r), 0) for r in range(3)]
    # each run is the single run of its seed judged by seed 0's validation victim: run 0 is
    # restarts: 1, the kept one is run 2's generator
    for r in (0, 2):
        single = DeepConfuse(_tiny_config(), 1, 28, 10, seed=restart_seed(0, r), validation_seed=0)
        single.fit(*tiny_data)
        assert [x.val_accuracy for x in curve if x.restart == r] == [x.val_accuracy for x in single.curve]
        if r == 2:
            assert attack.best_trial == single.best_trial and attack.best_score == single.best_score
            kept, own = attack.generator.state_dict(), single.generator.state_dict()
            assert all(torch.equal(kept[k], own[k]) for k in own)


def test_validation_seed_changes_the_judge_not_the_training(tiny_data, monkeypatch):
    validate, judged_generators = DeepConfuse._validate, []

    def record(self, gen, *args):
        judged_generators.append((self.validation_seed, [t.clone() for t in gen.state_dict().values()]))
        return validate(self, gen, *args)

    monkeypatch.setattr(DeepConfuse, "_validate", record)
    own, judged = _fit(tiny_data, seed=1), DeepConfuse(_tiny_config(), 1, 28, 10, seed=1, validation_seed=0)
    judged.fit(*tiny_data)
    assert own.validation_seed == 1 and judged.validation_seed == 0
    # the generators scored are the seed's, trial by trial (validation never feeds back into training) ...
    mine, theirs = [g for v, g in judged_generators if v == 1], [g for v, g in judged_generators if v == 0]
    assert len(mine) == len(theirs) == 2
    assert all(torch.equal(a, b) for g, h in zip(mine, theirs) for a, b in zip(g, h))
    # ... by another validation victim: seed 0's initialisation, as run 0 of restarts from seed 0 has
    def first_weight(attack):
        return next(attack._victim(0, "validation-victim").parameters())

    run0 = DeepConfuse(_tiny_config(), 1, 28, 10, seed=0)
    assert torch.equal(first_weight(judged), first_weight(run0))
    assert not torch.equal(first_weight(judged), first_weight(own))


def test_one_restart_is_the_plain_run(tiny_data):
    attack = _fit(tiny_data)
    assert attack.best_restart == 0 and {r.restart for r in attack.curve} == {0}
    assert attack.best_score == min(r.val_accuracy for r in attack.curve)


def test_restarts_must_be_a_positive_integer():
    from poison.config import from_dict

    with pytest.raises(ConfigError, match="restarts"):
        from_dict(DeepConfuseConfig, {"restarts": 0}, "train_generator")
