"""poison.attacks.deepconfuse: the ordered top-k and multi-label objectives (ALGORITHMS.md sections 2, 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from poison.attacks.deepconfuse import DeepConfuse, DeepConfuseConfig, Target, victim_loss
from poison.errors import ConfigError
from poison.train import TrainConfig

TINY = TrainConfig(optimizer="adam", lr=1e-3, epochs=1, batch_size=16)


def _cfg(**kw) -> DeepConfuseConfig:
    base = dict(generator="test_autoencoder", surrogate="test_cnn", eps=0.3, trials=2, batch_size=16,
                generator_lr=1e-3, pretrain=TINY, validation=TINY)
    base.update(kw)
    return DeepConfuseConfig(**base)


def _data(n=48, s=16, seed=0, labels=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, s, s), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % labels
    return x, y


def test_topk_target_lists_and_distribution_rank_the_list_first():
    t = Target.from_config(_cfg(target="ordered_topk", topk=3), 5)
    assert t.topk_lists.tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 0], [4, 0, 1], [0, 1, 2]]
    assert t.target_map.tolist() == [1, 2, 3, 4, 0] and t.label_specific
    with pytest.raises(ConfigError, match="with_distribution"):
        t.generator_loss(torch.zeros(2, 5), torch.tensor([0, 1]))
    t = t.with_distribution(None, 10.0, 0.3)
    p = t.topk_dist
    assert torch.allclose(p.sum(1), torch.ones(5))
    for c in range(5):
        a, b, d = t.topk_lists[c].tolist()
        others = [j for j in range(5) if j not in (a, b, d)]
        assert p[c, a] > p[c, b] > p[c, d] > p[c, others].max()
    # the KL is smallest at the target distribution's own logits and positive elsewhere
    y = torch.tensor([0, 3])
    assert float(t.generator_loss(p[y].log(), y)) == pytest.approx(0.0, abs=1e-6)
    assert float(t.generator_loss(torch.zeros(2, 5), y)) > 0.3  # KL(P || uniform) = log 5 - H(P)


def test_topk_score_is_the_ordered_topk_rate():
    t = Target.from_config(_cfg(target="ordered_topk", topk=2), 4)
    y = torch.tensor([0, 1])
    # sample 0: top-2 = (1, 2) = its list; sample 1: top-2 = (2, 0), list (2, 3)
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [1.0, 0.0, 3.0, -1.0]])
    score, acc, rate = t.score(logits, y)
    assert rate == 0.5 and score == 0.5 and acc == 0.0


def test_multilabel_losses_and_scores():
    t = Target.from_config(_cfg(target="label_specific", flip_labels=(1,)), 3, multi_label=True)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert t.goal(y).tolist() == [[1, 1, 1], [0, 0, 0]]
    logits = torch.tensor([[5.0, 5.0, 5.0], [-5.0, 5.0, -5.0]])  # sample 0 flipped, sample 1 kept
    score, acc, rate = t.score(logits, y)
    assert (score, acc, rate) == (0.5, 0.5, 0.5)
    assert float(t.generator_loss(logits, y)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, t.goal(y).float())))
    u = Target.from_config(_cfg(), 3, multi_label=True)
    assert float(u.generator_loss(logits, y)) == pytest.approx(-float(F.binary_cross_entropy_with_logits(logits, y.float())))
    assert u.score(logits, y) == (0.5, 0.5, None)
    assert float(victim_loss(logits, y)) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, y.float())))


@pytest.mark.parametrize("kw, multi, match", [
    (dict(target="ordered_topk"), True, "single-label"),
    (dict(target="label_specific"), True, "flip_labels"),
    (dict(target="label_specific", flip_labels=(7,)), True, "flip_labels"),
    (dict(target="label_specific", flip_labels=(1,)), False, "flip_labels"),
    (dict(target="ordered_topk", topk=5), False, "topk"),
])
def test_target_errors_name_the_key(kw, multi, match):
    with pytest.raises(ConfigError, match=match):
        Target.from_config(_cfg(**kw), 5, multi_label=multi)


@pytest.mark.parametrize("kw, match", [
    (dict(target="ordered_topk", topk=0), "topk"),
    (dict(target="ordered_topk", topk=3, topk_alpha=1.2, topk_beta=0.3), "topk_alpha"),
    (dict(target="ordered_topk", target_map=(1, 2, 0)), "target_map"),
    (dict(flip_labels=(1,)), "flip_labels"),
    (dict(target="label_specific", flip_labels=(1, 1)), "flip_labels"),
])
def test_config_errors_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw)


@pytest.mark.parametrize("similarity", ["data", "none"])
def test_fit_ordered_topk_runs_and_records_its_lists(similarity):
    x, y = _data(labels=4)
    dc = DeepConfuse(_cfg(target="ordered_topk", topk=2, topk_similarity=similarity), 1, 16, 4, seed=0)
    curve = dc.fit(x, y, x[:16], y[:16])
    assert len(curve) == 2 and all(r.val_target_rate is not None for r in curve)
    state = dc.state()
    assert state["topk_targets"] == [[1, 2], [2, 3], [3, 0], [0, 1]] and state["target_map"] == [1, 2, 3, 0]
    assert dc.target.topk_dist is not None
    out = dc.poison(x)
    assert int((out.to(torch.int16) - x.to(torch.int16)).abs().max()) <= 76


def test_fit_multilabel_runs_on_multi_hot_labels_and_refuses_a_mismatch():
    x, _ = _data()
    y = (torch.rand(48, 4, generator=torch.Generator().manual_seed(1)) < 0.4).long()
    dc = DeepConfuse(_cfg(target="label_specific", flip_labels=(2,)), 1, 16, 4, seed=0, multi_label=True)
    curve = dc.fit(x, y, x[:16], y[:16])
    assert all(r.val_target_rate is not None and r.val_accuracy is not None for r in curve)
    assert dc.state()["flip_labels"] == [2] and dc.state()["multi_label"] is True
    with pytest.raises(ConfigError, match="multi_label"):
        DeepConfuse(_cfg(), 1, 16, 4, seed=0).fit(x, y, x[:16], y[:16])


def test_same_seed_same_multilabel_generator():
    x, _ = _data()
    y = (torch.rand(48, 4, generator=torch.Generator().manual_seed(1)) < 0.4).long()
    states = []
    for _ in range(2):
        dc = DeepConfuse(_cfg(trials=1), 1, 16, 4, seed=3, multi_label=True)
        dc.fit(x, y, x[:16], y[:16])
        states.append(dc.state()["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_topk_adversarial_term_carries_the_inverse_lists():
    x, y = _data(labels=5, n=40)
    dc = DeepConfuse(_cfg(target="ordered_topk", topk=3, adversarial_weight=1.0, topk_similarity="none", trials=1),
                     1, 16, 5, seed=0)
    dc.fit(x, y, x[:16], y[:16])
    q = dc._adv_dist
    for c in range(5):
        first, second, third = (c - 1) % 5, (c - 2) % 5, (c - 3) % 5  # poison of c carries y = c-1 first, ...
        others = [j for j in range(5) if j not in (first, second, third)]
        assert q[c, first] > q[c, second] > q[c, third] > q[c, others].max()


def test_untargeted_losses_log_not_true_is_bounded_and_ignores_confidently_wrong_images():
    """The default untargeted loss, -log(1 - p_y): 0 once an image is confidently wrong, so its
    gradient goes to the images still classified correctly (-CE keeps paying for the wrong ones)."""
    y = torch.tensor([0, 1, 2])
    logits = torch.tensor([[0.0, 30.0, 0.0],   # confidently wrong
                           [0.0, 2.0, 0.0],    # right
                           [0.0, 0.0, 0.0]])   # undecided
    lnt = Target.from_config(_cfg(untargeted_loss="log_not_true"), 3)
    ce = Target.from_config(_cfg(), 3)
    p_y = F.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(lnt.generator_loss(logits, y), -torch.log1p(-p_y).mean())
    assert torch.allclose(ce.generator_loss(logits, y), -F.cross_entropy(logits, y))
    grads = {}
    for name, target in (("lnt", lnt), ("ce", ce)):
        z = logits.clone().requires_grad_(True)
        target.generator_loss(z, y).backward()
        grads[name] = z.grad.norm(dim=1)
    assert grads["lnt"][0] < 1e-6 < grads["ce"][0]      # the wrong image: lnt stops, -CE keeps pushing
    assert grads["lnt"][1] > grads["lnt"][2] > 1e-3      # the effort goes to the right ones
    # bounded below by 0 and finite even when p_y rounds to 1
    assert float(lnt.generator_loss(logits, y)) >= 0
    sure = torch.tensor([[100.0, 0.0, 0.0]])
    assert torch.isfinite(lnt.generator_loss(sure, torch.tensor([0])))


def test_references_are_independent_models_and_the_term_targets_their_mean_softmax():
    x, y = _data(labels=4)
    dc = DeepConfuse(_cfg(target="label_specific", adversarial_weight=1.0, references=3, trials=1), 1, 16, 4, seed=0)
    dc.fit(x, y, x[:16], y[:16])
    refs = dc._references
    assert len(refs) == 3
    w = [next(r.parameters()) for r in refs]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # own initialisation and batch order
    assert all(not p.requires_grad for r in refs for p in r.parameters())
    xf = x[:8].float() / 255
    mean_p = torch.stack([F.softmax(r(xf), 1) for r in refs]).mean(0)
    got = dc._reference_log_probs(xf)
    assert torch.allclose(got, mean_p.log(), atol=1e-5)
    assert torch.allclose(got.exp().sum(1), torch.ones(8), atol=1e-5)


def test_one_reference_is_the_single_model_term():
    """references: 1 (the default) is the term as it was: CE of the one reference's logits."""
    x, y = _data(labels=4)
    dc = DeepConfuse(_cfg(target="label_specific", adversarial_weight=1.0, trials=1), 1, 16, 4, seed=0)
    dc.fit(x, y, x[:16], y[:16])
    (ref,) = dc._references
    xf = x[:8].float() / 255
    t = (y[:8] + 1) % 4
    assert torch.equal(F.nll_loss(dc._reference_log_probs(xf), t), F.cross_entropy(ref(xf), t))


def test_references_need_the_adversarial_term():
    with pytest.raises(ConfigError, match="references: 2 .*adversarial_weight"):
        _cfg(references=2)
    with pytest.raises(ConfigError, match="references: expected an integer >= 1"):
        _cfg(references=0, adversarial_weight=1.0)


def test_class_conditional_multilabel_generator_poisons_by_label_vector_and_round_trips():
    # the multi-label benchmark's path: multi-hot labels through fit, poison and a checkpoint
    from conftest import reload_generator

    from poison.attacks.deepconfuse import poison_images

    x, _ = _data()
    y = (torch.rand(48, 4, generator=torch.Generator().manual_seed(1)) < 0.4).long()
    dc = DeepConfuse(_cfg(generator="test_unet_cond", trials=1), 1, 16, 4, seed=0, multi_label=True)
    dc.fit(x, y, x[:16], y[:16])
    stored = dc.poison(x, labels=y)
    assert int((stored.to(torch.int16) - x.to(torch.int16)).abs().max()) <= 76
    one = x[:1].expand(2, -1, -1, -1).contiguous()
    pair = dc.poison(one, labels=torch.tensor([[1, 0, 0, 0], [1, 0, 1, 0]]))
    assert not torch.equal(pair[0], pair[1])  # another label set, another poison
    gen = reload_generator(dc.state(), 1, 16)
    assert torch.equal(poison_images(gen, x, 0.3, labels=y), stored)
    with pytest.raises(ConfigError, match=r"labels: 47 labels for 48 images"):
        poison_images(gen, x, 0.3, labels=y[:47])
