"""Train one DeepConfuse generator configuration on mnist5k and evaluate its stored poison.

Protocol (the pipeline's): the prepare stage's stratified split of params.yaml's data
(``default_split``; by default the embedded mnist5k, 3,500 train / 500 val / 1,000 test, seed 0); the generator is trained on train and selected on val;
its poison is quantized to uint8 as stored; `dc_cnn` models are trained from scratch on
it with downstream seeds never used in generator training and tested on the clean test
split (``--split test``; the default ``--split val`` scores on the validation split, for tuning) under three recipes:

    A   Adam lr 0.01, 2 epochs, batch 64 (the authors' test recipe)
    B5  Adam lr 1e-3, 5 epochs, batch 64 (the generator's validation recipe)
    B20 Adam lr 1e-3, 20 epochs, batch 64

Usage:
    python benchmarks/deepconfuse_config.py '{"trials": 20, "generator_lr": 0.001}' [--threads 1] [--seeds 100]

The JSON overrides keys of the ``train_generator`` section (validated like params.yaml).
Prints the curve and one JSON line of results (prefix ``RESULT``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from poison.attacks.deepconfuse import DeepConfuse, DeepConfuseConfig
from poison.bench import RECIPES as BENCH_RECIPES
from poison.config import from_dict, load_params
from poison.data import load_source, stratified_split, subsample_per_class
from poison.evaluate import classification_metrics
from poison.train import TrainConfig, build_model, predict, train_classifier
from poison.utils import derive_seed, make_generator

#: issue 3's recipes A and B20 (``poison.bench``) and the generator's validation recipe B5
RECIPES = {"A": BENCH_RECIPES["A"], "B5": TrainConfig("adam", 1e-3, epochs=5, batch_size=64),
           "B20": BENCH_RECIPES["B20"]}


def default_split(params_path: str = "params.yaml"):
    """Return the pipeline's (train, val, test) split as the prepare stage makes it from ``params_path``.

    The same source, subsample and stratified split (``data`` section and ``seed``) as
    ``poison.stages.prepare``, without writing shards: with the default params.yaml the
    embedded mnist5k, 3,500 / 500 / 1,000, seed 0. The scripts here build 1-channel 28x28
    models and 10 classes, so any other shape is refused.
    """
    params = load_params(params_path)
    cfg = params.data
    ds = load_source(cfg.source, cfg.root, cfg.channels)
    if tuple(ds.images.shape[1:]) != (1, 28, 28) or len(ds.classes) != 10:
        raise SystemExit(f"{params_path}: data.source {cfg.source!r} gives {len(ds.classes)} classes of "
                         f"{tuple(ds.images.shape[1:])} images; these benchmarks need 10 classes of 1x28x28 "
                         "(mnist5k, mnist, fashion_mnist)")
    if cfg.per_class is not None:
        ds = ds.subset(subsample_per_class(ds.labels, cfg.per_class, make_generator(params.seed, "subset")))
    split = stratified_split(ds.labels, {"train": -1, "val": cfg.val_size, "test": cfg.test_size},
                             make_generator(params.seed, "split"))
    return tuple(ds.subset(split[k]) for k in ("train", "val", "test"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="{}", help="JSON overrides of train_generator")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[100])
    parser.add_argument("--seed", type=int, default=0, help="generator training seed")
    parser.add_argument("--confusion", action="store_true", help="also print each downstream model's confusion matrix")
    parser.add_argument("--split", choices=["val", "test"], default="val",
                        help="split the downstream models are scored on (tune on val; read test once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.config)
    cfg = from_dict(DeepConfuseConfig, overrides, "train_generator")
    tr, va, te = default_split()
    if args.split == "val":
        te = va
    attack = DeepConfuse(cfg, 1, 28, 10, seed=args.seed)
    start = time.perf_counter()
    attack.fit(tr.images, tr.labels, va.images, va.labels,
               on_trial=lambda r: print(f"{f'restart {r.restart} ' if cfg.restarts > 1 else ''}trial {r.trial} steps {r.steps} {r.seconds:.1f}s "
                                        f"val_acc {r.val_accuracy} target_rate {r.val_target_rate}", flush=True))
    fit_seconds = time.perf_counter() - start
    poisoned = attack.poison(tr.images, labels=tr.labels)
    target_map = attack.target.target_map
    results: dict = {"config": overrides, "scored_on": args.split, "fit_seconds": round(fit_seconds, 1), "best_trial": attack.best_trial,
                     "best_restart": attack.best_restart,
                     "max_levels": int((poisoned.int() - tr.images.int()).abs().max())}
    for name, recipe in RECIPES.items():
        runs = []
        for s in args.seeds:
            model = build_model("dc_cnn", 1, 28, 10, derive_seed(s, "bench-init"), torch.device("cpu"))
            train_classifier(model, poisoned, tr.labels, recipe, torch.Generator().manual_seed(derive_seed(s, "bench-order")))
            m = classification_metrics(predict(model, te.images).argmax(1), te.labels, 10, target_map)
            runs.append({k: v for k, v in m.items() if k != "confusion_matrix"})
            print(name, s, f"acc {m['accuracy']:.4f}", f"target_rate {m.get('target_rate')}",
                  "per-class", " ".join(f"{v:.2f}" for v in m["per_class_accuracy"]), flush=True)
            if args.confusion:
                print("confusion (rows: true class)", m["confusion_matrix"], flush=True)
        results[name] = {"accuracy": [r["accuracy"] for r in runs],
                         "target_rate": [r.get("target_rate") for r in runs]}
    print("RESULT", json.dumps(results))


if __name__ == "__main__":
    main()
