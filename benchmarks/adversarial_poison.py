"""Baseline for issue 3: per-sample targeted adversarial poisons (no generator), scored like the others.

Fowl et al., "Adversarial Examples Make Strong Poisons", NeurIPS 2021 (arXiv 2106.10807):
each training image of class c is moved by targeted PGD (``poison.attacks.pgd``) towards
class (c + shift) mod C against a classifier trained on the clean training split, and
keeps its label c. A model trained on it learns "features of c + shift -> c", so on a
clean test image of class y it answers y - shift: shift 1 is an untargeted poison (a
derangement), shift -1 the label-specific y -> y + 1 poison of issue 3.

The poison is quantized to uint8 within eps as the pipeline stores it; downstream
classifiers are trained from scratch with ``train_and_test`` and the seeds of
``benchmarks/recipes.py`` (never the reference model's), and scored on the clean split
chosen (``--split val`` to tune; ``--split test`` chooses nothing).

HAZARD: the images this makes are poisoned training data; nothing is written but numbers.

Usage (after `dvc repro`, or `poison run --stages prepare`):
    python benchmarks/adversarial_poison.py --shift 1 --seeds 0 1 2 --split test [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from poison.attacks.deepconfuse import quantize_poison
from poison.attacks.pgd import pgd
from poison.bench import RECIPES as BENCH_RECIPES
from poison.evaluate import fit_classifier, train_and_test
from poison.models import check_classifiers
from poison.shards import load_split, read_manifest
from poison.train import TrainConfig, build_model, predict, to_float, train_classifier
from poison.utils import derive_seed, make_generator

#: issue 3's recipes A and B20 (``poison.bench``) and the generator's validation recipe B5
RECIPES = {"A": BENCH_RECIPES["A"], "B5": TrainConfig("adam", 1e-3, epochs=5, batch_size=64),
           "B20": BENCH_RECIPES["B20"]}


def craft(x: torch.Tensor, y: torch.Tensor, ref: torch.nn.Module, shift: int, eps: float, steps: int,
          num_classes: int, seed: int, batch_size: int = 500) -> torch.Tensor:
    """Return the stored (uint8) poison: class c moved towards (c + shift) mod C, within eps.

    Shape:
        x: (N, C, H, W) uint8; y: (N,) int64; returns (N, C, H, W) uint8
    """
    gen = make_generator(seed, "adversarial-poison-start")
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = to_float(x[i : i + batch_size]), y[i : i + batch_size]
        out.append(pgd(ref, xb, yb, eps, steps, gen, targets=(yb + shift) % num_classes))
    return quantize_poison(x, torch.cat(out), eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", default="data/shards/mnist5k")
    parser.add_argument("--shift", type=int, default=1, help="class c's poison carries features of c + shift")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (step size 2.5 eps / steps)")
    parser.add_argument("--ref-arch", default="dc_cnn", help="the classifier the poison is crafted against")
    parser.add_argument("--ref-epochs", type=int, default=3, help="its training: Adam, batch 64, this many epochs")
    parser.add_argument("--ref-lr", type=float, default=1e-3, help="its Adam learning rate")
    parser.add_argument("--ref-seed", type=int, default=7, help="seeds the reference model and PGD starts")
    parser.add_argument("--ref-adv-eps", type=float, default=0.0,
                        help="> 0: train the reference adversarially, loss 0.5 CE(x) + 0.5 CE(PGD of this L-inf "
                             "radius) (BENCHMARKS.md 4.16)")
    parser.add_argument("--ref-adv-steps", type=int, default=5, help="PGD steps of that training")
    parser.add_argument("--arch", default="dc_cnn", help="downstream classifier")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["A", "B20"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="downstream seeds")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="clean split to score on")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    check_classifiers((args.ref_arch, args.arch), "--ref-arch/--arch")
    torch.set_num_threads(args.threads)
    x, y, _ = load_split(args.clean, "train")
    x_ev, y_ev, _ = load_split(args.clean, args.split)
    k = len(read_manifest(args.clean)["classes"])
    if not 0 <= args.ref_adv_eps <= 1 or args.ref_adv_steps < 1:
        parser.error(f"--ref-adv-eps / --ref-adv-steps: expected a radius in [0, 1] and at least one step, got "
                     f"{args.ref_adv_eps} / {args.ref_adv_steps}")
    if args.shift % k == 0:
        parser.error(f"--shift: must not be a multiple of {k}, the number of classes (got {args.shift}); "
                     "every class needs another class to carry the features of")
    cpu = torch.device("cpu")
    start = time.perf_counter()
    ref_recipe = TrainConfig("adam", args.ref_lr, epochs=args.ref_epochs, batch_size=64)
    if args.ref_adv_eps > 0:
        pgd_gen = make_generator(args.ref_seed, "adversarial-poison-reference-pgd")
        ref = build_model(args.ref_arch, x.shape[1], x.shape[-1], k,
                          derive_seed(args.ref_seed, "adversarial-poison-reference"), cpu)
        train_classifier(ref, x, y, ref_recipe, make_generator(args.ref_seed, "adversarial-poison-reference-order"),
                         adversary=lambda m, xb, yb: pgd(m, xb, yb, args.ref_adv_eps, args.ref_adv_steps, pgd_gen))
    else:
        ref = fit_classifier(x, y, arch=args.ref_arch, recipe=ref_recipe,
                             seed=derive_seed(args.ref_seed, "adversarial-poison-reference"), num_classes=k, device=cpu)
    ref.eval().requires_grad_(False)
    poisoned = craft(x, y, ref, args.shift, args.eps, args.steps, k, args.ref_seed)
    seconds = time.perf_counter() - start
    hit = float((predict(ref, poisoned).argmax(1) == (y + args.shift) % k).float().mean())
    hit_clean = float((predict(ref, x).argmax(1) == (y + args.shift) % k).float().mean())
    levels = int((poisoned.int() - x.int()).abs().max())
    print(f"crafted in {seconds:.1f} s; reference model answers the poison's target class on {100 * hit:.1f}% "
          f"of it ({100 * hit_clean:.1f}% of the clean images); largest stored change {levels}/255", flush=True)
    # y - shift is the class a model that learnt "features of c + shift -> c" answers on a clean y
    target_map = (torch.arange(k) - args.shift) % k
    results: dict = {"shift": args.shift, "eps": args.eps, "steps": args.steps, "ref_arch": args.ref_arch,
                     "ref_epochs": args.ref_epochs, "ref_lr": args.ref_lr, "ref_adv_eps": args.ref_adv_eps,
                     "ref_adv_steps": args.ref_adv_steps, "arch": args.arch, "split": args.split,
                     "craft_seconds": round(seconds, 1), "reference_hit_rate": hit,
                     "reference_hit_rate_clean": hit_clean, "max_levels": levels}
    for name in args.recipes:
        runs = [train_and_test(poisoned, y, x_ev, y_ev, arch=args.arch, recipe=RECIPES[name], seed=s, num_classes=k,
                               device=cpu, target_map=target_map) for s in args.seeds]
        results[name] = {"accuracy": [r["accuracy"] for r in runs], "target_rate": [r["target_rate"] for r in runs]}
        print(f"{args.arch}, recipe {name}, poisoned-trained: accuracy "
              + " ".join(f"{100 * r['accuracy']:.1f}" for r in runs) + f"; answers y - ({args.shift}): "
              + " ".join(f"{100 * r['target_rate']:.1f}" for r in runs), flush=True)
    print("RESULT", json.dumps(results))


if __name__ == "__main__":
    main()
