"""Dataset manifests: parsing them without trusting them, and verifying shards against them.

A manifest (``manifest.json`` of a dataset folder) lists every shard with its split, sample
count, size and sha256. It is as untrusted as the shards: its schema, types and internal
consistency (split sizes, totals, one record per file) are checked when it is parsed, and a
shard name must be a plain ``<split>-NNNNNN.tar`` file of its folder. The writer is
``poison.shards``; decoding shards is ``poison.shard_reader``. Every failure is a
``ShardError`` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from poison.errors import ShardError
from poison.utils import sha256_file

__all__ = [
    "SCHEMA_VERSION",
    "DATASET_NAME",
    "KINDS",
    "read_manifest",
    "parse_manifest",
    "manifest_sha256",
    "verify_dataset",
    "shard_name",
    "shard_path",
    "label_count",
    "check_shard_bytes",
]

SCHEMA_VERSION = 1
#: What a dataset (and so a published folder) may be called: one plain path component.
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: What a dataset may be (the manifest's ``kind``).
KINDS = ("clean", "poisoned", "semantic")
_SHARD_NAME = re.compile(r"^([a-z0-9]+)-(\d{6})\.tar$")


def read_manifest(dataset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed ``manifest.json`` of a dataset folder."""
    folder = Path(dataset_dir)
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise ShardError(f"{folder}: no such dataset folder{' (a file)' if folder.exists() else ''}; check the path "
                         "(a dataset is a folder with manifest.json), or make it (`dvc repro`) or fetch it (`dvc pull`)")
    if not path.is_file():
        raise ShardError(
            f"{path}: no manifest{' (a folder of that name)' if path.exists() else ''}; this folder is not a complete "
            "dataset (run the stage that writes it, e.g. `dvc repro`, or `dvc pull` it)"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ShardError(f"{path}: cannot read ({exc}); check its permissions, or re-fetch the dataset") from exc
    return parse_manifest(data, str(path))


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
        path = shard_path(base, rec)
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


def shard_path(base: Path, rec: dict[str, Any]) -> Path:
    return base / shard_name(rec, str(base / "manifest.json"))


def label_count(manifest: dict[str, Any]) -> int | None:
    """The length of the label vectors of a multi-label dataset; None for single-label ones."""
    return len(manifest["classes"]) if manifest.get("label_type") == "multi_label" else None


def check_shard_bytes(data: bytes, rec: dict[str, Any], url: str) -> None:
    """Raise ``ShardError`` naming ``url`` unless ``data`` has the manifest record's size and sha256."""
    fix = "regenerate or re-fetch the dataset (`poison verify` lists every bad shard)"
    if len(data) != rec.get("bytes"):
        raise ShardError(f"{url}: {len(data)} bytes, the manifest says {rec.get('bytes')} (missing, truncated or "
                         f"modified); {fix}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec.get("sha256"):
        raise ShardError(f"{url}: sha256 {digest} does not match the manifest's {rec.get('sha256')} (corrupted or "
                         f"tampered with, at the same size); {fix}")
