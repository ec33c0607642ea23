"""Targeted multi-label adversarial perturbations: ML-CW, ML-DP, Rank I and Rank II.

Song, Jin, Huang, Hu, "Multi-label Adversarial Perturbations", ICDM 2018 (arXiv 1901.00546);
ALGORITHMS.md section 3. A multi-label model returns logits z (N, L); f = sigmoid(z) and
label l is predicted iff f_l > 0.5 (z_l > 0). Label vectors are {0, 1} (float or bool)
(N, L) here; y* = 2 t - 1 in {-1, +1} inside the losses, as in the paper.

Target strategies (``make_targets``, ``poison.attacks.multilabel_targets``): random (flip one
positive and one negative), extreme (flip all), reduction (remove one label), augmentation
(add one label).

Attacks (``attack``, dispatched by name; the CW-style ones only differ by the loss they
pass to ``poison.attacks.cw.cw_search``):

- ML-CW: min ||x' - x||_2^2 + c * sum_l max(0, -y*_l (f_l(x') - 0.5) + kappa) (or in logits,
  ``space``); success =
  exact match (every label's prediction equals the target).
- Rank I: max(0, max_{j: y*_j = -1} f_j - min_{i: y*_i = +1} f_i + kappa): target positives
  above target negatives. Success = that ranking (``rank_success``); exact match is
  reported separately (``MultiLabelResult.exact``: the smallest exact match the same
  search met), since a ranking can hold with every score below 0.5. [adapt] A sample without target positives (or negatives) compares its
  other side with the decision threshold 0.5 instead, so the loss still pushes and its rank
  success is its exact match.
- Rank II: Rank I + max(0, max_{removed} f - min_{kept negatives} f + kappa), where removed =
  {l: labels_l = 1, targets_l = 0} and kept negatives = {l: labels_l = 0, targets_l = 0}:
  the removed labels must also score below every label that was and stays negative.
  [adapt] No removed label: the term is 0; no kept negative: the removed labels are
  compared with the threshold 0.5. Success = Rank I's ranking and this order.
- ML-DP: DeepFool-style; per iteration r = J^T (J J^T)^+ b (a pseudo-inverse, in float64),
  accumulate r, x' = clip(x + (1 + overshoot) r_total, 0, 1); a sample stops once it matches
  exactly, at most ``max_iterations`` (20) [code]; overshoot 0.02 [adapt]. The paper
  linearises f and aims every label at 0.5; [adapt] we linearise the logits z (the same
  boundary z = 0, but no vanishing slope where f saturates: measured on MNIST composites,
  the f version reached 18% of random targets) with b = -z for the labels that do not match
  yet and b = 0 for the others, which are held to first order. [adapt] The box [0, 1]: a
  pixel the clip pins is left out of every later solve of that sample (it stays pinned),
  so the steps do not pile up behind the clip and stall.

``space`` [adapt]: the CW-style losses compare f = sigmoid(z), as the paper does
("probability"), or the logits z with threshold 0 ("logit"): the same decision boundary and
the same ranking (sigmoid is monotonic), but no vanishing slope where f saturates. A
clean-trained multi-label ``dc_cnn`` on the 2x2 composites has median |z| 5.9 (f' about 3e-3)
and 14% of images with a label at f exactly 0 or 1 in float32 (zero gradient), which the
hinge in f cannot move (BENCHMARKS.md section 8). The default is "logit": on validation
composites ML-CW in logits reached 100 / 83 / 100 / 100% of random / extreme / reduction /
augmentation targets with equal or smaller L2, against 77 / 0 / 78 / 97% in f (measured for
ML-CW; Rank I/II take the same default for the same reason, not measured).

``kappa`` is a margin in the units of ``space`` (like the paper's hinge in probability
units). With kappa = 0 a loss is 0 on the boundary itself, where success (strict
inequalities) does not hold yet.

Search defaults [adapt]: 200 Adam steps, 6 binary-search steps, c0 = 10 (a CPU budget);
the paper's code uses 1000 steps, 10 binary-search steps and c0 = 1e5, which a benchmark
can set through ``MultiLabelAttackConfig``.

Metrics (``attack_metrics``): success rate over valid samples, exact-match rate, mean L2
and L-inf of the successful perturbations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from poison.attacks.cw import CWConfig, CWResult, Loss, Success, cw_search, norms
from poison.attacks.multilabel_targets import LABELLED, STRATEGIES, as_bool, make_targets
from poison.errors import ConfigError
from poison.utils import frozen

__all__ = ["STRATEGIES", "SPACES", "METHODS", "MultiLabelAttackConfig", "MultiLabelResult", "make_targets", "exact_match",
           "rank_success", "ml_cw_loss", "rank_i_loss", "rank_ii_loss", "ml_dp", "attack", "attack_metrics"]


# ------------------------------------------------------------------- success
def exact_match(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) bool: every label's prediction (z > 0) equals the target. logits, targets: (N, L)."""
    return ((logits > 0) == as_bool(targets).to(logits.device)).all(1)


def _sides(scores: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, threshold: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(min over ``hi``, max over ``lo``) of ``scores`` per row; an empty side is ``threshold``."""
    t = torch.as_tensor(threshold, dtype=scores.dtype, device=scores.device)
    hi_min = torch.where(hi, scores, math.inf).amin(1)
    lo_max = torch.where(lo, scores, -math.inf).amax(1)
    return torch.where(hi.any(1), hi_min, t), torch.where(lo.any(1), lo_max, t)


def _removed_kept(targets: torch.Tensor, labels: torch.Tensor, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    t, y = as_bool(targets).to(device), as_bool(labels).to(device)
    return y & ~t, ~y & ~t


def rank_success(logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) bool: every target positive scores strictly above every target negative (Rank I).

    A row without target positives (negatives) needs its negatives below (positives above)
    the threshold z = 0 instead. With ``labels`` also Rank II's order: every removed label
    (labels 1, targets 0) below every kept negative (labels 0, targets 0), or below z = 0
    where no kept negative exists; no removed label: nothing more to hold.
    """
    t = as_bool(targets).to(logits.device)
    pos_min, neg_max = _sides(logits, t, ~t, 0.0)
    ok = neg_max < pos_min
    if labels is not None:
        removed, kept = _removed_kept(targets, labels, logits.device)
        kept_min, removed_max = _sides(logits, kept, removed, 0.0)
        ok = ok & (~removed.any(1) | (removed_max < kept_min))
    return ok


# -------------------------------------------------------------------- losses
SPACES = ("probability", "logit")


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"space: expected one of {', '.join(SPACES)}, got {space!r}")


def _scores(logits: torch.Tensor, space: str) -> tuple[torch.Tensor, float]:
    """The scores the CW-style losses compare, and their decision threshold."""
    return (torch.sigmoid(logits), 0.5) if space == "probability" else (logits, 0.0)


def ml_cw_loss(targets: torch.Tensor, kappa: float = 0.0, space: str = "probability") -> Loss:
    """Return logits (N, L) -> (N,) sum_l max(0, -y*_l (s_l - threshold) + kappa).

    s = f = sigmoid(logits) with threshold 0.5 (``space="probability"``, the paper), or the
    logits with threshold 0 (``space="logit"``).
    """
    _check_space(space)  # now, not at the first call

    def loss(logits: torch.Tensor) -> torch.Tensor:
        y = as_bool(targets).to(logits.device, logits.dtype) * 2 - 1
        scores, threshold = _scores(logits, space)
        return torch.relu(-y * (scores - threshold) + kappa).sum(1)
    return loss


def _rank_i(f: torch.Tensor, t: torch.Tensor, kappa: float, threshold: float) -> torch.Tensor:
    pos_min, neg_max = _sides(f, t, ~t, threshold)
    return torch.relu(neg_max - pos_min + kappa)


def rank_i_loss(targets: torch.Tensor, kappa: float = 0.0, space: str = "probability") -> Loss:
    """Return logits (N, L) -> (N,) max(0, max_{target negatives} s - min_{target positives} s + kappa).

    s: f = sigmoid(logits) or the logits (``space``); an empty side is replaced by the
    threshold (0.5 or 0; see the module docstring).
    """
    _check_space(space)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        scores, threshold = _scores(logits, space)
        return _rank_i(scores, as_bool(targets).to(logits.device), kappa, threshold)
    return loss


def rank_ii_loss(targets: torch.Tensor, labels: torch.Tensor, kappa: float = 0.0, space: str = "probability") -> Loss:
    """Return logits (N, L) -> (N,) Rank I + max(0, max_{removed} s - min_{kept negatives} s + kappa).

    removed: labels 1 and targets 0; kept negatives: labels 0 and targets 0. No removed
    label: the second term is 0; no kept negative: the removed labels face the threshold.
    """
    _check_space(space)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        f, threshold = _scores(logits, space)
        removed, kept = _removed_kept(targets, labels, logits.device)
        kept_min, removed_max = _sides(f, kept, removed, threshold)
        # where (not a product) keeps the +-inf of an empty side out of the gradient
        extra = torch.where(removed.any(1), torch.relu(removed_max - kept_min + kappa), torch.zeros_like(kept_min))
        return _rank_i(f, as_bool(targets).to(logits.device), kappa, threshold) + extra
    return loss


# ---------------------------------------------------------------------- config
@dataclass(frozen=True)
class MultiLabelAttackConfig:
    """The attack's settings (one params.yaml section).

    Search defaults are a CPU budget [adapt]; the paper's code: iterations 1000,
    binary_steps 10, c_init 1e5.
    """

    method: str = "ml_cw"        # ml_cw | ml_dp | rank_i | rank_ii
    strategy: str = "random"     # random | extreme | reduction | augmentation
    label: int | None = None     # the label reduction removes / augmentation adds (None: random)
    kappa: float = 0.0           # margin in the units of space (ML-CW, Rank I/II; ML-DP ignores it)
    space: str = "logit"         # ML-CW, Rank I/II compare the logits z [adapt] | probability: f (paper)
    iterations: int = 200        # CW-style: Adam steps per value of c
    lr: float = 0.1              # Adam in tanh space (paper 0.01 over 1000 steps; 0.01 barely moves saturated pixels in 200)
    binary_steps: int = 6
    c_init: float = 10.0
    abort_early: bool = True
    max_iterations: int = 20     # ML-DP
    overshoot: float = 0.02      # ML-DP

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.label is not None:
            if isinstance(self.label, bool) or not isinstance(self.label, int) or self.label < 0:
                raise ConfigError(f"label: expected None or an int >= 0, got {self.label!r}")
            if self.strategy not in LABELLED:
                raise ConfigError(f"label: only used by {' and '.join(LABELLED)}, got {self.label} "
                                  f"with strategy {self.strategy!r} (set label: null)")
        for key in ("iterations", "binary_steps", "max_iterations"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}: expected an int >= 1, got {v!r}")
        for key in ("kappa", "lr", "c_init", "overshoot"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{key}: expected a finite number, got {v!r}")
        if self.space not in SPACES:
            raise ConfigError(f"space: expected one of {', '.join(SPACES)}, got {self.space!r}")
        if self.space == "logit":
            if not self.kappa >= 0:
                raise ConfigError(f"kappa: expected >= 0 (a margin in logits), got {self.kappa}")
        elif not 0 <= self.kappa < (0.5 if self.method == "ml_cw" else 1.0):
            bound = "0.5 (f - 0.5 cannot exceed it)" if self.method == "ml_cw" else "1"
            raise ConfigError(f"kappa: expected 0 <= kappa < {bound} for method {self.method!r} in probability "
                              f"space, got {self.kappa} (or set space: logit)")
        for key in ("lr", "c_init"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: expected > 0, got {getattr(self, key)}")
        if not self.overshoot >= 0:
            raise ConfigError(f"overshoot: expected >= 0, got {self.overshoot}")
        if not isinstance(self.abort_early, bool):
            raise ConfigError(f"abort_early: expected a bool, got {self.abort_early!r}")

    def search(self) -> CWConfig:
        """The ``cw_search`` settings of the CW-style methods."""
        return CWConfig(iterations=self.iterations, lr=self.lr, binary_steps=self.binary_steps,
                        c_init=self.c_init, abort_early=self.abort_early)


@dataclass
class MultiLabelResult(CWResult):
    """``CWResult`` plus the exact matches: exact (N,) bool, the attack found an image
    matching every target label; exact_images that image (x where none); exact_l2,
    exact_linf (N,) its norms (0 where none).

    For ML-CW and ML-DP these are ``success``, ``l2`` and ``linf``. Rank I/II search for
    their ranking and keep the smallest image that holds it; ``exact`` is the smallest image
    of the same search that also matched exactly (``cw_search``'s ``secondary``), which
    need not be the kept one: a ranking can hold with every score below the threshold.
    """

    exact: torch.Tensor
    exact_images: torch.Tensor
    exact_l2: torch.Tensor
    exact_linf: torch.Tensor


# ----------------------------------------------------------------------- ML-DP
def _dp_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, free: torch.Tensor | None = None) -> torch.Tensor:
    """r (same shape as x) = J^T (J J^T)^+ b: the least-norm step of the linearised logits z.

    [adapt] b_l = -z_l (to the boundary z = 0, i.e. f = 0.5) for each mismatched label and
    b_l = 0 for each matched one, so matched labels are held to first order; linearising z
    rather than f = sigmoid(z) keeps the step finite where f saturates (same boundary).
    ``free`` (like x, bool): the pixels the step may move; the others (pinned at 0 or 1 by the
    box last time) are left out of the solve, so the step is spent where it takes effect.
    """
    def outputs(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = model(v)
        return z.sum(0), z  # samples are independent in eval mode: d(sum_n z_nl)/dx_n = dz_nl/dx_n

    jac, z = torch.func.jacrev(outputs, has_aux=True)(x)          # (L, N, *x), (N, L)
    mismatch = ((z > 0) != t).to(torch.float64)
    j = jac.flatten(2).transpose(0, 1).to(torch.float64)                          # (N, L, D)
    if free is not None:
        j = j * free.flatten(1)[:, None, :].to(j.dtype)
    b = -z.to(torch.float64) * mismatch                                            # (N, L)
    gram = j @ j.transpose(1, 2)                                                   # (N, L, L)
    r = (j.transpose(1, 2) @ (torch.linalg.pinv(gram, hermitian=True) @ b[..., None])).squeeze(-1)
    return r.to(x.dtype).view_as(x)


def ml_dp(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, cfg: MultiLabelAttackConfig) -> CWResult:
    """Return ML-DP's result against ``model`` (eval mode; parameters and mode restored).

    Shape:
        x: (N, C, H, W) float in [0, 1]; targets: (N, L) {0, 1}.

    Per iteration the samples that do not match exactly take r = J^T (J J^T)^+ b (``_dp_step``:
    mismatched logits to the boundary, matched ones held), r_total += r and
    x' = clip(x + (1 + overshoot) r_total, 0, 1); at most ``cfg.max_iterations``.
    Images are x where the target was not reached (norms 0, as ``cw_search``); c is nan.
    Deterministic.
    """
    x = x.detach()
    t = as_bool(targets).to(x.device)
    r_total = torch.zeros_like(x)
    adv = x.clone()
    free = torch.ones_like(x, dtype=torch.bool)
    with frozen(model):
        with torch.no_grad():
            done = exact_match(model(adv), t)
        for _ in range(cfg.max_iterations):
            if bool(done.all()):
                break
            idx = (~done).nonzero().squeeze(1)
            r_total[idx] += _dp_step(model, adv[idx], t[idx], free[idx])
            wanted = x[idx] + (1 + cfg.overshoot) * r_total[idx]
            adv[idx] = wanted.clamp(0, 1)
            # [adapt] the box [0, 1]: keep only what it allows, and solve later steps without the
            # pixels it pinned (else they pile up behind the clip and the attack stalls)
            free[idx] &= wanted == adv[idx]
            r_total[idx] = (adv[idx] - x[idx]) / (1 + cfg.overshoot)
            with torch.no_grad():
                done = exact_match(model(adv), t)
    images = torch.where(done.view(-1, *[1] * (x.dim() - 1)), adv, x)
    l2, linf = norms(images - x)
    return CWResult(images=images, success=done, l2=l2, linf=linf,
                    c=torch.full((x.shape[0],), math.nan, dtype=torch.float64, device=x.device))


# ---------------------------------------------------------------------- attack
#: CW-style method -> (labels, targets, kappa, space) -> (loss, success) for ``cw_search``
_CW_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, float, str], tuple[Loss, Success]]] = {
    "ml_cw": lambda labels, targets, kappa, space: (ml_cw_loss(targets, kappa, space),
                                                    partial(exact_match, targets=targets)),
    "rank_i": lambda labels, targets, kappa, space: (rank_i_loss(targets, kappa, space),
                                                     partial(rank_success, targets=targets)),
    "rank_ii": lambda labels, targets, kappa, space: (rank_ii_loss(targets, labels, kappa, space),
                                                      partial(rank_success, targets=targets, labels=labels)),
}


def _cw_method(name: str, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
               cfg: MultiLabelAttackConfig) -> CWResult:
    loss, success = _CW_METHODS[name](labels, targets, cfg.kappa, cfg.space)
    exact = None if name == "ml_cw" else partial(exact_match, targets=targets)
    return cw_search(model, x, loss, success, cfg.search(), secondary=exact)


def _ml_dp_method(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                  cfg: MultiLabelAttackConfig) -> CWResult:
    return ml_dp(model, x, targets, cfg)


#: method -> attack(model, x, labels, targets, cfg) -> CWResult
METHODS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, MultiLabelAttackConfig],
                            CWResult]] = {
    **{name: partial(_cw_method, name) for name in _CW_METHODS}, "ml_dp": _ml_dp_method,
}


def attack(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
           cfg: MultiLabelAttackConfig) -> MultiLabelResult:
    """Return ``cfg.method``'s minimal perturbations of x towards ``targets`` (model restored).

    Shape:
        x: (N, C, H, W) float in [0, 1]; labels, targets: (N, L) {0, 1} (labels: the
        original label sets, used by Rank II; usually the model's clean predictions).

    ``exact`` of the result: the attack found an image matching every target label, with
    ``exact_l2`` / ``exact_linf`` its norms (for ML-CW and ML-DP the same as ``success``,
    ``l2``, ``linf``; for Rank I/II the smallest exact match their search met, which may
    differ from the kept ranking image; ``MultiLabelResult``).
    """
    n = x.shape[0]
    for key, v in (("labels", labels), ("targets", targets)):
        if v.dim() != 2 or v.shape[0] != n:
            raise ValueError(f"{key}: expected shape (N, L) with N = {n} (the images), got {tuple(v.shape)}")
    if labels.shape != targets.shape:
        raise ValueError(f"targets: expected the shape of labels {tuple(labels.shape)}, got {tuple(targets.shape)}")
    labels, targets = as_bool(labels).to(x.device), as_bool(targets).to(x.device)
    res = METHODS[cfg.method](model, x, labels, targets, cfg)
    exact = res if res.secondary is None else res.secondary
    return MultiLabelResult(images=res.images, success=res.success, l2=res.l2, linf=res.linf, c=res.c,
                            exact=exact.success, exact_images=exact.images, exact_l2=exact.l2,
                            exact_linf=exact.linf)


def attack_metrics(result: CWResult, valid: torch.Tensor | None = None) -> dict:
    """Return JSON-ready metrics over the ``valid`` samples (all if None).

    count: valid samples; successes; success_rate (None if count is 0); mean_l2, mean_linf
    over the successes (None if none). When ``result`` carries ``exact`` (``attack``'s
    results): exact_match_rate, and exact_mean_l2 / exact_mean_linf over the exact matches
    (for Rank I/II these, not mean_l2, compare with ML-CW's and ML-DP's norms).
    """
    keep = torch.ones_like(result.success) if valid is None else valid.to(result.success.device).bool()
    ok = result.success & keep
    count, successes = int(keep.sum()), int(ok.sum())
    out: dict = {
        "count": count,
        "successes": successes,
        "success_rate": successes / count if count else None,
        "mean_l2": float(result.l2[ok].double().mean()) if successes else None,
        "mean_linf": float(result.linf[ok].double().mean()) if successes else None,
    }
    exact = getattr(result, "exact", None)
    if exact is not None:
        hit = exact & keep
        out["exact_match_rate"] = int(hit.sum()) / count if count else None
        out["exact_mean_l2"] = float(result.exact_l2[hit].double().mean()) if hit.any() else None
        out["exact_mean_linf"] = float(result.exact_linf[hit].double().mean()) if hit.any() else None
    return out
