"""Score every candidate generator of one DeepConfuse training run downstream, not only the kept one.

The pipeline keeps the trial whose poison does most harm to one validation victim (recipe
``validation``, one initialisation). This script trains a configuration exactly as
``benchmarks/deepconfuse_config.py`` does, keeps a copy of the generator at every scored
trial, and trains ``dc_cnn`` from scratch on each trial's stored (uint8) poison under issue
3's recipes A and B20 with several downstream seeds. It shows how much the poison changes
from trial to trial, whether training was still improving, and whether the validation victim
picked well. Scored on the validation split by default: the test split is for reporting.

Usage:
    python benchmarks/trial_scores.py '<JSON overrides of train_generator>' [--seed 0] \
        [--seeds 100 101 102] [--threads 1] [--out benchmarks/results/trial_scores.json]

Appends one run (keyed by configuration and seed) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from deepconfuse_config import default_split  # this folder (the script's own) is on sys.path
from poison.attacks.deepconfuse import DeepConfuse, DeepConfuseConfig, poison_images
from poison.bench import RECIPES
from poison.config import from_dict
from poison.train import build_model, predict, train_classifier
from poison.utils import derive_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="{}", help="JSON overrides of train_generator")
    parser.add_argument("--seed", type=int, default=0, help="generator training seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102], help="downstream seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--out", default="benchmarks/results/trial_scores.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.config)
    cfg = from_dict(DeepConfuseConfig, overrides, "train_generator")
    tr, va, te = default_split()
    scored = va if args.split == "val" else te
    attack = DeepConfuse(cfg, 1, 28, 10, seed=args.seed)
    kept: dict[int, tuple[dict, float]] = {}
    validate = attack._validate

    def keep(gen, *rest):
        score = validate(gen, *rest)
        kept[rest[-1]] = (copy.deepcopy(gen.state_dict()), score[0])
        return score

    attack._validate = keep  # the training run itself is unchanged: scoring never alters it
    start = time.perf_counter()
    attack.fit(tr.images, tr.labels, va.images, va.labels,
               on_trial=lambda r: print(f"trial {r.trial} {r.seconds:.1f}s val {r.val_accuracy}", flush=True))
    fit_seconds = time.perf_counter() - start
    gen = copy.deepcopy(attack.generator)
    target_map = attack.target.target_map
    trials = {}
    for trial, (state, score) in sorted(kept.items()):
        gen.load_state_dict(state)
        poisoned = poison_images(gen, tr.images, cfg.eps, labels=tr.labels)
        row: dict = {"validation_score": score}
        for name in ("A", "B20"):
            values = []
            for s in args.seeds:
                model = build_model("dc_cnn", 1, 28, 10, derive_seed(s, "bench-init"), torch.device("cpu"))
                train_classifier(model, poisoned, tr.labels, RECIPES[name],
                                 torch.Generator().manual_seed(derive_seed(s, "bench-order")))
                pred = predict(model, scored.images).argmax(1)
                hit = pred == (scored.labels if target_map is None else target_map[scored.labels])
                values.append(round(float(hit.float().mean()), 4))
            row[name] = values
        trials[str(trial)] = row
        print(trial, json.dumps(row), flush=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    key = json.dumps({"config": overrides, "seed": args.seed, "split": args.split}, sort_keys=True)
    results[key] = {"kept_trial": attack.best_trial, "fit_seconds": round(fit_seconds, 1),
                    "metric": "accuracy" if target_map is None else "target_rate", "downstream_seeds": args.seeds,
                    "command": "python benchmarks/trial_scores.py " + json.dumps(json.dumps(overrides))
                               + f" --seed {args.seed} --seeds {' '.join(map(str, args.seeds))}"
                               + f" --threads {args.threads} --split {args.split}",
                    "trials": trials}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
