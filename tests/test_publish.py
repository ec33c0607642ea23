"""Publishing to a readable prefix (a folder here; S3 in test_s3.py): layout, safety, idempotence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds

from conftest import tiny_params_dict
from poison import publish as pub
from poison.card import GENERATOR_HAZARD, HAZARD
from poison.cli import main
from poison.config import from_dict, Params
from poison.errors import ConfigError, ShardError
from poison.evaluate import summarise
from poison.loader import open_dataset
from poison.shards import load_split, manifest_sha256, read_manifest


@pytest.fixture()
def dataset(poisoned_dataset, tmp_path) -> Path:
    dest = tmp_path / "src" / "poisoned"
    shutil.copytree(poisoned_dataset, dest)
    return dest


def test_publish_to_a_folder_layout_and_round_trip(dataset, tmp_path):
    r = pub.publish_dataset(dataset, tmp_path / "pub")
    version = manifest_sha256(dataset)[:12]
    out = tmp_path / "pub" / read_manifest(dataset)["dataset"] / version
    assert r["published"] and r["version"] == version and Path(r["url"]) == out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "README.md", "train.wids.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"])
    for name in ("manifest.json", "train-000000.tar", "train-000002.tar"):
        assert (out / name).read_bytes() == (dataset / name).read_bytes()
    assert not list(out.parent.glob(".*staging*"))
    index = json.loads((out / "train.wids.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert index["description"] == HAZARD  # what a wids consumer sees, who may never read the card
    assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [
        ("train-000000.tar", 100), ("train-000001.tar", 100), ("train-000002.tar", 10)]
    x, y, _ = load_split(dataset, "train")
    xs, ys = open_dataset(out, dtype=torch.uint8).tensors()
    assert torch.equal(xs, x) and torch.equal(ys, y)


def test_plain_webdataset_brace_url_reads_the_published_copy(dataset, tmp_path):
    r = pub.publish_dataset(dataset, tmp_path / "pub")
    url = f"{r['url']}/train-{{000000..000002}}.tar"
    samples = list(wds.WebDataset(url, shardshuffle=False).to_tuple("__key__", "cls"))
    assert [k for k, _ in samples] == [f"train_{i:08d}" for i in range(210)]
    _, y, _ = load_split(dataset, "train")
    assert [int(c) for _, c in samples] == y.tolist()


def test_republishing_is_idempotent_and_versions_are_immutable(dataset, tmp_path):
    first = pub.publish_dataset(dataset, tmp_path / "pub", version="v1")
    again = pub.publish_dataset(dataset, tmp_path / "pub", version="v1")
    assert first["published"] and not again["published"]
    m = json.loads((dataset / "manifest.json").read_text())
    m["seed"] = 123  # other content, same version name
    (dataset / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(pub.PublishError, match="already published with other content"):
        pub.publish_dataset(dataset, tmp_path / "pub", version="v1")


def test_a_tampered_dataset_publishes_nothing(dataset, tmp_path):
    shard = dataset / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    with pytest.raises(pub.PublishError, match=r"train-000002\.tar.*truncated"):
        pub.publish_dataset(dataset, tmp_path / "pub")
    assert not (tmp_path / "pub").exists() or not any((tmp_path / "pub").rglob("*"))


def test_a_copy_that_dies_midway_leaves_no_visible_version(dataset, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = Path.write_bytes

    def dying(self, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", dying)
    with pytest.raises(OSError, match="disk full"):
        pub.publish_dataset(dataset, tmp_path / "pub", version="v1")
    monkeypatch.undo()
    parent = tmp_path / "pub" / read_manifest(dataset)["dataset"]
    assert not (parent / "v1").exists() and not list(parent.glob(".v1.staging-*"))
    assert pub.publish_dataset(dataset, tmp_path / "pub", version="v1")["published"]


def test_a_store_copy_writes_the_manifest_last(dataset):
    class Recorder:
        url = "mem://x"
        written: list[str] = []

        def write(self, name, data):
            self.written.append(name)

    rec = Recorder()
    raw = (dataset / "manifest.json").read_bytes()
    pub._publish_to_store(rec, pub._files(dataset, read_manifest(dataset), raw, b"card"))
    assert rec.written[-1] == "manifest.json" and rec.written[:3] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_metrics_go_into_the_card_only_for_the_dataset_they_measured(dataset, tmp_path):
    metrics = {"target": "untargeted", "test_samples": 60, "recipe": {"epochs": 1}, "seeds": [0],
               "budget": {"eps": 0.3},
               "datasets": {"poisoned": {"manifest_sha256": manifest_sha256(dataset)},
                            "clean": {"manifest_sha256": "0" * 64}},
               "clean": {"test_cnn": summarise([{"accuracy": 0.9}])},
               "poisoned": {"test_cnn": summarise([{"accuracy": 0.0}, {"accuracy": 0.2}]) | {"runs": []}}}
    summary = pub.card_metrics(metrics, dataset)
    assert summary["measured_as"] == "poisoned"
    # the spread over seeds that evaluate.summarise reports travels with the mean; per-run detail does not
    assert summary["clean_test_accuracy"]["poisoned"]["test_cnn"] == {"accuracy_mean": 0.1, "accuracy_min": 0.0,
                                                                       "accuracy_max": 0.2}
    r = pub.publish_dataset(dataset, tmp_path / "pub", metrics=metrics, repo_path="data/shards/x")
    card = (Path(r["url"]) / "README.md").read_text()
    assert card.startswith("# ⚠ POISONED DATASET") and "## Metrics" in card and '"accuracy_mean": 0.1' in card
    assert "dvc import <git URL of the producing project> data/shards/x" in card
    metrics["datasets"]["poisoned"]["manifest_sha256"] = "f" * 64
    assert pub.card_metrics(metrics, dataset) is None


def test_publish_config_is_validated():
    for bad, key in [({"datasets": ["generator"]}, "datasets"), ({"version": "../x"}, "version"),
                     ({"dvc_push": False, "prefix": None}, "dvc_push/prefix")]:
        with pytest.raises(ConfigError, match=key):
            from_dict(Params, tiny_params_dict(publish=bad))


def test_cli_publish_without_push_copies_to_the_prefix(session_params, poisoned_dataset, tmp_path, capsys,
                                                       monkeypatch):
    import yaml

    params = tiny_params_dict(Path(session_params.paths.poisoned).parents[2])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    code = main(["publish", "--params", str(params_file), "--no-push", "--to", str(tmp_path / "pub")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "poisoned: published at" in out.out
    assert out.out.splitlines()[0] == f"publish: WARNING: {HAZARD} (poisoned: {poisoned_dataset.as_posix()})"
    assert GENERATOR_HAZARD not in out.out  # nothing was pushed: the generator did not go out
    version = manifest_sha256(poisoned_dataset)[:12]
    assert (tmp_path / "pub" / read_manifest(poisoned_dataset)["dataset"] / version / "manifest.json").is_file()
    assert main(["publish", "--params", str(params_file), "--no-push"]) == 1
    assert "nothing to do" in capsys.readouterr().err


def test_a_push_without_a_prefix_still_warns_for_the_poison_and_its_generator(session_params, poisoned_dataset,
                                                                              augmented_dataset, clean_dataset,
                                                                              tmp_path, capsys, monkeypatch):
    # the default publish section pushes with DVC and copies nowhere: the warnings go out all the same
    import yaml

    pushed = []
    monkeypatch.setattr(pub, "dvc_push", lambda repo, remote=None, targets=None: pushed.append(targets) or "")
    params = tiny_params_dict(Path(session_params.paths.poisoned).parents[2])
    params["publish"] = {**params.get("publish", {}), "dvc_push": True, "prefix": None, "datasets": ["clean", "poisoned"]}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    assert main(["publish", "--params", str(params_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert pushed == [("dvc.yaml",)]
    # dvc push of dvc.yaml sends the augmented set too, though publish.datasets does not name it
    from poison.card import AUGMENTED

    assert lines[:3] == [f"publish: WARNING: {HAZARD} (poisoned: {poisoned_dataset.as_posix()})",
                         f"publish: WARNING: {AUGMENTED} (augmented: {augmented_dataset.as_posix()})",
                         f"publish: WARNING: {GENERATOR_HAZARD} (pushed with the pipeline's outputs)"]
    assert pub.publication_hazards([clean_dataset], False) == []  # clean data carries no warning


def test_a_pipeline_push_names_the_poisoned_and_augmented_sets_it_sends_though_unlisted(
        session_params, clean_dataset, poisoned_dataset, augmented_dataset, tmp_path):
    from poison.card import AUGMENTED

    pipeline = pub.pipeline_datasets(session_params)
    notes = pub.publication_hazards([clean_dataset], True, pipeline)
    assert notes == [f"{HAZARD} (poisoned: {poisoned_dataset.as_posix()})",
                     f"{AUGMENTED} (augmented: {augmented_dataset.as_posix()})",
                     f"{GENERATOR_HAZARD} (pushed with the pipeline's outputs)"]
    # copied, not pushed: only the datasets named; a pipeline dataset not on disk is not named
    assert pub.publication_hazards([clean_dataset], False, pipeline) == []
    assert pub.publication_hazards([poisoned_dataset], True, [tmp_path / "absent"]) == notes[::2]


def test_a_manifest_naming_a_path_cannot_publish_outside_the_prefix(dataset, tmp_path):
    m = json.loads((dataset / "manifest.json").read_text())
    m["dataset"] = "../../escape"
    (dataset / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="not a plain folder name"):
        pub.publish_dataset(dataset, tmp_path / "pub" / "a")
    assert not (tmp_path / "escape").exists()


def test_a_published_shard_changed_in_place_at_its_size_is_found_and_replaced(dataset, tmp_path):
    r = pub.publish_dataset(dataset, tmp_path / "pub", version="v1")
    assert not pub.publish_dataset(dataset, tmp_path / "pub", version="v1")["published"]
    shard = Path(r["url"]) / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, other bytes: a size check alone would call this copy whole
    shard.write_bytes(bytes(data))
    again = pub.publish_dataset(dataset, tmp_path / "pub", version="v1")
    assert again["published"] and shard.read_bytes() == (dataset / "train-000000.tar").read_bytes()
    assert pub.publish_dataset(dataset, tmp_path / "pub", version="v1")["checked"] == "sha256"


def test_a_damaged_published_copy_is_replaced_and_a_foreign_folder_is_kept(dataset, tmp_path):
    r = pub.publish_dataset(dataset, tmp_path / "pub", version="v1")
    shard = Path(r["url"]) / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:100])
    assert pub.publish_dataset(dataset, tmp_path / "pub", version="v1")["published"]
    assert shard.read_bytes() == (dataset / "train-000001.tar").read_bytes()
    foreign = tmp_path / "pub" / read_manifest(dataset)["dataset"] / "v2"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(pub.PublishError, match="is not a published version"):
        pub.publish_dataset(dataset, tmp_path / "pub", version="v2")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_an_interrupted_repair_keeps_the_earlier_copy_and_the_next_publish_repairs_it(dataset, tmp_path, monkeypatch):
    import os

    r = pub.publish_dataset(dataset, tmp_path / "pub", version="v1")
    out = Path(r["url"])
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:100])
    damaged = {p.name: p.read_bytes() for p in out.iterdir()}
    real = os.replace

    def interrupted(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".v1.staging-"):  # the earlier copy has just been moved aside
            raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pub.publish_dataset(dataset, tmp_path / "pub", version="v1")
    monkeypatch.undo()
    # never a manifest beside a partial set of shards: the earlier copy, as it was
    assert {p.name: p.read_bytes() for p in out.iterdir()} == damaged
    assert [p.name for p in out.parent.iterdir()] == ["v1"]
    assert pub.publish_dataset(dataset, tmp_path / "pub", version="v1")["published"]
    assert shard.read_bytes() == (dataset / "train-000001.tar").read_bytes()


@pytest.mark.parametrize("content", [b"\xff\xfe binary", b'{"datasets": []}', b'{"datasets": {"poisoned": 3}}'])
def test_damaged_evaluate_metrics_are_a_publish_error_naming_the_file(tmp_path, content):
    params = from_dict(Params, tiny_params_dict(tmp_path))
    path = tmp_path / params.paths.reports / "evaluate" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(pub.PublishError, match=r"metrics\.json.*rerun the evaluate stage"):
        pub.evaluate_metrics(params, repo=tmp_path)


def test_a_read_only_prefix_is_refused_before_anything_is_verified_or_pushed(session_params, dataset, monkeypatch):
    pushed, verified = [], []
    monkeypatch.setattr(pub, "dvc_push", lambda *a, **k: pushed.append(a))
    monkeypatch.setattr(pub, "verify_all", lambda *a, **k: verified.append(a) or {})
    with pytest.raises(pub.PublishError, match=r"--to / publish.prefix.*https://example.org/data is read-only"):
        pub.publish(session_params, push=True, prefix="https://example.org/data")
    assert pushed == [] and verified == []
    with pytest.raises(pub.PublishError, match="read-only"):
        pub.publish_dataset(dataset, "http://example.org/data")
    with pytest.raises(pub.PublishError, match=r"publish.prefix.*unsupported scheme 'ftp'; publish to a folder or"):
        pub.publish(session_params, push=False, prefix="ftp://example.org/data")
    hashed = []
    monkeypatch.setattr(pub, "verify_dataset", lambda d: hashed.append(d) or [])
    with pytest.raises(pub.PublishError, match="read-only"):
        pub.publish_dataset(dataset, "https://example.org/data")
    assert hashed == []  # refused before the dataset is hashed


def test_cli_publish_of_dirs_refuses_a_read_only_prefix_before_verifying_or_pushing(session_params, dataset,
                                                                                    monkeypatch, capsys):
    pushed, verified = [], []
    monkeypatch.setattr(pub, "dvc_push", lambda *a, **k: pushed.append(a))
    monkeypatch.setattr(pub, "verify_dataset", lambda d: verified.append(d) or [])
    assert main(["publish", str(dataset), "--to", "https://example.org/data"]) == 1
    assert "read-only" in capsys.readouterr().err and pushed == [] and verified == []
