"""poison/attacks/topk.py: ordered targets, the AD distribution, the CW^k loss and both attacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from poison.attacks import topk as T
from poison.errors import ConfigError
from poison.train import build_model


def _linear(seed: int = 0, classes: int = 6) -> nn.Module:
    # weights of std 1 on 16 pixels: a small perturbation in [0, 1] reorders the logits
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, classes))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(classes, 16, generator=g))
        model[1].bias.zero_()
    return model


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g) * 0.6 + 0.2


# ----------------------------------------------------------------------- targets
def test_ordered_targets_exclude_the_label_are_distinct_and_reproducible():
    labels = torch.arange(40) % 10
    t = T.ordered_targets(labels, 9, 10, torch.Generator().manual_seed(3))
    assert t.shape == (40, 9) and t.dtype == torch.long
    assert not (t == labels[:, None]).any()
    # k = C - 1: every other class exactly once
    assert torch.equal(torch.cat([t, labels[:, None]], 1).sort(1).values, torch.arange(10).expand(40, 10))
    a = T.ordered_targets(labels, 3, 10, torch.Generator().manual_seed(5))
    b = T.ordered_targets(labels, 3, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not (a == labels[:, None]).any()
    s = a.sort(1).values
    assert (s[:, 1:] != s[:, :-1]).all()
    assert not torch.equal(a, T.ordered_targets(labels, 3, 10, torch.Generator().manual_seed(6)))


def test_ordered_targets_refuse_k_above_the_other_classes():
    with pytest.raises(ConfigError, match="k: expected 1 <= k <= num_classes - 1 = 9"):
        T.ordered_targets(torch.zeros(2, dtype=torch.long), 10, 10, torch.Generator())


def test_shifted_targets_label_specific_map_and_never_the_label():
    y = torch.arange(10)
    assert torch.equal(T.shifted_targets(y, 1, 10), ((y + 1) % 10)[:, None])
    assert torch.equal(T.shifted_targets(y, 3, 10, shift=2)[3], torch.tensor([5, 6, 7]))
    for shift in (0, 1, 7, 10, -1):
        t = T.shifted_targets(y, 9, 10, shift=shift)
        assert not (t == y[:, None]).any(), shift
        s = t.sort(1).values
        assert (s[:, 1:] != s[:, :-1]).all(), shift
    assert torch.equal(T.shifted_targets(y, 2, 10, shift=0)[4], torch.tensor([5, 6]))  # y itself skipped


# ------------------------------------------------------------------ distribution
def _sim(c: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.functional.normalize(torch.randn(c, 4, generator=g), dim=1)
    return m @ m.T


@pytest.mark.parametrize("similarity", [None, "random"])
def test_target_distribution_ranks_the_targets_in_order_above_the_rest(similarity):
    targets = torch.tensor([[2, 0, 5], [1, 4, 3], [5, 4, 0]])
    sim = _sim() if similarity else None
    p = T.target_distribution(targets, sim, num_classes=6)
    assert p.shape == (3, 6)
    assert torch.allclose(p.sum(1), torch.ones(3))
    pt = p.gather(1, targets)
    assert (pt[:, :-1] > pt[:, 1:]).all()
    rest = p.masked_fill(torch.nn.functional.one_hot(targets, 6).sum(1).bool(), float("inf")).amin(1)
    others = p.masked_fill(torch.nn.functional.one_hot(targets, 6).sum(1).bool(), float("-inf")).amax(1)
    assert (pt[:, -1] > others).all() and torch.isfinite(rest).all()
    assert torch.equal(p.topk(3, 1).indices, targets)
    if similarity is None:  # knowledge-free: equal mass on every non-target class
        non = p.masked_select(~torch.nn.functional.one_hot(targets, 6).sum(1).bool()).view(3, 3)
        assert torch.allclose(non, non[:, :1].expand(3, 3))


def test_target_distribution_uses_the_mean_similarity_of_the_targets():
    sim = _sim()
    targets = torch.tensor([[0, 1]])
    p = T.target_distribution(targets, sim, alpha=10.0, beta=0.3)
    logp = p.log()[0]
    mean = sim[[0, 1]].mean(0)
    assert torch.allclose(logp[2:] - logp[2], mean[2:] - mean[2], atol=1e-5)
    assert torch.allclose(logp[0] - logp[1], torch.tensor(0.3), atol=1e-5)


def test_target_distribution_needs_num_classes_without_similarity():
    with pytest.raises(ConfigError, match="num_classes: required"):
        T.target_distribution(torch.tensor([[1]]), None)


# ------------------------------------------------------------------- similarity
def test_class_similarity_is_a_symmetric_cosine_matrix_and_restores_the_mode():
    model = build_model("test_cnn", 1, 16, 10, 0, torch.device("cpu"))
    model.train()
    buffers = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 1, 16, 16, generator=g), torch.arange(30) % 10
    sim = T.class_similarity(model, x, y, 10, batch_size=7)
    assert sim.shape == (10, 10)
    assert torch.allclose(sim, sim.T) and torch.equal(sim.diagonal(), torch.ones(10))
    assert (sim.abs() <= 1).all()
    assert model.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert torch.allclose(sim, T.class_similarity(model, x, y, 10, batch_size=500), atol=1e-6)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert not last._forward_pre_hooks  # the hook is removed


def test_class_similarity_errors_on_an_empty_class_or_no_linear():
    model = build_model("test_cnn", 1, 16, 10, 0, torch.device("cpu"))
    x = torch.rand(9, 1, 16, 16)
    with pytest.raises(ConfigError, match=r"y: classes \[9\] have no samples"):
        T.class_similarity(model, x, torch.arange(9), 10)
    with pytest.raises(ConfigError, match="model: expected a classifier ending with an nn.Linear"):
        T.class_similarity(nn.Sequential(nn.Flatten()), x, torch.arange(9), 9)


# -------------------------------------------------------------- success and loss
def test_topk_success_requires_the_exact_order():
    logits = torch.tensor([[0.1, 3.0, 2.0, 1.0, 0.0], [0.1, 2.0, 3.0, 1.0, 0.0]])
    targets = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert T.topk_success(logits, targets).tolist() == [True, False]
    assert T.topk_success(logits, torch.tensor([[1, 2], [2, 1]])).tolist() == [True, True]


def test_cwk_loss_is_zero_exactly_when_the_order_holds_with_margin():
    targets = torch.tensor([[1, 2, 3]] * 4)
    logits = torch.tensor([
        [0.0, 3.0, 2.0, 1.0, -1.0],   # ordered, margins 1
        [0.0, 2.0, 3.0, 1.0, -1.0],   # t1, t2 swapped
        [0.0, 3.0, 2.0, 1.0, 1.5],    # a non-target above t3
        [0.0, 3.0, 2.0, 1.0, 0.5],    # ordered, smallest margin 0.5
    ])
    loss = T.cwk_loss(targets)(logits)
    assert loss[0] == 0 and loss[3] == 0 and (loss[1:3] > 0).all()
    # by hand, row 1: i=1: max(z0, z2, z3, z4) - z1 = 1; i=2, i=3: 0
    assert torch.allclose(loss[1], torch.tensor(1 / 3))
    margin = T.cwk_loss(targets, kappa=0.75)(logits)
    assert margin[0] == 0 and margin[3] > 0
    assert T.topk_success(logits, targets).tolist() == (loss == 0).tolist()


def test_ad_loss_is_the_kl_divergence():
    p = T.target_distribution(torch.tensor([[1, 0], [2, 3]]), None, num_classes=4)
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    expected = (p * (p.log() - torch.log_softmax(z, 1))).sum(1)
    assert torch.allclose(T.ad_loss(p)(z), expected, atol=1e-6)
    assert torch.allclose(T.ad_loss(p)(p.log() + 5.0), torch.zeros(2), atol=1e-5)


# ----------------------------------------------------------------------- attacks
_FAST = dict(iterations=60, lr=0.05, binary_steps=3, c_init=10.0)


@pytest.mark.parametrize("attack", ["ad_none", "ad_data", "cwk"])
def test_attacks_reach_ordered_top3_within_range_and_leave_the_model_alone(attack):
    model = _linear()
    model.train()
    before = copy.deepcopy(model.state_dict())
    x = _images()
    with torch.no_grad():
        y = model(x).argmax(1)
    targets = T.ordered_targets(y, 3, 6, torch.Generator().manual_seed(1))
    if attack == "cwk":
        res = T.cwk_attack(model, x, targets, T.TopKConfig(k=3, **_FAST))
    elif attack == "ad_none":
        res = T.ad_attack(model, x, targets, T.TopKConfig(k=3, similarity="none", **_FAST))
    else:
        sim = T.class_similarity(model, _images(12, seed=2), torch.arange(12) % 6, 6)
        res = T.ad_attack(model, x, targets, T.TopKConfig(k=3, **_FAST), similarity=sim)
    assert int(res.success.sum()) >= 3
    assert res.images.min() >= 0 and res.images.max() <= 1
    l2 = (res.images - x).flatten(1).norm(dim=1)
    assert torch.allclose(res.l2, torch.where(res.success, l2, torch.zeros_like(l2)), atol=1e-6)
    with torch.no_grad():
        assert torch.equal(T.topk_success(model(res.images), targets)[res.success], res.success[res.success])
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    m = T.attack_metrics(res)
    assert m["count"] == 4 and m["success_rate"] == int(res.success.sum()) / 4
    assert m["mean_l2"] == pytest.approx(float(res.l2[res.success].mean()))


def test_attack_metrics_without_successes():
    res = T.CWResult(images=torch.zeros(2, 1, 2, 2), success=torch.zeros(2, dtype=torch.bool),
                     l2=torch.zeros(2), linf=torch.zeros(2), c=torch.full((2,), float("nan")))
    assert T.attack_metrics(res) == {"success_rate": 0.0, "mean_l2": None, "mean_linf": None,
                                     "count": 2, "successes": 0}
    empty = T.CWResult(images=torch.zeros(0, 1, 2, 2), success=torch.zeros(0, dtype=torch.bool),
                       l2=torch.zeros(0), linf=torch.zeros(0), c=torch.zeros(0))
    assert T.attack_metrics(empty)["success_rate"] is None  # nothing attacked is not a measured 0%


def test_ad_attack_checks_the_similarity_choice_and_target_shape():
    model, x = _linear(), _images(2)
    targets = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ConfigError, match="similarity: 'data' needs a similarity matrix"):
        T.ad_attack(model, x, targets, T.TopKConfig())
    with pytest.raises(ConfigError, match="similarity: 'none'"):
        T.ad_attack(model, x, targets, T.TopKConfig(similarity="none"), similarity=_sim())
    with pytest.raises(ConfigError, match=r"similarity: expected a \(6, 6\) matrix .* got \(10, 10\)"):
        T.ad_attack(model, x, targets, T.TopKConfig(), similarity=_sim(10))
    with pytest.raises(ValueError, match=r"targets: expected shape \(2, 2\)"):
        T.cwk_attack(model, x, targets, T.TopKConfig(k=2))
    with pytest.raises(ValueError, match="targets: expected k distinct"):
        T.cwk_attack(model, x, torch.tensor([[0, 1, 0], [3, 4, 5]]), T.TopKConfig())


# ------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs, key", [
    (dict(k=0), "k:"),
    (dict(k=2.5), "k:"),
    (dict(beta=0.0), "beta:"),
    (dict(alpha=1.5, beta=0.3, k=3), "alpha:"),
    (dict(similarity="glove"), "similarity:"),
    (dict(kappa=-1.0), "kappa:"),
    (dict(iterations=0), "iterations:"),
    (dict(lr=0.0), "lr:"),
    (dict(binary_steps=0), "binary_steps:"),
    (dict(c_init=-1.0), "c_init:"),
])
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        T.TopKConfig(**kwargs)


def test_config_search_carries_the_settings():
    cfg = T.TopKConfig(iterations=7, lr=0.2, binary_steps=2, c_init=3.0, abort_early=False)
    s = cfg.search()
    assert (s.iterations, s.lr, s.binary_steps, s.c_init, s.abort_early) == (7, 0.2, 2, 3.0, False)
