"""WebDataset shards: writing datasets (manifests and verifying: poison/manifest.py; reading:
poison/shard_reader.py, poison/tar_reader.py; the card: poison/card.py).

Layout of a dataset folder (DESIGN.md, data contracts)::

    <split>-000000.tar ...   members <key>.png (uint8), <key>.cls, <key>.json[, <key>.delta.npy]
                             (multi-label datasets: no cls; the json's "labels" is the 0/1 vector)
    manifest.json            schema, kind, method + config, budget, seed, source, sha256 per shard
    README.md                the dataset card; poisoned data says so first

Keys are ``<split>_<index:08d>`` (no dots: WebDataset splits keys on them). Tars are
written with mtime 0, uid/gid 0 and sorted members, so equal inputs give equal bytes.
A dataset is assembled in a hidden staging folder and renamed into place only when
every shard, the manifest and the card are written: an interrupted run leaves nothing
that looks complete. Readers accept only png/cls/json/txt/npy members and never unpickle.
The reading API (``read_manifest``, ``load_split``, ...) is re-exported here for callers
that import it from ``poison.shards``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from poison import __version__
from poison.card import AUGMENTED, HAZARD, dataset_card
from poison.errors import ShardError
from poison.manifest import (  # noqa: F401  (re-exported: the reading API)
    DATASET_NAME,
    KINDS,
    SCHEMA_VERSION,
    check_shard_bytes,
    label_count,
    manifest_sha256,
    parse_manifest,
    read_manifest,
    shard_name,
    verify_dataset,
)
from poison.shard_reader import SAFE_EXTENSIONS, iter_samples, load_range, load_split  # noqa: F401  (re-exported)
from poison.utils import atomic_path, canonical_json, git_revision, remove_stale_folders, sha256_file, swap_in_folder

__all__ = [
    "SCHEMA_VERSION",
    "HAZARD",
    "SplitSamples",
    "sample_key",
    "write_dataset",
    "write_shard",
    "shard_file",
    "open_staging",
    "finish_dataset",
    "class_counts",
    "label_count",
    "read_manifest",
    "parse_manifest",
    "shard_name",
    "manifest_sha256",
    "verify_dataset",
    "iter_samples",
    "load_split",
    "load_range",
    "dataset_card",
    "SAFE_EXTENSIONS",
]

log = logging.getLogger(__name__)



def sample_key(split: str, index: int) -> str:
    """Return the WebDataset key of sample ``index`` of ``split`` (``train_00000042``)."""
    if "." in split or "_" in split or not split:
        raise ValueError(f"split: expected a name without '.' or '_', got {split!r}")
    return f"{split}_{index:08d}"


@dataclass(frozen=True)
class SplitSamples:
    """The samples of one split, ready to be written.

    Shape:
        images: (N, C, H, W) uint8
        labels: (N,) int64 class labels, or (N, L) int64 in {0, 1} for a multi-label dataset
            (stored as the json's ``labels`` list instead of a ``cls`` member)
        metadata: N dicts (JSON-serialisable) stored as each sample's ``json`` member
        deltas: optional (N, C, H, W) float, stored as float16 ``delta.npy``
    """

    images: torch.Tensor
    labels: torch.Tensor
    metadata: Sequence[dict[str, Any]]
    deltas: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise ShardError(
                f"images: expected uint8 (N, 1|3, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.ndim not in (1, 2) or self.labels.shape[0] != n or len(self.metadata) != n:
            raise ShardError(
                f"labels/metadata: expected {n} of each (labels (N,) or multi-hot (N, L)), got "
                f"{tuple(self.labels.shape)} labels and {len(self.metadata)} metadata records"
            )
        if self.labels.ndim == 2 and not bool(((self.labels == 0) | (self.labels == 1)).all()):
            raise ShardError("labels: a multi-label dataset's label vectors must hold only 0 and 1")
        if self.deltas is not None and self.deltas.shape != self.images.shape:
            raise ShardError(f"deltas: expected shape {tuple(self.images.shape)}, got {tuple(self.deltas.shape)}")


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | os.PathLike[str], split: str, start: int, samples: SplitSamples,
                begin: int, end: int) -> dict[str, Any]:
    """Write samples ``[begin, end)`` of ``samples`` to the tar ``path``; return its record.

    Sample ``i`` gets key ``sample_key(split, start + i)``. Every sample is validated
    before anything is written; the tar appears under ``path`` only when complete.
    """
    path = Path(path)
    members: list[tuple[str, bytes]] = []
    images = samples.images[begin:end].numpy()
    for i in range(end - begin):
        key = sample_key(split, start + begin + i)
        meta = dict(samples.metadata[begin + i])
        if samples.labels.ndim == 2:
            meta["labels"] = [int(v) for v in samples.labels[begin + i].tolist()]
        else:
            members.append((f"{key}.cls", str(int(samples.labels[begin + i])).encode()))
        if samples.deltas is not None:
            members.append((f"{key}.delta.npy", _npy_bytes(samples.deltas[begin + i].numpy().astype(np.float16))))
        members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
        members.append((f"{key}.png", _png_bytes(images[i])))
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                _add_member(tar, name, data)
    return {
        "file": path.name,
        "split": split,
        "samples": end - begin,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def class_counts(labels: torch.Tensor, num_classes: int) -> dict[str, int]:
    """Samples per class; for multi-hot labels (N, L), the samples carrying each label."""
    if labels.ndim == 2:
        counts = labels.long().sum(0)
    else:
        counts = torch.bincount(labels.long(), minlength=num_classes)
    return {str(i): int(c) for i, c in enumerate(counts.tolist())}


def write_dataset(
    out_dir: str | os.PathLike[str],
    splits: dict[str, SplitSamples],
    *,
    dataset: str,
    kind: str,
    classes: Sequence[str],
    seed: int,
    method: str | None = None,
    config: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    shard_size: int = 1000,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a whole dataset folder (shards, manifest.json, README.md) atomically.

    The folder is built in a hidden staging folder beside ``out_dir`` and swapped in
    only when complete; a previous dataset at ``out_dir`` is replaced. Returns the manifest.
    The same as ``open_staging`` + ``write_shard`` per shard + ``finish_dataset``, which
    parallel writers use (the bytes do not depend on who wrote which shard).
    """
    if shard_size < 1:
        raise ShardError(f"shard_size: expected >= 1, got {shard_size}")
    first = next(iter(splits.values()))
    _, c, h, w = first.images.shape
    staging = open_staging(out_dir, dataset, kind)
    try:
        records: list[dict[str, Any]] = []
        split_info: dict[str, Any] = {}
        for split, samples in splits.items():
            if tuple(samples.images.shape[1:]) != (c, h, w):
                raise ShardError(f"split {split!r}: image shape {tuple(samples.images.shape[1:])} differs from {(c, h, w)}")
            n = samples.images.shape[0]
            for shard_index, begin in enumerate(range(0, n, shard_size)):
                end = min(begin + shard_size, n)
                records.append(write_shard(staging / shard_file(split, shard_index), split, 0, samples, begin, end))
            split_info[split] = {"samples": n, "class_counts": class_counts(samples.labels, len(classes))}
        return finish_dataset(staging, out_dir, records=records, splits=split_info, image=(c, h, w),
                              dataset=dataset, kind=kind, classes=classes, seed=seed, method=method, config=config,
                              budget=budget, source=source, metrics=metrics, multi_label=first.labels.ndim == 2)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def shard_file(split: str, index: int) -> str:
    """Return the file name of shard ``index`` of ``split`` (``train-000003.tar``)."""
    return f"{split}-{index:06d}.tar"


def open_staging(out_dir: str | os.PathLike[str], dataset: str, kind: str) -> Path:
    """Return a new hidden staging folder beside ``out_dir`` for a dataset's shards.

    Leftovers of killed runs beside ``out_dir`` are removed first. Shards are written
    into it (``write_shard``, from any process that sees the folder) and
    ``finish_dataset`` turns it into ``out_dir``; until then nothing looks complete.
    """
    if kind not in KINDS:
        raise ShardError(f"kind: expected one of {KINDS}, got {kind!r}")
    if not DATASET_NAME.match(dataset):
        raise ShardError(f"dataset: expected a plain name (letters, digits, '.', '_', '-'), got {dataset!r}; "
                         "rename the output folder in params.yaml's paths")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def finish_dataset(
    staging: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    records: list[dict[str, Any]],
    splits: dict[str, dict[str, Any]],
    image: tuple[int, int, int],
    dataset: str,
    kind: str,
    classes: Sequence[str],
    seed: int,
    method: str | None = None,
    config: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    multi_label: bool = False,
) -> dict[str, Any]:
    """Write manifest.json and the card into ``staging`` and swap it in as ``out_dir``.

    ``records`` are ``write_shard``'s, in shard order; each must name a file in
    ``staging`` with the recorded size (a shard a failed writer left out is caught here).
    ``splits`` maps split -> {samples, class_counts}. Returns the manifest. On any error
    the staging folder is removed and ``out_dir`` is left as it was.
    """
    staging = Path(staging)
    out = Path(out_dir)
    try:
        for rec in records:
            path = staging / rec["file"]
            if not path.is_file() or path.stat().st_size != rec["bytes"]:
                raise ShardError(f"{path}: shard missing or of the wrong size in the staging folder; "
                                 "a shard writer failed: rerun the stage")
        for split, info in splits.items():
            got = sum(r["samples"] for r in records if r["split"] == split)
            if got != info["samples"]:
                raise ShardError(f"split {split!r}: the shards hold {got} samples, expected {info['samples']}; "
                                 "a shard writer failed: rerun the stage")
        c, h, w = image
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "dataset": dataset,
            "kind": kind,
            "hazard": HAZARD if kind == "poisoned" else (AUGMENTED if kind == "semantic" else None),
            "method": method,
            "config": config or {},
            "budget": budget,
            "seed": seed,
            "source": source,
            "package": {"name": "poison", "version": __version__, "git_rev": git_revision(Path(__file__).parent)},
            "image": {"channels": c, "height": h, "width": w, "dtype": "uint8", "format": "png"},
            "classes": list(classes),
            "label_type": "multi_label" if multi_label else "single_label",
            "splits": splits,
            "shards": records,
            "totals": {"samples": sum(s["samples"] for s in splits.values()), "shards": len(records),
                       "bytes": sum(r["bytes"] for r in records)},
        }
        (staging / "manifest.json").write_text(canonical_json(manifest))
        repo_path = out.as_posix() if not out.is_absolute() else None
        (staging / "README.md").write_text(dataset_card(manifest, metrics, repo_path=repo_path))
        swap_in_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest
