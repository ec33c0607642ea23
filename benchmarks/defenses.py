"""Does the poison survive cheap training-data defenses? (ALGORITHMS.md section 6)

Usage (after `dvc repro`):
    python benchmarks/defenses.py [--defenses none jpeg:10 posterize:2 posterize:1] [--seeds 0 1 2]
        [--recipes A B20] [--split test] [--defend-test] [--out benchmarks/results/defenses.json]

For each defense (``poison.defenses``: ``jpeg:Q``, ``posterize:B``, ``grayscale``; ``none`` is
no defense) the defender transforms every *training* image, clean or poisoned as stored, then
trains ``--arch`` from scratch with each recipe and seed and scores clean accuracy on the clean
split (untransformed; ``--defend-test`` transforms it too, as a defender preprocessing every
input would). Recipes: A = Adam lr 0.01, 2 epochs (the authors' test recipe); B20 = Adam lr 1e-3,
20 epochs; B10 = Adam lr 1e-3, 10 epochs (params.yaml's default `evaluate.recipe`); all batch 64. The clean-trained rows are the
cost of the defense itself; the poisoned rows say whether the poison survives it. Writes the
results (with the command) as JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from poison.bench import RECIPES as BENCH_RECIPES
from poison.defenses import apply_defense, parse_defense
from poison.evaluate import train_and_test
from poison.models import check_classifiers
from poison.shards import load_split, read_manifest
from poison.train import TrainConfig
from poison.utils import atomic_write_json

#: issue 3's recipes A and B20 (``poison.bench``), and B10
RECIPES = {**BENCH_RECIPES, "B10": TrainConfig("adam", 1e-3, epochs=10, batch_size=64)}


def defend(spec: str, images: torch.Tensor) -> torch.Tensor:
    return images if spec == "none" else apply_defense(spec, images, key="--defenses")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clean", default="data/shards/mnist5k")
    p.add_argument("--poisoned", default="data/shards/mnist5k-deepconfuse")
    p.add_argument("--defenses", nargs="+", default=["none", "jpeg:10", "posterize:2", "posterize:1"])
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["A", "B20"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--split", choices=["val", "test"], default="test", help="clean split to score on")
    p.add_argument("--arch", default="dc_cnn", help="classifier of the model registry")
    p.add_argument("--defend-test", action="store_true", help="transform the scored images too")
    p.add_argument("--poisoned-only", action="store_true", help="skip the clean-trained rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/defenses.json")
    args = p.parse_args(argv)
    for spec in args.defenses:
        if spec != "none":
            parse_defense(spec, "--defenses")  # every spec checked before the first training
    check_classifiers((args.arch,), "--arch")
    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.poisoned)
    if manifest["config"].get("target_map") is not None:
        raise SystemExit(f"--poisoned {args.poisoned}: a label-specific poison; this benchmark scores clean accuracy "
                         "of untargeted poisons (pass an untargeted dataset)")
    x_test, y_test, _ = load_split(args.clean, args.split)
    datasets = {"clean": load_split(args.clean, "train")[:2], "poisoned": load_split(args.poisoned, "train")[:2]}
    if args.poisoned_only:
        del datasets["clean"]
    k = len(read_manifest(args.clean)["classes"])
    rows, started = [], time.perf_counter()
    for spec in args.defenses:
        scored = defend(spec, x_test) if args.defend_test else x_test
        for name, (x, y) in datasets.items():
            defended = defend(spec, x)
            change = (defended.float() - x.float()).abs().mean().item() / 255.0
            for recipe in args.recipes:
                accs = [train_and_test(defended, y, scored, y_test, arch=args.arch, recipe=RECIPES[recipe], seed=s,
                                       num_classes=k, device=torch.device("cpu"))["accuracy"] for s in args.seeds]
                rows.append({"defense": spec, "dataset": name, "recipe": recipe, "seeds": args.seeds,
                             "accuracy": accs, "accuracy_mean": sum(accs) / len(accs),
                             "mean_abs_change": change})
                print(f"{spec:12s} {name:8s} {recipe:4s} " + " ".join(f"{100 * a:5.1f}" for a in accs)
                      + f"  mean {100 * rows[-1]['accuracy_mean']:.2f}", flush=True)
    out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
           "arch": args.arch, "split": args.split, "defend_test": args.defend_test,
           "clean": args.clean, "poisoned": args.poisoned,
           "recipes": {r: {"optimizer": RECIPES[r].optimizer, "lr": RECIPES[r].lr, "epochs": RECIPES[r].epochs,
                           "batch_size": RECIPES[r].batch_size} for r in args.recipes},
           "rows": rows, "seconds": time.perf_counter() - started,
           "machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                       "torch": torch.__version__}}
    atomic_write_json(args.out, out)
    print("\n| defense | dataset | " + " | ".join(args.recipes) + " |")
    print("|---|---|" + "---|" * len(args.recipes))
    for spec in args.defenses:
        for name in datasets:
            cells = [r for r in rows if r["defense"] == spec and r["dataset"] == name]
            print(f"| {spec} | {name} | " + " | ".join(
                f"{100 * r['accuracy_mean']:.2f} ({' / '.join(f'{100 * a:.1f}' for a in r['accuracy'])})"
                for r in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
