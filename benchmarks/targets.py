"""Multi-label and ordered top-k attacks and poisons measured (issue 7), 3 seeds each.

1. ``topk_attacks``: ordered top-k test-time attacks on ``dc_cnn`` trained on the clean
   training split; 500 test images (a seeded subset), random ordered target lists that
   exclude the true label; AD (adversarial distillation, data-driven label similarity) vs
   CW^k at k = 1, 3, 5. Success = the top-k equals the list in order; mean L2 over successes.
2. ``multilabel_attacks``: ML-CW and ML-DP (and Rank I / II) on a multi-label ``dc_cnn``
   (BCE) trained on the clean composites; 500 test composites; targets from the ground
   truth by each strategy (random, extreme, reduction, augmentation). Success = every
   label matches the target; mean L2 / L-inf over successes.
3. ``topk_poison``: DeepConfuse generators at equal budget (``--trials``, objective align +
   the targeted-adversarial term, as the strongest label-specific poison of BENCHMARKS.md
   section 4): label-specific (y -> y + 1), ordered top-k k = 1 and k = 3. Downstream
   ``dc_cnn`` trained from scratch on the stored (uint8) poison: clean test accuracy,
   top-1 target rate, ordered top-3 rate.
4. ``multilabel_poison``: DeepConfuse on the composites (objective align, BCE victim),
   label-specific (flip label 0, keep the others) and untargeted. Downstream multi-label
   ``dc_cnn``: exact match, Hamming loss, macro F1, and the share of clean test composites
   whose predicted labels are exactly the goal; clean-trained models as reference.

Generators are selected on the validation split; downstream seeds are derived per purpose
and never those of generator training. ``--split val`` scores every part on the validation
split instead of test: choose settings (trials, generator, attack budgets) with it, and
run test once to report, so that the test split chooses nothing.

Usage:
    python benchmarks/targets.py --clean <repo>/data/shards/mnist5k --grid <repo>/data/shards/mnist5k-grid
        [--only topk_attacks multilabel_attacks topk_poison multilabel_poison] [--seeds 0 1 2]
        [--trials 8] [--workers 2] [--split val|test]
Results: benchmarks/results/targets.json (merged per part) and a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

PARTS = ("topk_attacks", "multilabel_attacks", "topk_poison", "multilabel_poison")
KS = (1, 3, 5)
STRATEGIES = ("random", "extreme", "reduction", "augmentation")
ML_METHODS = ("ml_cw", "ml_dp", "rank_i", "rank_ii")
ML_SPACES = ("probability", "logit")
SEARCH = {"iterations": 100, "binary_steps": 4}  # CW-style search budget (CPU); both sides of a comparison share it
TOPK_POISONS = ("label_specific", "topk1", "topk3")
ML_POISONS = ("flip", "untargeted")
SAMPLES = 500
TRIALS = 6  # generator trials of the poisons unless --trials says otherwise


def _recipe(epochs: int = 10):
    from poison.train import TrainConfig

    return TrainConfig(optimizer="adam", lr=1e-3, epochs=epochs, batch_size=64)


def _model(x, y, k, seed, purpose):
    from poison.evaluate import fit_classifier

    return fit_classifier(x, y, arch="dc_cnn", recipe=_recipe(), seed=seed, num_classes=k,
                          device=torch.device("cpu")) if purpose == "downstream" else _victim(x, y, k, seed, purpose)


def _victim(x, y, k, seed, purpose):
    from poison.train import build_model, train_classifier
    from poison.utils import derive_seed, make_generator

    model = build_model("dc_cnn", x.shape[1], x.shape[-1], k, derive_seed(seed, "bench-targets", purpose, "init"),
                        torch.device("cpu"))
    return train_classifier(model, x, y, _recipe(), make_generator(seed, "bench-targets", purpose, "order"))


def _subset(n: int, seed: int) -> torch.Tensor:
    from poison.utils import make_generator

    return torch.sort(torch.randperm(n, generator=make_generator(seed, "bench-targets", "subset"))[:SAMPLES]).values


def _metrics(result, valid=None) -> dict[str, Any]:
    ok = result.success if valid is None else result.success & valid
    n = int(valid.sum()) if valid is not None else int(result.success.numel())
    s = int(ok.sum())
    return {"count": n, "successes": s, "success_rate": s / n if n else None,
            "mean_l2": float(result.l2[ok].mean()) if s else None,
            "mean_linf": float(result.linf[ok].mean()) if s else None}


# --------------------------------------------------------------- 1. top-k attacks
def topk_attacks(seed: int, k: int, clean: str, search: dict[str, Any], split: str = "test",
                 c_init: dict[str, float] | None = None, ad: dict[str, float] | None = None,
                 samples: int = SAMPLES, methods: tuple[str, ...] = ("ad", "cwk")) -> dict[str, Any]:
    from poison.attacks.topk import TopKConfig, ad_attack, class_similarity, cwk_attack, ordered_targets, topk_success
    from poison.shards import load_split, read_manifest
    from poison.train import to_float
    from poison.utils import make_generator

    torch.set_num_threads(1)
    nc = len(read_manifest(clean)["classes"])
    x, y, _ = load_split(clean, "train")
    x_te, y_te, _ = load_split(clean, split)
    model = _victim(x, y, nc, seed, "topk-victim")
    idx = _subset(x_te.shape[0], seed)[:samples]  # a prefix of the 500: the same images and target lists
    xs, ys = to_float(x_te[idx]), y_te[idx]
    targets = ordered_targets(ys, k, nc, make_generator(seed, "bench-targets", "topk-targets", k))
    sim = class_similarity(model, to_float(x), y, nc)
    c_init = c_init or {}
    cfg_ad = TopKConfig(k=k, **search, **(ad or {}), **({"c_init": c_init["ad"]} if "ad" in c_init else {}))
    cfg_cw = TopKConfig(k=k, **search, **({"c_init": c_init["cwk"]} if "cwk" in c_init else {}))
    out: dict[str, Any] = {"seed": seed, "k": k, "split": split, "samples": int(idx.numel()), "search": dict(search),
                           "c_init": {"ad": cfg_ad.c_init, "cwk": cfg_cw.c_init},
                           "ad_distribution": {"alpha": cfg_ad.alpha, "beta": cfg_ad.beta, "similarity": cfg_ad.similarity},
                           "clean_error": float((model(xs).argmax(1) != ys).float().mean())}
    with torch.no_grad():
        out["already_at_target"] = float(topk_success(model(xs), targets).float().mean())
    runs = {"ad": lambda a, t: ad_attack(model, a, t, cfg_ad, sim if cfg_ad.similarity == "data" else None),
            "cwk": lambda a, t: cwk_attack(model, a, t, cfg_cw)}
    for name, fn in ((m, runs[m]) for m in methods):
        t0 = time.perf_counter()
        parts = [fn(xs[i : i + 250], targets[i : i + 250]) for i in range(0, xs.shape[0], 250)]
        res = _cat(parts)
        out[name] = _metrics(res) | {"seconds": round(time.perf_counter() - t0, 1)}
    return out


def _cat(parts):
    """One result of the batches' results (same class; tensor fields concatenated, ``secondary`` dropped)."""
    cls = type(parts[0])
    return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(cls) if f.name != "secondary"})


# ---------------------------------------------------------- 2. multi-label attacks
def multilabel_attacks(seed: int, strategy: str, grid: str, methods: tuple[str, ...],
                       search: dict[str, int], split: str = "test", samples: int = SAMPLES,
                       spaces: tuple[str, ...] = ("probability",)) -> dict[str, Any]:
    """One victim, one strategy: each method (CW-style ones once per loss space) on the images.

    Results are keyed by method, with ``_logit`` appended for the logit-space losses (ML-DP
    has no loss space and runs once)."""
    from poison.attacks.multilabel import MultiLabelAttackConfig, attack, attack_metrics, make_targets
    from poison.shards import load_split, read_manifest
    from poison.train import to_float
    from poison.utils import make_generator

    torch.set_num_threads(1)
    nl = len(read_manifest(grid)["classes"])
    x, y, _ = load_split(grid, "train")
    x_te, y_te, _ = load_split(grid, split)
    model = _victim(x, y, nl, seed, "multilabel-victim")
    idx = _subset(x_te.shape[0], seed)[:samples]
    xs, ys = to_float(x_te[idx]), y_te[idx].float()
    with torch.no_grad():
        z = model(xs)
    pred = (z > 0).float()
    f = torch.sigmoid(z)  # float32: f == 0 or 1 exactly has zero gradient, the hinge in f cannot move it
    saturation = {"clean_logit_abs_median": float(z.abs().median()),
                  "saturated_labels": float(((f == 0) | (f == 1)).float().mean()),
                  "saturated_images": float(((f == 0) | (f == 1)).any(1).float().mean())}
    # The attacker starts from what the model predicts: each target flips
    # labels of the clean prediction and keeps the rest, so the attack's cost is the change it
    # asks for, not also the repair of the model's own mistakes on the ground truth.
    targets, valid = make_targets(pred, strategy, make_generator(seed, "bench-targets", "ml-targets", strategy))
    out: dict[str, Any] = {"seed": seed, "strategy": strategy, "split": split, "samples": int(idx.numel()),
                           "valid": int(valid.sum()), "targets_from": "prediction",
                           "clean_exact_match": float((pred == ys).all(1).float().mean())} | saturation
    runs = [(m, sp) for m in methods for sp in (("probability",) if m == "ml_dp" else spaces)]
    out["measured"] = [_ml_key(m, sp) for m, sp in runs]
    out["search"] = dict(search)
    for method, space in runs:
        cfg = MultiLabelAttackConfig(method=method, strategy=strategy, space=space, **search)
        t0 = time.perf_counter()
        parts = [attack(model, xs[i : i + 250], pred[i : i + 250], targets[i : i + 250], cfg)
                 for i in range(0, xs.shape[0], 250)]
        # exact_*: Rank I/II's smallest exact match met in their search (ML-CW, ML-DP: their success)
        out[_ml_key(method, space)] = attack_metrics(_cat(parts), valid) | {
            "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _ml_key(method: str, space: str) -> str:
    return method if space == "probability" else f"{method}_{space}"


# ---------------------------------------------------------------- 3. top-k poisons
def _generator_config(trials: int, **kw):
    from poison.attacks.deepconfuse import DeepConfuseConfig
    from poison.train import TrainConfig

    base = dict(generator="unet16", surrogate="dc_cnn", eps=0.3, trials=trials, generator_lr=1e-3,
                generator_lr_schedule="cosine", select_every=2, objective="align",
                validation=TrainConfig(optimizer="adam", lr=1e-3, epochs=5, batch_size=64))
    return DeepConfuseConfig(**(base | kw))


def topk_poison(variant: str, seeds: list[int], trials: int, clean: str, generator_seed: int = 0,
                generator: str = "unet16", split: str = "test") -> dict[str, Any]:
    """One generator, its poison scored downstream on ``split`` (val: to choose settings; test: to report)."""
    from poison.attacks.deepconfuse import DeepConfuse
    from poison.attacks.topk import shifted_targets, topk_success
    from poison.shards import load_split, read_manifest
    from poison.train import predict

    torch.set_num_threads(1)
    nc = len(read_manifest(clean)["classes"])
    x, y, _ = load_split(clean, "train")
    x_va, y_va, _ = load_split(clean, "val")
    x_te, y_te, _ = load_split(clean, split)
    kw = {"label_specific": dict(target="label_specific", adversarial_weight=1.0),
          "topk1": dict(target="ordered_topk", topk=1, adversarial_weight=1.0),
          "topk3": dict(target="ordered_topk", topk=3, adversarial_weight=1.0)}[variant]
    cfg = _generator_config(trials, generator=generator, **kw)
    dc = DeepConfuse(cfg, x.shape[1], x.shape[-1], nc, seed=generator_seed)
    t0 = time.perf_counter()
    curve = dc.fit(x, y, x_va, y_va)
    seconds = time.perf_counter() - t0
    x_p = dc.poison(x, labels=y)
    lists = shifted_targets(y_te, 3, nc, 1)
    runs = []
    for seed in seeds:
        logits = predict(_model(x_p, y, nc, seed, "downstream"), x_te)
        runs.append({"seed": seed, "accuracy": float((logits.argmax(1) == y_te).float().mean()),
                     "target_rate": float((logits.argmax(1) == lists[:, 0]).float().mean()),
                     "top3_rate": float(topk_success(logits, lists).float().mean())})
    return {"variant": variant, "generator_seed": generator_seed, "generator": generator, "config": kw, "trials": trials,
            "split": split, "generator_seconds": round(seconds, 1),
            "best_trial": dc.best_trial, "curve": [vars(r) for r in curve], "runs": runs}


# ---------------------------------------------------------- 4. multi-label poisons
def multilabel_poison(variant: str, seeds: list[int], trials: int, grid: str, generator_seed: int = 0,
                      generator: str = "unet16", split: str = "test") -> dict[str, Any]:
    """One generator (none for ``clean``), its poison scored downstream on ``split``."""
    from poison.attacks.deepconfuse import DeepConfuse
    from poison.evaluate import multilabel_metrics
    from poison.shards import load_split, read_manifest
    from poison.train import predict

    torch.set_num_threads(1)
    nl = len(read_manifest(grid)["classes"])
    x, y, _ = load_split(grid, "train")
    x_va, y_va, _ = load_split(grid, "val")
    x_te, y_te, _ = load_split(grid, split)
    if variant == "clean":
        x_p, info = x, {}
        goal = (y_te + torch.nn.functional.one_hot(torch.tensor(0), nl)) % 2
    else:
        kw = dict(target="label_specific", flip_labels=(0,)) if variant == "flip" else dict(target="untargeted")
        dc = DeepConfuse(_generator_config(trials, generator=generator, **kw), x.shape[1], x.shape[-1], nl,
                         seed=generator_seed,
                         multi_label=True)
        t0 = time.perf_counter()
        curve = dc.fit(x, y, x_va, y_va)
        info = {"config": kw, "trials": trials, "generator_seconds": round(time.perf_counter() - t0, 1),
                "best_trial": dc.best_trial, "curve": [vars(r) for r in curve]}
        x_p = dc.poison(x, labels=y)
        goal = (y_te + torch.nn.functional.one_hot(torch.tensor(0), nl)) % 2
    runs = []
    for seed in seeds:
        logits = predict(_model(x_p, y, nl, seed, "downstream"), x_te)
        m = multilabel_metrics((logits > 0).long(), y_te, goal)
        runs.append({"seed": seed, **{k: v for k, v in m.items() if k not in ("samples", "per_label_f1")},
                     "label0_f1": m["per_label_f1"][0]})
    return {"variant": variant, "generator_seed": generator_seed, **({} if variant == "clean" else {"generator": generator}),
            "split": split, **info, "runs": runs}


# ------------------------------------------------------------------------ report
def _measuring(command: str) -> str:
    """``command`` without ``--out FILE``: where results are written changes no figure."""
    words = command.split(" ")
    keep = [w for i, w in enumerate(words) if w != "--out" and (i == 0 or words[i - 1] != "--out")]
    return " ".join(keep)


def _merge(name: str, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Part ``name`` with ``new``'s runs replacing the ones of ``old`` they repeat; the other
    runs and the commands that made them are kept. A repeated run keeps the methods only
    the old one measured (AD run alone, then CW^k alone: one run with both)."""
    def commands(part: dict[str, Any]) -> list[str]:
        return [_measuring(c) for c in part.get("commands", [part["command"]] if "command" in part else [])]

    def runs(part: dict[str, Any]) -> list[dict[str, Any]]:
        # attack runs stored before each run recorded its budget ran with their part's
        budget = {"search": part["search"]} if "search" in part and name.endswith("attacks") else {}
        return [{**budget, **r} for r in part.get("runs", [])]

    old_runs, new_runs = runs(old), runs(new)
    previous = {_identity(name, r): r for r in old_runs}
    fresh = {_identity(name, r) for r in new_runs}
    kept = [r for r in old_runs if _identity(name, r) not in fresh]
    merged = {**old, **new, "runs": kept + [{**previous.get(_identity(name, r), {}), **r} for r in new_runs]}
    merged["commands"] = [c for c in commands(old) if c not in commands(new)] + commands(new)
    merged.pop("command", None)
    return merged

def _identity(part: str, run: dict[str, Any]) -> str:
    """What makes a run of ``part`` the same measurement (a rerun replaces it, a different one is kept).

    The attacks' search budget and the poisons' downstream seeds are part of it: a run with
    another budget or other seeds is another measurement, never merged into this one's row.
    Runs stored before a key was recorded read as its default (what they were measured with).
    """
    keys = {"topk_attacks": ("seed", "k", "split", "samples", "c_init", "ad_distribution", "search"),
            "multilabel_attacks": ("seed", "strategy", "split", "samples", "measured", "search"),
            "topk_poison": ("variant", "generator_seed", "generator", "trials", "split", "seeds"),
            "multilabel_poison": ("variant", "generator_seed", "generator", "trials", "split", "seeds")}[part]
    defaults = {"samples": SAMPLES, "generator_seed": 0, "split": "test", "generator": "unet16",
                "measured": ["ml_cw", "ml_dp"], "trials": TRIALS, "search": SEARCH}
    values = {**defaults, **run, "seeds": [r.get("seed") for r in run.get("runs", [])]}
    return json.dumps([values.get(k) for k in keys], sort_keys=True)

def _budget(run: dict[str, Any]) -> str:
    """A suffix naming an attack run's search budget when it is not the default (else "")."""
    search = run.get("search", SEARCH)
    if search == SEARCH:
        return ""
    return f" ({search['iterations']} steps x {search['binary_steps']} c)"


def _ms(rows: list[dict[str, Any]], key: str, scale: float = 100.0, fmt: str = ".1f") -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "-"
    t = torch.tensor(vals, dtype=torch.float64) * scale
    return f"{float(t.mean()):{fmt}} ({float(t.min()):{fmt}}-{float(t.max()):{fmt}})"


def markdown(result: dict[str, Any]) -> str:
    lines: list[str] = []
    if "topk_attacks" in result:
        rows = result["topk_attacks"]["runs"]
        split = rows[0].get("split", "test")
        lines += [f"**1. Ordered top-k attacks on clean-trained `dc_cnn`, {split} images** "
                  "(success %, mean L2 over successes; mean (min-max) of the seeds)", "",
                  "| k | images | AD target distribution | first c (AD / CW^k) | AD success | AD mean L2 | CW^k success | CW^k mean L2 |",
                  "|---|---|---|---|---|---|---|---|"]

        def key(r: dict[str, Any]) -> tuple:
            c = r.get("c_init", {"ad": 10.0, "cwk": 10.0})
            d = r.get("ad_distribution", {"alpha": 10.0, "beta": 0.3, "similarity": "data"})
            return (r["k"], -r.get("samples", SAMPLES), d["similarity"], d["alpha"], d["beta"], c["ad"], c["cwk"],
                    _budget(r))

        for kk in sorted({key(r) for r in rows}):
            sub = [r for r in rows if key(r) == kk]
            ad, cw = [x["ad"] for x in sub if "ad" in x], [x["cwk"] for x in sub if "cwk" in x]
            lines.append(f"| {kk[0]}{kk[7]} | {-kk[1]} | {kk[2]}, alpha {kk[3]:g}, beta {kk[4]:g} | {kk[5]:g} / {kk[6]:g} | "
                         f"{_ms(ad, 'success_rate')} | {_ms(ad, 'mean_l2', 1, '.2f')} | "
                         f"{_ms(cw, 'success_rate')} | {_ms(cw, 'mean_l2', 1, '.2f')} |")
        lines.append("")
    if "multilabel_attacks" in result:
        rows = result["multilabel_attacks"]["runs"]
        split, n = rows[0].get("split", "test"), rows[0].get("samples", SAMPLES)
        lines += [f"**2. Multi-label attacks on a clean-trained multi-label `dc_cnn`, {n} {split} composites** "
                  "(targets flip labels of the model's clean prediction; success % of valid targets (exact match; "
                  "Rank I/II: ranking order), mean L2 / L-inf over successes)",
                  "", "| strategy | method | success | mean L2 | mean L-inf |", "|---|---|---|---|---|"]
        for s, budget in sorted({(r["strategy"], _budget(r)) for r in rows},
                                key=lambda sb: (STRATEGIES.index(sb[0]), sb[1])):
            sub = [r for r in rows if r["strategy"] == s and _budget(r) == budget]
            for m in [_ml_key(m, sp) for sp in ML_SPACES for m in ML_METHODS]:
                v = [x[m] for x in sub if m in x]
                if v:
                    lines.append(f"| {s}{budget} | {m} | {_ms(v, 'success_rate')} | {_ms(v, 'mean_l2', 1, '.2f')} | "
                                 f"{_ms(v, 'mean_linf', 1, '.3f')} |")
        lines.append("")
    def by_variant(rows: list[dict[str, Any]], order: tuple[str, ...]):
        """Per variant, generator and trial count: one row per generator seed, then all of them
        pooled when there are several."""
        def kind(r: dict[str, Any]) -> tuple[str, int, str]:
            return r.get("generator", "unet16"), r.get("trials", TRIALS), r.get("split", "test")

        for v in order:
            kinds = sorted({kind(r) for r in rows if r["variant"] == v},
                           key=lambda k: (k[2] != "test", k[0] != "unet16", k[0], k[1]))
            for gen, trials, split in kinds:
                name = v if gen == "unet16" or v == "clean" else f"{v}, `{gen}`"
                if trials != TRIALS and v != "clean":
                    name += f", {trials} trials"
                if split != "test":
                    name += f" (scored on {split})"
                sub = sorted((r for r in rows if r["variant"] == v and kind(r) == (gen, trials, split)),
                             key=lambda r: r.get("generator_seed", 0))
                for r in sub:
                    yield name, str(r.get("generator_seed", 0)), r["runs"], r.get("generator_seconds", "-")
                if len(sub) > 1:
                    yield name, f"all {len(sub)} pooled", [x for r in sub for x in r["runs"]], "-"

    if "topk_poison" in result:
        rows = result["topk_poison"]["runs"]
        lines += ["**3. Ordered top-k poisons (eps 0.3): downstream `dc_cnn` on the clean test split (val where a "
                  "row says so), %** "
                  "(mean (min-max) over the downstream seeds)", "",
                  "| poison | generator seed | accuracy | top-1 target rate (y+1) | ordered top-3 rate (y+1, y+2, y+3) "
                  "| generator (s) |", "|---|---|---|---|---|---|"]
        for v, g, runs, sec in by_variant(rows, TOPK_POISONS):
            lines.append(f"| {v} | {g} | {_ms(runs, 'accuracy')} | {_ms(runs, 'target_rate')} | "
                         f"{_ms(runs, 'top3_rate')} | {sec} |")
        lines.append("")
    if "multilabel_poison" in result:
        rows = result["multilabel_poison"]["runs"]
        lines += ["**4. Multi-label poisons (eps 0.3): downstream multi-label `dc_cnn` on the clean test composites "
                  "(val where a row says so), %** "
                  "(mean (min-max) over the downstream seeds)",
                  "", "| training data | generator seed | exact match | Hamming loss | macro F1 | label 0 F1 "
                  "| goal rate (label 0 flipped, rest kept) |", "|---|---|---|---|---|---|---|"]
        for v, g, runs, _ in by_variant(rows, ("clean", *ML_POISONS)):
            lines.append(f"| {v} | {'-' if v == 'clean' else g} | {_ms(runs, 'exact_match')} | "
                         f"{_ms(runs, 'hamming_loss')} | {_ms(runs, 'macro_f1')} | {_ms(runs, 'label0_f1')} | "
                         f"{_ms(runs, 'target_rate')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=TRIALS, help="generator trials of the poisons (equal for all)")
    ap.add_argument("--generator", default="unet16",
                    help="topk_poison / multilabel_poison: the generator (unet16_cond: class-conditional)")
    ap.add_argument("--ml-methods", nargs="+", choices=ML_METHODS, default=["ml_cw", "ml_dp"])
    ap.add_argument("--ml-spaces", nargs="+", choices=ML_SPACES, default=["probability"],
                    help="multilabel_attacks: the loss spaces of the CW-style methods (probability: the paper's)")
    ap.add_argument("--iterations", type=int, default=SEARCH["iterations"], help="CW-style Adam steps per c")
    ap.add_argument("--binary-steps", type=int, default=SEARCH["binary_steps"], help="CW-style values of c")
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="the images attacked (attacks) or the downstream models are scored on (poisons): val to "
                         "choose settings, test to report")
    ap.add_argument("--c-init", nargs="+", type=float, default=None,
                    help="topk_attacks on val: the first c values to try for both methods")
    ap.add_argument("--c-init-ad", type=float, default=None, help="topk_attacks: AD's first c (default 10)")
    ap.add_argument("--c-init-cwk", type=float, default=None, help="topk_attacks: CW^k's first c (default 10)")
    ap.add_argument("--ad-alpha", type=float, default=None, help="topk_attacks: AD's alpha (default 10)")
    ap.add_argument("--ad-beta", type=float, default=None, help="topk_attacks: AD's beta (default 0.3)")
    ap.add_argument("--ad-similarity", choices=["data", "none"], default=None,
                    help="topk_attacks: AD's label similarity (default data)")
    ap.add_argument("--topk-methods", nargs="+", choices=["ad", "cwk"], default=["ad", "cwk"],
                    help="topk_attacks: the attacks run")
    ap.add_argument("--ks", nargs="+", type=int, default=list(KS), help="topk_attacks: the values of k")
    ap.add_argument("--samples", type=int, default=SAMPLES,
                    help="topk_attacks, multilabel_attacks: the first N of the seeded 500 images (exploration only; report 500)")
    ap.add_argument("--generator-seeds", nargs="+", type=int, default=[0],
                    help="poisons: the DeepConfuse seeds (one generator each)")
    ap.add_argument("--topk-poisons", nargs="+", choices=TOPK_POISONS, default=list(TOPK_POISONS))
    ap.add_argument("--ml-poisons", nargs="+", choices=("clean", *ML_POISONS), default=["clean", *ML_POISONS])
    ap.add_argument("--clean", default="data/shards/mnist5k")
    ap.add_argument("--grid", default="data/shards/mnist5k-grid")
    ap.add_argument("--workers", type=int, default=2, help="processes (each 1 torch thread)")
    ap.add_argument("--out", default="benchmarks/results/targets.json")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only merge these result files (runs in parallel with other --out) into --out, then report")
    args = ap.parse_args()
    from poison.utils import update_json

    if args.merge:
        parts = [json.loads(Path(other).read_text()) for other in args.merge]

        def merged(result: dict) -> dict:
            for part in parts:
                for name, runs in part.items():
                    result[name] = _merge(name, result.get(name, {}), runs)
            return result

        print(markdown(update_json(args.out, merged)))
        return
    search = {"iterations": args.iterations, "binary_steps": args.binary_steps}
    ad = {key: v for key, v in (("alpha", args.ad_alpha), ("beta", args.ad_beta), ("similarity", args.ad_similarity))
          if v is not None}
    c_inits = ([{"ad": c, "cwk": c} for c in args.c_init] if args.c_init else
               [{m: v for m, v in (("ad", args.c_init_ad), ("cwk", args.c_init_cwk)) if v is not None}])
    jobs: dict[str, list[tuple]] = {
        "topk_attacks": [(topk_attacks, s, k, args.clean, search, args.split, c, ad, args.samples,
                          tuple(args.topk_methods)) for c in c_inits for k in args.ks for s in args.seeds],
        "multilabel_attacks": [(multilabel_attacks, s, st, args.grid, tuple(args.ml_methods), search, args.split,
                                args.samples, tuple(args.ml_spaces))
                               for st in STRATEGIES for s in args.seeds],
        "topk_poison": [(topk_poison, v, args.seeds, args.trials, args.clean, g, args.generator, args.split)
                        for g in args.generator_seeds for v in args.topk_poisons],
        "multilabel_poison": [(multilabel_poison, v, args.seeds, args.trials, args.grid, g, args.generator, args.split)
                              for g in args.generator_seeds for v in args.ml_poisons],
    }
    result: dict = {}
    with ProcessPoolExecutor(args.workers) as pool:
        # the long generator trainings first, so the short attack jobs fill in around them
        order = sorted(args.only, key=lambda n: n.endswith("attacks"))
        futures = {name: [pool.submit(fn, *a) for fn, *a in jobs[name]] for name in order}
        for name in args.only:
            t0 = time.perf_counter()
            runs = [f.result() for f in futures[name]]
            command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
            part = {"runs": runs, "seconds_waited": time.perf_counter() - t0, "search": search, "commands": [command],
                    "machine": {"cpus": os.cpu_count(), "workers": args.workers,
                                "python": platform.python_version(), "torch": torch.__version__}}
            # re-read under the lock, so a run writing the same file meanwhile keeps its results
            result = update_json(args.out, lambda r, name=name, part=part:
                                 r | {name: _merge(name, r.get(name, {}), part)})
            print(f"{name}: {len(runs)} runs", flush=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
