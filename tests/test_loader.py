"""open_dataset: bit-exact streaming from folders and http, partial poisoning, refusal of bad shards."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch

import poison
from poison.card import HAZARD
from poison.errors import PoisonedDatasetWarning, ShardError
from poison.loader import open_dataset, poisoned_indices, verify_location
from poison.shards import load_split, read_manifest


@pytest.fixture()
def poisoned_copy(poisoned_dataset, tmp_path) -> Path:
    dest = tmp_path / "poisoned"
    shutil.copytree(poisoned_dataset, dest)
    return dest


@pytest.fixture(scope="module")
def http_root(tmp_path_factory, clean_dataset, poisoned_dataset):
    """A static file server on 127.0.0.1 (free port) serving copies of both datasets."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(clean_dataset, root / "clean")
    shutil.copytree(poisoned_dataset, root / "poisoned")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_open_dataset_is_exported_from_the_package():
    assert poison.open_dataset is open_dataset


def test_local_folder_is_bit_exact_and_in_key_order(poisoned_dataset):
    x, y, meta = load_split(poisoned_dataset, "train")
    ds = open_dataset(poisoned_dataset, dtype=torch.uint8)
    assert len(ds) == 210 and ds.kind == "poisoned"
    xs, ys = ds.tensors()
    assert torch.equal(xs, x) and torch.equal(ys, y)
    floats, _ = open_dataset(poisoned_dataset).tensors()
    assert floats.dtype == torch.float32 and torch.equal(floats, x.float() / 255)


def test_with_meta_labels_samples_as_poisoned(poisoned_dataset):
    items = list(open_dataset(poisoned_dataset, with_meta=True))
    assert [m["key"] for _, _, m in items] == [f"train_{i:08d}" for i in range(210)]
    assert all(m["poisoned"] is True and m["kind"] == "poisoned" for _, _, m in items)


def test_opening_a_poisoned_dataset_warns_with_its_hazard(poisoned_dataset, clean_dataset):
    import warnings

    with pytest.warns(PoisonedDatasetWarning) as caught:
        ds = open_dataset(poisoned_dataset)
    assert len(caught) == 1 and str(caught[0].message) == f"{poisoned_dataset}: {HAZARD}"
    assert caught[0].filename == __file__  # points at the caller's line, not the library's
    assert ds.hazard == HAZARD
    with pytest.warns(PoisonedDatasetWarning):
        open_dataset(poisoned_dataset, ratio=0.25, clean=clean_dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: clean data, or a mix that serves no poisoned sample
        assert open_dataset(clean_dataset).hazard is None
        open_dataset(poisoned_dataset, ratio=0.0, clean=clean_dataset)


def test_every_split_of_a_clean_dataset(clean_dataset):
    for split, n in {"train": 210, "val": 30, "test": 60}.items():
        x, y, _ = load_split(clean_dataset, split)
        xs, ys = open_dataset(clean_dataset, split, dtype=torch.uint8).tensors()
        assert xs.shape[0] == n and torch.equal(xs, x) and torch.equal(ys, y)
    with pytest.raises(ShardError, match="no split 'dev'"):
        open_dataset(clean_dataset, "dev")


def test_http_prefix_is_bit_exact(http_root, poisoned_dataset):
    _, url = http_root
    x, y, _ = load_split(poisoned_dataset, "train")
    xs, ys = open_dataset(f"{url}/poisoned", dtype=torch.uint8).tensors()
    assert torch.equal(xs, x) and torch.equal(ys, y)
    manifest, problems = verify_location(f"{url}/poisoned")
    assert problems == [] and manifest["kind"] == "poisoned"


def test_http_tampered_shard_raises_before_yielding_from_it(http_root):
    root, url = http_root
    dest = root / "tampered"
    shutil.copytree(root / "poisoned", dest)
    shard = dest / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    seen = []
    with pytest.raises(ShardError, match=r"train-000001\.tar: sha256 [0-9a-f]+ does not match .*same size"):
        for item in open_dataset(f"{url}/tampered"):
            seen.append(item)
    assert len(seen) == 100  # all of shard 0, nothing of shard 1
    _, problems = verify_location(f"{url}/tampered")
    assert len(problems) == 1 and "train-000001.tar" in problems[0]


def test_http_missing_prefix_and_unreachable_server_are_clear(http_root):
    _, url = http_root
    with pytest.raises(ShardError, match=r"/nothing/manifest\.json: not found"):
        open_dataset(f"{url}/nothing")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ShardError, match=rf"127\.0\.0\.1:{port}/x/manifest\.json: cannot reach the server"):
        open_dataset(f"http://127.0.0.1:{port}/x")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_bad_shard_raises_before_any_of_its_samples(poisoned_copy, damage):
    shard = poisoned_copy / "train-000001.tar"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:5000])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    seen = []
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        for item in open_dataset(poisoned_copy):
            seen.append(item)
    assert len(seen) == 100


def test_manifest_with_a_path_as_shard_name_is_refused_before_fetching(poisoned_copy):
    path = poisoned_copy / "manifest.json"
    m = json.loads(path.read_text())
    m["shards"][0]["file"] = "../../etc/passwd"
    path.write_text(json.dumps(m))
    with pytest.raises(ShardError, match="not a plain"):
        open_dataset(poisoned_copy)


def test_unverified_reading_still_refuses_unsafe_members(poisoned_copy):
    import io
    import tarfile

    shard = poisoned_copy / "train-000000.tar"
    with tarfile.open(shard, "a") as tar:
        payload = b"\x80\x04K\x01."  # a pickle
        info = tarfile.TarInfo("train_00000099.pyd")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardError, match="pyd"):
        list(open_dataset(poisoned_copy, verify=False))


def test_unverified_reading_refuses_a_sample_beyond_the_manifest_before_serving_it(poisoned_copy, clean_dataset):
    import io
    import tarfile

    m = json.loads((poisoned_copy / "manifest.json").read_text())
    last = [r for r in m["shards"] if r["split"] == "train"][-1]
    shard = poisoned_copy / last["file"]
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers() if info.isfile()]
    key = members[-1][0].name.split(".", 1)[0]
    with tarfile.open(shard, "a") as tar:  # one more whole sample under a new key
        for info, data in members:
            if info.name.startswith(key + "."):
                extra = tarfile.TarInfo("train_99999999." + info.name.split(".", 1)[1])
                extra.size = len(data)
                tar.addfile(extra, io.BytesIO(data))
    for kwargs in ({}, {"ratio": 0.5, "clean": clean_dataset}):  # mixing by index: no IndexError past the end
        ds = open_dataset(poisoned_copy, verify=False, with_meta=True, **kwargs)
        served = []
        with pytest.raises(ShardError, match=rf"{last['file']}: more than the {last['samples']} samples"):
            for item in ds:
                served.append(item)
        assert len(served) == len(ds) and all("99999999" not in meta["key"] for _, _, meta in served)


def test_poisoned_indices_are_deterministic_nested_and_exact():
    a = poisoned_indices(1000, 0.3, seed=5)
    assert a.numel() == 300 and torch.equal(a, poisoned_indices(1000, 0.3, seed=5))
    assert not torch.equal(a, poisoned_indices(1000, 0.3, seed=6))
    assert set(a.tolist()) <= set(poisoned_indices(1000, 0.6, seed=5).tolist())
    assert poisoned_indices(10, 0.0, 0).numel() == 0 and poisoned_indices(10, 1.0, 0).numel() == 10
    with pytest.raises(ShardError, match="ratio"):
        poisoned_indices(10, 1.5, 0)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_partial_poisoning_mixes_by_index(poisoned_dataset, clean_dataset, ratio):
    xp, yp, _ = load_split(poisoned_dataset, "train")
    xc, yc, _ = load_split(clean_dataset, "train")
    assert not torch.equal(xp, xc)
    ds = open_dataset(poisoned_dataset, ratio=ratio, clean=clean_dataset, seed=3, dtype=torch.uint8, with_meta=True)
    items = list(ds)
    chosen = set(poisoned_indices(210, ratio, 3).tolist())
    assert len(items) == 210 and sum(m["poisoned"] for _, _, m in items) == round(ratio * 210) == len(chosen)
    for i, (image, label, meta) in enumerate(items):
        assert meta["poisoned"] == (i in chosen)
        assert torch.equal(image, xp[i] if i in chosen else xc[i]) and label == int(yc[i])
    # the same seed gives the same mix; another seed another one
    again = [m["poisoned"] for _, _, m in open_dataset(poisoned_dataset, ratio=ratio, clean=clean_dataset, seed=3,
                                                       with_meta=True)]
    assert again == [m["poisoned"] for _, _, m in items]
    if 0 < ratio < 1:
        other = [m["poisoned"] for _, _, m in open_dataset(poisoned_dataset, ratio=ratio, clean=clean_dataset, seed=4,
                                                           with_meta=True)]
        assert sum(other) == sum(again) and other != again


def test_partial_poisoning_needs_the_matching_clean_set(poisoned_dataset, clean_dataset, tmp_path):
    with pytest.raises(ShardError, match="clean: ratio 0.5 < 1 needs the clean dataset"):
        open_dataset(poisoned_dataset, ratio=0.5)
    other = tmp_path / "other"
    shutil.copytree(clean_dataset, other)
    m = json.loads((other / "manifest.json").read_text())
    m["seed"] = 99
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="pass the matching clean dataset"):
        open_dataset(poisoned_dataset, ratio=0.5, clean=other)
    with pytest.raises(ShardError, match="already clean"):
        open_dataset(clean_dataset, ratio=0.5, clean=clean_dataset)


def test_partial_poisoning_of_an_augmented_dataset_is_refused_up_front(augmented_dataset, clean_dataset):
    with pytest.raises(ShardError, match=r"ratio: .* is a semantic \(augmented\) dataset.*open this one with ratio=1\.0"):
        open_dataset(augmented_dataset, split="adversarial", ratio=0.5, clean=clean_dataset)


def test_shuffle_is_a_reproducible_permutation(poisoned_dataset):
    ds = open_dataset(poisoned_dataset, shuffle=50, seed=1, with_meta=True)
    keys = [m["key"] for _, _, m in ds]
    assert sorted(keys) == [f"train_{i:08d}" for i in range(210)] and keys != sorted(keys)
    assert keys == [m["key"] for _, _, m in ds]
    ds.set_epoch(1)
    assert [m["key"] for _, _, m in ds] != keys


WORKERS = r"""
import json, sys
from torch.utils.data import DataLoader
from poison import open_dataset
ds = open_dataset(sys.argv[1], with_meta=True, shuffle=20)
loader = DataLoader(ds, batch_size=32, num_workers=2, collate_fn=lambda b: b)
print(json.dumps([m["key"] for batch in loader for _, _, m in batch]))
"""


def test_dataloader_workers_read_each_sample_once(poisoned_dataset):
    # a fresh interpreter, as a consumer's: workers forked from this test process would inherit
    # the threads of the Prefect test server, which makes forked children exit with status 1
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", WORKERS, str(poisoned_dataset)], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(keys) == [f"train_{i:08d}" for i in range(210)]


def test_bad_arguments_name_the_argument(poisoned_dataset):
    with pytest.raises(ShardError, match="dtype"):
        open_dataset(poisoned_dataset, dtype=torch.int32)
    with pytest.raises(ShardError, match="shuffle"):
        open_dataset(poisoned_dataset, shuffle=-1)
    with pytest.raises(ShardError, match="unsupported scheme 'ftp'"):
        open_dataset("ftp://example.invalid/x")
    with pytest.raises(ShardError, match="manifest.json: not found"):
        open_dataset(poisoned_dataset.parent / "does-not-exist")


def test_manifest_is_the_source_of_the_shape(poisoned_dataset):
    m = read_manifest(poisoned_dataset)
    image, _ = next(iter(open_dataset(poisoned_dataset)))
    assert tuple(image.shape) == (m["image"]["channels"], m["image"]["height"], m["image"]["width"])


def _members(tar_bytes: bytes) -> list[tuple[str, bytes]]:
    from poison.tar_reader import tar_samples

    return [(s["__key__"], s["cls"]) for s in tar_samples(tar_bytes, "x.tar")]


def _tar(entries, fmt) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def test_fast_tar_reader_matches_tarfile_and_falls_back_for_pax():
    import tarfile

    entries = [("a_00000000.cls", b"3", tarfile.REGTYPE), ("a_00000001.cls", b"7" * 600, tarfile.REGTYPE)]
    assert _members(_tar(entries, tarfile.USTAR_FORMAT)) == [("a_00000000", b"3"), ("a_00000001", b"7" * 600)]
    long = [("k" * 120 + ".cls", b"1", tarfile.REGTYPE)]  # needs a pax header
    assert _members(_tar(long, tarfile.PAX_FORMAT)) == [("k" * 120, b"1")]


@pytest.mark.parametrize("fmt", ["ustar", "pax"])
def test_tar_readers_refuse_links_and_damaged_headers(fmt):
    import tarfile

    f = tarfile.USTAR_FORMAT if fmt == "ustar" else tarfile.PAX_FORMAT
    name = "a_00000000.cls" if fmt == "ustar" else "k" * 120 + ".cls"
    with pytest.raises(ShardError, match="not a regular file"):
        _members(_tar([(name, b"", tarfile.SYMTYPE)], f))
    data = bytearray(_tar([("a_00000000.cls", b"3", tarfile.REGTYPE)], tarfile.USTAR_FORMAT))
    data[130] = ord("7")  # the size field changes, the checksum does not
    with pytest.raises(ShardError, match="checksum|unreadable"):
        _members(bytes(data))
    with pytest.raises(ShardError, match="unreadable tar"):
        _members(bytes(data[:300]))


def test_negative_or_non_octal_tar_sizes_are_refused_not_looped_on():
    import tarfile

    data = bytearray(_tar([("a_00000000.cls", b"3" * 1000, tarfile.REGTYPE)], tarfile.USTAR_FORMAT))
    data[124:136] = b"-0000001000\0"
    data[148:156] = b" " * 8
    data[148:155] = (b"%06o" % (sum(data[:512]))) + b"\0"  # a forged, valid checksum
    with pytest.raises(ShardError, match="non-octal"):
        _members(bytes(data))


def test_partial_poisoning_refuses_a_clean_set_of_another_size(poisoned_dataset, clean_dataset, tmp_path):
    other = tmp_path / "p"
    shutil.copytree(poisoned_dataset, other)
    m = json.loads((other / "manifest.json").read_text())
    m["shards"] = m["shards"][:2]  # 200 of 210 samples, the manifest consistent with itself
    m["splits"]["train"]["samples"] = sum(r["samples"] for r in m["shards"])
    m["totals"] = {"samples": m["splits"]["train"]["samples"], "shards": 2,
                   "bytes": sum(r["bytes"] for r in m["shards"])}
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="has 210 'train' samples.*has 200"):
        open_dataset(other, ratio=0.5, clean=clean_dataset)


def test_a_failed_dvc_fetch_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ShardError, match="dvc get` failed"):
        open_dataset("data/x", repo=str(tmp_path / "no-such-repo"))
    assert list(tmp_path.iterdir()) == []


def test_http_size_refuses_a_content_length_that_is_not_a_byte_count():
    from poison.stores import HttpStore

    class Lying(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "lots")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Lying)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = HttpStore(f"http://127.0.0.1:{server.server_address[1]}/ds", timeout=10)
        with pytest.raises(ShardError, match=r"/ds/train-000000\.tar: the server sent Content-Length 'lots'"):
            store.size("train-000000.tar")
    finally:
        server.shutdown()
        server.server_close()
