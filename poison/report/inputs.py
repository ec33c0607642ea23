"""Reading the stages' outputs for a report, and the formatting every page shares.

A report computes no new metric: it reads what the stages wrote and checks what can be checked
against the datasets on disk. Anything missing, unreadable or made from another dataset is a
``ReportError`` naming the file and the stage to rerun.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from poison.errors import PoisonError

__all__ = ["ReportError", "dvc_target", "rerun", "read_json", "read_manifest", "check_source", "check_described",
           "check_curve", "first_per_class",
           "pct", "spread", "per_class_means", "samples", "budget", "revisions"]


class ReportError(PoisonError):
    """An input of the report is missing, unreadable, or from another run than its neighbours."""


#: stages of the variants pipeline: DVC finds them only by their file (``variants/dvc.yaml:<stage>``)
_VARIANT_STAGES = ("topk", "compose", "multilabel", "variants_report")


def dvc_target(stage: str) -> str:
    """The ``dvc repro`` target of ``stage``, run from the repository root."""
    return f"variants/dvc.yaml:{stage}" if stage in _VARIANT_STAGES else stage


def rerun(stage: str) -> str:
    """How to run ``stage`` alone again: its output on disk is damaged or from another run.

    ``-s``: that stage only (``-f`` alone would force every stage upstream of it too).
    """
    return f"`dvc repro -s -f {dvc_target(stage)}` (or `poison run --stages {stage}`)"


def read_json(path: Path, stage: str, keys: tuple[str, ...] = ()) -> Any:
    """``path``'s JSON, which must hold ``keys`` (written by ``stage``)."""
    if not path.is_file():
        raise ReportError(f"{path}: missing; the report needs the {stage} stage's output: "
                          f"run `dvc repro {dvc_target(stage)}` (or `poison run --stages {stage}`) first")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc}); rerun the {stage} stage: {rerun(stage)}") from exc
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ReportError(f"{path}: no {missing} (written by an older or interrupted run); rerun the {stage} stage: "
                          f"{rerun(stage)}")
    return data


#: what every record of a generator's ``curve.json`` holds
CURVE_KEYS = ("trial", "val_accuracy", "val_target_rate")


def check_curve(curve: Any, generator: dict[str, Any], path: Path, stage: str) -> None:
    """``curve`` is a list of trial records, and the one of the generator ``generator`` summarises.

    The curve and the summary record no dataset hash; what ties them is the kept trial: the
    curve must hold exactly one record of (``best_restart``, ``best_trial``), scored
    ``best_val_accuracy``. Anything else is a curve from another run (or a damaged file).
    """
    fix = f"rerun the {stage} stage: {rerun(stage)}"
    if not isinstance(curve, list) or any(not isinstance(r, dict) or any(k not in r for k in CURVE_KEYS)
                                          for r in curve):
        raise ReportError(f"{path}: not a list of trial records ({list(CURVE_KEYS)} each); {fix}")
    kept = [r for r in curve if r["trial"] == generator["best_trial"]
            and r.get("restart", 0) == generator.get("best_restart", 0)]
    if len(kept) != 1 or kept[0]["val_accuracy"] != generator["best_val_accuracy"]:
        raise ReportError(f"{path}: no record of the kept trial {generator['best_trial']} with the validation score "
                          f"the generator's summary quotes (a curve from another run); {fix}")


def read_manifest(path: str, stage: str) -> dict[str, Any]:
    """The manifest of the dataset at ``path`` (written by ``stage``)."""
    from poison.shards import read_manifest as _read

    if not Path(path, "manifest.json").is_file():
        raise ReportError(f"{path}: no dataset (manifest.json missing); run `dvc repro {dvc_target(stage)}` "
                          f"(or `poison run --stages {stage}`) first")
    return _read(path)


def check_source(manifest: dict[str, Any], path: str, source_sha: str, source_path: str, stage: str,
                 what: str = "dataset") -> None:
    """The dataset at ``path`` must have been made from the ``what`` at ``source_path`` (its manifest sha256)."""
    if (manifest.get("source") or {}).get("manifest_sha256") != source_sha:
        raise ReportError(f"{path}: made from another {what} than {source_path} (its manifest's "
                          f"source.manifest_sha256); rerun the {stage} stage: {rerun(stage)}")


def check_described(metrics: dict[str, Any], metrics_file: Path, sha: dict[str, str], paths: dict[str, str],
                    stage: str) -> None:
    """``metrics["datasets"][kind]`` must describe the dataset on disk, for each kind in ``sha``."""
    for kind, digest in sha.items():
        if ((metrics.get("datasets") or {}).get(kind) or {}).get("manifest_sha256") != digest:
            raise ReportError(f"{metrics_file}: describes another {kind} dataset than {paths[kind]} "
                              f"(datasets.{kind}.manifest_sha256); rerun the {stage} stage: {rerun(stage)}")


def first_per_class(clean_path: str, poisoned_path: str, num_classes: int,
                    stage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first poisoned training sample of each class and its clean original: (poisoned, clean, labels).

    Multi-label data: the first sample carrying each label (one sample may cover several).
    Reads the two training splits side by side and stops once every class is covered; a sample
    whose key or label differs between them means the poison was not made from this clean set.
    """
    from poison.shards import iter_samples

    images: list[torch.Tensor] = []
    originals: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    covered: set[int] = set()
    for c, q in zip(iter_samples(clean_path, "train"), iter_samples(poisoned_path, "train")):
        label = torch.as_tensor(q["label"])
        if c["key"] != q["key"] or not torch.equal(torch.as_tensor(c["label"]), label):
            raise ReportError(f"{poisoned_path}: training sample {q['key']!r} does not match {clean_path}'s "
                              f"{c['key']!r}; rerun the {stage} stage: {rerun(stage)}")
        carried = {int(i) for i in torch.nonzero(label).flatten()} if label.ndim == 1 else {int(label)}
        if carried - covered:
            covered |= carried
            images.append(q["image"])
            originals.append(c["image"])
            labels.append(label)
        if len(covered) >= num_classes:
            break
    if not images:
        raise ReportError(f"{poisoned_path}: no training samples; rerun the {stage} stage: {rerun(stage)}")
    if labels[0].ndim == 0:  # single-label: one row per class, in class order
        order = sorted(range(len(labels)), key=lambda i: int(labels[i]))
        images, originals, labels = ([seq[i] for i in order] for seq in (images, originals, labels))
    return torch.stack(images), torch.stack(originals), torch.stack(labels).long()


# ---------------------------------------------------------------------------- formatting
def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def spread(d: dict[str, Any], key: str) -> str:
    """``d``'s ``<key>_mean`` (``<key>_min``-``<key>_max``) in %; "-" without a mean."""
    if d.get(f"{key}_mean") is None:
        return "-"
    return f"{pct(d[f'{key}_mean'])} ({pct(d.get(f'{key}_min'))}-{pct(d.get(f'{key}_max'))})"


def per_class_means(runs: list[dict[str, Any]], key: str, n: int) -> list[str]:
    """Each run's per-class list ``key`` (n values), mean over the runs that define it, in %.

    "-" where no run does (a class absent from the test split, or never present nor predicted).
    """
    out = []
    for c in range(n):
        values = [r[key][c] for r in runs if len(r.get(key) or []) == n and r[key][c] is not None]
        out.append(f"{100 * sum(values) / len(values):.1f}" if values else "-")
    return out


def samples(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{split} {info['samples']}" for split, info in manifest["splits"].items())


def budget(manifest: dict[str, Any]) -> str:
    b = manifest.get("budget") or {}
    if not b:
        return "-"
    text = f"{b.get('norm', 'linf')} eps {b.get('eps')}"
    if "levels" in b:
        text += f" ({b['levels']}/255; largest used {b.get('max_levels_used')}/255"
        text += f", mean change {b['mean_abs']:.3f})" if b.get("mean_abs") is not None else ")"
    elif b.get("max_image_linf_used") is not None:
        text += f" on pixels (largest used {b['max_image_linf_used']:.3f})"
        text += f" + transforms of {', '.join(b['attributes'])}" if b.get("attributes") else ""
    return text


def revisions(*manifests: dict[str, Any]) -> str:
    """The code revisions that made the datasets, as Markdown code spans."""
    revs = sorted({str((m.get("package") or {}).get("git_rev") or "unknown") for m in manifests})
    return ", ".join(f"`{r}`" for r in revs)
