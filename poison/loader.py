"""``open_dataset``: stream a (published) dataset's shards as (image, label) samples.

    from poison import open_dataset
    ds = open_dataset("data/shards/mnist5k-deepconfuse")                 # a folder
    ds = open_dataset("s3://bucket/poison/mnist5k-deepconfuse/3f2c0e9a1b7d")
    ds = open_dataset("https://example.org/poison/mnist5k-deepconfuse/3f2c0e9a1b7d")
    ds = open_dataset("data/shards/mnist5k-deepconfuse", repo="https://github.com/org/poison", rev="v1")
    loader = torch.utils.data.DataLoader(ds, batch_size=64)

The manifest is read first. With ``verify`` (the default) every shard is downloaded
whole and its size and sha256 checked against the manifest *before* any of its samples
is yielded: a truncated, corrupted or tampered shard raises ``ShardError`` naming it.
Members other than png/cls/json/txt/npy are refused (nothing is ever unpickled).

``ratio`` < 1 mixes the poisoned samples with the matching clean ones at load time
(partial poisoning): a fixed subset of ``round(ratio * N)`` sample indices, drawn from
``seed``, comes from the poisoned dataset and every other index from ``clean``, the
clean dataset the poison was made from (checked through the manifest's sha256).

Opening a poisoned dataset (any ratio > 0) warns once per call site with the manifest's
hazard line (``PoisonedDatasetWarning``; the dataset's ``hazard`` attribute holds it too).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from poison.card import HAZARD
from poison.errors import PoisonedDatasetWarning, ShardError
from poison.manifest import check_shard_bytes, label_count, parse_manifest, shard_name
from poison.shard_reader import checked_samples
from poison.tar_reader import tar_samples
from poison.stores import Store, fetch_from_dvc, open_store
from poison.utils import make_generator, sha256_bytes

#: Decoded clean shards kept per iterator when mixing (ratio < 1) with shuffled or split shard orders.
_CLEAN_CACHE = 4

__all__ = ["open_dataset", "ShardDataset", "poisoned_indices", "verify_location"]


def poisoned_indices(n: int, ratio: float, seed: int) -> torch.Tensor:
    """Return the sorted sample indices (of ``n``) that stay poisoned at ``ratio``, fixed by ``seed``.

    The subsets are nested: for one seed, every index poisoned at a ratio is also
    poisoned at any larger ratio.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ShardError(f"ratio: expected a fraction in [0, 1], got {ratio}")
    order = torch.randperm(n, generator=make_generator(seed, "partial-poisoning"))
    return order[: round(ratio * n)].sort().values


def _same_label(a: Any, b: Any) -> bool:
    """Labels are ints, or int64 vectors in multi-label datasets."""
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@dataclass
class _Source:
    store: Store
    manifest: dict[str, Any]
    manifest_sha256: str
    records: list[dict[str, Any]]
    starts: list[int]  # first sample index of each record

    @classmethod
    def open(cls, store: Store, split: str) -> "_Source":
        data = store.read("manifest.json")
        where = store.join("manifest.json")
        manifest = parse_manifest(data, where)
        records = [r for r in manifest["shards"] if isinstance(r, dict) and r.get("split") == split]
        if not records and split not in manifest["splits"]:
            raise ShardError(f"{where}: no split {split!r}; it has {sorted(manifest['splits'])}")
        for rec in records:
            shard_name(rec, where)  # refuse odd names before anything is fetched
        starts, total = [], 0
        for rec in records:
            starts.append(total)
            total += int(rec["samples"])
        return cls(store, manifest, sha256_bytes(data), records, starts)

    def counts(self) -> list[int]:
        return [int(r["samples"]) for r in self.records]

    @property
    def shape(self) -> tuple[int, int, int]:
        im = self.manifest["image"]
        return (im["channels"], im["height"], im["width"])

    def samples(self, i: int, verify: bool, meta: bool = True) -> Iterator[dict[str, Any]]:
        """Decoded samples of record ``i``; with ``verify`` the whole shard is checked first."""
        rec = self.records[i]
        name = shard_name(rec, self.store.join("manifest.json"))
        url = self.store.join(name)
        data = self.store.read(name)
        if verify:
            check_shard_bytes(data, rec, url)
        return checked_samples(tar_samples(data, url), rec, url, self.shape, meta, label_count(self.manifest),
                               len(self.manifest["classes"]))


class ShardDataset(IterableDataset):
    """An iterable of ``(image, label)`` (or ``(image, label, meta)``) over one split's shards.

    ``label`` is an int, or an int64 0/1 vector (L,) in a multi-label dataset (manifest ``label_type``).

    Works with ``torch.utils.data.DataLoader``: each worker reads its own shards. Attributes:
    ``manifest`` (of the dataset), ``kind`` (clean / poisoned / semantic), ``hazard`` (the
    manifest's hazard line; None for clean data), ``poisoned`` (the sorted indices served
    from the poisoned set; all of them unless ``ratio`` < 1).
    """

    def __init__(self, source: _Source, split: str, *, clean: _Source | None, ratio: float, seed: int,
                 verify: bool, with_meta: bool, dtype: torch.dtype, shuffle: int):
        super().__init__()
        self._src, self._clean, self.split = source, clean, split
        self.manifest = source.manifest
        self.kind = source.manifest["kind"]
        # manifests written before the hazard field: a poisoned dataset is hazardous all the same
        self.hazard = source.manifest.get("hazard") or (HAZARD if self.kind == "poisoned" else None)
        self.ratio, self.seed, self.verify, self.with_meta, self.dtype = ratio, seed, verify, with_meta, dtype
        self.shuffle = shuffle
        self.epoch = 0
        n = len(self)
        self.poisoned = poisoned_indices(n, ratio, seed) if clean is not None else torch.arange(n)
        self._is_poisoned = torch.zeros(n, dtype=torch.bool)
        self._is_poisoned[self.poisoned] = True
        self._tmp: str | None = None  # a DVC download owned by this dataset

    def __len__(self) -> int:
        return sum(int(r["samples"]) for r in self._src.records)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently (same seed) for each epoch when ``shuffle`` is on."""
        self.epoch = epoch

    def _shard_order(self) -> list[int]:
        order = list(range(len(self._src.records)))
        if self.shuffle:
            perm = torch.randperm(len(order), generator=make_generator(self.seed, "shard-order", self.epoch))
            order = [order[i] for i in perm.tolist()]
        info = get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        return order

    def _clean_sample(self, index: int, cache: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
        src = self._clean
        assert src is not None
        # the clean record holding this index (records are consecutive, in key order)
        lo, hi = 0, len(src.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if src.starts[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        if lo in cache:
            cache[lo] = cache.pop(lo)  # most recently used last
        else:
            if len(cache) >= _CLEAN_CACHE:  # drop the least recently used decoded shard
                cache.pop(next(iter(cache)))
            cache[lo] = list(src.samples(lo, self.verify, self.with_meta))
        return cache[lo][index - src.starts[lo]]

    def _samples(self) -> Iterator[dict[str, Any]]:
        clean_cache: dict[int, list[dict[str, Any]]] = {}
        for i in self._shard_order():
            start = self._src.starts[i]
            for offset, sample in enumerate(self._src.samples(i, self.verify, self.with_meta)):
                index = start + offset
                if self._clean is not None and not self._is_poisoned[index]:
                    poisoned, sample = sample, self._clean_sample(index, clean_cache)
                    if sample["key"] != poisoned["key"] or not _same_label(sample["label"], poisoned["label"]):
                        raise ShardError(
                            f"{self._clean.store.url}: sample {index} is {sample['key']!r} label {sample['label']}, "
                            f"the poisoned set has {poisoned['key']!r} label {poisoned['label']}; "
                            "the clean dataset does not match the poison"
                        )
                    sample["meta"] = dict(sample["meta"], poisoned=False)
                yield sample

    def _shuffled(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if not self.shuffle:
            yield from samples
            return
        info = get_worker_info()
        gen = make_generator(self.seed, "sample-order", self.epoch, info.id if info else 0)
        buf: list[dict[str, Any]] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle:
                j = int(torch.randint(len(buf), (1,), generator=gen))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        order = torch.randperm(len(buf), generator=gen).tolist()
        for j in order:
            yield buf[j]

    def __iter__(self) -> Iterator[tuple]:
        for s in self._shuffled(self._samples()):
            image = s["image"] if self.dtype == torch.uint8 else s["image"].to(self.dtype).div_(255.0)
            if self.with_meta:
                meta = dict(s["meta"], key=s["key"])
                meta.setdefault("poisoned", self.kind == "poisoned")
                yield image, s["label"], meta
            else:
                yield image, s["label"]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the whole split as (images (N, C, H, W) of ``dtype``, labels (N,)), in key order."""
        if self.shuffle:
            raise ShardError("tensors(): open the dataset with shuffle=0 to read it in key order")
        images, labels = [], []
        for item in self:
            images.append(item[0])
            labels.append(item[1])
        width = label_count(self.manifest)
        if not images:
            empty = torch.zeros(0, dtype=torch.long) if width is None else torch.zeros(0, width, dtype=torch.long)
            return torch.zeros(0, *self._src.shape, dtype=self.dtype), empty
        return torch.stack(images), (torch.tensor(labels, dtype=torch.long) if width is None else torch.stack(labels))

    def __repr__(self) -> str:
        extra = f", ratio={self.ratio}" if self._clean is not None else ""
        return (f"ShardDataset({self._src.store.url!r}, split={self.split!r}, kind={self.kind!r}, "
                f"samples={len(self)}{extra})")


def open_dataset(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    ratio: float = 1.0,
    clean: str | os.PathLike[str] | None = None,
    seed: int = 0,
    verify: bool = True,
    with_meta: bool = False,
    dtype: torch.dtype = torch.float32,
    shuffle: int = 0,
    repo: str | None = None,
    rev: str | None = None,
    endpoint_url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ShardDataset:
    """Open one split of a dataset for streaming; see the module docstring.

    Args:
        source: a dataset folder, a ``file://``, ``http(s)://`` or ``s3://`` prefix holding
            ``manifest.json`` and the shards, or, with ``repo``, the dataset's path inside
            that DVC project.
        split: ``train``, ``val`` or ``test`` (poisoned datasets hold ``train``).
        ratio: fraction of samples served poisoned; below 1 needs ``clean``.
        clean: the clean dataset the poison was made from (any location ``source`` accepts;
            a path in ``repo`` when ``repo`` is given).
        seed: picks the poisoned subset (ratio < 1) and the shuffle order.
        verify: check each shard's size and sha256 against the manifest before use.
        with_meta: also yield each sample's metadata dict (key, poisoned, source index, ...).
        dtype: ``torch.float32`` (images in [0, 1]) or ``torch.uint8`` (as stored).
        shuffle: 0 keeps key order; N > 0 shuffles the shard order and samples through a
            buffer of N (reproducible per ``seed`` and ``set_epoch``).
        repo, rev: a DVC project (git URL or folder) and git revision to fetch ``source`` from.
        endpoint_url: S3-compatible endpoint (default: ``AWS_ENDPOINT_URL`` or AWS).
        cache_dir: where DVC downloads go, a new sub-folder per call (default: a temporary
            folder removed with the dataset).
    """
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.uint8):
        raise ShardError(f"dtype: expected torch.float32, float64, float16 or uint8, got {dtype}")
    if shuffle < 0:
        raise ShardError(f"shuffle: expected 0 (key order) or a buffer size > 0, got {shuffle}")
    if not 0.0 <= ratio <= 1.0:
        raise ShardError(f"ratio: expected a fraction in [0, 1], got {ratio}")
    tmp = None
    try:
        if repo is not None:
            if cache_dir is None:
                tmp = tempfile.mkdtemp(prefix="poison-dvc-")
                cache = Path(tmp)
            else:
                cache = Path(cache_dir)
            source = fetch_from_dvc(repo, str(source), rev, _fresh(cache / (Path(str(source)).name or "dataset")))
            if clean is not None:
                clean = fetch_from_dvc(repo, str(clean), rev, _fresh(cache / (Path(str(clean)).name or "clean")))
        src = _Source.open(open_store(source, endpoint_url=endpoint_url), split)
        clean_src = None
        if ratio < 1.0:
            if src.manifest["kind"] == "clean":
                raise ShardError(f"ratio: {source} is already clean; ratio applies to a poisoned dataset")
            if src.manifest["kind"] != "poisoned":
                raise ShardError(f"ratio: {source} is a {src.manifest['kind']} (augmented) dataset, whose splits hold "
                                 "new images rather than one changed image per clean sample; ratio applies to a "
                                 "poisoned dataset: open this one with ratio=1.0 and mix it with clean data yourself")
            if clean is None:
                origin = (src.manifest.get("source") or {}).get("dataset", "its source")
                raise ShardError(f"clean: ratio {ratio} < 1 needs the clean dataset the poison was made from "
                                 f"({origin!r}); pass clean=<its folder or prefix>")
            clean_src = _Source.open(open_store(clean, endpoint_url=endpoint_url), split)
            want = (src.manifest.get("source") or {}).get("manifest_sha256")
            if clean_src.manifest_sha256 != want:
                raise ShardError(
                    f"clean: {clean} has manifest sha256 {clean_src.manifest_sha256}, but {source} was made from "
                    f"the dataset whose manifest sha256 is {want}; pass the matching clean dataset"
                )
            n_poisoned, n_clean = sum(src.counts()), sum(clean_src.counts())
            if n_poisoned != n_clean:
                raise ShardError(f"clean: {clean} has {n_clean} {split!r} samples, {source} has {n_poisoned}; "
                                 "partial poisoning needs one clean sample per poisoned sample")
        ds = ShardDataset(src, split, clean=clean_src, ratio=ratio, seed=seed, verify=verify,
                          with_meta=with_meta, dtype=dtype, shuffle=shuffle)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp:
        ds._tmp = tmp
        weakref.finalize(ds, shutil.rmtree, tmp, True)
    if ds.kind == "poisoned" and len(ds.poisoned):
        warnings.warn(f"{source}: {ds.hazard}", PoisonedDatasetWarning, stacklevel=2)
    return ds


def verify_location(source: str | os.PathLike[str], *, endpoint_url: str | None = None
                    ) -> tuple[dict[str, Any], list[str]]:
    """Return (manifest, problems) checking every shard of a folder or http(s)/s3 prefix (empty: all good)."""
    store = open_store(source, endpoint_url=endpoint_url)
    manifest = parse_manifest(store.read("manifest.json"), store.join("manifest.json"))
    problems = []
    for rec in manifest["shards"]:
        name = shard_name(rec, store.join("manifest.json"))
        try:
            check_shard_bytes(store.read(name), rec, store.join(name))
        except ShardError as exc:
            problems.append(str(exc))
    return manifest, problems


def _fresh(path: Path) -> Path:
    """``path`` if unused, else ``path-1``, ``path-2``, ... (DVC fetches never overwrite)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
