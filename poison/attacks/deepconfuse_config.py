"""The ``train_generator`` section of params.yaml: ``DeepConfuseConfig`` and its checks.

Our additions, all off at their defaults except where params.yaml turns them on, and
each a keyword of ``DeepConfuseConfig``:
- ``generator_lr_schedule="cosine"``: decay the generator's Adam lr over the trials.
- ``untargeted_loss="log_not_true"``: minimise -log(1 - p_y) instead of -CE (bounded);
  ``"derangement"``: minimise CE to a fixed wrong class (y + target_shift) mod C, i.e.
  the label-specific objective used for an untargeted attack (scored by accuracy).
- ``adversarial_weight > 0`` [adapt]: add a targeted-adversarial term against a
  clean-trained reference model, CE(f_ref(x'), m(y)), where m maps each class to the
  class whose features its poison should carry (Fowl et al., "Adversarial Examples
  Make Strong Poisons", NeurIPS 2021, arXiv 2106.10807). ``references=K`` [adapt]: K
  reference models (independent initialisations and batch orders) whose mean softmax the
  term targets, so the poison carries features that several clean models agree on.
- ``victim_optimizer="adam"``: train the surrogate victim with Adam.
- ``objective="align"``: the generator maximises the cosine between the poison's training
  gradient and the target objective's gradient on clean data (see ``align_objective``)
  instead of the authors' one-step unrolled loss.
- ``victim_reset_every=N``: re-initialise the surrogate victim every N trials, not every trial.
- ``victims=K`` [adapt]: K surrogate victims (own initialisations, each with its own optimizer,
  all trained on the same poison batches); the generator descends the mean of their K
  objectives on one shared perturbation, so it follows what poisons victims in general
  rather than one victim's trajectory. K = 1 is the authors' single victim, bit for bit.
- ``restarts=R``: train R generators, each a whole run from its own seed, and keep the one
  whose kept trial scores best on validation, every run judged by the same validation victim
  (the test split still chooses nothing). The generator seed moves the poison's strength more
  than any setting measured (BENCHMARKS.md 4.4), but best of two is not reliably better: over
  four pairs the kept generator averaged 1.94% (A) / 1.98% (B20) clean test accuracy against
  2.18 / 2.01 for one run over eight (4.10, 4.12), at R times the training time.
- ``threads=N``: the stages train the generator with N torch CPU threads (``fit_generator``). CPU
  kernels split their sums by thread, so N is part of the generator's bytes and of every poison
  made from it: fixing it makes a run give the same generator on machines with other core counts.
  None leaves the stage's setting (the variants stages: their section's ``threads``).
- ``precision="bfloat16"``: run the unrolled generator step and the victim step under bfloat16
  autocast (faster on CPUs with bf16 instructions and on GPUs; on a CPU without them autocast
  emulates bfloat16, 2-15x slower than float32, and ``fit`` warns); the validation victim that
  picks the kept generator, and every poison stored, stay float32.
- ``target="ordered_topk"`` [adapt] (Zhang & Wu, "Adversarial Distillation for Ordered Top-k
  Attacks", arXiv 1905.10695; ALGORITHMS.md section 2): the generator step minimises
  KL(P_t(y) || softmax(f_theta'(x))), P the adversarial-distillation distribution of the
  ordered list t(y) = (y + shift, y + shift + 1, ...) of ``topk`` classes, so a model trained
  on the poison ranks that list first; scored by the share of validation images whose top-k
  equals it. k = 1 is the label-specific poison with a soft target.
- Multi-label data (labels (N, L) in {0, 1}; ALGORITHMS.md section 3) [adapt]: the victim
  trains with binary cross-entropy; untargeted, the generator maximises it (scored by
  exact-match accuracy); label-specific, it minimises the BCE to y XOR ``flip_labels``
  (scored by the share of images whose predicted label vector is exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from poison.errors import ConfigError
from poison.models import CLASSIFIERS, GENERATORS
from poison.train import TrainConfig

__all__ = ["DeepConfuseConfig"]


@dataclass(frozen=True)
class DeepConfuseConfig:
    """Mirrors the ``train_generator`` section of params.yaml."""

    generator: str = "dc_autoencoder"
    surrogate: str = "dc_cnn"
    eps: float = 0.3
    norm: Literal["linf"] = "linf"
    target: Literal["untargeted", "label_specific", "ordered_topk"] = "untargeted"
    target_shift: int = 1
    target_map: tuple[int, ...] | None = None
    topk: int = 3                          # ordered_topk: length of the target list
    topk_alpha: float = 10.0               # ordered_topk: AD distribution, logit of t_1 ...
    topk_beta: float = 0.3                 # ... minus beta per rank
    topk_similarity: Literal["data", "none"] = "data"  # label similarity: a clean model's class means, or none
    flip_labels: tuple[int, ...] | None = None  # multi-label, label_specific: the labels each poison flips
    untargeted_loss: Literal["ce", "log_not_true", "derangement"] = "ce"
    objective: Literal["unroll", "align"] = "unroll"
    trials: int = 10
    victim_epochs: int = 1
    victim_reset_every: int = 1
    victims: int = 1                       # surrogate victims per step (own init, batch-shared); the generator's loss is their mean
    batch_size: int = 64
    victim_optimizer: Literal["sgd", "adam"] = "sgd"
    victim_lr: float = 0.01
    unroll_lr: float = 0.01
    generator_lr: float = 1e-4
    generator_lr_schedule: Literal["constant", "cosine"] = "constant"
    quantize: bool = True
    precision: Literal["float32", "bfloat16"] = "float32"  # training steps only; poisons are made in float32
    select_every: int = 1
    restarts: int = 1                      # whole generator runs from their own seeds; the one best on validation is kept
    generator_ema: float = 0.0             # > 0: the poison of each trial comes from an EMA of the generator's weights
    adversarial_weight: float = 0.0
    adversarial_shift: int = 1
    references: int = 1                    # clean reference models of the adversarial term (mean softmax)
    threads: int | None = None             # torch CPU threads while a stage trains it (part of the bytes);
                                           # None: the stage's own setting
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="adam", lr=1e-3, epochs=3, batch_size=64))
    validation: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="adam", lr=0.01, epochs=2, batch_size=64))

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ConfigError(f"generator: unknown generator {self.generator!r}; known: {', '.join(sorted(GENERATORS))}")
        if self.surrogate not in CLASSIFIERS:
            raise ConfigError(f"surrogate: unknown classifier {self.surrogate!r}; known: {', '.join(sorted(CLASSIFIERS))}")
        if not 0 < self.eps <= 1:
            raise ConfigError(f"eps: expected 0 < eps <= 1 (L-inf on images in [0, 1]), got {self.eps}")
        for key in ("trials", "victim_epochs", "victim_reset_every", "victims", "batch_size", "select_every", "references",
                    "restarts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.target == "untargeted" and self.target_map is not None:
            raise ConfigError(
                "target_map: only used with target: label_specific; remove it or set target: label_specific"
            )
        if self.target != "untargeted" and self.untargeted_loss != "ce":
            raise ConfigError(
                f"untargeted_loss: {self.untargeted_loss!r} only applies to target: untargeted; "
                "set it back to ce or choose target: untargeted"
            )
        if self.target == "ordered_topk":
            if self.target_map is not None:
                raise ConfigError("target_map: not used with target: ordered_topk (the lists are y + shift, ...); remove it")
            if self.topk < 1:
                raise ConfigError(f"topk: expected an integer >= 1, got {self.topk}")
            if not self.topk_alpha - (self.topk - 1) * self.topk_beta > 1 or self.topk_beta <= 0:
                raise ConfigError(
                    f"topk_alpha/topk_beta: expected beta > 0 and alpha - (topk - 1) * beta > 1 so the target "
                    f"logits stay ordered above every similarity, got alpha {self.topk_alpha}, beta {self.topk_beta}")
        if self.flip_labels is not None:
            if self.target != "label_specific":
                raise ConfigError("flip_labels: only used with target: label_specific on multi-label data; remove it")
            if not self.flip_labels or len(set(self.flip_labels)) != len(self.flip_labels) or min(self.flip_labels) < 0:
                raise ConfigError(f"flip_labels: expected distinct label indices >= 0, got {list(self.flip_labels)}")
        if self.target == "label_specific" and self.target_map is not None:
            if any(t < 0 for t in self.target_map) or any(t == i for i, t in enumerate(self.target_map)):
                raise ConfigError(
                    f"target_map: expected one label >= 0 per class, each different from its class, got {list(self.target_map)}"
                )
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ConfigError(f"threads: expected null (the stage's own setting) or an integer >= 1, "
                              f"got {self.threads}")
        if not 0 <= self.generator_ema < 1:
            raise ConfigError(f"generator_ema: expected 0 <= generator_ema < 1 (0: off), got {self.generator_ema}")
        if self.adversarial_weight < 0:
            raise ConfigError(f"adversarial_weight: expected >= 0, got {self.adversarial_weight}")
        if self.precision not in ("float32", "bfloat16"):
            raise ConfigError(f"precision: expected float32 or bfloat16, got {self.precision!r}")
        if self.references > 1 and self.adversarial_weight == 0:
            raise ConfigError(f"references: {self.references} reference models are only used by the adversarial term; "
                              "set adversarial_weight > 0 or references: 1")
        for key in ("victim_lr", "unroll_lr", "generator_lr"):
            if not 0 < getattr(self, key) <= 10:
                raise ConfigError(f"{key}: expected 0 < {key} <= 10, got {getattr(self, key)}")
