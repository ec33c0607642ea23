"""`dvc repro` end to end on tiny params, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY
from poison.shards import read_manifest, verify_dataset

BIN = Path(sys.executable).parent


def _tiny_repo_params() -> dict:
    """The repository's params.yaml with tiny values: same sections and keys, paths unchanged."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["device"] = "cpu"
    params["data"].update(per_class=30, test_size=60, val_size=30, shard_size=100)
    params["train_generator"].update(generator="test_autoencoder", surrogate="test_cnn", trials=1, batch_size=64)
    for section in ("validation", "pretrain"):
        if isinstance(params["train_generator"].get(section), dict):
            params["train_generator"][section].update(epochs=1, batch_size=64)
    params["poison"].update(batch_size=100, shard_size=100)
    params["augment"].update(victim="test_cnn", diagnosis_samples=20, batch_size=100, shard_size=100)
    params["augment"]["attack"].update(steps=2)
    params["evaluate"].update(archs=["test_cnn"], seeds=[0])
    params["evaluate"]["recipe"].update(epochs=1, batch_size=64)
    for section in ("topk", "multilabel"):  # the poison variants: tiny generators, as conftest's TINY
        for key, value in TINY[section].items():
            if key == "generator":
                for gkey, gvalue in value.items():
                    if isinstance(gvalue, dict):
                        params[section]["generator"][gkey].update(gvalue)
                    else:
                        params[section]["generator"][gkey] = gvalue
            else:
                params[section][key] = value
    params["compose"].update(TINY["compose"])
    return params


def _copy_repository(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if rel.startswith(("tests/", "benchmarks/")) or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)


@pytest.fixture(scope="module")
def dvc_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DVC_", "GIT_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        HOME=str(home),
        XDG_CACHE_HOME=str(home / "cache"),
        XDG_CONFIG_HOME=str(home / "config"),
        MPLCONFIGDIR=str(home / "mpl"),
        TMPDIR=str(tmp_path_factory.mktemp("tmp")),
        OMP_NUM_THREADS="1",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


CORE = ("prepare", "train_generator", "poison", "augment", "evaluate", "report")
VARIANTS = tuple(f"variants/dvc.yaml:{s}" for s in ("topk", "compose", "multilabel", "variants_report"))


@pytest.fixture(scope="module")
def repro(tmp_path_factory, dvc_env):
    """A tiny copy of this project, committed to git, after `dvc repro` (the core pipeline)
    and `dvc repro variants/dvc.yaml` (the poison variants): (repo, logs of both)."""
    repo = tmp_path_factory.mktemp("project") / "repo"
    repo.mkdir()
    _copy_repository(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_repo_params(), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny"]):
        assert _run(cmd, repo, dvc_env).returncode == 0
    logs = {}
    for name, cmd in (("core", ["repro"]), ("variants", ["repro", "variants/dvc.yaml"])):
        run = _run([str(BIN / "dvc"), *cmd], repo, dvc_env, timeout=600)
        logs[name] = run.stdout + run.stderr
        assert run.returncode == 0, logs[name][-4000:]
    return repo, logs


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_up_to_date(repro, dvc_env):
    repo, logs = repro
    dvc = str(BIN / "dvc")
    for stage in CORE:
        assert f"Running stage '{stage}'" in logs["core"]
    # `dvc repro` is the core pipeline only; the variants pipeline reuses its outputs
    assert "variants/dvc.yaml" not in logs["core"]
    for stage in VARIANTS:
        assert f"Running stage '{stage}'" in logs["variants"]
    for stage in CORE:
        assert f"Running stage '{stage}'" not in logs["variants"]
    assert (repo / "variants" / "dvc.lock").is_file()
    for name in ("topk", "multilabel"):
        m = json.loads((repo / "reports" / name / "metrics.json").read_text())
        assert m["datasets"]["poisoned"]["manifest_sha256"]
    assert verify_dataset(repo / "data" / "shards" / "mnist5k-grid-deepconfuse") == []

    clean = repo / "data" / "shards" / "mnist5k"
    poisoned = repo / "data" / "shards" / "mnist5k-deepconfuse"
    assert verify_dataset(clean) == [] and verify_dataset(poisoned) == []
    assert {k: v["samples"] for k, v in read_manifest(clean)["splits"].items()} == {"train": 210, "val": 30, "test": 60}
    assert read_manifest(poisoned)["kind"] == "poisoned"
    assert (repo / "models" / "generator.pt").stat().st_size > 0
    metrics = json.loads((repo / "reports" / "evaluate" / "metrics.json").read_text())
    for kind in ("clean", "poisoned"):
        assert 0.0 <= metrics[kind]["test_cnn"]["accuracy_mean"] <= 1.0
    assert metrics["budget"]["within_budget"] is True
    assert metrics["device"] == "cpu"  # the device the cells ran on (these params pin the cpu)
    assert (repo / "reports" / "evaluate" / "confusion" / "poisoned_test_cnn.png").is_file()
    page = (repo / "reports" / "report" / "report.md").read_text()
    assert read_manifest(poisoned)["hazard"] in page and "`test_cnn`" in page
    assert (repo / "reports" / "report" / "report.html").is_file() and (repo / "reports" / "report" / "samples.png").is_file()
    assert (repo / "dvc.lock").is_file()

    second = _run([dvc, "repro", "--all-pipelines"], repo, dvc_env)
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-4000:]
    assert "Running stage" not in log2
    for stage in CORE + VARIANTS:
        assert f"Stage '{stage}' didn't change" in log2
    assert "Data and pipelines are up to date" in log2

    status = _run([dvc, "status"], repo, dvc_env)
    assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout + status.stderr


@pytest.mark.slow
def test_publish_flow_pushes_and_another_project_dvc_imports_the_dataset(repro, dvc_env, tmp_path, monkeypatch):
    """The producer pushes with the publish flow to a local-folder remote; a separate git project
    `dvc import`s the poisoned dataset from the producer's git repository and streams it bit-exact."""
    repo, _ = repro
    remote = tmp_path / "shared-remote"
    for cmd in (["dvc", "remote", "add", "-d", "-f", "local", str(remote)], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "pipeline outputs recorded in dvc.lock; shared remote"]):
        proc = _run([str(BIN / cmd[0]) if cmd[0] == "dvc" else cmd[0], *cmd[1:]], repo, dvc_env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # nothing half-written or out of step with dvc.lock is ever pushed
    from poison.config import load_params
    from poison.publish import PublishError, dvc_push, publish

    shard = repo / "data" / "shards" / "mnist5k-deepconfuse" / "train-000001.tar"
    good = shard.read_bytes()
    for key in ("HOME", "DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, dvc_env[key])
    try:
        shard.chmod(0o644)
        shard.write_bytes(good[: len(good) // 2])
        with pytest.raises(PublishError, match=r"train-000001\.tar.*truncated"):
            publish(load_params(repo / "params.yaml"), repo=repo)
    finally:
        shard.write_bytes(good)
    params_text = (repo / "params.yaml").read_text()
    try:
        (repo / "params.yaml").write_text(params_text.replace("  seeds:\n  - 0", "  seeds:\n  - 7"))
        with pytest.raises(PublishError, match="out of step with the lock file dvc.lock.*evaluate"):
            dvc_push(repo)
    finally:
        (repo / "params.yaml").write_text(params_text)
    assert not remote.exists() or not any(remote.rglob("*"))

    pushed = _run([sys.executable, "-m", "flows.publish"], repo, dvc_env, timeout=600)
    assert pushed.returncode == 0, (pushed.stdout + pushed.stderr)[-4000:]
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"
    # what went out is named on the terminal (the console may wrap a log line between words)
    for warning in (r"POISONED\s+DATA:", r"SEMANTICALLY\s+AUGMENTED\s+DATA:", r"POISON\s+GENERATOR:"):
        assert re.search(warning, pushed.stdout + pushed.stderr), warning

    # a git clone has no DVC cache: everything the consumer gets comes through the remote
    origin = tmp_path / "origin"
    assert _run(["git", "clone", "-q", str(repo), str(origin)], tmp_path, dvc_env).returncode == 0
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                [str(BIN / "dvc"), "import", str(origin), "data/shards/mnist5k-deepconfuse", "-o", "poisoned"]):
        proc = _run(cmd, consumer, dvc_env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (consumer / "poisoned.dvc").is_file()

    source = repo / "data" / "shards" / "mnist5k-deepconfuse"
    for f in sorted(source.iterdir()):
        assert (consumer / "poisoned" / f.name).read_bytes() == f.read_bytes()
    from poison import open_dataset
    from poison.shards import load_split

    x, y, _ = load_split(source, "train")
    xs, ys = open_dataset(consumer / "poisoned", dtype=torch.uint8).tensors()
    assert torch.equal(xs, x) and torch.equal(ys, y)

    # open_dataset straight from the DVC location (dvc get), mixed 50/50 with the clean set
    for key in ("HOME", "DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, dvc_env[key])
    ds = open_dataset("data/shards/mnist5k-deepconfuse", repo=str(origin), rev="HEAD", ratio=0.5,
                      clean="data/shards/mnist5k", dtype=torch.uint8, with_meta=True)
    xc, _, _ = load_split(repo / "data" / "shards" / "mnist5k", "train")
    items = list(ds)
    assert sum(m["poisoned"] for _, _, m in items) == round(0.5 * len(x))
    for i, (image, _, meta) in enumerate(items):
        assert torch.equal(image, x[i] if meta["poisoned"] else xc[i])


@pytest.mark.slow
def test_regenerate_flow_records_pushes_tags_and_a_failure_leaves_the_workspace_as_it_was(repro, dvc_env, tmp_path):
    repo, _ = repro
    remote = tmp_path / "remote"
    for cmd in ([str(BIN / "dvc"), "remote", "add", "-d", "-f", "local", str(remote)], ["git", "add", "-A"],
                ["git", "commit", "-q", "--allow-empty", "-m", "remote for regenerate"]):
        proc = _run(cmd, repo, dvc_env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    ok = _run([sys.executable, "-m", "flows.regenerate", "--tag", "data-v1"], repo, dvc_env, timeout=600)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
    assert any(remote.rglob("*")), "regenerate pushed nothing"
    for warning in (r"POISONED\s+DATA:", r"SEMANTICALLY\s+AUGMENTED\s+DATA:", r"POISON\s+GENERATOR:"):
        assert re.search(warning, ok.stdout + ok.stderr), warning
    tags = _run(["git", "tag", "--points-at", "HEAD"], repo, dvc_env).stdout.split()
    assert "data-v1" in tags

    clean = repo / "data" / "shards" / "mnist5k"
    before = {p.name: p.read_bytes() for p in sorted(clean.iterdir())}
    locks = {name: (repo / name).read_bytes() for name in ("dvc.lock", "variants/dvc.lock")}
    params_text = (repo / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["data"]["shard_size"] = 50   # prepare reruns and rewrites the clean shards ...
    params["device"] = "cuda:99"        # ... then train_generator fails on a device no machine has
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        bad = _run([sys.executable, "-m", "flows.regenerate", "--no-pull", "--no-push"], repo, dvc_env, timeout=600)
        log = bad.stdout + bad.stderr
        assert bad.returncode != 0 and "Running stage 'prepare'" in log, log[-4000:]
        assert {name: (repo / name).read_bytes() for name in locks} == locks
        assert {p.name: p.read_bytes() for p in sorted(clean.iterdir())} == before
        assert not (repo / ".dvc" / "tmp" / "regenerate-rollback").exists()  # nothing owed after the rollback
    finally:
        (repo / "params.yaml").write_text(params_text)
    status = _run([str(BIN / "dvc"), "status"], repo, dvc_env)
    assert "Data and pipelines are up to date" in status.stdout + status.stderr


def test_regenerate_restores_the_lock_file_of_every_pipeline():
    """flows.regenerate's lock files (what a failed run puts back) must follow the pipelines."""
    from conftest import PIPELINES
    from flows.regenerate import lock_files

    locks = lock_files(REPO)
    assert locks == sorted(str(Path(p).with_suffix(".lock")) for p in PIPELINES)
    assert all((REPO / lock).is_file() for lock in locks)
