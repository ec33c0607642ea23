"""The pipeline's stages as plain functions: params in, files out, a small record back.

``flows/`` wraps each in a Prefect flow of the same name and ``dvc.yaml`` runs those;
``poison run`` calls them directly. Nothing here imports Prefect or DVC.

Stages and what they write (paths from the ``paths`` section of params.yaml):
- ``prepare``: clean train/val/test shards of the source dataset.
- ``train_generator``: the DeepConfuse generator checkpoint, its training curve.
- ``poison``: poisoned training shards from the checkpoint.
- ``evaluate``: downstream classifiers trained on clean and on poisoned shards,
  tested on the clean test split: metrics.json and confusion-matrix PNGs.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from poison.attacks.deepconfuse import CHECKPOINT_FORMAT, DeepConfuse, TrialRecord, budget_levels, poison_images
from poison.config import Params, to_dict
from poison.data import load_source, stratified_split, subsample_per_class
from poison.errors import CheckpointError, DataSourceError, PoisonError, ShardError
from poison.evaluate import save_confusion_png, summarise, train_and_test
from poison.models import create_generator
from poison.shards import SplitSamples, load_split, manifest_sha256, read_manifest, write_dataset
from poison.utils import atomic_path, atomic_write_bytes, atomic_write_json, make_generator, resolve_device

__all__ = ["prepare", "train_generator", "poison", "evaluate", "load_generator", "STAGES", "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)


def _reports(params: Params, stage: str) -> Path:
    path = Path(params.paths.reports) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare(params: Params) -> dict[str, Any]:
    """Write clean, stratified train/val/test shards of the source dataset; return a summary."""
    cfg = params.data
    ds = load_source(cfg.source, cfg.root, cfg.channels)
    if ds.images.shape[-1] != ds.images.shape[-2]:
        raise DataSourceError(
            f"data.source {cfg.source!r} (data.root {cfg.root!r}): images must be square, got "
            f"{tuple(ds.images.shape[-2:])}; resize or crop them to a square first"
        )
    source_index = torch.arange(ds.labels.numel())
    if cfg.per_class is not None:
        source_index = subsample_per_class(ds.labels, cfg.per_class, make_generator(params.seed, "subset"))
        ds = ds.subset(source_index)
    index = stratified_split(ds.labels, {"train": -1, "val": cfg.val_size, "test": cfg.test_size},
                             make_generator(params.seed, "split"))
    splits = {}
    for split, idx in index.items():
        meta = [{"kind": "clean", "split": split, "source": cfg.source, "source_index": int(source_index[i]),
                 "label": int(ds.labels[i])} for i in idx.tolist()]
        splits[split] = SplitSamples(ds.images[idx], ds.labels[idx], meta)
    manifest = write_dataset(
        params.paths.clean, splits, dataset=cfg.source, kind="clean", classes=ds.classes, seed=params.seed,
        config=to_dict(cfg), shard_size=cfg.shard_size,
        source={"dataset": cfg.source, "root": cfg.root, "manifest_sha256": None},
    )
    log.info("prepare: wrote %s (%s)", params.paths.clean, {k: v["samples"] for k, v in manifest["splits"].items()})
    return {"path": params.paths.clean, "splits": {k: v["samples"] for k, v in manifest["splits"].items()}}


def train_generator(params: Params, on_trial: Callable[[TrialRecord], None] | None = None) -> dict[str, Any]:
    """Train the DeepConfuse generator on the clean train split (selected on val); save it."""
    cfg = params.train_generator
    clean = read_manifest(params.paths.clean)
    x_tr, y_tr, _ = load_split(params.paths.clean, "train")
    x_va, y_va, _ = load_split(params.paths.clean, "val")
    device = resolve_device(params.device)
    attack = DeepConfuse(cfg, x_tr.shape[1], x_tr.shape[-1], len(clean["classes"]), params.seed, device)
    start = time.perf_counter()
    curve = attack.fit(x_tr, y_tr, x_va, y_va, on_trial=on_trial)
    seconds = time.perf_counter() - start
    ckpt = attack.state() | {
        "config": to_dict(cfg),
        "seed": params.seed,
        "source": {"dataset": clean["dataset"], "manifest_sha256": manifest_sha256(params.paths.clean)},
    }
    # Through memory: torch.save names its zip records after the file, and the temporary
    # file's random name would make equal checkpoints differ in bytes.
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(params.paths.generator, buf.getvalue())
    reports = _reports(params, "train_generator")
    records = [vars(r) for r in curve]
    atomic_write_json(reports / "curve.json", records)
    best = next(r for r in curve if r.trial == attack.best_trial)
    summary = {"best_trial": attack.best_trial, "trials": cfg.trials, "steps": curve[-1].steps,
               "best_val_accuracy": best.val_accuracy, "best_val_target_rate": best.val_target_rate,
               "train_seconds": round(seconds, 1), "device": str(device)}
    atomic_write_json(reports / "summary.json", summary)
    _plot_curve(records, reports / "curve.png")
    return {"checkpoint": params.paths.generator, **summary}


def _plot_curve(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in records if r["val_accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot([r["trial"] for r in pts], [r["val_accuracy"] for r in pts], marker="o", label="clean val accuracy")
    if pts and pts[0]["val_target_rate"] is not None:
        ax.plot([r["trial"] for r in pts], [r["val_target_rate"] for r in pts], marker="s", label="target rate")
    ax.set_xlabel("trial")
    ax.set_ylim(0, 1)
    ax.set_title("victim trained on the current poison", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


_CHECKPOINT_KEYS = {"generator_arch", "in_channels", "image_size", "num_classes", "eps", "target_map",
                    "state_dict", "config", "source"}


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Return (generator in eval mode, checkpoint record) from a checkpoint file (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no generator checkpoint; run the train_generator stage first (`dvc repro train_generator`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or unsafe files
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({exc}); rerun train_generator") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: expected a checkpoint of format {CHECKPOINT_FORMAT!r}; rerun train_generator")
    missing = sorted(_CHECKPOINT_KEYS - set(ckpt))
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}; rerun train_generator")
    try:
        gen = create_generator(ckpt["generator_arch"], ckpt["in_channels"], ckpt["image_size"])
        gen.load_state_dict(ckpt["state_dict"])
    except (PoisonError, RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit generator {ckpt['generator_arch']!r} ({exc}); "
                              "rerun train_generator") from exc
    return gen.to(device).eval(), ckpt


def poison(params: Params) -> dict[str, Any]:
    """Apply the trained generator to the clean training split; write poisoned shards."""
    device = resolve_device(params.device)
    gen, ckpt = load_generator(params.paths.generator, device)
    cfg = params.train_generator
    if abs(ckpt["eps"] - cfg.eps) > 1e-12:
        raise CheckpointError(
            f"{params.paths.generator}: trained for eps {ckpt['eps']}, but train_generator.eps is {cfg.eps}; "
            "rerun train_generator (`dvc repro`)"
        )
    clean = read_manifest(params.paths.clean)
    image = clean["image"]
    if (ckpt["in_channels"], ckpt["image_size"]) != (image["channels"], image["height"]):
        raise CheckpointError(
            f"{params.paths.generator}: trained for {ckpt['in_channels']}x{ckpt['image_size']}px images, but "
            f"{params.paths.clean} has {image['channels']}x{image['height']}px; rerun train_generator"
        )
    if ckpt["source"]["manifest_sha256"] != manifest_sha256(params.paths.clean):
        raise CheckpointError(
            f"{params.paths.generator}: trained on a different clean dataset than {params.paths.clean} "
            "(manifest sha256 differs); rerun train_generator (`dvc repro`)"
        )
    x, y, meta = load_split(params.paths.clean, "train")

    x_p = poison_images(gen, x, ckpt["eps"], device, params.poison.batch_size)
    diff = (x_p.to(torch.int16) - x.to(torch.int16)).abs()
    levels = budget_levels(ckpt["eps"])
    if int(diff.max()) > levels:  # the quantizer guarantees this; a failure here is a bug
        raise AssertionError(f"poison exceeds the budget: {int(diff.max())} > {levels} levels")
    target_map = ckpt["target_map"]
    records = []
    for i, m in enumerate(meta):
        records.append({
            "kind": "poisoned", "poisoned": True, "method": "deepconfuse", "split": "train",
            "source": clean["dataset"], "source_index": m["source_index"], "source_key": f"train_{i:08d}",
            "label": int(y[i]), "true_label": int(y[i]),
            "target_label": None if target_map is None else int(target_map[int(y[i])]),
            "eps": ckpt["eps"],
        })
    deltas = (x_p.float() - x.float()) / 255.0 if params.poison.write_delta else None
    name = Path(params.paths.poisoned).name
    manifest = write_dataset(
        params.paths.poisoned, {"train": SplitSamples(x_p, y, records, deltas)},
        dataset=name, kind="poisoned", classes=clean["classes"], seed=params.seed, method="deepconfuse",
        config=ckpt["config"] | {"target_map": target_map},
        budget={"norm": "linf", "eps": ckpt["eps"], "levels": levels, "max_levels_used": int(diff.max()),
                "mean_abs": float(diff.float().mean() / 255.0)},
        source={"dataset": clean["dataset"], "path": params.paths.clean,
                "manifest_sha256": manifest_sha256(params.paths.clean)},
        shard_size=params.poison.shard_size,
    )
    return {"path": params.paths.poisoned, "samples": manifest["totals"]["samples"],
            "max_linf": int(diff.max()) / 255.0, "eps": ckpt["eps"]}


def evaluate(params: Params) -> dict[str, Any]:
    """Train each downstream classifier on clean and on poisoned shards; test on clean test."""
    device = resolve_device(params.device)
    clean = read_manifest(params.paths.clean)
    poisoned = read_manifest(params.paths.poisoned)
    if poisoned["source"]["manifest_sha256"] != manifest_sha256(params.paths.clean):
        raise ShardError(
            f"{params.paths.poisoned}: made from a different clean dataset than {params.paths.clean}; "
            "rerun the poison stage (`dvc repro`)"
        )
    classes = clean["classes"]
    k = len(classes)
    x_tr, y_tr, _ = load_split(params.paths.clean, "train")
    x_te, y_te, _ = load_split(params.paths.clean, "test")
    x_p, y_p, _ = load_split(params.paths.poisoned, "train")
    tm = poisoned["config"].get("target_map")
    target_map = None if tm is None else torch.tensor(tm, dtype=torch.long)
    diff = (x_p.to(torch.int16) - x_tr.to(torch.int16)).abs().max()
    eps = poisoned["budget"]["eps"]
    out: dict[str, Any] = {
        "budget": {"norm": "linf", "eps": eps, "max_linf_stored": int(diff) / 255.0,
                   "within_budget": bool(int(diff) / 255.0 <= eps + 1e-12)},
        "target": "untargeted" if target_map is None else "label_specific",
        "recipe": to_dict(params.evaluate.recipe),
        "seeds": list(params.evaluate.seeds),
        "test_samples": int(y_te.numel()),
        # which datasets these numbers describe (publish attaches them only to these)
        "datasets": {"clean": {"path": params.paths.clean, "manifest_sha256": manifest_sha256(params.paths.clean)},
                     "poisoned": {"path": params.paths.poisoned,
                                  "manifest_sha256": manifest_sha256(params.paths.poisoned)}},
    }
    reports = _reports(params, "evaluate")
    for kind, (xs, ys) in {"clean": (x_tr, y_tr), "poisoned": (x_p, y_p)}.items():
        out[kind] = {}
        for arch in params.evaluate.archs:
            runs = []
            for seed in params.evaluate.seeds:
                m = train_and_test(xs, ys, x_te, y_te, arch=arch, recipe=params.evaluate.recipe, seed=seed,
                                   num_classes=k, device=device, target_map=target_map)
                runs.append({"seed": seed, **m})
                log.info("evaluate: %s-trained %s seed %d: test accuracy %.4f", kind, arch, seed, m["accuracy"])
            out[kind][arch] = {**summarise(runs), "runs": runs}
            save_confusion_png(runs[0]["confusion_matrix"], classes, reports / "confusion" / f"{kind}_{arch}.png",
                               f"{arch} trained on {kind} data, clean test (seed {runs[0]['seed']})")
    atomic_write_json(reports / "metrics.json", out)
    return {arch: {"clean": out["clean"][arch]["accuracy_mean"], "poisoned": out["poisoned"][arch]["accuracy_mean"]}
            for arch in params.evaluate.archs}


STAGES: dict[str, Callable[[Params], dict[str, Any]]] = {
    "prepare": prepare,
    "train_generator": train_generator,
    "poison": poison,
    "evaluate": evaluate,
}
