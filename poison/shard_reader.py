"""Reading poison datasets: decoding shards without trusting them.

The writer is ``poison.shards`` (which re-exports the whole reading API); the manifest and
verification are ``poison.manifest``; tar parsing is ``poison.tar_reader``. Shards
and manifests are untrusted input: every shard's size and sha256 are checked against the manifest
before its samples are decoded (``verify``), tars are parsed in memory and never extracted, only
members with the extensions in ``SAFE_EXTENSIONS`` are read, a PNG's size is checked from its
header before a pixel is decoded, and nothing is unpickled (``np.load(allow_pickle=False)``).
Every failure is a ``ShardError`` naming the file.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from poison.errors import ShardError
from poison.manifest import check_shard_bytes, label_count, read_manifest, shard_path
from poison.tar_reader import tar_samples

__all__ = ["SAFE_EXTENSIONS", "checked_samples", "iter_samples", "load_split", "load_range"]

#: Member extensions a reader accepts; everything else (pickle, pyd, pth, ...) is refused.
SAFE_EXTENSIONS = frozenset({"png", "cls", "json", "txt", "npy", "delta.npy"})


def _decode(sample: dict[str, Any], url: str, meta: bool = True, multi_label: int | None = None,
            shape: tuple[int, int, int] | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """Decode one raw sample; ``shape`` (C, H, W) is checked from the PNG header before any pixel is
    decoded (a hostile PNG cannot make us allocate more), ``num_classes`` bounds a ``cls`` label."""
    from PIL import Image

    key = sample["__key__"]
    members = {k for k in sample if not k.startswith("__")}
    unsafe = sorted(members - SAFE_EXTENSIONS)
    if unsafe:
        raise ShardError(
            f"{url}: sample {key!r} has member(s) {unsafe}; only {sorted(SAFE_EXTENSIONS)} are read "
            "(pickle-like members can run code). Refusing this dataset: regenerate it with poison, or re-fetch it."
        )
    for need in ("png", "json") if multi_label else ("png", "cls"):
        if need not in sample:
            raise ShardError(f"{url}: sample {key!r} lacks its {need!r} member; the shard is corrupt or not of this "
                             "manifest: regenerate or re-fetch the dataset")
    try:
        # Image.open reads the header only: the size checks below run before a pixel is decoded. PIL
        # raises DecompressionBombError past twice its pixel limit and only warns between once and
        # twice it, so that range is refused here, by hand: the manifest's shape is as untrusted as
        # the PNG, and warnings.catch_warnings would swap process-wide filters while stages decode
        # in threads.
        img = Image.open(io.BytesIO(sample["png"]))
        with img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.size[0] * img.size[1] > limit:
                raise ShardError(f"{url}: sample {key!r} is {img.size[0]} x {img.size[1]} pixels, past PIL's limit of "
                                 f"{limit} (a decompression bomb?); the shard is corrupt or tampered with: "
                                 "regenerate or re-fetch the dataset")
            if img.format != "PNG" or img.mode not in ("L", "RGB"):
                raise ShardError(f"{url}: sample {key!r}: expected an 8-bit L or RGB PNG, got {img.format} {img.mode}; "
                                 "regenerate or re-fetch the dataset")
            if shape is not None and (img.size != (shape[2], shape[1]) or len(img.getbands()) != shape[0]):
                raise ShardError(f"{url}: sample {key!r} has shape {(len(img.getbands()), img.size[1], img.size[0])}, "
                                 f"the manifest says {shape}; the dataset is inconsistent: regenerate or re-fetch it")
            arr = np.array(img)  # a copy: PIL buffers are read-only
        if multi_label:
            record = json.loads(sample["json"])
            vector = record.get("labels") if isinstance(record, dict) else None
            if (not isinstance(vector, list) or len(vector) != multi_label
                    or any(v not in (0, 1) or isinstance(v, bool) for v in vector)):
                raise ShardError(f"{url}: sample {key!r}: expected a json 'labels' list of {multi_label} zeros and "
                                 "ones (a multi-label dataset); the shard is corrupt or not of this manifest")
            label: Any = torch.tensor(vector, dtype=torch.long)
            meta = record if meta else {}
        else:
            label = int(sample["cls"])
            if num_classes is not None and not 0 <= label < num_classes:
                raise ShardError(f"{url}: sample {key!r}: label {label} is not a class index in "
                                 f"[0, {num_classes - 1}] (the manifest's classes); the shard is corrupt or not of "
                                 "this manifest: regenerate or re-fetch the dataset")
            meta = json.loads(sample["json"]) if meta and "json" in sample else {}
            if not isinstance(meta, dict):
                raise ShardError(f"{url}: sample {key!r}: its json member is {type(meta).__name__}, expected an "
                                 "object; the shard is corrupt or tampered with: regenerate or re-fetch the dataset")
    except ShardError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # (PIL's warning arrives as an exception where the caller's filters make warnings errors)
        raise ShardError(f"{url}: sample {key!r} does not decode ({exc}); the shard is corrupt: regenerate or "
                         "re-fetch the dataset") from exc
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    out = {
        "key": key,
        "image": torch.from_numpy(np.ascontiguousarray(arr)),
        "label": label,
        "meta": meta,
    }
    if "delta.npy" in sample:
        try:
            delta = np.load(io.BytesIO(sample["delta.npy"]), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # garbage, or a pickled object array (refused)
            raise ShardError(f"{url}: sample {key!r}: delta.npy does not load as a plain array ({exc}); "
                             "the shard is corrupt or tampered with: regenerate or re-fetch the dataset") from exc
        if not isinstance(delta, np.ndarray) or delta.shape != arr.shape or delta.dtype.kind != "f":
            raise ShardError(f"{url}: sample {key!r}: delta.npy is not a float array of the image's shape "
                             f"{arr.shape}; the shard is corrupt or tampered with: regenerate or re-fetch the dataset")
        out["delta"] = torch.from_numpy(delta.astype(np.float32))
    return out


def iter_samples(dataset_dir: str | os.PathLike[str], split: str, verify: bool = True) -> Iterator[dict[str, Any]]:
    """Yield the samples of ``split`` in key order as dicts: key, image (uint8 CHW), label, meta.

    With ``verify`` every shard's sha256 is checked against the manifest before any of
    its samples is yielded.
    """
    base = Path(dataset_dir)
    manifest = read_manifest(base)
    shape = (manifest["image"]["channels"], manifest["image"]["height"], manifest["image"]["width"])
    records = [r for r in manifest["shards"] if r["split"] == split]
    if not records and split not in manifest["splits"]:
        raise ShardError(f"{base}: no split {split!r}; it has {sorted(manifest['splits'])}")
    for rec in records:
        yield from _shard_samples(base, rec, shape, verify, label_count(manifest), len(manifest["classes"]))


def _shard_samples(base: Path, rec: dict[str, Any], shape: tuple[int, int, int], verify: bool,
                   multi_label: int | None = None, num_classes: int | None = None) -> Iterator[dict[str, Any]]:
    """The decoded samples of one shard; with ``verify`` its size and sha256 are checked first."""
    path = shard_path(base, rec)
    url = str(path)
    missing = ShardError(f"{url}: missing (the manifest lists it with {rec['samples']} samples); re-fetch the dataset "
                         "(`dvc pull` / `dvc checkout`) or regenerate it (`dvc repro`)")
    if not path.is_file():
        raise missing
    try:
        # with verify: read once, check, then parse the same bytes (the file cannot change in between)
        data: Path | bytes = path.read_bytes() if verify else path
    except FileNotFoundError:
        raise missing from None
    except OSError as exc:
        raise ShardError(f"{url}: cannot read ({exc}); check its permissions, or re-fetch the dataset "
                         "(`dvc pull`)") from exc
    if verify:
        check_shard_bytes(data, rec, url)
    yield from checked_samples(tar_samples(data, url), rec, url, shape, multi_label=multi_label,
                               num_classes=num_classes)


def checked_samples(raw_samples: Iterator[dict[str, Any]], rec: dict[str, Any], url: str,
                    shape: tuple[int, int, int], meta: bool = True, multi_label: int | None = None,
                    num_classes: int | None = None) -> Iterator[dict[str, Any]]:
    """Decode a shard's raw samples, checking each image's shape, label and the shard's sample count.

    ``multi_label``: the label-vector length of a multi-label dataset (``label_count``);
    ``num_classes``: the manifest's number of classes (a single-label ``cls`` must index one).
    """
    count = 0
    for raw in raw_samples:
        count += 1
        if count > rec["samples"]:  # refused before it is served: the manifest's indices end here
            raise ShardError(f"{url}: more than the {rec['samples']} samples the manifest says; the shard is "
                             "damaged: regenerate or re-fetch the dataset")
        sample = _decode(raw, url, meta, multi_label, shape, num_classes)
        if tuple(sample["image"].shape) != shape:
            raise ShardError(f"{url}: sample {sample['key']!r} has shape {tuple(sample['image'].shape)}, "
                             f"the manifest says {shape}; the dataset is inconsistent: regenerate or re-fetch it")
        yield sample
    if count != rec["samples"]:
        raise ShardError(f"{url}: {count} samples, manifest says {rec['samples']}; the shard is damaged: regenerate "
                         "or re-fetch the dataset")


def load_split(dataset_dir: str | os.PathLike[str], split: str, verify: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Return (images uint8 (N, C, H, W), labels int64 (N,) or multi-hot (N, L), metadata) of one split."""
    manifest = read_manifest(dataset_dir)
    m = manifest["image"]
    return _stack(list(iter_samples(dataset_dir, split, verify=verify)), (m["channels"], m["height"], m["width"]),
                  label_count(manifest))


def load_range(dataset_dir: str | os.PathLike[str], split: str, begin: int, end: int, verify: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Return samples ``[begin, end)`` of ``split`` like ``load_split``, reading only the shards they lie in."""
    base = Path(dataset_dir)
    manifest = read_manifest(base)
    if split not in manifest["splits"]:
        raise ShardError(f"{base}: no split {split!r}; it has {sorted(manifest['splits'])}")
    n = manifest["splits"][split]["samples"]
    if not 0 <= begin <= end <= n:
        raise ShardError(f"{base}: range [{begin}, {end}) is outside split {split!r} of {n} samples")
    shape = (manifest["image"]["channels"], manifest["image"]["height"], manifest["image"]["width"])
    picked: list[dict[str, Any]] = []
    offset = 0
    for rec in (r for r in manifest["shards"] if r["split"] == split):
        lo, hi = offset, offset + rec["samples"]
        offset = hi
        if hi <= begin or lo >= end:
            continue
        picked += [smp for i, smp in enumerate(_shard_samples(base, rec, shape, verify, label_count(manifest),
                                                              len(manifest["classes"])))
                   if begin <= lo + i < end]
    return _stack(picked, shape, label_count(manifest))


def _stack(samples: list[dict[str, Any]], shape: tuple[int, int, int], multi_label: int | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """(images uint8 (N, C, H, W), labels int64 (N,) or (N, L), metadata) of decoded samples."""
    if not samples:
        empty = torch.zeros(0, dtype=torch.long) if multi_label is None else torch.zeros(0, multi_label, dtype=torch.long)
        return torch.zeros(0, *shape, dtype=torch.uint8), empty, []
    labels = (torch.tensor([smp["label"] for smp in samples], dtype=torch.long) if multi_label is None
              else torch.stack([smp["label"] for smp in samples]))
    return torch.stack([smp["image"] for smp in samples]), labels, [smp["meta"] for smp in samples]
