"""Clean accuracy of `dc_cnn` trained on a clean and a poisoned dataset under Adam (lr) for N epochs.

Usage (after `dvc repro`): python benchmarks/recipes.py [--lr 0.001] [--epochs 5 10] [--seeds 3 4 5] [--split val]
"""

from __future__ import annotations

import argparse

import torch

from poison.evaluate import train_and_test
from poison.shards import load_split
from poison.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", default="data/shards/mnist5k")
    parser.add_argument("--poisoned", default="data/shards/mnist5k-deepconfuse")
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--split", choices=["val", "test"], default="val", help="clean split to score on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y, _ = load_split(args.clean, "train")
    x_test, y_test, _ = load_split(args.clean, args.split)
    x_p, y_p, _ = load_split(args.poisoned, "train")
    for epochs in args.epochs:
        recipe = TrainConfig("adam", args.lr, epochs=epochs, batch_size=64)
        for name, (xs, ys) in {"clean": (x, y), "poisoned": (x_p, y_p)}.items():
            accs = [train_and_test(xs, ys, x_test, y_test, arch="dc_cnn", recipe=recipe, seed=s, num_classes=10,
                                   device=torch.device("cpu"))["accuracy"] for s in args.seeds]
            print(f"lr {args.lr}, {epochs} epochs, {name}-trained: " + " ".join(f"{100 * a:.1f}" for a in accs), flush=True)


if __name__ == "__main__":
    main()
