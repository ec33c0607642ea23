"""S3 end to end against a real moto server on 127.0.0.1: DVC push/pull, publish, stream back."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import webdataset as wds

from poison.errors import ShardError
from poison.loader import open_dataset, verify_location
from poison.publish import publish_dataset
from poison.shards import load_split, read_manifest

import boto3  # noqa: E402  (moto[server], a dev extra, brings it; no skip: CI must run these)
import moto  # noqa: E402,F401
BIN = Path(sys.executable).parent
BUCKET = "poison-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port with one bucket; yields (endpoint, env)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = str(BIN / "moto_server") if (BIN / "moto_server").exists() else "moto_server"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint}
        mp = pytest.MonkeyPatch()
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint, env
        mp.undo()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


def test_dvc_push_and_pull_through_s3(s3, poisoned_dataset, tmp_path):
    endpoint, aws = s3
    env = {**os.environ, **aws, "DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path / "home"),
           "DVC_SITE_CACHE_DIR": str(tmp_path / "site"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e.invalid"}
    proj = tmp_path / "proj"
    proj.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], proj, env)
    _run(dvc + ["init", "-q"], proj, env)
    shutil.copytree(poisoned_dataset, proj / "data" / "poisoned")
    _run(dvc + ["add", "-q", "data/poisoned"], proj, env)
    _run(dvc + ["remote", "add", "-d", "s3", f"s3://{BUCKET}/dvc-store"], proj, env)
    _run(dvc + ["remote", "modify", "s3", "endpointurl", endpoint], proj, env)
    _run(dvc + ["push"], proj, env)
    shutil.rmtree(proj / "data" / "poisoned")
    shutil.rmtree(proj / ".dvc" / "cache")
    _run(dvc + ["pull"], proj, env)
    for f in sorted(poisoned_dataset.iterdir()):
        assert (proj / "data" / "poisoned" / f.name).read_bytes() == f.read_bytes()

    # an unreachable remote is a clear error naming the endpoint
    from poison.publish import PublishError, dvc_push

    _run(dvc + ["remote", "add", "gone", f"s3://{BUCKET}/x"], proj, env)
    _run(dvc + ["remote", "modify", "gone", "endpointurl", f"http://127.0.0.1:{_free_port()}"], proj, env)
    mp = pytest.MonkeyPatch()
    for key in ("HOME", "DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS"):
        mp.setenv(key, env[key])
    try:
        with pytest.raises(PublishError, match=r"`dvc push --remote gone` failed.*Could not connect to the endpoint"):
            dvc_push(proj, remote="gone", check_status=False)
    finally:
        mp.undo()


def test_publish_to_s3_and_stream_back(s3, poisoned_dataset, clean_dataset):
    endpoint, _ = s3
    r = publish_dataset(poisoned_dataset, f"s3://{BUCKET}/pub", version="v1")
    name = read_manifest(poisoned_dataset)["dataset"]
    assert r["published"] and r["url"] == f"s3://{BUCKET}/pub/{name}/v1"
    keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="pub/")["Contents"])
    assert keys == sorted(f"pub/{name}/v1/{f}" for f in
                          ["manifest.json", "README.md", "train.wids.json", "train-000000.tar", "train-000001.tar",
                           "train-000002.tar"])
    x, y, _ = load_split(poisoned_dataset, "train")
    xs, ys = open_dataset(r["url"], dtype=torch.uint8).tensors()
    assert torch.equal(xs, x) and torch.equal(ys, y)
    # made publicly readable, the same objects are plain http: open_dataset and WebDataset brace URLs work
    client = boto3.client("s3")
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/pub/*"}]}))
    http_prefix = f"{endpoint}/{BUCKET}/pub/{name}/v1"
    xh, _ = open_dataset(http_prefix, dtype=torch.uint8).tensors()
    assert torch.equal(xh, x)
    if shutil.which("curl"):  # WebDataset streams http(s) through curl
        keys = [k for (k,) in wds.WebDataset(f"{http_prefix}/train-{{000000..000002}}.tar",
                                             shardshuffle=False).to_tuple("__key__")]
        assert keys == [f"train_{i:08d}" for i in range(210)]
    # partial poisoning with the clean set published beside it
    c = publish_dataset(clean_dataset, f"s3://{BUCKET}/pub", version="v1")
    mixed = list(open_dataset(r["url"], ratio=0.5, clean=c["url"], with_meta=True))
    assert sum(m["poisoned"] for _, _, m in mixed) == 105
    again = publish_dataset(poisoned_dataset, f"s3://{BUCKET}/pub", version="v1")
    assert not again["published"] and again["checked"] == "size"  # a remote's shards are not downloaded to hash


def test_tampered_s3_object_is_refused_and_named(s3, poisoned_dataset):
    r = publish_dataset(poisoned_dataset, f"s3://{BUCKET}/tamper", version="v1")
    name = read_manifest(poisoned_dataset)["dataset"]
    key = f"tamper/{name}/v1/train-000001.tar"
    client = boto3.client("s3")
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[700] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    _, problems = verify_location(r["url"])
    assert len(problems) == 1 and "train-000001.tar" in problems[0]
    seen = []
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        for item in open_dataset(r["url"]):
            seen.append(item)
    assert len(seen) == 100


def test_missing_bucket_and_unreachable_endpoint_are_clear(s3):
    with pytest.raises(ShardError, match="bucket 'no-such-bucket' does not exist"):
        open_dataset("s3://no-such-bucket/x")
    with pytest.raises(ShardError, match=r"s3://poison-test/absent/manifest\.json: not found"):
        open_dataset(f"s3://{BUCKET}/absent")
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=rf"cannot reach the S3 endpoint http://127\.0\.0\.1:{port}"):
        open_dataset(f"s3://{BUCKET}/x", endpoint_url=f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 60  # a refused connection fails fast, not after minutes of retries
