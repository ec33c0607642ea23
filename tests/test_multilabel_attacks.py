"""poison/attacks/multilabel.py: target strategies, success criteria, losses, the four attacks, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from poison.attacks import multilabel as M
from poison.attacks.cw import CWResult, norms
from poison.errors import ConfigError

# a few steps suffice on the linear model; keeps each attack test well under a second
FAST = dict(iterations=100, binary_steps=4)


def _linear_model() -> nn.Module:
    """A linear multi-label model on 1x4x4 images, z = W (x - 0.5): balanced predictions."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        m[1].weight.copy_(torch.randn(4, 16, generator=g) * 2)
        m[1].bias.copy_(-m[1].weight.sum(1) * 0.5)
    return m


def _images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.2


def _logits(f: list[list[float]]) -> torch.Tensor:
    """Logits whose sigmoid is ``f``."""
    return torch.logit(torch.tensor(f, dtype=torch.float64))


LABELS = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.float32)


# ------------------------------------------------------------------- targets
def _flips(labels: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives turned off, negatives turned on) per row."""
    return ((labels == 1) & (targets == 0)).sum(1), ((labels == 0) & (targets == 1)).sum(1)


def test_random_flips_one_positive_and_one_negative_where_both_exist():
    t, valid = M.make_targets(LABELS, "random", torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and set(t.unique().tolist()) <= {0.0, 1.0}
    assert valid.tolist() == [True, False, False, True, True]
    off, on = _flips(LABELS, t)
    assert off[valid].tolist() == [1, 1, 1] and on[valid].tolist() == [1, 1, 1]
    assert torch.equal(t[~valid], LABELS[~valid])


def test_extreme_flips_every_label():
    t, valid = M.make_targets(LABELS.bool(), "extreme", None)
    assert torch.equal(t, 1 - LABELS) and bool(valid.all())


def test_reduction_and_augmentation_flip_one_random_label():
    g = torch.Generator().manual_seed(0)
    t, valid = M.make_targets(LABELS, "reduction", g)
    assert valid.tolist() == [True, True, False, True, True]
    off, on = _flips(LABELS, t)
    assert off.tolist() == [1, 1, 0, 1, 1] and on.sum() == 0
    t, valid = M.make_targets(LABELS, "augmentation", g)
    assert valid.tolist() == [True, False, True, True, True]
    off, on = _flips(LABELS, t)
    assert on.tolist() == [1, 0, 1, 1, 1] and off.sum() == 0


def test_a_given_label_is_removed_or_added_where_the_rule_allows():
    t, valid = M.make_targets(LABELS, "reduction", None, label=1)
    assert valid.tolist() == [False, True, False, True, True]
    expected = LABELS.clone()
    expected[valid, 1] = 0
    assert torch.equal(t, expected)
    t, valid = M.make_targets(LABELS, "augmentation", None, label=1)
    assert valid.tolist() == [True, False, True, False, False]
    expected = LABELS.clone()
    expected[valid, 1] = 1
    assert torch.equal(t, expected)


def test_random_choice_is_uniform_over_the_candidates():
    labels = torch.tensor([[1, 1, 1, 0]] * 900, dtype=torch.float32)
    t, valid = M.make_targets(labels, "reduction", torch.Generator().manual_seed(3))
    counts = (labels - t).sum(0)
    assert bool(valid.all()) and counts[3] == 0 and ((counts[:3] - 300).abs() < 60).all()


@pytest.mark.parametrize("strategy", ["random", "reduction", "augmentation"])
def test_same_seed_gives_the_same_targets(strategy):
    labels = (torch.rand(64, 5, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    a, va = M.make_targets(labels, strategy, torch.Generator().manual_seed(7))
    b, vb = M.make_targets(labels, strategy, torch.Generator().manual_seed(7))
    c, _ = M.make_targets(labels, strategy, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(va, vb) and not torch.equal(a, c)


def test_make_targets_errors_name_the_argument():
    with pytest.raises(ConfigError, match="strategy: expected one of random, extreme, reduction, augmentation"):
        M.make_targets(LABELS, "swap", None)
    with pytest.raises(ConfigError, match=r"label: expected an int in \[0, 4\), got 4"):
        M.make_targets(LABELS, "reduction", None, label=4)
    with pytest.raises(ConfigError, match="label: only used by reduction and augmentation"):
        M.make_targets(LABELS, "random", torch.Generator(), label=0)
    with pytest.raises(ConfigError, match="generator: expected a torch.Generator"):
        M.make_targets(LABELS, "random", None)


# ------------------------------------------------------------------- success
def test_exact_match_and_rank_success_on_hand_built_logits():
    targets = torch.tensor([[1, 0, 1, 0]] * 3 + [[0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    logits = _logits([
        [0.9, 0.1, 0.8, 0.2],   # exact, ranked
        [0.3, 0.1, 0.4, 0.2],   # ranked, every score below 0.5: not exact
        [0.9, 0.85, 0.8, 0.2],  # neither
        [0.4, 0.3, 0.2, 0.1],   # no target positive: ranked iff all below the threshold
        [0.9, 0.8, 0.7, 0.4],   # no target negative: one below the threshold
    ])
    assert M.exact_match(logits, targets).tolist() == [True, False, False, True, False]
    assert M.exact_match(logits, targets.bool()).tolist() == [True, False, False, True, False]
    assert M.rank_success(logits, targets).tolist() == [True, True, False, True, False]


def test_rank_success_with_labels_adds_rank_ii_order():
    labels = torch.tensor([[1, 1, 0, 0]] * 3 + [[1, 1, 0, 0]])
    targets = torch.tensor([[1, 0, 0, 1]] * 3 + [[0, 0, 1, 1]])   # last: no kept negative
    logits = _logits([
        [0.9, 0.2, 0.3, 0.8],   # removed (1) below kept negative (2)
        [0.9, 0.3, 0.2, 0.8],   # removed above kept negative: Rank I only
        [0.4, 0.2, 0.3, 0.45],  # both orders, nothing above 0.5
        [0.1, 0.6, 0.7, 0.8],   # removed label 1 above the threshold
    ])
    assert M.rank_success(logits, targets).tolist() == [True, True, True, True]
    assert M.rank_success(logits, targets, labels).tolist() == [True, False, True, False]


# -------------------------------------------------------------------- losses
@pytest.mark.parametrize("kappa", [0.0, 0.1])
def test_ml_cw_loss_is_zero_exactly_when_every_margin_reaches_kappa(kappa):
    targets = torch.tensor([[1, 0, 1, 0]] * 3)
    logits = _logits([
        [0.5 + kappa + 0.01, 0.5 - kappa - 0.01, 0.95, 0.05],
        [0.5 + kappa - 0.02, 0.1, 0.9, 0.1],   # one margin short by 0.02
        [0.9, 0.1, 0.9, 0.7],                  # one label on the wrong side
    ])
    loss = M.ml_cw_loss(targets, kappa)(logits)
    assert loss.shape == (3,) and loss[0] == 0 and (loss[1:] > 0).all()
    assert math.isclose(float(loss[1]), 0.02, abs_tol=1e-9)
    assert math.isclose(float(loss[2]), 0.2 + kappa, abs_tol=1e-9)


@pytest.mark.parametrize("kappa", [0.0, 0.1])
def test_rank_i_loss_is_zero_exactly_when_positives_lead_by_kappa(kappa):
    targets = torch.tensor([[1, 0, 1, 0]] * 3 + [[0, 0, 0, 0], [0, 0, 0, 0]])
    logits = _logits([
        [0.3 + kappa + 0.01, 0.1, 0.45, 0.3],  # ranked with margin, all below 0.5
        [0.3 + kappa - 0.02, 0.1, 0.45, 0.3],  # short by 0.02
        [0.2, 0.6, 0.9, 0.1],
        [0.5 - kappa - 0.01, 0.1, 0.2, 0.3],   # no target positive: faces 0.5
        [0.55, 0.1, 0.2, 0.3],
    ])
    loss = M.rank_i_loss(targets, kappa)(logits)
    assert loss.shape == (5,) and loss[0] == 0 and loss[3] == 0
    assert math.isclose(float(loss[1]), 0.02, abs_tol=1e-9)
    assert math.isclose(float(loss[2]), 0.6 - 0.2 + kappa, abs_tol=1e-9)
    assert math.isclose(float(loss[4]), 0.05 + kappa, abs_tol=1e-9)


def test_rank_ii_loss_adds_the_removed_below_kept_negatives_term():
    labels = torch.tensor([[1, 1, 0, 0]] * 3 + [[1, 1, 0, 0], [0, 0, 1, 0]])
    targets = torch.tensor([[1, 0, 0, 1]] * 3 + [[0, 0, 1, 1], [0, 1, 1, 0]])
    logits = _logits([
        [0.9, 0.2, 0.3, 0.8],   # both orders hold
        [0.9, 0.35, 0.3, 0.8],  # removed 0.05 above the kept negative
        [0.9, 0.35, 0.3, 0.2],  # Rank I fails (0.2 < 0.35) and removed is 0.05 above kept
        [0.1, 0.6, 0.7, 0.8],   # no kept negative: removed label 1 faces 0.5
        [0.1, 0.7, 0.8, 0.2],   # augmentation, nothing removed: Rank I only
    ])
    kappa = 0.0
    r1 = M.rank_i_loss(targets, kappa)(logits)
    r2 = M.rank_ii_loss(targets, labels, kappa)(logits)
    assert r2[0] == 0 and r1[1] == 0
    assert math.isclose(float(r2[1]), 0.05, abs_tol=1e-9)
    assert math.isclose(float(r2[2] - r1[2]), 0.05, abs_tol=1e-9) and r1[2] > 0
    assert math.isclose(float(r2[3] - r1[3]), 0.1, abs_tol=1e-9)
    assert r2[4] == r1[4] == 0


def test_losses_have_finite_gradients_with_empty_sides():
    labels = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    targets = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    z = torch.tensor([[1.0, 2, 3, 4], [1, -2, 3, -4], [-1, 2, -3, 4]], requires_grad=True)
    for loss in (M.ml_cw_loss(targets), M.rank_i_loss(targets), M.rank_ii_loss(targets, labels, 0.1)):
        (g,) = torch.autograd.grad(loss(z).sum(), [z])
        assert torch.isfinite(g).all() and (g.abs().sum(1) > 0).all()


@pytest.mark.parametrize("kappa", [0.0, 2.0])
def test_logit_space_losses_use_logits_and_threshold_zero(kappa):
    targets = torch.tensor([[1, 0, 1, 0]] * 3)
    z = torch.tensor([
        [kappa + 0.5, -kappa - 0.5, 8.0, -8.0],
        [kappa - 0.25, -3.0, 3.0, -3.0],        # one margin short by 0.25
        [3.0, -3.0, 3.0, 1.0],                  # one label on the wrong side by 1
    ], dtype=torch.float64)
    loss = M.ml_cw_loss(targets, kappa, "logit")(z)
    assert loss[0] == 0
    assert math.isclose(float(loss[1]), 0.25, abs_tol=1e-9)
    assert math.isclose(float(loss[2]), 1.0 + kappa, abs_tol=1e-9)
    # Rank I: min target positive 3 vs max target negative 1 leads by 2; one-sided rows face 0
    r = M.rank_i_loss(torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]]), kappa, "logit")(
        torch.tensor([[3.0, 1.0, 5.0, -2.0], [-0.5, -1.0, -2.0, -3.0]], dtype=torch.float64))
    assert math.isclose(float(r[0]), max(0.0, kappa - 2.0), abs_tol=1e-9)
    assert math.isclose(float(r[1]), max(0.0, kappa - 0.5), abs_tol=1e-9)
    with pytest.raises(ValueError, match="^space: "):
        M.ml_cw_loss(targets, 0.0, "softmax")


def test_logit_space_keeps_a_gradient_where_the_sigmoid_saturates():
    """A label at z = 40 has f == 1 exactly in float32: the paper's hinge in f cannot move it."""
    targets = torch.tensor([[0, 1]])
    z = torch.tensor([[40.0, 1.0]], requires_grad=True)
    (g_prob,) = torch.autograd.grad(M.ml_cw_loss(targets)(z).sum(), [z])
    (g_logit,) = torch.autograd.grad(M.ml_cw_loss(targets, space="logit")(z).sum(), [z])
    assert M.ml_cw_loss(targets)(z).item() > 0 and g_prob[0, 0] == 0
    assert g_logit[0, 0] == 1 and g_logit[0, 1] == 0


# ------------------------------------------------------------------- attacks
def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method, space", [("ml_cw", "probability"), ("ml_dp", "probability"),
                                           ("rank_i", "probability"), ("rank_ii", "probability"),
                                           ("ml_cw", "logit"), ("rank_ii", "logit")])
@pytest.mark.parametrize("strategy", ["random", "augmentation", "extreme", "reduction"])
def test_attacks_reach_the_target_on_a_linear_model(method, space, strategy):
    model = _linear_model().train()
    model[1].bias.requires_grad_(False)
    before = _state(model)
    x = _images()
    with torch.no_grad():
        labels = (model(x) > 0).float()
    targets, valid = M.make_targets(labels, strategy, torch.Generator().manual_seed(2))
    assert valid.sum() >= 6
    cfg = M.MultiLabelAttackConfig(method=method, strategy=strategy, space=space, **FAST)
    res = M.attack(model, x, labels, targets, cfg)

    assert isinstance(res, CWResult) and bool(res.success[valid].all())
    assert res.images.shape == x.shape and res.images.min() >= 0 and res.images.max() <= 1
    l2, linf = norms(res.images - x)
    assert torch.allclose(res.l2, l2) and torch.allclose(res.linf, linf)
    if method in ("ml_cw", "ml_dp"):  # a ranking can hold at x already; an exact flip cannot
        assert (res.l2[valid] > 0).all()
    with torch.no_grad():
        z = model(res.images)
    criterion = {"ml_cw": M.exact_match(z, targets), "ml_dp": M.exact_match(z, targets),
                 "rank_i": M.rank_success(z, targets), "rank_ii": M.rank_success(z, targets, labels)}[method]
    assert bool(criterion[res.success].all())
    # exact: the smallest exact match the search met; a kept image that matches exactly is one
    kept_exact = res.success & M.exact_match(z, targets)
    assert bool(res.exact[kept_exact].all()) and bool((res.exact_l2 <= res.l2 + 1e-6)[kept_exact].all())
    if method in ("ml_cw", "ml_dp"):
        assert torch.equal(res.exact, kept_exact) and res.exact_images is res.images
    with torch.no_grad():
        assert bool(M.exact_match(model(res.exact_images), targets)[res.exact].all())
    e_l2, e_linf = norms(res.exact_images - x)
    assert torch.allclose(res.exact_l2, torch.where(res.exact, e_l2, 0 * e_l2))
    assert torch.allclose(res.exact_linf, torch.where(res.exact, e_linf, 0 * e_linf))
    # a target without positives or without negatives is ranked against the threshold: exact
    one_sided = (targets.sum(1) == 0) | (targets.sum(1) == targets.shape[1])
    assert torch.equal(res.exact[one_sided], res.success[one_sided])
    # the model is left as it was
    assert model.training and not model[1].bias.requires_grad and model[1].weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ml_dp_leaves_already_matching_samples_unperturbed_and_is_deterministic():
    model = _linear_model()
    x = _images(4)
    with torch.no_grad():
        labels = (model(x) > 0).float()
    targets = labels.clone()
    targets[2:] = 1 - targets[2:]
    cfg = M.MultiLabelAttackConfig(method="ml_dp")
    a = M.ml_dp(model, x, targets, cfg)
    b = M.ml_dp(model, x, targets, cfg)
    assert a.success.all() and torch.equal(a.images[:2], x[:2]) and (a.l2[:2] == 0).all() and (a.l2[2:] > 0).all()
    assert torch.equal(a.images, b.images) and torch.isnan(a.c).all()


def test_attack_metrics_count_valid_samples_and_average_successes():
    res = M.MultiLabelResult(images=torch.zeros(4, 1, 2, 2), success=torch.tensor([True, True, False, True]),
                             l2=torch.tensor([1.0, 3.0, 0.0, 5.0]), linf=torch.tensor([0.1, 0.3, 0.0, 0.5]),
                             c=torch.ones(4, dtype=torch.float64), exact=torch.tensor([True, False, True, True]),
                             exact_images=torch.zeros(4, 1, 2, 2), exact_l2=torch.tensor([2.0, 0.0, 4.0, 9.0]),
                             exact_linf=torch.tensor([0.2, 0.0, 0.4, 0.9]))
    m = M.attack_metrics(res, valid=torch.tensor([True, True, True, False]))
    assert m["count"] == 3 and m["successes"] == 2 and m["success_rate"] == pytest.approx(2 / 3)
    assert m["mean_l2"] == pytest.approx(2.0) and m["mean_linf"] == pytest.approx(0.2)
    assert m["exact_match_rate"] == pytest.approx(2 / 3)
    assert m["exact_mean_l2"] == pytest.approx(3.0) and m["exact_mean_linf"] == pytest.approx(0.3)
    none = M.attack_metrics(CWResult(res.images, torch.zeros(4, dtype=torch.bool), res.l2 * 0, res.linf * 0, res.c))
    assert none["success_rate"] == 0 and none["mean_l2"] is None and none["mean_linf"] is None
    assert "exact_match_rate" not in none


# -------------------------------------------------------------------- config
def test_config_search_and_defaults():
    cfg = M.MultiLabelAttackConfig()
    s = cfg.search()
    assert (s.iterations, s.lr, s.binary_steps, s.c_init) == (200, 0.1, 6, 10.0)
    assert (cfg.max_iterations, cfg.overshoot) == (20, 0.02)
    assert cfg.space == "logit"  # the paper's probability-space hinge stalls where f saturates
    assert set(M.METHODS) == {"ml_cw", "ml_dp", "rank_i", "rank_ii"}


@pytest.mark.parametrize("changes, key", [
    ({"method": "fgsm"}, "method"),
    ({"strategy": "swap"}, "strategy"),
    ({"kappa": -0.1}, "kappa"),
    ({"kappa": 0.5, "space": "probability"}, "kappa"),
    ({"kappa": float("nan")}, "kappa"),
    ({"iterations": 0}, "iterations"),
    ({"iterations": 2.5}, "iterations"),
    ({"binary_steps": 0}, "binary_steps"),
    ({"max_iterations": True}, "max_iterations"),
    ({"lr": 0.0}, "lr"),
    ({"c_init": -1.0}, "c_init"),
    ({"overshoot": -0.01}, "overshoot"),
    ({"abort_early": 1}, "abort_early"),
    ({"label": -1, "strategy": "reduction"}, "label"),
    ({"label": 1}, "label"),
    ({"space": "softmax"}, "space"),
    ({"space": "logit", "kappa": -1.0}, "kappa"),
])
def test_config_errors_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        M.MultiLabelAttackConfig(**changes)


def test_config_error_lists_the_known_methods():
    with pytest.raises(ConfigError, match="ml_cw, rank_i, rank_ii, ml_dp"):
        M.MultiLabelAttackConfig(method="ml-cw")
    assert M.MultiLabelAttackConfig(method="rank_i", kappa=0.6, space="probability").kappa == 0.6
    assert M.MultiLabelAttackConfig(space="logit", kappa=2.0).kappa == 2.0  # logits: no 0.5 bound


def test_rank_search_reports_the_smallest_exact_match_it_met_not_only_the_kept_ranking():
    """A ranking can hold with every score below the threshold; the search's exact matches are tracked apart."""
    from poison.attacks.cw import CWConfig, cw_search

    model = _linear_model()
    x = _images(6)
    never = lambda z: torch.zeros(z.shape[0], dtype=torch.bool)  # noqa: E731
    always = lambda z: torch.ones(z.shape[0], dtype=torch.bool)  # noqa: E731
    loss = lambda z: z.pow(2).sum(1)  # noqa: E731
    cfg = CWConfig(iterations=5, binary_steps=2, c_init=1.0, lr=0.1)
    res = cw_search(model, x, loss, never, cfg, secondary=always)
    assert not res.success.any() and res.secondary.success.all()
    # the first iterate is x itself (up to tanh round-off): the smallest that passes ``always``
    assert (res.secondary.l2 < 1e-3).all() and torch.allclose(res.secondary.images, x, atol=1e-5)
    assert cw_search(model, x, loss, never, cfg).secondary is None


@pytest.mark.parametrize("method", ["ml_cw", "rank_i", "rank_ii"])
def test_rank_methods_pass_the_exact_match_test_to_the_search(method, monkeypatch):
    seen = []
    real = M.cw_search

    def spy(model, x, loss, success, cfg, secondary=None):
        seen.append(secondary)
        return real(model, x, loss, success, cfg, secondary=secondary)

    monkeypatch.setattr(M, "cw_search", spy)
    model = _linear_model()
    x = _images(4)
    with torch.no_grad():
        z = model(x)
    labels = (z > 0).float()
    targets, _ = M.make_targets(labels, "random", torch.Generator().manual_seed(0))
    M.attack(model, x, labels, targets, M.MultiLabelAttackConfig(method=method, strategy="random", **FAST))
    if method == "ml_cw":  # its success already is the exact match
        assert seen == [None]
    else:
        assert len(seen) == 1 and torch.equal(seen[0](z), M.exact_match(z, targets))
