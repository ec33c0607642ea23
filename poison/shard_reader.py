"""Reading poison datasets: the manifest, verification, and decoding shards without trusting them.

The writer is ``poison.shards``; this module is everything a consumer needs. Shards and
manifests are untrusted input: a manifest's shard names must be plain ``<split>-NNNNNN.tar``
files of its folder, every shard's size and sha256 are checked against the manifest
before its samples are decoded (``verify``), tars are parsed in memory (a small ustar
reader, ``tarfile`` for pax/GNU extensions) and never extracted, only regular-file
members with the extensions in ``SAFE_EXTENSIONS`` are read, and nothing is unpickled
(``np.load(allow_pickle=False)``). Every failure is a ``ShardError`` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from poison.errors import ShardError
from poison.utils import sha256_file

__all__ = [
    "SCHEMA_VERSION",
    "SAFE_EXTENSIONS",
    "KINDS",
    "read_manifest",
    "parse_manifest",
    "manifest_sha256",
    "verify_dataset",
    "shard_name",
    "label_count",
    "check_shard_bytes",
    "iter_samples",
    "load_split",
    "load_range",
]

SCHEMA_VERSION = 1
#: What a dataset (and so a published folder) may be called: one plain path component.
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: What a dataset may be (the manifest's ``kind``).
KINDS = ("clean", "poisoned", "semantic")
#: Member extensions a reader accepts; everything else (pickle, pyd, pth, ...) is refused.
SAFE_EXTENSIONS = frozenset({"png", "cls", "json", "txt", "npy", "delta.npy"})


def read_manifest(dataset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed ``manifest.json`` of a dataset folder."""
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise ShardError(
            f"{path}: no manifest; this folder is not a complete dataset (run the stage that "
            "writes it, e.g. `dvc repro`, or `dvc pull` it)"
        )
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes | str, where: str) -> dict[str, Any]:
    """Return a manifest parsed from ``data`` (read from ``where``), checked for schema and keys."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{where}: not valid JSON ({exc}); regenerate or re-fetch the dataset") from exc
    if not isinstance(manifest, dict):
        raise ShardError(f"{where}: expected a JSON object; regenerate or re-fetch the dataset")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{where}: schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}; "
            "regenerate it with this version of poison"
        )
    missing = sorted({"dataset", "kind", "image", "classes", "splits", "shards", "seed", "package", "totals"}
                     - set(manifest))
    if missing:
        raise ShardError(f"{where}: missing keys {missing}; the manifest is incomplete: regenerate the dataset")
    if not isinstance(manifest["dataset"], str) or not DATASET_NAME.match(manifest["dataset"]):
        raise ShardError(f"{where}: dataset name {manifest['dataset']!r} is not a plain folder name (letters, digits, "
                         "'.', '_', '-'); the manifest is corrupt or tampered with")
    _check_structure(manifest, where)
    return manifest


def _fields(value: Any, types: dict[str, type], where: str, key: str) -> None:
    """Refuse ``value`` unless it is a JSON object with each of ``types``' keys of that type."""
    if not isinstance(value, dict):
        raise ShardError(f"{where}: {key} is {type(value).__name__}, expected an object; the manifest is corrupt or "
                         "tampered with: regenerate or re-fetch the dataset")
    for name, kind in types.items():
        v = value.get(name)
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
            raise ShardError(f"{where}: {key}.{name} is {v!r}, expected {'an integer >= 0' if kind is int else 'a string'}; "
                             "the manifest is corrupt or tampered with: regenerate or re-fetch the dataset")


def _check_structure(manifest: dict[str, Any], where: str) -> None:
    """The nested fields readers index (image size, split and shard records, totals), typed."""
    _fields(manifest["image"], {"channels": int, "height": int, "width": int}, where, "image")
    if not isinstance(manifest["splits"], dict):
        _fields(manifest["splits"], {}, where, "splits")
    for split, info in manifest["splits"].items():
        _fields(info, {"samples": int}, where, f"splits.{split}")
    if not isinstance(manifest["shards"], list):
        raise ShardError(f"{where}: shards is {type(manifest['shards']).__name__}, expected a list; the manifest is "
                         "corrupt or tampered with: regenerate or re-fetch the dataset")
    for i, rec in enumerate(manifest["shards"]):
        _fields(rec, {"file": str, "split": str, "samples": int, "bytes": int, "sha256": str}, where, f"shards[{i}]")
    _fields(manifest["totals"], {"samples": int, "shards": int, "bytes": int}, where, "totals")
    _check_consistent(manifest, where)


def _check_consistent(manifest: dict[str, Any], where: str) -> None:
    """The manifest agrees with itself: its kind, classes, shard list, split sizes and totals.

    Readers trust the shard list and ``verify`` checks each listed shard, so a shard dropped
    from the list (or a split added) would otherwise read as a smaller dataset that looks whole.
    """
    bad = f"{where}: {{}}; the manifest is corrupt or tampered with: regenerate or re-fetch the dataset"
    if manifest["kind"] not in KINDS:
        raise ShardError(bad.format(f"kind is {manifest['kind']!r}, expected one of {list(KINDS)}"))
    classes = manifest["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ShardError(bad.format(f"classes is {classes!r}, expected a non-empty list of class names"))
    shards = manifest["shards"]
    files = [rec["file"] for rec in shards]
    if len(set(files)) != len(files):
        raise ShardError(bad.format(f"shards list a file twice ({sorted({f for f in files if files.count(f) > 1})})"))
    for rec in shards:
        if rec["split"] not in manifest["splits"]:
            raise ShardError(bad.format(f"shard {rec['file']!r} belongs to split {rec['split']!r}, which splits does "
                                        f"not list ({sorted(manifest['splits'])})"))
    for split, info in manifest["splits"].items():
        listed = sum(rec["samples"] for rec in shards if rec["split"] == split)
        if listed != info["samples"]:
            raise ShardError(bad.format(f"splits.{split}.samples is {info['samples']} but its shards hold {listed} "
                                        "samples (a shard missing from the list?)"))
    totals = manifest["totals"]
    actual = {"samples": sum(rec["samples"] for rec in shards), "shards": len(shards),
              "bytes": sum(rec["bytes"] for rec in shards)}
    for key, value in actual.items():
        if totals[key] != value:
            raise ShardError(bad.format(f"totals.{key} is {totals[key]} but the shards add up to {value}"))


def manifest_sha256(dataset_dir: str | os.PathLike[str]) -> str:
    """Return the sha256 of a dataset's manifest.json (how derived datasets cite their source)."""
    return sha256_file(Path(dataset_dir) / "manifest.json")


def verify_dataset(dataset_dir: str | os.PathLike[str]) -> list[str]:
    """Return the problems found checking every shard against the manifest (empty: all good)."""
    base = Path(dataset_dir)
    manifest = read_manifest(base)
    problems = []
    for rec in manifest["shards"]:
        path = _shard_path(base, rec)
        if not path.is_file():
            problems.append(f"{path}: missing (manifest lists it with {rec['samples']} samples)")
            continue
        size = path.stat().st_size
        if size != rec["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {rec['bytes']} (truncated or modified)")
            continue
        digest = sha256_file(path)
        if digest != rec["sha256"]:
            problems.append(f"{path}: sha256 {digest} does not match the manifest's {rec['sha256']} (corrupted or tampered)")
    return problems


_OCTAL = re.compile(rb"[0-7]*")
_SHARD_NAME = re.compile(r"^([a-z0-9]+)-(\d{6})\.tar$")


def shard_name(rec: dict[str, Any], where: str) -> str:
    """Return the file name of a manifest's shard record, refusing names that are not plain shard files.

    The manifest is as untrusted as the shards: a name such as ``pipe:cmd`` or ``../x``
    must never reach a URL opener or leave the dataset folder.
    """
    name = rec.get("file") if isinstance(rec, dict) else None
    match = _SHARD_NAME.match(name) if isinstance(name, str) else None
    if match is None or match.group(1) != rec.get("split"):
        raise ShardError(
            f"{where}: shard entry {rec!r} is not a plain '<split>-NNNNNN.tar' file name "
            "of its split; the manifest is corrupt or tampered with: regenerate or re-fetch the dataset"
        )
    return name


def _shard_path(base: Path, rec: dict[str, Any]) -> Path:
    return base / shard_name(rec, str(base / "manifest.json"))


def _tar_samples(source: Path | bytes, where: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield WebDataset-style samples ({"__key__", ext: bytes}) of a tar file or tar bytes, in order.

    Members are grouped by key (the name up to its first dot), as WebDataset does; only
    regular files are read and nothing is ever extracted to disk.
    """
    where = where or str(source)
    if isinstance(source, (bytes, bytearray)):
        members = _ustar_members(bytes(source), where)
        if members is None:  # pax / GNU extensions: let tarfile handle them
            members = _tarfile_members(source, where)
    else:
        members = _tarfile_members(source, where)
    current: dict[str, Any] | None = None
    for name, data in members:
        if "/" in name or "." not in name:
            raise ShardError(f"{where}: member name {name!r} is not '<key>.<ext>'; refusing this shard: regenerate or re-fetch the dataset")
        key, ext = name.split(".", 1)
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        current[ext] = data
    if current is not None:
        yield current


def _tarfile_members(source: Path | bytes, where: str) -> Iterator[tuple[str, bytes]]:
    try:
        if isinstance(source, (bytes, bytearray)):
            tar = tarfile.open(fileobj=io.BytesIO(source), mode="r:")
        else:
            tar = tarfile.open(source, mode="r:")
        with tar:
            for info in tar:
                if not info.isfile():
                    raise ShardError(f"{where}: member {info.name!r} is not a regular file; refusing this shard: regenerate or re-fetch the dataset")
                fh = tar.extractfile(info)
                yield info.name, (fh.read() if fh is not None else b"")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"{where}: unreadable tar ({exc}); the shard is truncated or corrupt: regenerate or re-fetch it") from exc


def _ustar_members(data: bytes, where: str) -> list[tuple[str, bytes]] | None:
    """Return (name, bytes) of the regular files of a plain ustar/v7 archive held in memory.

    About 10x faster than ``tarfile`` for shards of many small members (the reading
    bottleneck of ``open_dataset``). Every header's checksum is checked; any other member
    type raises; returns None if the archive uses pax or GNU extensions (``tarfile`` reads those).
    """
    out: list[tuple[str, bytes]] = []
    pos, n = 0, len(data)
    bad = f"{where}: unreadable tar ({{}}); the shard is truncated or corrupt: regenerate or re-fetch it"
    while True:
        if pos + 512 > n:
            raise ShardError(bad.format(f"ends inside a header at byte {pos}"))
        header = data[pos : pos + 512]
        if header.count(0) == 512:  # end-of-archive block
            return out
        if header[124] & 0x80:  # base-256 size (huge members): tarfile reads those
            return None
        size_field, sum_field = header[124:136].strip(b"\0 "), header[148:156].strip(b"\0 ")
        if not _OCTAL.fullmatch(size_field) or not _OCTAL.fullmatch(sum_field) or not sum_field:
            raise ShardError(bad.format(f"header at byte {pos} has a non-octal size or checksum"))
        size, stored = int(size_field or b"0", 8), int(sum_field, 8)
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError(bad.format(f"header checksum mismatch at byte {pos}"))
        kind = header[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            return None
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        if kind not in (b"0", b"\0"):
            raise ShardError(f"{where}: member {name!r} is not a regular file; refusing this shard: regenerate or re-fetch the dataset")
        start = pos + 512
        if start + size > n:
            raise ShardError(bad.format(f"member {name!r} is cut short"))
        out.append((name, data[start : start + size]))
        pos = start + (size + 511) // 512 * 512


def label_count(manifest: dict[str, Any]) -> int | None:
    """The length of the label vectors of a multi-label dataset; None for single-label ones."""
    return len(manifest["classes"]) if manifest.get("label_type") == "multi_label" else None


def _decode(sample: dict[str, Any], url: str, meta: bool = True, multi_label: int | None = None,
            shape: tuple[int, int, int] | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """Decode one raw sample; ``shape`` (C, H, W) is checked from the PNG header before any pixel is
    decoded (a hostile PNG cannot make us allocate more), ``num_classes`` bounds a ``cls`` label."""
    import warnings

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
        with warnings.catch_warnings():
            # PIL only warns between its pixel limit and twice it: make that an error too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(sample["png"]))
        with img:
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
    path = _shard_path(base, rec)
    url = str(path)
    try:
        # with verify: read once, check, then parse the same bytes (the file cannot change in between)
        data: Path | bytes = path.read_bytes() if verify else path
    except FileNotFoundError:
        data = b""  # check_shard_bytes names it missing
    except OSError as exc:
        raise ShardError(f"{url}: cannot read ({exc}); check its permissions, or re-fetch the dataset "
                         "(`dvc pull`)") from exc
    if not verify and not path.is_file():
        raise ShardError(f"{url}: missing (the manifest lists it with {rec['samples']} samples); re-fetch the dataset "
                         "(`dvc pull` / `dvc checkout`) or regenerate it (`dvc repro`)")
    if verify:
        check_shard_bytes(data, rec, url)
    yield from _checked_samples(_tar_samples(data, url), rec, url, shape, multi_label=multi_label,
                                num_classes=num_classes)


def check_shard_bytes(data: bytes, rec: dict[str, Any], url: str) -> None:
    """Raise ``ShardError`` naming ``url`` unless ``data`` has the manifest record's size and sha256."""
    if len(data) != rec.get("bytes") or hashlib.sha256(data).hexdigest() != rec.get("sha256"):
        raise ShardError(
            f"{url}: missing, truncated or sha256 differs from the manifest ({len(data)} bytes, manifest says "
            f"{rec.get('bytes')}); the shard is corrupt or tampered with: regenerate or re-fetch the dataset "
            "(`poison verify` lists every bad shard)"
        )


def _checked_samples(raw_samples: Iterator[dict[str, Any]], rec: dict[str, Any], url: str,
                     shape: tuple[int, int, int], meta: bool = True, multi_label: int | None = None,
                     num_classes: int | None = None) -> Iterator[dict[str, Any]]:
    """Decode a shard's raw samples, checking each image's shape, label and the shard's sample count.

    ``multi_label``: the label-vector length of a multi-label dataset (``label_count``);
    ``num_classes``: the manifest's number of classes (a single-label ``cls`` must index one).
    """
    count = 0
    for raw in raw_samples:
        count += 1
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
