"""Clean accuracy of a classifier trained on a clean and a poisoned dataset under Adam (lr) for N epochs.

Usage (after `dvc repro`): python benchmarks/recipes.py [--lr 0.001] [--epochs 5 10] [--seeds 3 4 5] [--split val]
    [--arch dc_cnn] [--sklearn random_forest svm_rbf] [--poisoned-only]

With `--sklearn` it also fits the scikit-learn models of `poison bench`'s transfer set on raw
pixels (the random forest once per seed; the RBF SVM, deterministic, once). The poisoned
dataset is evaluated as stored; the test split chooses nothing.
"""

from __future__ import annotations

import argparse

import torch

from poison.bench import SKLEARN_MODELS, _flat, _sklearn_model
from poison.evaluate import train_and_test
from poison.models import check_classifiers
from poison.shards import load_split, read_manifest
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
    parser.add_argument("--arch", default="dc_cnn", help="neural classifier of the model registry")
    parser.add_argument("--sklearn", nargs="*", choices=SKLEARN_MODELS, default=[],
                        help="also fit these scikit-learn models on raw pixels (no epochs, no lr)")
    parser.add_argument("--no-neural", action="store_true", help="only the --sklearn models")
    parser.add_argument("--poisoned-only", action="store_true", help="skip the clean-trained baseline")
    args = parser.parse_args()
    check_classifiers((args.arch,), "--arch")
    torch.set_num_threads(args.threads)
    x, y, _ = load_split(args.clean, "train")
    x_test, y_test, _ = load_split(args.clean, args.split)
    x_p, y_p, _ = load_split(args.poisoned, "train")
    k = len(read_manifest(args.clean)["classes"])
    datasets = {"clean": (x, y), "poisoned": (x_p, y_p)}
    if args.poisoned_only:
        del datasets["clean"]
    for epochs in [] if args.no_neural else args.epochs:
        recipe = TrainConfig("adam", args.lr, epochs=epochs, batch_size=64)
        for name, (xs, ys) in datasets.items():
            accs = [train_and_test(xs, ys, x_test, y_test, arch=args.arch, recipe=recipe, seed=s, num_classes=k,
                                   device=torch.device("cpu"))["accuracy"] for s in args.seeds]
            print(f"{args.arch}, lr {args.lr}, {epochs} epochs, {name}-trained: "
                  + " ".join(f"{100 * a:.1f}" for a in accs), flush=True)
    for model in args.sklearn:
        seeds = args.seeds if model == "random_forest" else args.seeds[:1]
        for name, (xs, ys) in datasets.items():
            accs = []
            for s in seeds:
                pred = torch.as_tensor(_sklearn_model(model, s).fit(_flat(xs), ys.numpy()).predict(_flat(x_test)))
                accs.append(float((pred == y_test).float().mean()))
            print(f"{model}, {name}-trained: " + " ".join(f"{100 * a:.1f}" for a in accs), flush=True)


if __name__ == "__main__":
    main()
