"""Score every candidate generator of one DeepConfuse training run downstream, not only the kept one.

The pipeline keeps the trial whose poison does most harm to one validation victim (recipe
``validation``, one initialisation). This script trains a configuration exactly as
``benchmarks/deepconfuse_config.py`` does, keeps a copy of the generator at every scored
trial, and trains ``dc_cnn`` from scratch on each trial's stored (uint8) poison under issue
3's recipes A and B20 with several downstream seeds. It shows how much the poison changes
from trial to trial, whether training was still improving, and whether the validation victim
picked well. Scored on the validation split by default: the test split is for reporting.

``--victims V`` scores every trial with V validation victims: victim 0 is the pipeline's own
(the one that picks the kept trial), victims 1..V-1 have their own initialisations and batch
orders and the same recipe (``validation``). ``--downstream picks`` then trains the downstream
models only on the trials that one of two selection rules keeps: victim 0 alone (the pipeline's
rule) and the mean of the V victims (ties: the earlier trial). Both rules are fixed before any
downstream figure is read, so scoring them on the test split lets the test split choose nothing;
with ``--split test`` the same downstream models are also scored on the validation split.

``--select-recipes A B20`` adds a third rule: every trial is also scored by one validation
victim per named recipe of ``poison.bench.RECIPES`` (issue 3's recipes; own initialisation and
batch order per recipe, never the downstream seeds), and the rule keeps the trial with the
lowest mean over those recipes: selection by the recipes the poison is judged by, rather than
by the pipeline's one 5-epoch validation recipe.

Usage:
    python benchmarks/trial_scores.py '<JSON overrides of train_generator>' [--seed 0] \
        [--seeds 100 101 102] [--threads 1] [--split val] [--victims 1] [--select-recipes A B20] \
        [--downstream all|picks] [--out benchmarks/results/trial_scores.json]

Appends one run to ``--out``, keyed by everything that changes its figures (``run_key``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from deepconfuse_config import default_split  # this folder (the script's own) is on sys.path
from poison.attacks.deepconfuse import DeepConfuse, DeepConfuseConfig, poison_images
from poison.bench import RECIPES
from poison.config import from_dict
from poison.train import build_model, predict, train_classifier
from poison.utils import derive_seed, make_generator, update_json


#: the options whose defaults stay out of a run's key, so stored keys keep their meaning
KEY_DEFAULTS = {"seeds": [100, 101, 102], "threads": 1, "victims": 1, "select_recipes": [], "downstream": "all"}


def run_key(overrides: dict, args: argparse.Namespace) -> str:
    """Return the key of one run in ``--out``: everything that changes its figures.

    The configuration, the generator seed and the split always; the downstream seeds, torch
    threads (part of the training trajectory), validation victims, selection recipes and the
    downstream mode where they differ from their defaults. Two runs differing in any of them
    are kept side by side; a rerun of the same command replaces its entry.
    """
    extra = {name: getattr(args, name) for name, default in KEY_DEFAULTS.items() if getattr(args, name) != default}
    return json.dumps({"config": overrides, "seed": args.seed, "split": args.split} | extra, sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="{}", help="JSON overrides of train_generator")
    parser.add_argument("--seed", type=int, default=0, help="generator training seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102], help="downstream seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--victims", type=int, default=1, help="validation victims that score each trial")
    parser.add_argument("--select-recipes", nargs="+", choices=list(RECIPES), default=[],
                        help="also score every trial with one validation victim per recipe (a third rule)")
    parser.add_argument("--downstream", choices=["all", "picks"], default="all",
                        help="train downstream models on every scored trial, or on the trials the rules keep")
    parser.add_argument("--out", default="benchmarks/results/trial_scores.json")
    args = parser.parse_args()
    if args.victims < 1:
        raise SystemExit(f"--victims: expected an integer >= 1, got {args.victims}")
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.config)
    cfg = from_dict(DeepConfuseConfig, overrides, "train_generator")
    if cfg.restarts != 1:
        raise SystemExit(f"restarts: this script scores one generator run, got {cfg.restarts}; run each seed "
                         "(--seed S) with restarts: 1 instead (run r of restarts is the run of seed S + r)")
    tr, va, te = default_split()
    scored = va if args.split == "val" else te
    attack = DeepConfuse(cfg, 1, 28, 10, seed=args.seed)
    kept: dict[int, tuple[dict, list[float]]] = {}
    by_recipe: dict[int, dict[str, float]] = {}
    validate = attack._validate

    def keep(gen, train_images, train_labels, val_images, val_labels, trial):
        score = validate(gen, train_images, train_labels, val_images, val_labels, trial)
        scores = [score[0]]
        if args.select_recipes or args.victims > 1:
            poisoned = poison_images(gen, train_images, cfg.eps, labels=train_labels)

        def victim_score(stream: str, recipe) -> float:
            """One more validation victim on the same stored poison, with streams of its own."""
            victim = attack._victim(0, f"validation-victim-{stream}")
            order = make_generator(attack.seed, f"validation-order-{stream}")
            train_classifier(victim, poisoned, train_labels, recipe, order)
            return attack.target.score(predict(victim, val_images), val_labels)[0]

        for name in args.select_recipes:
            by_recipe.setdefault(trial, {})[name] = victim_score(name, RECIPES[name])
        scores += [victim_score(str(j), cfg.validation) for j in range(1, args.victims)]
        kept[trial] = (copy.deepcopy(gen.state_dict()), scores)
        return score

    attack._validate = keep  # the training run itself is unchanged: scoring never alters it
    start = time.perf_counter()
    attack.fit(tr.images, tr.labels, va.images, va.labels,
               on_trial=lambda r: print(f"trial {r.trial} {r.seconds:.1f}s val {r.val_accuracy}", flush=True))
    fit_seconds = time.perf_counter() - start
    gen = copy.deepcopy(attack.generator)
    target_map = attack.target.target_map
    mean = {t: sum(scores) / len(scores) for t, (_, scores) in kept.items()}
    # the rules: lowest score of victim 0 alone (fit's own choice), lowest mean of the V (ties: the earlier trial)
    picks = {"victim_0": attack.best_trial, "mean": min(mean, key=lambda t: (mean[t], t))}
    if by_recipe:
        recipe_mean = {t: sum(v.values()) / len(v) for t, v in by_recipe.items()}
        picks["recipes"] = min(recipe_mean, key=lambda t: (recipe_mean[t], t))

    def hit_rate(model, split) -> float:
        """Clean accuracy untargeted, else the target rate, on one split."""
        pred = predict(model, split.images).argmax(1)
        hit = pred == (split.labels if target_map is None else target_map[split.labels])
        return round(float(hit.float().mean()), 4)

    trials = {}
    for trial, (state, scores) in sorted(kept.items()):
        row: dict = {"validation_score": mean[trial], "validation_scores": scores}
        if by_recipe:
            row["validation_by_recipe"] = by_recipe[trial]
        trials[str(trial)] = row
        if args.downstream == "picks" and trial not in picks.values():
            continue
        gen.load_state_dict(state)
        poisoned = poison_images(gen, tr.images, cfg.eps, labels=tr.labels)
        for name in ("A", "B20"):
            values, on_val = [], []
            for s in args.seeds:
                model = build_model("dc_cnn", 1, 28, 10, derive_seed(s, "bench-init"), torch.device("cpu"))
                train_classifier(model, poisoned, tr.labels, RECIPES[name],
                                 torch.Generator().manual_seed(derive_seed(s, "bench-order")))
                values.append(hit_rate(model, scored))
                if args.split == "test":  # the same models on the validation split: what selection saw
                    on_val.append(hit_rate(model, va))
            row[name] = values
            if on_val:
                row[name + "_on_val"] = on_val
        print(trial, json.dumps(row), flush=True)
    key = run_key(overrides, args)
    entry = {"kept_trial": attack.best_trial, "picks": picks, "fit_seconds": round(fit_seconds, 1),
            "metric": "accuracy" if target_map is None else "target_rate", "downstream_seeds": args.seeds,
            "command": "python benchmarks/trial_scores.py " + json.dumps(json.dumps(overrides))
                       + f" --seed {args.seed} --seeds {' '.join(map(str, args.seeds))}"
                       + f" --threads {args.threads} --split {args.split} --victims {args.victims}"
                       + (f" --select-recipes {' '.join(args.select_recipes)}" if args.select_recipes else "")
                       + f" --downstream {args.downstream}",
            "trials": trials}
    update_json(args.out, lambda results: results | {key: entry}, indent=1)  # keeps runs side by side


if __name__ == "__main__":
    main()
