"""poison.shards: WebDataset round trip, keys, reproducible bytes, manifest, card, safety, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from poison import shards
from poison.errors import ShardError
from poison.shards import (
    HAZARD,
    SplitSamples,
    iter_samples,
    load_split,
    manifest_sha256,
    read_manifest,
    sample_key,
    verify_dataset,
    write_dataset,
)

CLASSES = ["a", "b", "c"]


def _samples(n: int, channels: int = 1, size: int = 5, seed: int = 0, deltas: bool = False) -> SplitSamples:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    meta = [{"i": i, "note": f"sample {i}", "nested": {"x": [i, 0.5]}, "flag": i % 2 == 0} for i in range(n)]
    d = (torch.rand(images.shape, generator=g) - 0.5) * 0.1 if deltas else None
    return SplitSamples(images, labels, meta, d)


def _write(out: Path, splits: dict[str, SplitSamples], kind: str = "clean", shard_size: int = 4, **kw):
    args = dict(dataset="tiny", kind=kind, classes=CLASSES, seed=3, shard_size=shard_size)
    args.update(kw)
    return write_dataset(out, splits, **args)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def dataset(tmp_path) -> Path:
    out = tmp_path / "ds"
    _write(out, {"train": _samples(10), "test": _samples(3, seed=1)})
    return out


# ------------------------------------------------------------------ keys
def test_sample_key_format():
    assert sample_key("train", 42) == "train_00000042"
    assert sample_key("val", 0) == "val_00000000"
    for bad in ("tr.ain", "my_split", ""):
        with pytest.raises(ValueError, match="split"):
            sample_key(bad, 1)


def test_tar_members_keys_and_order(dataset):
    manifest = read_manifest(dataset)
    keys = []
    for rec in manifest["shards"]:
        assert re.fullmatch(rf"{rec['split']}-\d{{6}}\.tar", rec["file"])
        with tarfile.open(dataset / rec["file"]) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
        for name in names:
            key, ext = name.split(".", 1)
            assert "." not in key and ext in ("cls", "json", "png")
            assert re.fullmatch(rf"{rec['split']}_\d{{8}}", key)
        file_keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
        assert len(file_keys) == rec["samples"]
        keys += file_keys
    assert keys[:10] == [f"train_{i:08d}" for i in range(10)]  # global indices across shards
    assert keys[10:] == [f"test_{i:08d}" for i in range(3)]


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_bit_exact(tmp_path, channels):
    train, val = _samples(9, channels, seed=5), _samples(2, channels, seed=6)
    _write(tmp_path / "ds", {"train": train, "val": val})
    for name, s in (("train", train), ("val", val)):
        images, labels, meta = load_split(tmp_path / "ds", name)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, s.images)
        assert torch.equal(labels, s.labels)
        assert meta == list(s.metadata)


def test_round_trip_with_float16_deltas(tmp_path):
    s = _samples(5, deltas=True)
    _write(tmp_path / "ds", {"train": s})
    got = list(iter_samples(tmp_path / "ds", "train"))
    with tarfile.open(tmp_path / "ds" / "train-000000.tar") as tar:
        assert "train_00000000.delta.npy" in tar.getnames()
    stored = torch.stack([g["delta"] for g in got])
    assert torch.equal(stored, s.deltas.half().float())
    assert [g["key"] for g in got] == [f"train_{i:08d}" for i in range(5)]


def test_empty_split_round_trip(tmp_path):
    empty = SplitSamples(torch.zeros(0, 1, 5, 5, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), [])
    _write(tmp_path / "ds", {"train": _samples(2), "val": empty})
    images, labels, meta = load_split(tmp_path / "ds", "val")
    assert images.shape == (0, 1, 5, 5) and labels.shape == (0,) and meta == []


def test_unknown_split_is_refused(dataset):
    with pytest.raises(ShardError, match=r"no split 'val'.*\['test', 'train'\]"):
        load_split(dataset, "val")


# ------------------------------------------------------------------ reproducible bytes
def test_same_inputs_give_identical_bytes(tmp_path):
    splits = {"train": _samples(10, deltas=True), "val": _samples(3, seed=2)}
    _write(tmp_path / "one" / "ds", splits, kind="poisoned", method="deepconfuse", budget={"eps": 0.1})
    _write(tmp_path / "two" / "ds", splits, kind="poisoned", method="deepconfuse", budget={"eps": 0.1})
    a, b = _files(tmp_path / "one" / "ds"), _files(tmp_path / "two" / "ds")
    assert set(a) == {"manifest.json", "README.md", "train-000000.tar", "train-000001.tar",
                      "train-000002.tar", "val-000000.tar"}
    assert a == b


def test_different_inputs_give_different_bytes(tmp_path):
    _write(tmp_path / "one", {"train": _samples(4, seed=0)})
    _write(tmp_path / "two", {"train": _samples(4, seed=1)})
    assert _files(tmp_path / "one")["train-000000.tar"] != _files(tmp_path / "two")["train-000000.tar"]


# ------------------------------------------------------------------ manifest
def test_manifest_records_every_shard(dataset):
    m = read_manifest(dataset)
    assert [r["file"] for r in m["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                "test-000000.tar"]
    assert [r["samples"] for r in m["shards"]] == [4, 4, 2, 3]
    for rec in m["shards"]:
        data = (dataset / rec["file"]).read_bytes()
        assert rec["bytes"] == len(data)
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["totals"] == {"samples": 13, "shards": 4, "bytes": sum(r["bytes"] for r in m["shards"])}
    labels = _samples(10).labels
    assert m["splits"]["train"]["class_counts"] == {str(i): int((labels == i).sum()) for i in range(3)}
    assert m["image"] == {"channels": 1, "height": 5, "width": 5, "dtype": "uint8", "format": "png"}
    assert m["kind"] == "clean" and m["hazard"] is None and m["seed"] == 3 and m["classes"] == CLASSES
    assert m["package"]["name"] == "poison"
    assert manifest_sha256(dataset) == hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()
    assert verify_dataset(dataset) == []


def test_read_manifest_errors(tmp_path, dataset):
    with pytest.raises(ShardError, match=r"nowhere: no such dataset folder; check the path"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"empty[/\\]manifest\.json: no manifest; this folder is not a complete"):
        read_manifest(tmp_path / "empty")
    (tmp_path / "odd" / "manifest.json").mkdir(parents=True)
    with pytest.raises(ShardError, match=r"no manifest \(a folder of that name\)"):
        read_manifest(tmp_path / "odd")
    m = json.loads((dataset / "manifest.json").read_text())
    m["schema_version"] = 99
    (dataset / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="schema_version 99"):
        read_manifest(dataset)


@pytest.mark.parametrize("edit, key", [
    (lambda m: m["shards"][0].pop("bytes"), r"shards\[0\]\.bytes is None"),
    (lambda m: m["shards"][1].update(samples="3"), r"shards\[1\]\.samples is '3'"),
    (lambda m: m.update(shards={"a": 1}), "shards is dict, expected a list"),
    (lambda m: m["image"].pop("width"), r"image\.width is None"),
    (lambda m: m["splits"].update(test=[]), r"splits\.test is list"),
    (lambda m: m.pop("totals"), r"missing keys \['totals'\]"),
    (lambda m: m["totals"].update(samples=-1), r"totals\.samples is -1"),
    # consistent types, inconsistent content: a shard dropped from the list must not read as a smaller whole
    (lambda m: m["shards"].pop(0), r"splits\.train\.samples is 10 but its shards hold 6 .*a shard missing"),
    (lambda m: m["totals"].update(bytes=m["totals"]["bytes"] + 1), r"totals\.bytes is \d+ but the shards add up"),
    (lambda m: m["totals"].update(shards=9), r"totals\.shards is 9 but the shards add up to 4"),
    (lambda m: m["splits"].pop("test"), r"shard 'test-000000\.tar' belongs to split 'test', which splits does not"),
    (lambda m: m["shards"].__setitem__(1, dict(m["shards"][0])), r"shards list a file twice \(\['train-000000\.tar'\]\)"),
    (lambda m: m.update(kind="toxic"), r"kind is 'toxic', expected one of \['clean', 'poisoned', 'semantic'\]"),
    (lambda m: m.update(classes="abc"), r"classes is 'abc', expected a non-empty list"),
])
def test_a_manifest_with_damaged_nested_fields_is_refused_by_name(dataset, capsys, edit, key):
    m = json.loads((dataset / "manifest.json").read_text())
    edit(m)
    (dataset / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=key) as info:
        read_manifest(dataset)
    assert "manifest.json" in str(info.value) and "regenerate" in str(info.value)
    from poison.cli import main

    assert main(["verify", str(dataset)]) == 1  # an error, not a traceback
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("payload", [
    b"not an npy file",
    b"pickled",  # replaced below by an object array, which np.load refuses without allow_pickle
    b"wrong shape",
])
def test_a_damaged_delta_member_is_a_shard_error_naming_the_shard(tmp_path, payload):
    out = tmp_path / "ds"
    _write(out, {"train": _samples(2, deltas=True)})
    shard = out / "train-000000.tar"
    if payload == b"pickled":
        buf = io.BytesIO()
        np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        payload = buf.getvalue()
    elif payload == b"wrong shape":
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 2), dtype=np.float16))
        payload = buf.getvalue()
    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            members.append((info, payload if info.name.endswith("00000000.delta.npy") else data))
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"train-000000\.tar.*train_00000000.*delta\.npy"):
        list(iter_samples(out, "train", verify=False))


def _replace_member(shard: Path, suffix: str, payload: bytes) -> None:
    """Rewrite ``shard`` with the member ending in ``suffix`` replaced by ``payload``."""
    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            members.append((info, payload if info.name.endswith(suffix) else data))
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _claiming(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its IHDR header rewritten to claim width x height (CRC fixed): a decompression bomb's header."""
    import struct
    import zlib

    ihdr = bytearray(png[12:29])  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    return png[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + png[33:]


@pytest.mark.parametrize("suffix, payload, message", [
    ("00000000.png", _png(6, 5), r"train_00000000' has shape \(1, 5, 6\), the manifest says \(1, 5, 5\)"),
    # claims 20000 x 20000: refused from its header, before PIL decodes (or refuses) a pixel
    ("00000000.png", _claiming(_png(1, 1), 20000, 20000), r"train_00000000'.*(shape \(1, 20000, 20000\)|does not decode)"),
    ("00000001.cls", b"7", r"train_00000001': label 7 is not a class index in \[0, 2\]"),
    ("00000001.cls", b"-3", r"train_00000001': label -3 is not a class index"),
    ("00000002.json", b"[1, 2]", r"train_00000002': its json member is list, expected an object"),
])
def test_a_sample_that_disagrees_with_its_manifest_is_a_shard_error(tmp_path, suffix, payload, message):
    out = tmp_path / "ds"
    _write(out, {"train": _samples(4)})
    _replace_member(out / "train-000000.tar", suffix, payload)
    with pytest.raises(ShardError, match=r"train-000000\.tar: sample '" + message):
        list(iter_samples(out, "train", verify=False))


def test_a_png_past_pils_pixel_limit_is_a_shard_error_not_a_pil_exception(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # the 5 x 5 images of _samples: past twice the limit
    out = tmp_path / "ds"
    _write(out, {"train": _samples(2)})
    with pytest.raises(ShardError, match=r"train_00000000' does not decode .*regenerate or re-fetch"):
        list(iter_samples(out, "train", verify=False))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_png_between_pils_pixel_limit_and_twice_it_is_refused_too(tmp_path, monkeypatch):
    """PIL only warns there (and would decode): the manifest agreeing with the size is no defence, it is untrusted."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 25 pixels: in PIL's warning-only range
    out = tmp_path / "ds"
    _write(out, {"train": _samples(2)})
    with pytest.raises(ShardError, match=r"train_00000000' is 5 x 5 pixels, past PIL's limit of 20"):
        list(iter_samples(out, "train", verify=False))


# ------------------------------------------------------------------ card
def test_poisoned_card_starts_with_warning(tmp_path):
    m = _write(tmp_path / "p", {"train": _samples(3)}, kind="poisoned", method="deepconfuse",
               budget={"norm": "linf", "eps": 0.3, "levels": 76})
    card = (tmp_path / "p" / "README.md").read_text()
    first = card.splitlines()[0]
    assert first.startswith("# ") and "POISONED" in first
    assert HAZARD in "\n".join(card.splitlines()[:4])
    assert m["hazard"] == HAZARD and read_manifest(tmp_path / "p")["hazard"] == HAZARD
    assert "eps = 0.3" in card and "76 uint8 levels" in card
    for rec in m["shards"]:
        assert rec["sha256"] in card


def test_clean_and_semantic_cards(tmp_path):
    _write(tmp_path / "c", {"train": _samples(3)})
    _write(tmp_path / "s", {"train": _samples(3)}, kind="semantic")
    clean = (tmp_path / "c" / "README.md").read_text()
    assert "POISONED" not in clean and clean.startswith("# Clean dataset")
    assert "- budget: none (the source's images, unchanged)" in clean and "None" not in clean and "eps = -" not in clean
    assert "AUGMENTED" in (tmp_path / "s" / "README.md").read_text().splitlines()[0]


@pytest.mark.parametrize("verify", [True, False])
def test_a_missing_shard_is_named_missing_with_the_fix(dataset, verify):
    (dataset / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar: missing.*(dvc pull|re-fetch)"):
        list(iter_samples(dataset, "train", verify=verify))


def test_invalid_kind_and_shard_size(tmp_path):
    with pytest.raises(ShardError, match="kind"):
        _write(tmp_path / "x", {"train": _samples(2)}, kind="toxic")
    with pytest.raises(ShardError, match="shard_size"):
        _write(tmp_path / "x", {"train": _samples(2)}, shard_size=0)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ validation
def test_split_samples_validation():
    good = _samples(3)
    with pytest.raises(ShardError, match="uint8"):
        SplitSamples(good.images.float(), good.labels, good.metadata)
    with pytest.raises(ShardError, match="uint8"):
        SplitSamples(torch.zeros(3, 2, 5, 5, dtype=torch.uint8), good.labels, good.metadata)
    with pytest.raises(ShardError, match="labels/metadata"):
        SplitSamples(good.images, good.labels[:2], good.metadata)
    with pytest.raises(ShardError, match="labels/metadata"):
        SplitSamples(good.images, good.labels, good.metadata[:2])
    with pytest.raises(ShardError, match="deltas"):
        SplitSamples(good.images, good.labels, good.metadata, torch.zeros(3, 1, 4, 4))


# ------------------------------------------------------------------ unsafe members
def _rewrite_with_extra_member(tar_path: Path, name: str, data: bytes) -> None:
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    extra = tarfile.TarInfo(name)
    extra.size = len(data)
    # insert it right after the first sample's members so it joins that sample
    members.insert(3, (extra, data))
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload))


def _fix_manifest(folder: Path, tar_name: str) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    for rec in m["shards"]:
        if rec["file"] == tar_name:
            data = (folder / tar_name).read_bytes()
            rec["sha256"], rec["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("ext", ["pyd", "pkl", "pth", "pickle"])
def test_unsafe_member_is_refused_even_with_a_matching_manifest(dataset, ext):
    _rewrite_with_extra_member(dataset / "train-000000.tar", f"train_00000000.{ext}", b"\x80\x04evil")
    _fix_manifest(dataset, "train-000000.tar")
    assert verify_dataset(dataset) == []  # hashes match: only the reader's member check can stop it
    with pytest.raises(ShardError) as info:
        load_split(dataset, "train")
    msg = str(info.value)
    assert f"'{ext}'" in msg and "train_00000000" in msg and "train-000000.tar" in msg


def test_unsafe_member_is_refused_without_verification(dataset):
    _rewrite_with_extra_member(dataset / "train-000001.tar", "train_00000004.pkl", b"\x80\x04evil")
    with pytest.raises(ShardError, match=r"\['pkl'\]"):
        load_split(dataset, "train", verify=False)
    # with verification the changed hash stops it first
    with pytest.raises(ShardError, match="sha256"):
        load_split(dataset, "train")


# ------------------------------------------------------------------ damaged shards
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_shard_caught_by_verify(dataset):
    _truncate(dataset / "train-000001.tar")
    problems = verify_dataset(dataset)
    assert len(problems) == 1 and "train-000001.tar" in problems[0] and "truncated" in problems[0]


def test_modified_shard_same_size_caught_by_verify(dataset):
    path = dataset / "test-000000.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    (problem,) = verify_dataset(dataset)
    assert "test-000000.tar" in problem and "sha256" in problem


def test_missing_shard_caught_by_verify(dataset):
    (dataset / "test-000000.tar").unlink()
    (problem,) = verify_dataset(dataset)
    assert "test-000000.tar" in problem and "missing" in problem


def test_iter_samples_raises_before_yielding_from_a_bad_shard(dataset):
    _truncate(dataset / "train-000001.tar")
    keys = []
    with pytest.raises(ShardError, match="train-000001.tar"):
        for s in iter_samples(dataset, "train"):
            keys.append(s["key"])
    assert keys == [f"train_{i:08d}" for i in range(4)]  # only the intact first shard


def test_iter_samples_refuses_a_bad_first_shard_at_once(dataset):
    _truncate(dataset / "train-000000.tar")
    it = iter_samples(dataset, "train")
    with pytest.raises(ShardError, match="train-000000.tar"):
        next(it)


# ------------------------------------------------------------------ atomic writes
def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "ds"
    bad = {"train": _samples(5, size=5), "val": _samples(2, size=6)}  # second split's shape differs
    with pytest.raises(ShardError, match="image shape"):
        _write(out, bad)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def _previous(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "ds"
    _write(out, {"train": _samples(6, seed=11)})
    return out, _files(out)


def test_failed_write_keeps_previous_dataset(tmp_path):
    out, before = _previous(tmp_path)
    bad = {"train": _samples(9, seed=12), "val": _samples(2, channels=3)}
    with pytest.raises(ShardError):
        _write(out, bad)
    assert _files(out) == before
    assert _leftovers(tmp_path) == []


def test_exception_mid_shard_keeps_previous_dataset(tmp_path, monkeypatch):
    out, before = _previous(tmp_path)
    real = shards._png_bytes
    calls = {"n": 0}

    def flaky(image: np.ndarray) -> bytes:
        calls["n"] += 1
        if calls["n"] == 6:  # in the second shard
            raise OSError("disk full")
        return real(image)

    monkeypatch.setattr(shards, "_png_bytes", flaky)
    with pytest.raises(OSError, match="disk full"):
        _write(out, {"train": _samples(9, seed=13)})
    assert calls["n"] == 6
    assert _files(out) == before
    assert _leftovers(tmp_path) == []


def test_exception_after_shards_before_card_leaves_no_dataset(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("card failed")

    monkeypatch.setattr(shards, "dataset_card", broken)
    with pytest.raises(RuntimeError, match="card failed"):
        _write(tmp_path / "ds", {"train": _samples(9)})
    assert list(tmp_path.iterdir()) == []


def test_interrupt_between_the_swap_renames_keeps_previous_dataset(tmp_path, monkeypatch):
    out, before = _previous(tmp_path)
    real = os.replace

    def interrupted(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".ds.staging-"):  # the previous dataset has just been moved aside
            assert not out.exists()
            raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(out, {"train": _samples(9, seed=12)})
    monkeypatch.undo()
    assert _files(out) == before
    assert _leftovers(tmp_path) == []


def test_next_write_restores_the_dataset_a_killed_swap_moved_aside(tmp_path):
    # the state a SIGKILL between swap_in_folder's two renames leaves: no `ds`, the previous one
    # complete under .ds.old-*, the new one complete under .ds.staging-*
    out, before = _previous(tmp_path)
    (tmp_path / ".ds.old-x").mkdir()
    os.replace(out, tmp_path / ".ds.old-x" / "ds")
    (tmp_path / ".ds.staging-y").mkdir()
    (tmp_path / ".ds.old-z").mkdir()  # an older leftover without a dataset
    with pytest.raises(ShardError):  # a write that fails after sweeping the leftovers
        _write(out, {"train": _samples(5, size=5), "val": _samples(2, size=6)})
    assert _files(out) == before
    assert _leftovers(tmp_path) == []


def test_rewrite_replaces_previous_dataset_completely(tmp_path):
    out, _ = _previous(tmp_path)
    _write(out, {"val": _samples(2, seed=3)})
    assert sorted(_files(out)) == ["README.md", "manifest.json", "val-000000.tar"]
    assert _leftovers(tmp_path) == []
