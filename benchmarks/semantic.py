"""The semantic image attack (SIA) measured three ways (issue 6), 3 seeds each.

1. ``strength``: success rate on the clean test split against ``dc_cnn`` trained on the
   clean training split: SIA (attributes + image-space eps) vs PGD (L-inf, the same eps
   and steps) vs attributes alone (SIA, eps 0) vs random attributes (one uniform draw in
   the full ranges), plus each attribute alone. Judged on the images as stored (uint8).
2. ``imbalance``: long-tailed training splits (imbalance ratio 10, 50, 100); balanced and
   tail-class (the last half of the classes) test accuracy of ``dc_cnn`` trained with
   plain training, random oversampling, class-balanced reweighting (Cui et al. 2019,
   beta 0.999), random attribute augmentation and SIA augmentation (tail filled to the
   head's count with variants, label kept).
3. ``advtrain``: SIA adversarial training vs PGD adversarial training (0.5 CE clean +
   0.5 CE adversarial, inner attack 5 steps): clean accuracy and accuracy under PGD
   (10 steps), FGSM and SIA (10 steps) on the clean test split; plain training as reference.

Seeds are never those of the pipeline (own derived streams); the test split chooses nothing.

Usage:
    python benchmarks/semantic.py [--only strength imbalance advtrain] [--seeds 0 1 2]
        [--epochs 10] [--clean data/shards/mnist5k] [--workers 2]
Results: benchmarks/results/semantic.json (merged per evaluation) and a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TAIL_RATIOS = (10.0, 50.0, 100.0)
METHODS = ("plain", "oversample", "reweight", "random_attributes", "sia")
#: candidates for the augment stage's default, to be chosen with --split val (not in the default run)
CANDIDATES = ("sia_attributes", "sia_mix", "sia_full", "sia_full_attributes")


def _data(clean: str, split: str = "test") -> dict[str, Any]:
    """The training split and the evaluation split (``test``, or ``val`` when choosing a method)."""
    from poison.shards import load_split, read_manifest

    x, y, _ = load_split(clean, "train")
    x_te, y_te, _ = load_split(clean, split)
    return {"x": x, "y": y, "x_te": x_te, "y_te": y_te, "k": len(read_manifest(clean)["classes"])}


def _recipe(epochs: int):
    from poison.train import TrainConfig

    return TrainConfig(optimizer="adam", lr=1e-3, epochs=epochs, batch_size=64)


def _train(x, y, k, seed, purpose, epochs, **kwargs):
    from poison.train import build_model, train_classifier
    from poison.utils import derive_seed, make_generator

    model = build_model("dc_cnn", x.shape[1], x.shape[-1], k, derive_seed(seed, "bench-semantic", purpose, "init"),
                        torch.device("cpu"))
    return train_classifier(model, x, y, _recipe(epochs), make_generator(seed, "bench-semantic", purpose, "order"), **kwargs)


def _stored(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().clamp(0, 255) / 255


def _rate(model, images, y) -> float:
    with torch.no_grad():
        return float((model(_stored(images)).argmax(1) != y).float().mean())


def _batched(fn, x, y, batch=500):
    return torch.cat([fn(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)])


# ------------------------------------------------------------------ 1. strength
def strength(seed: int, epochs: int, clean: str) -> dict[str, Any]:
    from poison.attacks.pgd import pgd
    from poison.attacks.semantic import SIAConfig, apply_attributes, random_attributes, sia
    from poison.train import to_float
    from poison.utils import make_generator

    torch.set_num_threads(1)
    d = _data(clean)
    model = _train(d["x"], d["y"], d["k"], seed, "strength-victim", epochs)
    x, y = to_float(d["x_te"]), d["y_te"]
    cfg = SIAConfig()
    out: dict[str, Any] = {"seed": seed, "clean_error": _rate(model, x, y)}
    gen = make_generator(seed, "bench-semantic", "sia")
    out["sia"] = _rate(model, _batched(lambda a, b: sia(model, a, b, cfg, gen).images, x, y), y)
    gen = make_generator(seed, "bench-semantic", "pgd")
    out["pgd"] = _rate(model, _batched(lambda a, b: pgd(model, a, b, cfg.eps, cfg.steps, gen), x, y), y)
    attrs_only = SIAConfig(eps=0.0)
    gen = make_generator(seed, "bench-semantic", "attributes")
    out["attributes_only"] = _rate(model, _batched(lambda a, b: sia(model, a, b, attrs_only, gen).images, x, y), y)
    gen = make_generator(seed, "bench-semantic", "random")
    values = random_attributes(x.shape[0], cfg.attributes, cfg.half_ranges(), gen)
    with torch.no_grad():
        out["random_attributes"] = _rate(model, apply_attributes(x, cfg.attributes, values), y)
    out["single_attribute"] = {}
    for name in cfg.attributes:
        gen = make_generator(seed, "bench-semantic", "single", name)
        out["single_attribute"][name] = _rate(
            model, _batched(lambda a, b: sia(model, a, b, cfg, gen, only=name).images, x, y), y)
    return out


# ----------------------------------------------------------------- 2. imbalance
def imbalance(seed: int, epochs: int, clean: str, ratio: float, method: str, split: str = "test") -> dict[str, Any]:
    from poison.attacks.semantic import SIAConfig, apply_attributes, random_attributes
    from poison.augment import AugmentConfig, attack_dataset, long_tail_indices, tail_plan
    from poison.train import to_float
    from poison.utils import make_generator

    torch.set_num_threads(1)
    d = _data(clean, split)
    k = d["k"]
    lt = long_tail_indices(d["y"], k, ratio, make_generator(seed, "bench-semantic", "longtail", ratio))
    x, y = d["x"][lt], d["y"][lt]
    counts = torch.bincount(y, minlength=k)
    kwargs: dict[str, Any] = {}
    if method == "oversample":
        gen = make_generator(seed, "bench-semantic", "oversample", ratio)
        extra = [torch.nonzero(y == c).flatten()[torch.randint(int(counts[c]), (int(counts.max() - counts[c]),),
                                                                generator=gen)] for c in range(k)]
        idx = torch.cat([torch.arange(y.numel()), *extra])
        x, y = x[idx], y[idx]
    elif method == "reweight":
        beta = 0.999
        w = (1 - beta) / (1 - beta ** counts.double())
        kwargs["class_weights"] = (w / w.sum() * k).float()
    elif method == "random_attributes":
        plan = torch.tensor(tail_plan(y, k, 1.0), dtype=torch.long)
        cfg = SIAConfig()
        gen = make_generator(seed, "bench-semantic", "random-aug", ratio)
        values = random_attributes(plan.numel(), cfg.attributes, cfg.half_ranges(), gen)
        with torch.no_grad():
            variants = (apply_attributes(to_float(x[plan]), cfg.attributes, values) * 255).round().to(torch.uint8)
        x, y = torch.cat([x, variants]), torch.cat([y, y[plan]])
    elif method in ("sia", *CANDIDATES):
        # sia: the augment stage's variants; sia_attributes: the same attack without image-space
        # noise (eps 0); sia_mix: every other variant SIA, the rest random attributes; sia_full:
        # the random start spans the whole range (random attributes, then SIA steps);
        # sia_full_attributes: that without image-space noise
        base = _train(x, y, k, seed, f"longtail-{ratio}-plain", epochs)
        plan = torch.tensor(tail_plan(y, k, 1.0), dtype=torch.long)
        cfg = AugmentConfig()
        import dataclasses

        if method in ("sia_attributes", "sia_full_attributes"):
            cfg = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, eps=0.0))
        if method in ("sia_full", "sia_full_attributes"):
            cfg = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, start_fraction=1.0))
        adv = attack_dataset(base, x[plan], y[plan], cfg, k,
                             make_generator(seed, "bench-semantic", "sia-aug", ratio), torch.device("cpu"))
        variants = adv["images"]
        if method == "sia_mix":
            sc = SIAConfig()
            gen = make_generator(seed, "bench-semantic", "random-aug", ratio)
            values = random_attributes(plan.numel(), sc.attributes, sc.half_ranges(), gen)
            with torch.no_grad():
                rand = (apply_attributes(to_float(x[plan]), sc.attributes, values) * 255).round().to(torch.uint8)
            variants = torch.where((torch.arange(plan.numel()) % 2 == 1).view(-1, 1, 1, 1), rand, variants)
        x, y = torch.cat([x, variants]), torch.cat([y, y[plan]])
    model = _train(x, y, k, seed, f"longtail-{ratio}-{method}", epochs, **kwargs)
    with torch.no_grad():
        pred = model(to_float(d["x_te"])).argmax(1)
    per_class = [float((pred[d["y_te"] == c] == c).float().mean()) for c in range(k)]
    return {"seed": seed, "ratio": ratio, "method": method, "split": split, "train_samples": int(y.numel()),
            "balanced_accuracy": sum(per_class) / k, "tail_accuracy": sum(per_class[k // 2:]) / (k - k // 2),
            "overall_accuracy": float((pred == d["y_te"]).float().mean()), "per_class_accuracy": per_class}


# ----------------------------------------------------------------- 3. advtrain
def advtrain(seed: int, epochs: int, clean: str, method: str) -> dict[str, Any]:
    from poison.attacks.pgd import fgsm, pgd
    from poison.attacks.semantic import SIAConfig, sia
    from poison.train import to_float
    from poison.utils import make_generator

    torch.set_num_threads(1)
    d = _data(clean)
    inner_gen = make_generator(seed, "bench-semantic", "inner", method)
    inner_sia = SIAConfig(steps=5)
    adversary = None
    if method == "pgd_at":
        adversary = lambda m, a, b: pgd(m, a, b, 0.1, 5, inner_gen)  # noqa: E731
    elif method == "sia_at":
        adversary = lambda m, a, b: sia(m, a, b, inner_sia, inner_gen).images  # noqa: E731
    t0 = time.perf_counter()
    model = _train(d["x"], d["y"], d["k"], seed, f"advtrain-{method}", epochs, adversary=adversary)
    seconds = time.perf_counter() - t0
    x, y = to_float(d["x_te"]), d["y_te"]
    gen = make_generator(seed, "bench-semantic", "eval-attacks", method)
    acc = lambda images: 1.0 - _rate(model, images, y)  # noqa: E731
    return {"seed": seed, "method": method, "train_seconds": seconds, "clean": acc(x),
            "pgd": acc(_batched(lambda a, b: pgd(model, a, b, 0.1, 10, gen), x, y)),
            "fgsm": acc(_batched(lambda a, b: fgsm(model, a, b, 0.1), x, y)),
            "sia": acc(_batched(lambda a, b: sia(model, a, b, SIAConfig(), gen).images, x, y))}


# ----------------------------------------------------------------------- report
def _mean(rows: list[dict[str, Any]], key: str) -> str:
    vals = torch.tensor([r[key] for r in rows], dtype=torch.float64) * 100
    return f"{float(vals.mean()):.1f} ({float(vals.min()):.1f}-{float(vals.max()):.1f})"


def markdown(result: dict[str, Any]) -> str:
    lines: list[str] = []
    if "strength" in result:
        rows = result["strength"]["runs"]
        lines += ["**1. Attack success rate, % of the 1,000 clean test images** (dc_cnn trained on clean data; "
                  "mean (min-max) of 3 seeds; eps 0.1, 10 steps)", "",
                  "| attack | success rate |", "|---|---|"]
        for key, label in (("clean_error", "none (clean error)"), ("random_attributes", "random attributes"),
                           ("attributes_only", "SIA, attributes only"), ("pgd", "PGD, L-inf 0.1"),
                           ("sia", "SIA, attributes + L-inf 0.1")):
            lines.append(f"| {label} | {_mean(rows, key)} |")
        for name in rows[0]["single_attribute"]:
            sub = [{"v": r["single_attribute"][name]} for r in rows]
            lines.append(f"| SIA, {name} alone | {_mean(sub, 'v')} |")
        lines.append("")
    if "imbalance" in result:
        rows = result["imbalance"]["runs"]
        split = rows[0].get("split", "test")
        lines += [f"**2. Long-tailed training: balanced / tail-class {split} accuracy, %** (mean (min-max) of the seeds)", "",
                  "| method | " + " | ".join(f"IR {int(r)} balanced | IR {int(r)} tail" for r in TAIL_RATIOS) + " |",
                  "|---|" + "---|---|" * len(TAIL_RATIOS)]
        for m in [m for m in (*METHODS, *CANDIDATES) if any(r["method"] == m for r in rows)]:
            cells = []
            for ratio in TAIL_RATIOS:
                sub = [r for r in rows if r["method"] == m and r["ratio"] == ratio]
                cells += [_mean(sub, "balanced_accuracy"), _mean(sub, "tail_accuracy")] if sub else ["-", "-"]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if "advtrain" in result:
        rows = result["advtrain"]["runs"]
        lines += ["**3. Adversarial training: test accuracy, %, clean and under attack** (eps 0.1; mean (min-max) of 3 seeds)",
                  "", "| training | clean | PGD-10 | FGSM | SIA-10 | train time (s) |", "|---|---|---|---|---|---|"]
        for m in ("plain", "pgd_at", "sia_at"):
            sub = [r for r in rows if r["method"] == m]
            if sub:
                secs = sum(r["train_seconds"] for r in sub) / len(sub)
                lines.append(f"| {m} | {_mean(sub, 'clean')} | {_mean(sub, 'pgd')} | {_mean(sub, 'fgsm')} | "
                             f"{_mean(sub, 'sia')} | {secs:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=["strength", "imbalance", "advtrain"],
                    default=["strength", "imbalance", "advtrain"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--clean", default="data/shards/mnist5k")
    ap.add_argument("--workers", type=int, default=2, help="processes (each 1 torch thread)")
    ap.add_argument("--out", default="benchmarks/results/semantic.json")
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="imbalance: where accuracy is measured (val: to choose a method; test: to report)")
    ap.add_argument("--methods", nargs="+", choices=[*METHODS, *CANDIDATES], default=list(METHODS))
    ap.add_argument("--ratios", nargs="+", type=float, default=list(TAIL_RATIOS))
    args = ap.parse_args()
    from poison.utils import update_json

    result: dict = {}
    jobs: dict[str, list[tuple]] = {
        "strength": [(strength, s, args.epochs, args.clean) for s in args.seeds],
        "imbalance": [(imbalance, s, args.epochs, args.clean, r, m, args.split) for r in args.ratios
                      for m in args.methods for s in args.seeds],
        "advtrain": [(advtrain, s, args.epochs, args.clean, m) for m in ("plain", "pgd_at", "sia_at") for s in args.seeds],
    }
    with ProcessPoolExecutor(args.workers) as pool:
        for name in args.only:
            t0 = time.perf_counter()
            futures = [pool.submit(fn, *a) for fn, *a in jobs[name]]
            runs = [f.result() for f in futures]
            part = {"runs": runs, "seconds": time.perf_counter() - t0, "epochs": args.epochs,
                    "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                    "machine": {"cpus": os.cpu_count(), "workers": args.workers,
                                "python": platform.python_version(), "torch": torch.__version__}}
            # re-read under the lock, so a run writing the same file meanwhile keeps its results
            result = update_json(args.out, lambda r, name=name, part=part: r | {name: part})
            print(f"{name}: {len(runs)} runs in {part['seconds']:.0f} s", flush=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
