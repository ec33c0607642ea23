"""Bad-input paths found in review: tampered manifests, impossible batch sizes, overlapping
paths, incomplete checkpoints, stale staging folders."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch

from conftest import tiny_params_dict
from poison.attacks.deepconfuse import DeepConfuse, DeepConfuseConfig
from poison.config import Params, from_dict
from poison.errors import CheckpointError, ConfigError, ShardError
from poison.shards import SplitSamples, iter_samples, load_split, verify_dataset, write_dataset
from poison.stages import load_generator


def _dataset(tmp_path, name="ds"):
    images = torch.arange(4 * 1 * 4 * 4, dtype=torch.int64).reshape(4, 1, 4, 4).to(torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])
    out = tmp_path / name
    write_dataset(out, {"train": SplitSamples(images, labels, [{"i": i} for i in range(4)])},
                  dataset=name, kind="clean", classes=["a", "b"], seed=0, shard_size=2)
    return out


@pytest.mark.parametrize("bad_name", ["pipe:touch PWNED; cat train-000000.tar", "../train-000000.tar",
                                      "/etc/passwd", "train-000000.tar::x", "val-000000.tar"])
def test_manifest_shard_names_never_reach_a_url_opener(tmp_path, bad_name, monkeypatch):
    ds = _dataset(tmp_path)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["shards"][0]["file"] = bad_name
    (ds / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardError, match="not a plain '<split>-NNNNNN.tar' file name"):
        load_split(ds, "train", verify=False)
    with pytest.raises(ShardError, match="not a plain"):
        verify_dataset(ds)
    assert not (tmp_path / "PWNED").exists() and not (ds / "PWNED").exists()


def test_shards_and_manifest_are_readable_by_others(tmp_path):
    ds = _dataset(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for p in ds.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 & ~umask, p


def test_stale_staging_folders_are_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".ds.staging-abc123"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"half written")
    ds = _dataset(tmp_path)
    assert not stale.exists()
    assert verify_dataset(ds) == []


def test_batch_larger_than_training_split_is_a_config_error():
    cfg = DeepConfuseConfig(generator="test_autoencoder", surrogate="test_cnn", batch_size=64, trials=1)
    attack = DeepConfuse(cfg, 1, 28, 10, seed=0)
    x = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    y = torch.arange(10)
    with pytest.raises(ConfigError, match=r"^batch_size: 64 exceeds the training split \(10 samples\)"):
        attack.fit(x, y, x, y)


@pytest.mark.parametrize("section", ["train_generator", "topk.generator"])
def test_a_training_error_about_a_key_names_the_section_the_key_sits_in(clean_dataset, section):
    from poison.variants import fit_generator

    cfg = DeepConfuseConfig(generator="test_autoencoder", surrogate="test_cnn", batch_size=4096, trials=1, threads=1)
    with pytest.raises(ConfigError, match=rf"^{re.escape(section)}\.batch_size: 4096 exceeds the training split"):
        fit_generator(cfg, str(clean_dataset), 0, torch.device("cpu"), multi_label=False, section=section)


@pytest.mark.parametrize("poisoned", ["data/shards/mnist5k", "data/shards/mnist5k/sub"])
def test_overlapping_paths_are_rejected(poisoned):
    d = tiny_params_dict()
    d["paths"]["poisoned"] = poisoned
    with pytest.raises(ConfigError, match="paths.clean/poisoned: .* overlap"):
        from_dict(Params, d)


def test_label_specific_target_map_checked_at_load_time():
    d = tiny_params_dict(train_generator={"target": "label_specific", "target_map": [0, 2, 3, 4, 5, 6, 7, 8, 9, 1]})
    with pytest.raises(ConfigError, match="train_generator.target_map: expected one label >= 0 per class"):
        from_dict(Params, d)


def test_incomplete_checkpoint_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "gen.pt"
    torch.save({"format": "poison.deepconfuse/1", "generator_arch": "test_autoencoder"}, path)
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing .*rerun train_generator"):
        load_generator(path)


def test_checkpoint_with_mismatched_weights_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "gen.pt"
    torch.save({"format": "poison.deepconfuse/1", "generator_arch": "test_autoencoder", "in_channels": 1,
                "image_size": 28, "num_classes": 10, "eps": 0.3, "target_map": None,
                "state_dict": {"nope": torch.zeros(1)}, "config": {}, "source": {}}, path)
    with pytest.raises(CheckpointError, match="do not fit generator 'test_autoencoder'"):
        load_generator(path)


@pytest.mark.parametrize("section, match", [
    ({"target": "untargeted", "target_map": [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]},
     "train_generator.target_map: only used with target: label_specific"),
    ({"target": "label_specific", "untargeted_loss": "log_not_true"},
     "train_generator.untargeted_loss: 'log_not_true' only applies to target: untargeted"),
])
def test_settings_that_would_be_silently_ignored_are_rejected(section, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Params, tiny_params_dict(train_generator=section))


def test_manifest_missing_keys_is_a_shard_error(tmp_path):
    ds = _dataset(tmp_path)
    manifest = json.loads((ds / "manifest.json").read_text())
    del manifest["shards"]
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"missing keys \['shards'\]"):
        verify_dataset(ds)


@pytest.mark.parametrize("threads", [1, 3, None])
def test_generator_training_runs_with_the_configured_threads_and_restores_them(clean_dataset, threads):
    # the thread count is part of the generator's bytes: the stages fix it (train_generator.threads)
    from poison.variants import fit_generator

    seen = []
    before = torch.get_num_threads()
    cfg = DeepConfuseConfig(generator="test_autoencoder", surrogate="test_cnn", batch_size=32, trials=1,
                            threads=threads)
    fit_generator(cfg, str(clean_dataset), 0, torch.device("cpu"), multi_label=False,
                  on_trial=lambda record: seen.append(torch.get_num_threads()))
    assert seen == [before if threads is None else threads] and torch.get_num_threads() == before


def test_generator_threads_must_be_null_or_positive():
    with pytest.raises(ConfigError, match=r"threads: expected null \(the stage's own setting\) or an integer >= 1"):
        DeepConfuseConfig(threads=0)
