"""Poisons beyond one label per image (issue 7): ordered top-k and multi-label DeepConfuse.

Three stages, each a plain function of ``Params`` (``poison.stages.STAGES``):

- ``compose``: a multi-label dataset from the clean splits (ALGORITHMS.md section 3 [adapt]):
  ``grid`` x ``grid`` mosaics of clean digits with multi-hot labels
  (``poison.data.grid_composites``); each split is composed from the clean split of the
  same name, so train / val / test never share a base image. Shards of kind ``clean``,
  label_type ``multi_label`` (the json's ``labels`` is the 0/1 vector).
- ``topk``: DeepConfuse with the ordered top-k objective (ALGORITHMS.md section 2 [adapt];
  Zhang & Wu, arXiv 1905.10695): the generator step minimises KL(P_t(y) || f_theta'(x)), so a
  model trained on the poison ranks t(y) = (y + 1, y + 2, ...) first. Shards of kind
  ``poisoned``; downstream models (``evaluate.archs`` x ``evaluate.seeds``) trained on the clean
  and on the poisoned split report accuracy, the top-1 target rate and the ordered top-k rate.
- ``multilabel``: DeepConfuse on the composites with a BCE victim (Song et al., arXiv
  1901.00546 for the setting); label-specific it flips ``flip_labels`` and keeps the others,
  untargeted it maximises the BCE. Downstream: exact match, Hamming loss, per-label F1 and
  (label-specific) the share of test composites whose predicted labels are exactly the goal.

Generators are selected on the validation split, poisons are stored as uint8 and evaluated
as stored, downstream seeds are derived per purpose (never those of generator training).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from poison.attacks.deepconfuse import DeepConfuse
from poison.attacks.deepconfuse_config import DeepConfuseConfig
from poison.attacks.perturbation import budget_levels
from poison.card import GENERATOR_HAZARD
from poison.errors import ConfigError, ShardError
from poison.evaluate import fit_classifier, multilabel_metrics
from poison.shards import SplitSamples, load_split, manifest_sha256, read_manifest, sample_key, write_dataset
from poison.train import TrainConfig, predict
from poison.utils import atomic_write_bytes, atomic_write_json, make_generator, resolve_device, torch_threads

__all__ = ["ComposeConfig", "TopKPoisonConfig", "MultiLabelPoisonConfig", "compose", "topk", "multilabel",
           "fit_generator", "save_checkpoint"]

log = logging.getLogger(__name__)


def _unet(**kw: Any) -> DeepConfuseConfig:
    # the settings of the strongest label-specific poison measured (BENCHMARKS.md section 4):
    # gradient alignment, cosine-decayed Adam 1e-3, selection every 2 trials on val
    base = dict(generator="unet16", surrogate="dc_cnn", eps=0.3, trials=6, generator_lr=1e-3,
                generator_lr_schedule="cosine", select_every=2, objective="align",
                validation=TrainConfig(optimizer="adam", lr=1e-3, epochs=5, batch_size=64))
    return DeepConfuseConfig(**(base | kw))


def _check_sizes(obj: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(obj, key) < 1:
            raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(obj, key)}")
    if getattr(obj, "threads", None) is not None and obj.threads < 1:
        raise ConfigError(f"threads: expected null (torch's default) or an integer >= 1, got {obj.threads}")


@dataclass(frozen=True)
class ComposeConfig:
    """The ``compose`` section: the multi-label composites of the clean splits."""

    grid: int = 2            # grid x grid mosaics (2: 56x56 from 28x28 digits)
    empty: float = 0.25      # chance a cell is blank (at least one digit per mosaic)
    train_size: int = 2000
    val_size: int = 500
    test_size: int = 1000
    shard_size: int = 1000

    def __post_init__(self) -> None:
        _check_sizes(self, ("grid", "train_size", "val_size", "test_size", "shard_size"))
        if not 0 <= self.empty < 1:
            raise ConfigError(f"empty: expected 0 <= empty < 1, got {self.empty}")


@dataclass(frozen=True)
class TopKPoisonConfig:
    """The ``topk`` section: the ordered top-k DeepConfuse poison of the clean training split."""

    generator: DeepConfuseConfig = field(
        default_factory=lambda: _unet(target="ordered_topk", topk=3, adversarial_weight=1.0))
    batch_size: int = 500
    shard_size: int = 1000
    threads: int | None = 1  # torch CPU threads; part of the bytes, like poison.threads

    def __post_init__(self) -> None:
        _check_sizes(self, ("batch_size", "shard_size"))
        if self.generator.target != "ordered_topk":
            raise ConfigError(f"generator.target: expected ordered_topk in this section, got {self.generator.target!r}")


@dataclass(frozen=True)
class MultiLabelPoisonConfig:
    """The ``multilabel`` section: DeepConfuse on the multi-label composites."""

    generator: DeepConfuseConfig = field(default_factory=lambda: _unet(target="label_specific", flip_labels=(0,)))
    batch_size: int = 500
    shard_size: int = 1000
    threads: int | None = 1

    def __post_init__(self) -> None:
        _check_sizes(self, ("batch_size", "shard_size"))
        if self.generator.target == "ordered_topk":
            raise ConfigError("generator.target: ordered_topk is single-label; use untargeted or label_specific")
        if self.generator.target == "label_specific" and self.generator.flip_labels is None:
            raise ConfigError("generator.flip_labels: a label-specific multi-label poison needs the labels to flip, "
                              "e.g. [0]")


# ----------------------------------------------------------------------- compose
def compose(params: Any) -> dict[str, Any]:
    """Write the multi-label composites of the clean splits; return a summary."""
    from poison.data import grid_composites

    cfg = params.compose
    clean = read_manifest(params.paths.clean)
    if clean.get("label_type") == "multi_label":
        raise ShardError(f"{params.paths.clean}: already multi-label; compose needs a single-label clean dataset")
    classes = clean["classes"]
    splits = {}
    for split, size in (("train", cfg.train_size), ("val", cfg.val_size), ("test", cfg.test_size)):
        if split not in clean["splits"]:
            raise ShardError(f"{params.paths.clean}: no {split!r} split; rerun the prepare stage")
        x, y, _ = load_split(params.paths.clean, split)
        images, labels, sources = grid_composites(x, y, len(classes), size,
                                                  make_generator(params.seed, "compose", split), cfg.grid, cfg.empty)
        meta = [{"kind": "clean", "split": split, "source": clean["dataset"],
                 "source_keys": [None if int(s) < 0 else sample_key(split, int(s)) for s in row]}
                for row in sources.tolist()]
        splits[split] = SplitSamples(images, labels, meta)
    name = Path(params.paths.multilabel_clean).name
    from poison.config import to_dict

    manifest = write_dataset(
        params.paths.multilabel_clean, splits, dataset=name, kind="clean", classes=classes, seed=params.seed,
        method="grid_composites", config=to_dict(cfg), shard_size=cfg.shard_size,
        source={"dataset": clean["dataset"], "path": params.paths.clean,
                "manifest_sha256": manifest_sha256(params.paths.clean)},
    )
    positives = {s: round(float(v.labels.float().sum(1).mean()), 3) for s, v in splits.items()}
    return {"path": params.paths.multilabel_clean, "splits": {k: v["samples"] for k, v in manifest["splits"].items()},
            "mean_positives": positives}


# ------------------------------------------------------- generator and materialization
def save_checkpoint(attack: DeepConfuse, config: dict[str, Any], seed: int, source: dict[str, Any],
                    path: str | Path) -> None:
    """Write the generator checkpoint (tensors and plain values only: loadable with weights_only=True).

    It carries ``hazard`` (``GENERATOR_HAZARD``): a checkpoint pushed to a DVC remote or copied
    elsewhere says what it makes, as every poisoned dataset's manifest and card do.
    """
    ckpt = attack.state() | {"config": config, "seed": seed, "source": source, "hazard": GENERATOR_HAZARD}
    # Through memory: torch.save names its zip records after the file, and the temporary
    # file's random name would make equal checkpoints differ in bytes.
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())


def fit_generator(cfg: DeepConfuseConfig, data_path: str, seed: int, device: torch.device, multi_label: bool,
                  on_trial: Callable[..., None] | None = None,
                  section: str = "train_generator") -> tuple[DeepConfuse, dict[str, Any]]:
    """Train a DeepConfuse generator on ``data_path``'s train split, selected on its val split.

    ``section``: where ``cfg`` sits in params.yaml; the errors that need the data (a target
    map or top-k list that does not fit its classes) name it, e.g. ``topk.generator.topk``.
    """
    manifest = read_manifest(data_path)
    x_tr, y_tr, _ = load_split(data_path, "train")
    x_va, y_va, _ = load_split(data_path, "val")
    try:
        attack = DeepConfuse(cfg, x_tr.shape[1], x_tr.shape[-1], len(manifest["classes"]), seed, device,
                             multi_label=multi_label)
    except ConfigError as err:
        raise ConfigError(f"{section}.{err} (data: {data_path}, {len(manifest['classes'])} classes)") from None
    start = time.perf_counter()
    try:
        with torch_threads(cfg.threads):  # part of the generator's bytes (DeepConfuseConfig.threads)
            curve = attack.fit(x_tr, y_tr, x_va, y_va, on_trial=on_trial)
    except ConfigError as err:  # an error about a key of cfg (e.g. batch_size) names its section
        if str(err).split(":", 1)[0] not in {f.name for f in dataclasses.fields(cfg)}:
            raise
        raise ConfigError(f"{section}.{err} (data: {data_path})") from None
    best = next(r for r in curve if r.trial == attack.best_trial and r.restart == attack.best_restart)
    lists = attack.target.topk_lists
    # what best_val_target_rate counts (TrialRecord): not always the downstream target_rate (top-1)
    rate_of = (None if cfg.target == "untargeted"
               else f"ordered top-{lists.shape[1]}: the top {lists.shape[1]} predictions are t(y) in order"
               if lists is not None else "exact match of the goal label vector" if multi_label
               else "top-1: the prediction is t(y)")
    summary = {"best_trial": attack.best_trial, "trials": cfg.trials, "steps": curve[-1].steps,
               "best_val_accuracy": best.val_accuracy, "best_val_target_rate": best.val_target_rate,
               "best_val_target_rate_of": rate_of,
               "restarts": cfg.restarts, "best_restart": attack.best_restart,
               "train_seconds": round(time.perf_counter() - start, 1), "device": str(device),
               "curve": [vars(r) for r in curve]}
    return attack, summary


def _materialize(attack: DeepConfuse, params: Any, clean_path: str, out_path: str, section: Any, method: str,
                 targets: Callable[[torch.Tensor], list[Any]]) -> dict[str, Any]:
    """Poison the clean training split of ``clean_path`` with the kept generator; write it as shards."""
    clean = read_manifest(clean_path)
    x, y, _ = load_split(clean_path, "train")
    x_p = attack.poison(x, section.batch_size, labels=y)
    levels = budget_levels(attack.config.eps)
    diff = (x_p.to(torch.int16) - x.to(torch.int16)).abs()
    if diff.numel() and int(diff.max()) > levels:  # the quantizer guarantees this; a failure here is a bug
        raise AssertionError(f"{out_path}: the poison exceeds the budget ({int(diff.max())} > {levels} levels of "
                             f"eps {attack.config.eps}); a bug in the quantizer, please report it; nothing was written")
    goal = targets(y)
    meta = [{"kind": "poisoned", "poisoned": True, "method": method, "split": "train", "source": clean["dataset"],
             "source_key": sample_key("train", i), "target": goal[i], "eps": attack.config.eps}
            for i in range(y.shape[0])]
    from poison.config import to_dict

    state = attack.state()
    config = to_dict(attack.config) | {k: state[k] for k in ("target_map", "topk_targets", "flip_labels")}
    return write_dataset(
        out_path, {"train": SplitSamples(x_p, y, meta)}, dataset=Path(out_path).name, kind="poisoned",
        classes=clean["classes"], seed=params.seed, method=method, config=config,
        budget={"norm": "linf", "eps": attack.config.eps, "levels": levels,
                "max_levels_used": int(diff.max()) if diff.numel() else 0,
                "mean_abs": float(diff.float().mean()) / 255.0 if diff.numel() else 0.0},
        source={"dataset": clean["dataset"], "path": clean_path, "manifest_sha256": manifest_sha256(clean_path)},
        shard_size=section.shard_size,
    )


def _downstream(params: Any, clean_path: str, poisoned_path: str,
                metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]) -> dict[str, Any]:
    """Train ``evaluate.archs`` x ``evaluate.seeds`` on the clean and on the poisoned split; test on clean test.

    The (dataset x arch x seed) cells run on ``orchestration.workers`` threads, each with
    ``evaluate.threads`` torch threads (as the evaluate flow's cells): a cell's result
    depends on its seed and the thread count only, never on the workers or the order.
    """
    data = {"clean": load_split(clean_path, "train")[:2], "poisoned": load_split(poisoned_path, "train")[:2]}
    x_te, y_te, _ = load_split(clean_path, "test")
    k = len(read_manifest(clean_path)["classes"])
    device = resolve_device(params.device)
    cells = [(kind, arch, seed) for kind in data for arch in params.evaluate.archs for seed in params.evaluate.seeds]

    def run(cell: tuple[str, str, int]) -> dict[str, Any]:
        kind, arch, seed = cell
        x, y = data[kind]
        with torch_threads(params.evaluate.threads):
            model = fit_classifier(x, y, arch=arch, recipe=params.evaluate.recipe, seed=seed, num_classes=k,
                                   device=device)
            return {"seed": seed, **metrics(predict(model, x_te), y_te)}

    workers = min(params.orchestration.workers, len(cells))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="downstream") as pool:
            results = list(pool.map(run, cells))
    else:
        results = [run(cell) for cell in cells]
    out: dict[str, Any] = {}
    for kind in data:
        out[kind] = {}
        for arch in params.evaluate.archs:
            runs = [r for (ck, ca, _), r in zip(cells, results) if (ck, ca) == (kind, arch)]
            means = {key: _mean([r.get(key) for r in runs]) for key in dict.fromkeys(
                k for r in runs for k, v in r.items() if k != "seed" and (v is None or isinstance(v, float)))}
            out[kind][arch] = {"mean": means, "runs": runs}
    return out


def _mean(values: list[Any]) -> float | None:
    """The mean of one metric over seeds; None when any seed left it undefined (None or missing)."""
    if not values or not all(isinstance(v, float) for v in values):
        return None
    return sum(values) / len(values)


def report_dir(params: Any, stage: str) -> Path:
    """``<paths.reports>/<stage>``, created if needed (every stage writes its reports there)."""
    path = Path(params.paths.reports) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


# -------------------------------------------------------------------------- topk
def topk(params: Any) -> dict[str, Any]:
    """Train the ordered top-k generator, write its poisoned shards, evaluate them downstream."""
    from poison.attacks.topk import topk_success
    from poison.config import to_dict

    cfg = params.topk
    clean = read_manifest(params.paths.clean)
    if clean.get("label_type") == "multi_label":
        raise ShardError(f"{params.paths.clean}: multi-label; the ordered top-k poison needs single-label data")
    device = resolve_device(params.device)
    with torch_threads(cfg.threads):
        attack, summary = fit_generator(cfg.generator, params.paths.clean, params.seed, device, multi_label=False,
                                        section="topk.generator")
        source = {"dataset": clean["dataset"], "manifest_sha256": manifest_sha256(params.paths.clean)}
        save_checkpoint(attack, to_dict(cfg.generator), params.seed, source, params.paths.topk_generator)
        lists = attack.target.topk_lists
        manifest = _materialize(attack, params, params.paths.clean, params.paths.topk_poisoned, cfg,
                                "deepconfuse-ordered-topk", lambda y: lists[y].tolist())

    def metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        return {"accuracy": float((logits.argmax(1) == y).float().mean()),
                "target_rate": float((logits.argmax(1) == lists[y, 0]).float().mean()),
                "topk_rate": float(topk_success(logits, lists[y]).float().mean())}

    result = _downstream(params, params.paths.clean, params.paths.topk_poisoned, metrics)
    reports = report_dir(params, "topk")
    out = {"k": int(lists.shape[1]), "target_lists": lists.tolist(), "generator": {k: v for k, v in summary.items()
                                                                                    if k != "curve"},
           "recipe": to_dict(params.evaluate.recipe), "seeds": list(params.evaluate.seeds),
           "datasets": {"clean": {"path": params.paths.clean, "manifest_sha256": manifest_sha256(params.paths.clean)},
                        "poisoned": {"path": params.paths.topk_poisoned,
                                     "manifest_sha256": manifest_sha256(params.paths.topk_poisoned)}},
           **result}
    atomic_write_json(reports / "metrics.json", out)
    atomic_write_json(reports / "curve.json", summary["curve"])
    return {"path": params.paths.topk_poisoned, "samples": manifest["totals"]["samples"],
            **{arch: {kind: result[kind][arch]["mean"] for kind in ("clean", "poisoned")}
               for arch in params.evaluate.archs}}


# -------------------------------------------------------------------- multilabel
def multilabel(params: Any) -> dict[str, Any]:
    """Train the multi-label generator on the composites, write its poisoned shards, evaluate them."""
    from poison.config import to_dict

    cfg = params.multilabel
    clean_path = params.paths.multilabel_clean
    clean = read_manifest(clean_path)
    if clean.get("label_type") != "multi_label":
        raise ShardError(f"{clean_path}: not a multi-label dataset (label_type {clean.get('label_type')!r}); "
                         "run the compose stage first (`dvc repro variants/dvc.yaml:compose`)")
    device = resolve_device(params.device)
    with torch_threads(cfg.threads):
        attack, summary = fit_generator(cfg.generator, clean_path, params.seed, device, multi_label=True,
                                        section="multilabel.generator")
        source = {"dataset": clean["dataset"], "manifest_sha256": manifest_sha256(clean_path)}
        save_checkpoint(attack, to_dict(cfg.generator), params.seed, source, params.paths.multilabel_generator)
        target = attack.target
        manifest = _materialize(attack, params, clean_path, params.paths.multilabel_poisoned, cfg,
                                "deepconfuse-multilabel",
                                lambda y: [None] * y.shape[0] if target.flip is None else target.goal(y).tolist())

    def metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        m = multilabel_metrics((logits > 0).long(), y, target.goal(y))
        return {k: v for k, v in m.items() if k != "samples"}

    result = _downstream(params, clean_path, params.paths.multilabel_poisoned, metrics)
    out = {"target": cfg.generator.target, "flip_labels": attack.state()["flip_labels"],
           "generator": {k: v for k, v in summary.items() if k != "curve"},
           "recipe": to_dict(params.evaluate.recipe), "seeds": list(params.evaluate.seeds),
           "datasets": {"clean": {"path": clean_path, "manifest_sha256": manifest_sha256(clean_path)},
                        "poisoned": {"path": params.paths.multilabel_poisoned,
                                     "manifest_sha256": manifest_sha256(params.paths.multilabel_poisoned)}},
           **result}
    reports = report_dir(params, "multilabel")
    atomic_write_json(reports / "metrics.json", out)
    atomic_write_json(reports / "curve.json", summary["curve"])
    return {"path": params.paths.multilabel_poisoned, "samples": manifest["totals"]["samples"],
            **{arch: {kind: result[kind][arch]["mean"] for kind in ("clean", "poisoned")}
               for arch in params.evaluate.archs}}
