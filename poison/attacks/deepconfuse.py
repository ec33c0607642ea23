"""DeepConfuse: a generator of training-time perturbations that confuse any learner.

Feng, Cai, Zhou, "Learning to Confuse: Generating Training Time Adversarial Data
with Auto-Encoder", NeurIPS 2019, arXiv 1905.09027.

The generator g is trained against a surrogate victim f_theta that is itself being
trained on the poison x' = clip(x + eps * g(x), 0, 1). Per minibatch (authors' loop):

1. victim loss on poison from the trainable generator, gradients kept in the graph;
2. one unrolled SGD step theta' = theta - lr * grad (``torch.func.functional_call``);
3. generator step on the objective of f_theta' on *clean* x (untargeted: maximise
   cross-entropy; label-specific: minimise cross-entropy to t(y));
4. an ordinary victim SGD step on the poison of the frozen generator copy.

After each trial (``victim_epochs`` epochs) the trained generator is copied into the
frozen one and the victim is re-initialised (every ``victim_reset_every`` trials;
authors: every trial). Unlike the authors' code, the generator
kept is the one whose poison, quantized to uint8 exactly as stored, does most harm
to a victim trained on it as judged on the *validation* split (never the test split).

Where the rest lives: our additions to the authors' procedure, each a keyword of
``DeepConfuseConfig``, in ``poison.attacks.deepconfuse_config``; the targets and outer
objectives (``Target``, ``unroll_objective``, ``align_objective``) in
``poison.attacks.objectives``; applying a generator (``perturb``, ``poison_images``) in
``poison.attacks.perturbation``. This module is the training loop.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from poison.attacks.deepconfuse_config import DeepConfuseConfig
from poison.attacks.objectives import OBJECTIVES, Target, victim_loss
from poison.attacks.perturbation import budget_levels, perturb, poison_images, quantize_poison
from poison.errors import ConfigError
from poison.models import create_generator
from poison.train import build_model, predict, to_float, train_classifier
from poison.utils import GLOBAL_RNG_LOCK, cpu_has_bfloat16, derive_seed, make_generator

__all__ = [
    "DeepConfuseConfig",
    "Target",
    "DeepConfuse",
    "perturb",
    "quantize_poison",
    "budget_levels",
    "poison_images",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "poison.deepconfuse/1"

log = logging.getLogger(__name__)


@dataclass
class TrialRecord:
    """One scored trial: the validation victim's clean accuracy and the poison's goal rate on val.

    ``val_target_rate`` is the share of validation images on the target's goal: the target
    class t(y) (label-specific), the whole ordered list t(y) as the top k (``ordered_topk``:
    the ordered top-k rate, not its top-1), or the goal label vector (multi-label flip);
    None when untargeted. ``val_accuracy`` is exact match for multi-label data.
    """

    trial: int
    steps: int
    seconds: float
    val_accuracy: float | None
    val_target_rate: float | None
    restart: int = 0          # which of ``restarts`` generator runs the trial belongs to


def restart_seed(seed: int, restart: int) -> int:
    """Seed of generator run ``restart`` of ``restarts``: ``seed + restart``.

    Run 0 is ``seed`` itself, so ``restarts: 1`` is the plain run, and ``restarts: 2`` from seed S
    trains the runs of seeds S and S + 1 (the pairs of BENCHMARKS.md 4.10)."""
    return seed + restart


class DeepConfuse:
    """Trains a DeepConfuse perturbation generator (``fit``) and applies it (``poison``).

    Args:
        config: the attack's configuration.
        in_channels, image_size, num_classes: the data's shape (num_classes: labels, if multi-label).
        seed: seeds the generator and victim initialisations and batch orders.
        device: where to train.
        multi_label: the data's labels are multi-hot vectors (N, num_classes).
        validation_seed: seeds the validation victim and its batch order (default ``seed``);
            the runs of ``restarts`` all take run 0's, so one judge scores every candidate.
    """

    def __init__(self, config: DeepConfuseConfig, in_channels: int, image_size: int, num_classes: int,
                 seed: int, device: torch.device | str = "cpu", multi_label: bool = False,
                 validation_seed: int | None = None) -> None:
        self.config = config
        self.shape = (in_channels, image_size, num_classes)
        self.seed = seed
        self.validation_seed = seed if validation_seed is None else validation_seed
        self.device = torch.device(device)
        self.multi_label = multi_label
        self.target = Target.from_config(config, num_classes, multi_label)
        with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed(seed, "generator-init"))
            self.generator = create_generator(config.generator, in_channels, image_size,
                                              num_classes=num_classes).to(self.device)
        self.generator.eval()
        self.curve: list[TrialRecord] = []
        self.best_trial: int | None = None
        self.best_restart: int = 0
        self.best_score: float = math.inf
        self._references: list[nn.Module] = []
        self._adv_map: torch.Tensor | None = None
        self._adv_dist: torch.Tensor | None = None

    # ------------------------------------------------------------------ training
    def _victim(self, trial: int, purpose: str) -> nn.Module:
        """A fresh surrogate; validation victims ("validation-*") are seeded by ``validation_seed``."""
        c, s, k = self.shape
        seed = self.validation_seed if purpose.startswith("validation") else self.seed
        return build_model(self.config.surrogate, c, s, k, derive_seed(seed, purpose, trial), self.device,
                           key="surrogate")

    def _unrolled_generator_step(self, victims: list[nn.Module], g_train: nn.Module, opt_g: torch.optim.Optimizer,
                                 x: torch.Tensor, y: torch.Tensor) -> float:
        cfg = self.config
        x_p = perturb(g_train, x, cfg.eps, cfg.quantize, y)
        terms = []
        for victim in victims:
            # [adapt] several victims (own initialisations, one shared perturbation): the mean of their
            # objectives, so the generator follows what poisons victims in general, not one trajectory.
            params = {k: p.detach().requires_grad_(True) for k, p in victim.named_parameters()}
            # Copies: the generator's passes must not move the victim's BatchNorm statistics.
            buffers = {k: b.clone() for k, b in victim.named_buffers()}
            terms.append(OBJECTIVES[cfg.objective](victim, params, buffers, x, x_p, y, self.target.generator_loss,
                                                   cfg.unroll_lr))
        outer = terms[0] if len(terms) == 1 else torch.stack(terms).mean()
        if self._references:
            # [adapt] Targeted-adversarial term against clean-trained reference models:
            # poison of class y should carry features of class t(y) (Fowl et al., 2021).
            ref_log_probs = self._reference_log_probs(x_p)
            if self._adv_dist is not None:
                q = self._adv_dist[y]
                term = (q * (q.log() - ref_log_probs)).sum(1).mean()
            else:
                term = F.nll_loss(ref_log_probs, self._adv_map.to(y.device)[y])
            outer = outer + cfg.adversarial_weight * term
        opt_g.zero_grad(set_to_none=True)
        outer.backward(inputs=list(g_train.parameters()))
        opt_g.step()
        return float(outer.detach())

    def _autocast(self) -> torch.autocast:
        """bfloat16 autocast of the training steps when ``precision`` asks for it (a no-op otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bfloat16")

    def _reference_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the references' mean softmax on ``x`` (one reference: its log-softmax)."""
        if len(self._references) == 1:
            return F.log_softmax(self._references[0](x), dim=1)
        log_probs = torch.stack([F.log_softmax(ref(x), dim=1) for ref in self._references])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self._references))

    def fit(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        val_images: torch.Tensor,
        val_labels: torch.Tensor,
        on_trial: Callable[[TrialRecord], None] | None = None,
    ) -> list[TrialRecord]:
        """Train the generator; keep the one best on the validation split. Returns the curve.

        With ``restarts: R > 1``, R generators are trained one after another, each a whole run
        from its own seed (``restart_seed``; run 0 is this object's seed), and the kept trial
        of the run that scores best on validation is kept (ties: the earlier run). Every run is
        scored by the same validation victim and batch order (this object's
        ``validation_seed``), so the runs differ only by their poison. The curve
        holds every run's trials, each with its ``restart``. The variance between generator
        seeds is the largest effect on the poison's strength (BENCHMARKS.md 4.4, 4.10).

        Shape:
            train_images, val_images: (N, C, H, W) uint8
            train_labels, val_labels: (N,) int64, or (N, L) in {0, 1} for a multi-label model
        """
        if self.config.precision == "bfloat16" and self.device.type == "cpu" and cpu_has_bfloat16() is False:
            log.warning("precision: bfloat16 on a CPU without bfloat16 instructions: autocast emulates them and "
                        "trains 2-15x slower than float32 (BENCHMARKS.md section 3); set precision: float32 "
                        "(train_generator.precision in params.yaml)")
        if self.config.restarts == 1:
            return self._fit_one(train_images, train_labels, val_images, val_labels, on_trial)
        curve: list[TrialRecord] = []
        best: DeepConfuse | None = None
        for r in range(self.config.restarts):
            run = DeepConfuse(self.config, *self.shape, seed=restart_seed(self.seed, r), device=self.device,
                              multi_label=self.multi_label, validation_seed=self.validation_seed)

            def tagged(record: TrialRecord, r: int = r) -> None:
                record.restart = r
                if on_trial is not None:
                    on_trial(record)

            run._fit_one(train_images, train_labels, val_images, val_labels, tagged)
            curve += run.curve
            log.info("restart %d/%d (seed %d): kept trial %s, validation score %.4f", r + 1, self.config.restarts,
                     run.seed, run.best_trial, run.best_score)
            if best is None or run.best_score < best.best_score:
                best, self.best_restart = run, r
        assert best is not None
        self.generator.load_state_dict(best.generator.state_dict())
        self.generator.eval()
        self.target, self.best_trial, self.best_score = best.target, best.best_trial, best.best_score
        self.curve = curve
        return self.curve

    def _fit_one(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        val_images: torch.Tensor,
        val_labels: torch.Tensor,
        on_trial: Callable[[TrialRecord], None] | None = None,
    ) -> list[TrialRecord]:
        """One generator run from this object's seed (``fit`` without restarts)."""
        cfg = self.config
        if (train_labels.ndim == 2) != self.multi_label or (val_labels.ndim == 2) != self.multi_label:
            raise ConfigError(f"labels: this generator was set up for {'multi' if self.multi_label else 'single'}-label "
                              f"data, got labels of shape {tuple(train_labels.shape)}; build DeepConfuse with "
                              "multi_label matching the dataset's label_type")
        if train_images.shape[0] < cfg.batch_size:
            raise ConfigError(
                f"batch_size: {cfg.batch_size} exceeds the training split ({train_images.shape[0]} "
                "samples), so no step would run; lower it, or lower data.val_size / data.test_size, or raise data.per_class"
            )
        self.curve, self.best_trial, self.best_score = [], None, math.inf
        self._references = []
        k = self.shape[2]
        adv_map = self.target.feature_map(k, cfg.adversarial_shift) if cfg.adversarial_weight > 0 else None
        needs_similarity = self.target.topk_lists is not None and cfg.topk_similarity == "data"
        refs: list[nn.Module] = []
        if adv_map is not None or needs_similarity:
            order = make_generator(self.seed, "reference-order")  # one stream: each reference its own order
            for i in range(cfg.references if adv_map is not None else 1):
                refs.append(self._victim(i, "reference"))
                train_classifier(refs[-1], train_images, train_labels, cfg.pretrain, order)
                refs[-1].eval().requires_grad_(False)
        ref = refs[0] if refs else None  # the label similarity of ordered top-k comes from the first
        if self.target.topk_lists is not None:
            from poison.attacks.topk import class_similarity

            sim = class_similarity(ref, to_float(train_images).to(self.device), train_labels.to(self.device), k) \
                if needs_similarity else None
            self.target = self.target.with_distribution(None if sim is None else sim.cpu(), cfg.topk_alpha,
                                                        cfg.topk_beta)
        if adv_map is not None:
            self._references = refs
            self._adv_map = adv_map
            self._adv_dist = None
            if self.target.topk_lists is not None:
                # [adapt] the ordered version of the term: poison of class c carries features of the
                # class j whose list has c at rank i, weighted by the AD distribution of those ranks,
                # so a model trained on it ranks a clean y's list t(y) in order
                from poison.attacks.topk import target_distribution

                lists = self.target.topk_lists
                inverse = torch.stack([torch.argsort(lists[:, i]) for i in range(lists.shape[1])], dim=1)
                self._adv_dist = target_distribution(inverse, None if sim is None else sim.cpu(), cfg.topk_alpha,
                                                     cfg.topk_beta, num_classes=k).to(self.device)
        x_all = to_float(train_images).to(self.device)
        y_all = train_labels.long().to(self.device)  # multi-hot stays (N, L); victim_loss casts for BCE
        order_gen = make_generator(self.seed, "batch-order")
        g_train = copy.deepcopy(self.generator).train()
        g_frozen = copy.deepcopy(self.generator).eval()
        g_ema = copy.deepcopy(self.generator) if cfg.generator_ema > 0 else None
        opt_g = torch.optim.Adam(g_train.parameters(), lr=cfg.generator_lr)
        best_score, best_state = math.inf, copy.deepcopy(self.generator.state_dict())
        n = x_all.shape[0]
        step = 0
        for trial in range(cfg.trials):
            start = time.perf_counter()
            if trial % cfg.victim_reset_every == 0:
                # The authors start a fresh victim every trial; keeping one for several trials
                # also shows the generator victims trained as long as many-epoch downstream recipes.
                # Victim 0 keeps the single-victim seed stream, so victims: 1 is the authors' procedure.
                victims = [self._victim(trial, "surrogate" if j == 0 else f"surrogate-{j}").train()
                           for j in range(cfg.victims)]
                opts_v: list[torch.optim.Optimizer] = [
                    torch.optim.Adam(v.parameters(), lr=cfg.victim_lr) if cfg.victim_optimizer == "adam"
                    else torch.optim.SGD(v.parameters(), lr=cfg.victim_lr) for v in victims]
            if cfg.generator_lr_schedule == "cosine":
                # Decay over trials so the generator settles instead of oscillating late.
                for group in opt_g.param_groups:
                    group["lr"] = cfg.generator_lr * 0.5 * (1 + math.cos(math.pi * trial / cfg.trials))
            for _ in range(cfg.victim_epochs):
                order = torch.randperm(n, generator=order_gen).to(self.device)
                for b in range(0, n - cfg.batch_size + 1, cfg.batch_size):
                    idx = order[b : b + cfg.batch_size]
                    x, y = x_all[idx], y_all[idx]
                    with self._autocast():
                        self._unrolled_generator_step(victims, g_train, opt_g, x, y)
                    if g_ema is not None:
                        _ema_update(g_ema, g_train, cfg.generator_ema)
                    with self._autocast():
                        with torch.no_grad():
                            x_p = perturb(g_frozen, x, cfg.eps, cfg.quantize, y)
                    for victim, opt_v in zip(victims, opts_v):
                        with self._autocast():
                            loss = victim_loss(victim(x_p), y)
                        opt_v.zero_grad(set_to_none=True)
                        loss.backward()
                        opt_v.step()
                    step += 1
            g_frozen.load_state_dict((g_train if g_ema is None else g_ema).state_dict())
            g_frozen.eval()
            record = TrialRecord(trial, step, 0.0, None, None)
            if (trial + 1) % cfg.select_every == 0 or trial == cfg.trials - 1:
                score, acc, rate = self._validate(g_frozen, train_images, train_labels, val_images, val_labels, trial)
                record.val_accuracy, record.val_target_rate = acc, rate
                if score < best_score:
                    best_score, best_state = score, copy.deepcopy(g_frozen.state_dict())
                    self.best_trial, self.best_score = trial, score
            record.seconds = time.perf_counter() - start
            self.curve.append(record)
            log.info("trial %d/%d: val acc %s target rate %s (%.1fs)", trial + 1, cfg.trials,
                     record.val_accuracy, record.val_target_rate, record.seconds)
            if on_trial is not None:
                on_trial(record)
        self.generator.load_state_dict(best_state)
        self.generator.eval()
        return self.curve

    def _validate(self, gen: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                  val_images: torch.Tensor, val_labels: torch.Tensor, trial: int) -> tuple[float, float, float | None]:
        """Train a fresh surrogate on the stored (uint8) poison; return its score, clean val accuracy, target rate.

        The score is ``Target.score``'s (lower is stronger): accuracy untargeted, 1 - target rate
        otherwise; for multi-label data accuracy is exact-match.

        Every trial, of every run of ``restarts``, is scored with the same victim initialisation
        and batch order (from ``validation_seed``), so candidates differ only by their poison,
        not by the luck of a seed.
        """
        del trial
        poisoned = poison_images(gen, train_images, self.config.eps, self.device, labels=train_labels)
        victim = self._victim(0, "validation-victim")
        order = make_generator(self.validation_seed, "validation-order")
        train_classifier(victim, poisoned, train_labels, self.config.validation, order)
        return self.target.score(predict(victim, val_images), val_labels)

    # ----------------------------------------------------------------- applying
    def poison(self, images: torch.Tensor, batch_size: int = 500, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return the stored poison of ``images`` (uint8, within eps) from the kept generator.

        ``labels``: the images' labels, needed by a class-conditional generator.
        """
        return poison_images(self.generator, images, self.config.eps, self.device, batch_size, labels)

    def state(self) -> dict:
        """Return a checkpoint: tensors and plain values only (loadable with weights_only=True)."""
        c, s, k = self.shape
        return {
            "format": CHECKPOINT_FORMAT,
            "generator_arch": self.config.generator,
            "in_channels": c,
            "image_size": s,
            "num_classes": k,
            "eps": self.config.eps,
            "target_map": None if self.target.target_map is None else self.target.target_map.tolist(),
            "topk_targets": None if self.target.topk_lists is None else self.target.topk_lists.tolist(),
            "flip_labels": None if self.target.flip is None else self.target.flip.nonzero().flatten().tolist(),
            "multi_label": self.multi_label,
            "best_trial": self.best_trial,
            "best_restart": self.best_restart,
            "state_dict": {k2: v.detach().cpu() for k2, v in self.generator.state_dict().items()},
        }


@torch.no_grad()
def _ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """Move ``average``'s parameters ``1 - decay`` of the way to ``model``'s; copy its buffers.

    Buffers (BatchNorm running statistics) are copied, not averaged: they then describe the
    trained weights' activations rather than the average's, the usual choice for weight
    averaging without a recalibration pass. Averaging itself gave no gain (BENCHMARKS.md 4.8),
    so no recalibration pass was added."""
    for a, p in zip(average.parameters(), model.parameters()):
        a.lerp_(p.detach(), 1.0 - decay)
    for a, b in zip(average.buffers(), model.buffers()):
        a.copy_(b)
