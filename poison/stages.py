"""The pipeline's stages as plain functions: params in, files out, a small record back.

``flows/`` wraps each in a Prefect flow of the same name and ``dvc.yaml`` runs those;
``poison run`` calls them directly. Nothing here imports Prefect or DVC.

Stages and what they write (paths from the ``paths`` section of params.yaml):
- ``prepare``: clean train/val/test shards of the source dataset.
- ``train_generator``: the DeepConfuse generator checkpoint, its training curve.
- ``poison``: poisoned training shards from the checkpoint.
- ``augment``: semantically augmented shards (SIA): adversarial examples of the training
  split and a long-tailed split filled with SIA variants; the attack's diagnosis
  (``poison.augment``).
- ``evaluate``: downstream classifiers trained on clean and on poisoned shards,
  tested on the clean test split: metrics.json and confusion-matrix PNGs.
- ``report``: one page (Markdown + HTML) of the stages above (``poison.report``).
- ``topk``, ``compose``, ``multilabel``: the ordered top-k poison, the multi-label
  composites and their poison, each evaluated downstream (``poison.variants``).
- ``variants_report``: one page of those three (``poison.report.variants``).
"""

from __future__ import annotations

import logging
import reprlib
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from poison.attacks.deepconfuse import CHECKPOINT_FORMAT, TrialRecord
from poison.attacks.perturbation import budget_levels, poison_images
from poison.augment import augment
from poison.config import Params, to_dict
from poison.data import load_source, stratified_split, subsample_per_class
from poison.defenses import apply_defense
from poison.errors import CheckpointError, DataSourceError, PoisonError, ShardError
from poison.evaluate import save_confusion_png, summarise, train_and_test
from poison.models import create_generator
from poison.shards import (SplitSamples, finish_dataset, load_range, load_split, manifest_sha256, open_staging,
                           read_manifest, sample_key, shard_file, write_dataset, write_shard)
from poison.variants import compose, fit_generator, multilabel, report_dir, save_checkpoint, topk
from poison.utils import (GLOBAL_RNG_LOCK, atomic_path, atomic_write_json, make_generator, resolve_device, sha256_file,
                          torch_threads)

__all__ = ["prepare", "train_generator", "poison", "evaluate", "report", "load_generator", "STAGES", "CHECKPOINT_FORMAT",
           "topk", "compose", "multilabel", "variants_report",
           "augment", "poison_plan", "poison_shard", "poison_finish", "abandon", "evaluate_plan", "evaluate_cell", "evaluate_finish"]

log = logging.getLogger(__name__)


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
    attack, summary = fit_generator(cfg, params.paths.clean, params.seed, resolve_device(params.device),
                                    multi_label=False, on_trial=on_trial)
    save_checkpoint(attack, to_dict(cfg), params.seed,
                    {"dataset": clean["dataset"], "manifest_sha256": manifest_sha256(params.paths.clean)},
                    params.paths.generator)
    # the checkpoint is written first: a run killed before its summary leaves a summary that names another checkpoint
    summary["checkpoint_sha256"] = sha256_file(params.paths.generator)
    reports = report_dir(params, "train_generator")
    records = summary.pop("curve")
    atomic_write_json(reports / "curve.json", records)
    atomic_write_json(reports / "summary.json", summary)
    _plot_curve(records, reports / "curve.png")
    return {"checkpoint": params.paths.generator, **summary}


def _plot_curve(records: list[dict[str, Any]], path: Path) -> None:
    from poison.report.render import curve_png

    png = curve_png(records)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


_CHECKPOINT_KEYS = {"generator_arch", "in_channels", "image_size", "num_classes", "eps", "target_map",
                    "state_dict", "config", "source"}
#: The fields readers use, with their types (a checkpoint is untrusted input, like a shard).
_CHECKPOINT_TYPES = (("generator_arch", str, "a generator name"), ("in_channels", int, "an integer"),
                     ("image_size", int, "an integer"), ("num_classes", int, "an integer"),
                     ("eps", (int, float), "a budget in (0, 1]"), ("target_map", (list, type(None)), "a list or null"),
                     ("state_dict", dict, "a mapping of tensors"), ("config", dict, "a mapping"),
                     ("source", dict, "a mapping"))


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Return (generator in eval mode, checkpoint record) from a checkpoint file (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no generator checkpoint; run the train_generator stage first (`dvc repro train_generator`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or unsafe files
        # only the type: torch's own text can advise weights_only=False, i.e. running the file's code
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({type(exc).__name__}: damaged, or "
                              "not a generator written by train_generator); rerun train_generator "
                              "(`dvc repro train_generator`) or re-fetch it (`dvc pull`)") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: expected a checkpoint of format {CHECKPOINT_FORMAT!r}; rerun train_generator")
    missing = sorted(_CHECKPOINT_KEYS - set(ckpt))
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}; rerun train_generator")
    for key, kinds, expected in _CHECKPOINT_TYPES:
        value = ckpt[key]
        if not isinstance(value, kinds) or isinstance(value, bool) or (key == "eps" and not 0 < value <= 1):
            raise CheckpointError(f"{path}: checkpoint field {key} is {reprlib.repr(value)}, expected {expected}; the file is "
                                  "damaged or not written by train_generator: rerun train_generator")
    try:
        # building draws an initialisation from torch's global generator: under the lock, and put
        # back, so a model another thread is seeding meanwhile gets its own draws (the weights are replaced)
        with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
            gen = create_generator(ckpt["generator_arch"], ckpt["in_channels"], ckpt["image_size"],
                                   num_classes=ckpt["num_classes"])
        gen.load_state_dict(ckpt["state_dict"])
    except (PoisonError, RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit generator {ckpt['generator_arch']!r} ({exc}); "
                              "rerun train_generator") from exc
    return gen.to(device).eval(), ckpt


# ---------------------------------------------------------------- poison (fan-out)
# ``poison`` = ``poison_plan`` -> ``poison_shard`` for each job -> ``poison_finish``. The flow
# runs the shard jobs on a Prefect task runner; every job fixes its own batches and torch
# threads, so the bytes do not depend on where or in which order the jobs ran.


def poison_plan(params: Params) -> dict[str, Any]:
    """Check the checkpoint against params and the clean data; open the staging folder.

    Returns a small JSON-ready record: the staging folder, the shard jobs (index, begin,
    end of the clean training split) and what the jobs check and the manifest records.
    """
    _, ckpt = load_generator(params.paths.generator, "cpu")
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
    clean_sha = manifest_sha256(params.paths.clean)
    if ckpt["source"]["manifest_sha256"] != clean_sha:
        raise CheckpointError(
            f"{params.paths.generator}: trained on a different clean dataset than {params.paths.clean} "
            "(manifest sha256 differs); rerun train_generator (`dvc repro`)"
        )
    if "train" not in clean["splits"]:
        raise ShardError(f"{params.paths.clean}: no train split; rerun the prepare stage")
    n = clean["splits"]["train"]["samples"]
    size = params.poison.shard_size
    name = Path(params.paths.poisoned).name
    staging = open_staging(params.paths.poisoned, name, "poisoned")
    return {
        "staging": str(staging), "dataset": name, "clean_dataset": clean["dataset"], "samples": n, "eps": ckpt["eps"],
        "image": [image["channels"], image["height"], image["width"]], "classes": clean["classes"],
        "clean_manifest_sha256": clean_sha, "generator_sha256": sha256_file(params.paths.generator),
        "config": ckpt["config"] | {"target_map": ckpt["target_map"]},
        "jobs": [{"index": i, "begin": b, "end": min(b + size, n)} for i, b in enumerate(range(0, n, size))],
    }


def poison_shard(params: Params, plan: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Poison clean training samples ``[job.begin, job.end)``; write shard ``job.index`` into the staging folder.

    Returns the shard's manifest record and its statistics (never tensors).
    """
    if sha256_file(params.paths.generator) != plan["generator_sha256"]:
        raise CheckpointError(f"{params.paths.generator}: changed while the poison stage ran; rerun it")
    if manifest_sha256(params.paths.clean) != plan["clean_manifest_sha256"]:
        raise ShardError(f"{params.paths.clean}: changed while the poison stage ran; rerun it")
    with torch_threads(params.poison.threads):
        device = resolve_device(params.device)
        gen, ckpt = load_generator(params.paths.generator, device)
        begin, end = job["begin"], job["end"]
        x, y, meta = load_range(params.paths.clean, "train", begin, end)
        x_p = poison_images(gen, x, ckpt["eps"], device, params.poison.batch_size, labels=y)
    diff = (x_p.to(torch.int16) - x.to(torch.int16)).abs()
    levels = budget_levels(ckpt["eps"])
    if diff.numel() and int(diff.max()) > levels:  # the quantizer guarantees this; a failure here is a bug
        raise AssertionError(f"{params.paths.generator}: its poison of train samples {begin}..{end - 1} exceeds "
                             f"the budget ({int(diff.max())} > {levels} levels of eps {ckpt['eps']}); a bug in "
                             "the quantizer, please report it; no shard was written")
    target_map = ckpt["target_map"]
    records = []
    for i, m in enumerate(meta):
        label = int(y[i])
        records.append({
            "kind": "poisoned", "poisoned": True, "method": "deepconfuse", "split": "train",
            "source": plan["clean_dataset"],
            "source_index": m["source_index"], "source_key": sample_key("train", begin + i),
            "label": label, "true_label": label,
            "target_label": None if target_map is None else int(target_map[label]),
            "eps": ckpt["eps"],
        })
    deltas = (x_p.float() - x.float()) / 255.0 if params.poison.write_delta else None
    samples = SplitSamples(x_p, y, records, deltas)
    shard = write_shard(Path(plan["staging"]) / shard_file("train", job["index"]), "train", begin, samples, 0, end - begin)
    return {"shard": shard, "class_counts": torch.bincount(y, minlength=len(plan["classes"])).tolist(),
            "max_levels": int(diff.max()) if diff.numel() else 0, "abs_sum": int(diff.sum())}


def poison_finish(params: Params, plan: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the manifest and card of the shards ``results`` (in job order) and swap the dataset in."""
    if [r["shard"]["file"] for r in results] != [shard_file("train", j["index"]) for j in plan["jobs"]]:
        raise ShardError(f"{params.paths.poisoned}: the shard results do not match the plan's jobs; rerun the stage")
    n = plan["samples"]
    c, h, w = plan["image"]
    counts = torch.tensor([r["class_counts"] for r in results], dtype=torch.long).sum(0) if results else None
    max_levels = max((r["max_levels"] for r in results), default=0)
    elements = n * c * h * w
    manifest = finish_dataset(
        plan["staging"], params.paths.poisoned, records=[r["shard"] for r in results],
        splits={"train": {"samples": n, "class_counts": {str(i): int(v) for i, v in enumerate(
            counts.tolist() if counts is not None else [0] * len(plan["classes"]))}}},
        image=(c, h, w), dataset=plan["dataset"], kind="poisoned", classes=plan["classes"], seed=params.seed,
        method="deepconfuse", config=plan["config"],
        budget={"norm": "linf", "eps": plan["eps"], "levels": budget_levels(plan["eps"]), "max_levels_used": max_levels,
                "mean_abs": sum(r["abs_sum"] for r in results) / max(elements, 1) / 255.0},
        source={"dataset": plan["clean_dataset"], "path": params.paths.clean,
                "manifest_sha256": plan["clean_manifest_sha256"],
                "generator": params.paths.generator, "generator_sha256": plan["generator_sha256"]},
    )
    return {"path": params.paths.poisoned, "samples": manifest["totals"]["samples"], "shards": manifest["totals"]["shards"],
            "max_linf": max_levels / 255.0, "eps": plan["eps"]}


def abandon(plan: dict[str, Any]) -> None:
    """Remove a plan's staging folder after a failed job (the next run would sweep it anyway)."""
    shutil.rmtree(plan["staging"], ignore_errors=True)


def poison(params: Params) -> dict[str, Any]:
    """Apply the trained generator to the clean training split; write poisoned shards (sequentially)."""
    plan = poison_plan(params)
    try:
        results = [poison_shard(params, plan, job) for job in plan["jobs"]]
    except BaseException:
        abandon(plan)
        raise
    return poison_finish(params, plan, results)


# -------------------------------------------------------------- evaluate (fan-out)
# ``evaluate`` = ``evaluate_plan`` -> ``evaluate_cell`` for each (dataset, arch, seed) ->
# ``evaluate_finish``. A cell is pure: its result depends only on the two manifests (by
# sha256), the recipe, the threads and the code, so flows may cache it.

_SPLITS: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}
_SPLITS_LOCK = threading.Lock()


def _split(path: str, split: str, sha: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a dataset split, verified, kept for the next cell in this process."""
    key = (str(Path(path).resolve()), split, sha)
    with _SPLITS_LOCK:
        if key not in _SPLITS:
            if manifest_sha256(path) != sha:
                raise ShardError(f"{path}: changed while the evaluate stage ran; rerun it")
            x, y, _ = load_split(path, split)
            while len(_SPLITS) >= 4:
                _SPLITS.pop(next(iter(_SPLITS)))
            _SPLITS[key] = (x, y)
        return _SPLITS[key]


def evaluate_plan(params: Params) -> dict[str, Any]:
    """Check that the poisoned dataset was made from the clean one; return the cells to train."""
    read_manifest(params.paths.clean)
    poisoned = read_manifest(params.paths.poisoned)
    clean_sha = manifest_sha256(params.paths.clean)
    if poisoned["source"]["manifest_sha256"] != clean_sha:
        raise ShardError(
            f"{params.paths.poisoned}: made from a different clean dataset than {params.paths.clean}; "
            "rerun the poison stage (`dvc repro`)"
        )
    return {
        "manifest_sha256": {"clean": clean_sha, "poisoned": manifest_sha256(params.paths.poisoned)},
        "cells": [{"dataset": kind, "arch": arch, "seed": seed} for kind in ("clean", "poisoned")
                  for arch in params.evaluate.archs for seed in params.evaluate.seeds]
        # the same cells again on training data transformed by each defense (test images stay clean)
        + [{"dataset": kind, "arch": arch, "seed": seed, "defense": spec} for spec in params.evaluate.defenses
           for kind in ("clean", "poisoned") for arch in params.evaluate.archs for seed in params.evaluate.seeds],
    }


def evaluate_cell(params: Params, plan: dict[str, Any], cell: dict[str, Any]) -> dict[str, Any]:
    """Train ``cell.arch`` from scratch (seed ``cell.seed``) on ``cell.dataset``'s training split; test on clean test."""
    shas = plan["manifest_sha256"]
    path = {"clean": params.paths.clean, "poisoned": params.paths.poisoned}[cell["dataset"]]
    x, y = _split(path, "train", shas[cell["dataset"]])
    if cell.get("defense"):
        x = apply_defense(cell["defense"], x, "evaluate.defenses")  # as a defender preprocesses the training set
    x_te, y_te = _split(params.paths.clean, "test", shas["clean"])
    manifest = read_manifest(params.paths.poisoned)
    tm = manifest["config"].get("target_map")
    target_map = None if tm is None else torch.tensor(tm, dtype=torch.long)
    with torch_threads(params.evaluate.threads):
        m = train_and_test(x, y, x_te, y_te, arch=cell["arch"], recipe=params.evaluate.recipe, seed=cell["seed"],
                           num_classes=len(manifest["classes"]), device=resolve_device(params.device),
                           target_map=target_map)
    log.info("evaluate: %s-trained %s seed %d%s: test accuracy %.4f", cell["dataset"], cell["arch"], cell["seed"],
             f" under {cell['defense']}" if cell.get("defense") else "", m["accuracy"])
    return {**cell, **m}


def evaluate_finish(params: Params, plan: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Write metrics.json and the confusion matrices from the cells' results (in plan order)."""
    def ident(c: dict[str, Any]) -> tuple[Any, ...]:
        return c["dataset"], c["arch"], c["seed"], c.get("defense")

    if [ident(r) for r in runs] != [ident(c) for c in plan["cells"]]:
        raise ShardError("evaluate: the cell results do not match the plan's cells; rerun the stage")
    shas = plan["manifest_sha256"]
    clean = read_manifest(params.paths.clean)
    poisoned = read_manifest(params.paths.poisoned)
    x_tr, _ = _split(params.paths.clean, "train", shas["clean"])
    x_p, _ = _split(params.paths.poisoned, "train", shas["poisoned"])
    _, y_te = _split(params.paths.clean, "test", shas["clean"])
    diff = (x_p.to(torch.int16) - x_tr.to(torch.int16)).abs().max()
    eps = poisoned["budget"]["eps"]
    out: dict[str, Any] = {
        "budget": {"norm": "linf", "eps": eps, "max_linf_stored": int(diff) / 255.0,
                   "within_budget": bool(int(diff) / 255.0 <= eps + 1e-12)},
        "target": "untargeted" if poisoned["config"].get("target_map") is None else "label_specific",
        "recipe": to_dict(params.evaluate.recipe),
        "seeds": list(params.evaluate.seeds),
        "threads": params.evaluate.threads,
        "device": str(resolve_device(params.device)),  # `device: auto` resolved on this host (DVC cannot see it)
        "test_samples": int(y_te.numel()),
        # which datasets these numbers describe (publish attaches them only to these)
        "datasets": {"clean": {"path": params.paths.clean, "manifest_sha256": shas["clean"]},
                     "poisoned": {"path": params.paths.poisoned, "manifest_sha256": shas["poisoned"]}},
    }
    reports = report_dir(params, "evaluate")

    def section(kind: str, arch: str, defense: str | None) -> dict[str, Any]:
        cells = [{k: v for k, v in r.items() if k not in ("dataset", "arch", "defense")} for r in runs
                 if r["dataset"] == kind and r["arch"] == arch and r.get("defense") == defense]
        return {**summarise(cells), "runs": cells}

    for kind in ("clean", "poisoned"):
        out[kind] = {}
        for arch in params.evaluate.archs:
            out[kind][arch] = section(kind, arch, None)
            cells = out[kind][arch]["runs"]
            save_confusion_png(cells[0]["confusion_matrix"], clean["classes"], reports / "confusion" / f"{kind}_{arch}.png",
                               f"{arch} trained on {kind} data, clean test (seed {cells[0]['seed']})")
    if params.evaluate.defenses:
        # each defense transforms the training split of both datasets; the test split stays clean
        out["defenses"] = {spec: {kind: {arch: section(kind, arch, spec) for arch in params.evaluate.archs}
                                  for kind in ("clean", "poisoned")} for spec in params.evaluate.defenses}
    atomic_write_json(reports / "metrics.json", out)
    return {arch: {"clean": out["clean"][arch]["accuracy_mean"], "poisoned": out["poisoned"][arch]["accuracy_mean"],
                   **{f"{kind} under {spec}": out["defenses"][spec][kind][arch]["accuracy_mean"]
                      for spec in params.evaluate.defenses for kind in ("clean", "poisoned")}}
            for arch in params.evaluate.archs}


def evaluate(params: Params) -> dict[str, Any]:
    """Train each downstream classifier on clean and on poisoned shards; test on clean test (sequentially)."""
    plan = evaluate_plan(params)
    return evaluate_finish(params, plan, [evaluate_cell(params, plan, cell) for cell in plan["cells"]])


def report(params: Params) -> dict[str, Any]:
    """Write the one-page report (Markdown + HTML) of the core pipeline's outputs (``poison.report``)."""
    from poison.report import build_report

    result = build_report(params)
    result.pop("summary")  # the page's text: the Prefect flow shows it, `poison run` prints only where it went
    return result


def variants_report(params: Params) -> dict[str, Any]:
    """Write the one-page report of the variants pipeline (top-k, multi-label; ``poison.report.variants``)."""
    from poison.report import build_variants_report

    result = build_variants_report(params)
    result.pop("summary")
    return result


STAGES: dict[str, Callable[[Params], dict[str, Any]]] = {
    "prepare": prepare,
    "train_generator": train_generator,
    "poison": poison,
    "augment": augment,
    "evaluate": evaluate,
    "report": report,
    "topk": topk,
    "compose": compose,
    "multilabel": multilabel,
    "variants_report": variants_report,
}
