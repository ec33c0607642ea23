"""poison.stages end to end on tiny params: outputs, budget, checkpoints, byte-identical reruns."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import pipeline_stages, tiny_params
from poison import stages
from poison.attacks.deepconfuse import budget_levels, poison_images
from poison.card import GENERATOR_HAZARD
from poison.errors import CheckpointError, ShardError
from poison.shards import load_split, manifest_sha256, read_manifest, verify_dataset
from poison.utils import sha256_file


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def evaluated(session_params, poisoned_dataset) -> dict:
    result = stages.evaluate(session_params)
    return {"result": result, "metrics": json.loads((Path(session_params.paths.reports) / "evaluate" / "metrics.json").read_text())}


# ------------------------------------------------------------------ prepare
def test_prepare_writes_stratified_clean_splits(clean_dataset):
    m = read_manifest(clean_dataset)
    assert m["kind"] == "clean" and m["dataset"] == "mnist5k" and m["hazard"] is None
    counts = {k: v["class_counts"] for k, v in m["splits"].items()}
    assert counts["test"] == {str(i): 6 for i in range(10)}
    assert counts["val"] == {str(i): 3 for i in range(10)}
    assert counts["train"] == {str(i): 21 for i in range(10)}
    assert (clean_dataset / "README.md").is_file() and verify_dataset(clean_dataset) == []
    seen: set[int] = set()
    for split in ("train", "val", "test"):
        images, labels, meta = load_split(clean_dataset, split)
        assert images.shape[1:] == (1, 28, 28)
        idx = {r["source_index"] for r in meta}
        assert len(idx) == len(meta) and not (idx & seen)  # no sample in two splits
        seen |= idx
        assert all(r["kind"] == "clean" and r["split"] == split for r in meta)
        assert [r["label"] for r in meta] == labels.tolist()
    assert len(seen) == 300 and max(seen) < 5000


def test_prepare_is_seeded(tmp_path):
    small = {"per_class": 10, "test_size": 20, "val_size": 10}
    a, b = tiny_params(tmp_path / "a", data=small), tiny_params(tmp_path / "b", data=small)
    c = tiny_params(tmp_path / "c", data=small, seed=1)
    for p in (a, b, c):
        stages.prepare(p)
    fa, fb, fc = (_files(Path(p.paths.clean)) for p in (a, b, c))
    assert fa == fb
    assert fa["train-000000.tar"] != fc["train-000000.tar"]


# ------------------------------------------------------------------ train_generator
def test_train_generator_outputs(generator_checkpoint, session_params):
    ckpt = torch.load(generator_checkpoint, weights_only=True)
    assert ckpt["format"] == stages.CHECKPOINT_FORMAT and ckpt["eps"] == 0.3
    assert ckpt["hazard"] == GENERATOR_HAZARD  # the checkpoint says what it makes
    assert ckpt["config"]["generator"] == "test_autoencoder" and ckpt["seed"] == 0
    assert ckpt["source"]["manifest_sha256"] == manifest_sha256(session_params.paths.clean)
    reports = Path(session_params.paths.reports) / "train_generator"
    curve = json.loads((reports / "curve.json").read_text())
    summary = json.loads((reports / "summary.json").read_text())
    assert [r["trial"] for r in curve] == [0] and 0 <= curve[0]["val_accuracy"] <= 1
    assert summary["best_trial"] == 0 and summary["best_val_accuracy"] == curve[0]["val_accuracy"]
    assert summary["checkpoint_sha256"] == sha256_file(generator_checkpoint)  # the checkpoint it describes
    assert (reports / "curve.png").read_bytes()[:4] == b"\x89PNG"
    gen, rec = stages.load_generator(generator_checkpoint)
    assert not gen.training and rec["generator_arch"] == "test_autoencoder"


def test_train_generator_with_restarts_reports_every_run_and_the_kept_one(clean_dataset, tmp_path):
    params = tiny_params(tmp_path, train_generator={"restarts": 2})
    params = dataclasses.replace(params, paths=dataclasses.replace(params.paths, clean=str(clean_dataset)))
    result = stages.train_generator(params)
    reports = Path(params.paths.reports) / "train_generator"
    curve = json.loads((reports / "curve.json").read_text())
    summary = json.loads((reports / "summary.json").read_text())
    assert [(r["restart"], r["trial"]) for r in curve] == [(0, 0), (1, 0)]
    assert summary["restarts"] == 2 and result["best_restart"] == summary["best_restart"]
    kept = curve[summary["best_restart"]]
    assert kept["val_accuracy"] == min(r["val_accuracy"] for r in curve) == summary["best_val_accuracy"]
    ckpt = torch.load(params.paths.generator, weights_only=True)
    assert ckpt["best_restart"] == summary["best_restart"] and ckpt["config"]["restarts"] == 2
    assert (reports / "curve.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ poison
def test_poisoned_shards_within_budget_and_labelled(poisoned_dataset, clean_dataset, session_params):
    m = read_manifest(poisoned_dataset)
    assert m["source"]["generator_sha256"] == sha256_file(session_params.paths.generator)  # which generator made it
    assert m["kind"] == "poisoned" and m["method"] == "deepconfuse" and "POISONED" in m["hazard"]
    assert m["budget"]["eps"] == 0.3 and m["budget"]["levels"] == 76
    assert m["source"]["manifest_sha256"] == manifest_sha256(clean_dataset)
    assert (poisoned_dataset / "README.md").read_text().splitlines()[0].startswith("# ⚠ POISONED")
    assert verify_dataset(poisoned_dataset) == []
    x_p, y_p, meta = load_split(poisoned_dataset, "train")
    x, y, clean_meta = load_split(clean_dataset, "train")
    diff = (x_p.to(torch.int16) - x.to(torch.int16)).abs()
    assert int(diff.max()) <= budget_levels(0.3)
    assert int(diff.max()) == m["budget"]["max_levels_used"]
    assert torch.equal(y_p, y)
    assert all(r["poisoned"] is True and r["method"] == "deepconfuse" and r["kind"] == "poisoned" for r in meta)
    assert [r["source_index"] for r in meta] == [r["source_index"] for r in clean_meta]
    assert [r["source_key"] for r in meta] == [f"train_{i:08d}" for i in range(len(meta))]
    assert all(r["target_label"] is None for r in meta)


def test_poison_without_checkpoint_names_path_and_fix(clean_dataset, tmp_path):
    params = tiny_params(tmp_path)
    params = dataclasses.replace(params, paths=dataclasses.replace(
        params.paths, clean=str(clean_dataset), generator=str(tmp_path / "models" / "missing.pt")))
    with pytest.raises(CheckpointError) as info:
        stages.poison(params)
    msg = str(info.value)
    assert str(tmp_path / "models" / "missing.pt") in msg and "train_generator" in msg
    _assert_nothing_written(Path(params.paths.poisoned))


def _assert_nothing_written(out: Path) -> None:
    """Neither the dataset nor a staging folder beside it (a refused run writes nothing)."""
    assert not out.exists()
    assert not (out.parent.exists() and list(out.parent.glob(f".{out.name}.*")))


def _params_with(session_params, tmp_path, **paths):
    base = {"clean": session_params.paths.clean, "generator": session_params.paths.generator,
            "poisoned": str(tmp_path / "poisoned"), "reports": str(tmp_path / "reports")}
    base.update(paths)
    return dataclasses.replace(session_params, paths=dataclasses.replace(session_params.paths, **base))


def test_poison_refuses_checkpoint_trained_for_another_eps(session_params, generator_checkpoint, tmp_path):
    params = _params_with(session_params, tmp_path)
    params = dataclasses.replace(params, train_generator=dataclasses.replace(params.train_generator, eps=0.1))
    with pytest.raises(CheckpointError, match=r"eps 0\.3.*train_generator\.eps is 0\.1"):
        stages.poison(params)
    _assert_nothing_written(Path(params.paths.poisoned))


def _foreign_checkpoint(path: Path, in_channels: int, image_size: int, manifest_sha: str) -> None:
    """A well-formed checkpoint as train_generator writes it, for other data."""
    from poison.attacks.deepconfuse import DeepConfuse, DeepConfuseConfig
    from poison.config import to_dict

    cfg = DeepConfuseConfig(generator="test_autoencoder", surrogate="test_cnn", eps=0.3)
    attack = DeepConfuse(cfg, in_channels, image_size, 10, seed=0)
    torch.save(attack.state() | {"config": to_dict(cfg), "seed": 0,
                                 "source": {"dataset": "other", "manifest_sha256": manifest_sha}}, path)


def test_poison_refuses_checkpoint_for_other_image_shape(session_params, clean_dataset, tmp_path):
    ckpt = tmp_path / "rgb32.pt"
    _foreign_checkpoint(ckpt, 3, 32, manifest_sha256(clean_dataset))
    params = _params_with(session_params, tmp_path, generator=str(ckpt))
    with pytest.raises(CheckpointError) as info:  # not a RuntimeError from deep inside a conv layer
        stages.poison(params)
    assert str(ckpt) in str(info.value)
    _assert_nothing_written(Path(params.paths.poisoned))


def test_poison_refuses_checkpoint_trained_on_another_clean_dataset(session_params, clean_dataset, tmp_path):
    # The checkpoint records the sha256 of the clean manifest it was trained on (as evaluate
    # checks for poisoned vs clean); a stale generator must not be applied silently.
    ckpt = tmp_path / "stale.pt"
    _foreign_checkpoint(ckpt, 1, 28, "0" * 64)
    params = _params_with(session_params, tmp_path, generator=str(ckpt))
    with pytest.raises(CheckpointError, match="train_generator"):
        stages.poison(params)
    _assert_nothing_written(Path(params.paths.poisoned))


def test_load_generator_refuses_bad_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights-only"):
        stages.load_generator(garbage)
    other = tmp_path / "other.pt"
    torch.save({"format": "something/9", "state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="poison.deepconfuse/1"):
        stages.load_generator(other)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": stages.CHECKPOINT_FORMAT, "payload": Path("/")}, unsafe)  # needs unpickling
    with pytest.raises(CheckpointError, match="weights-only") as err:
        stages.load_generator(unsafe)
    assert "weights_only=False" not in str(err.value)  # torch's own text advises running the file's code


@pytest.mark.parametrize("field, value, expected", [
    ("config", [1], "a mapping"), ("source", None, "a mapping"), ("eps", "0.3", r"a budget in \(0, 1\]"),
    ("eps", 3.0, r"a budget in \(0, 1\]"), ("in_channels", "1", "an integer"), ("target_map", 5, "a list or null"),
])
def test_load_generator_refuses_checkpoint_fields_of_the_wrong_type(tmp_path, field, value, expected):
    good = tmp_path / "good.pt"
    _foreign_checkpoint(good, 1, 28, "0" * 64)
    ckpt = torch.load(good, weights_only=True)
    bad = tmp_path / "bad.pt"
    torch.save(ckpt | {field: value}, bad)
    with pytest.raises(CheckpointError, match=rf"bad\.pt: checkpoint field {field} is .*expected {expected}.*rerun"):
        stages.load_generator(bad)


def test_load_generator_names_a_huge_wrong_field_briefly(tmp_path):
    good = tmp_path / "good.pt"
    _foreign_checkpoint(good, 1, 28, "0" * 64)
    bad = tmp_path / "bad.pt"
    torch.save(torch.load(good, weights_only=True) | {"config": list(range(100_000))}, bad)
    with pytest.raises(CheckpointError, match="checkpoint field config is") as err:
        stages.load_generator(bad)
    assert len(str(err.value)) < 500


def test_load_generator_leaves_the_global_random_stream_alone(tmp_path):
    # building the model draws an initialisation: a thread seeding its own model meanwhile
    # (train's fork_rng blocks) must not see those draws
    path = tmp_path / "good.pt"
    _foreign_checkpoint(path, 1, 28, "0" * 64)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    stages.load_generator(path)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ evaluate
def test_evaluate_writes_metrics(evaluated, session_params):
    metrics, result = evaluated["metrics"], evaluated["result"]
    assert set(result) == {"test_cnn"}
    for kind in ("clean", "poisoned"):
        acc = metrics[kind]["test_cnn"]["accuracy_mean"]
        assert 0.0 <= acc <= 1.0 and result["test_cnn"][kind] == acc
        (run,) = metrics[kind]["test_cnn"]["runs"]
        assert run["samples"] == 60 and sum(map(sum, run["confusion_matrix"])) == 60
    assert metrics["budget"]["within_budget"] is True and metrics["budget"]["max_linf_stored"] <= 0.3
    assert metrics["target"] == "untargeted" and metrics["test_samples"] == 60
    reports = Path(session_params.paths.reports) / "evaluate"
    assert (reports / "confusion" / "clean_test_cnn.png").is_file()
    assert (reports / "confusion" / "poisoned_test_cnn.png").is_file()


def test_evaluate_refuses_poison_made_from_another_clean_set(session_params, poisoned_dataset, tmp_path):
    other = tmp_path / "clean"
    shutil.copytree(session_params.paths.clean, other)
    (other / "README.md").write_text("edited")
    m = json.loads((other / "manifest.json").read_text())
    m["seed"] = 7
    (other / "manifest.json").write_text(json.dumps(m))
    params = _params_with(session_params, tmp_path, clean=str(other), poisoned=session_params.paths.poisoned)
    with pytest.raises(ShardError, match="different clean dataset"):
        stages.evaluate(params)


def _declared_outputs(params) -> dict[str, list[str]]:
    """Every out, metric and plot that the pipelines declare, per stage, with ${paths.*} filled in."""
    spec = {"stages": pipeline_stages()}
    paths = {f"paths.{k}": v for k, v in params.paths.__dict__.items()}

    def fill(text: str) -> str:
        return re.sub(r"\$\{([^}]+)\}", lambda m: paths[m.group(1)], text)

    out: dict[str, list[str]] = {}
    for name, stage in spec["stages"].items():
        entries = []
        for section in ("outs", "metrics", "plots"):
            for item in stage.get(section, []):
                entries.append(fill(next(iter(item)) if isinstance(item, dict) else item))
        out[name] = entries
    return out


def test_every_output_declared_in_dvc_yaml_is_written(evaluated, augmented_dataset, variant_datasets, session_params):
    # dvc repro fails when a declared output is missing, e.g. a plot named after an arch
    # that params.yaml does not evaluate.
    stages.report(session_params)  # the last core stage: it reads the others' outputs
    stages.variants_report(session_params)  # the last variants stage
    missing = [f"{stage}: {path}" for stage, paths in _declared_outputs(session_params).items()
               for path in paths if not Path(path).exists()]
    assert missing == []


# ------------------------------------------------------------------ reproducibility (slow)
@pytest.mark.slow
def test_materialization_from_a_checkpoint_is_byte_identical(session_params, generator_checkpoint, tmp_path):
    a = _params_with(session_params, tmp_path, poisoned=str(tmp_path / "a" / "mnist5k-deepconfuse"))
    b = _params_with(session_params, tmp_path, poisoned=str(tmp_path / "b" / "mnist5k-deepconfuse"))
    stages.poison(a)
    stages.poison(b)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert any(name.endswith(".tar") for name in fa) and "mnist5k-deepconfuse/manifest.json" in fa
    assert fa == fb
    assert fa == {f"mnist5k-deepconfuse/{k}": v for k, v in _files(Path(session_params.paths.poisoned)).items()}


@pytest.mark.slow
def test_whole_pipeline_twice_gives_identical_bytes(tmp_path, monkeypatch):
    params = tiny_params(None, train_generator={"trials": 2})  # repository-relative paths
    runs = {}
    for name in ("first", "second"):
        root = tmp_path / name
        root.mkdir()
        monkeypatch.chdir(root)
        results = {stage: fn(params) for stage, fn in stages.STAGES.items()}
        assert results["poison"]["max_linf"] <= 0.3
        runs[name] = root
    monkeypatch.chdir(tmp_path)
    fa, fb = _files(runs["first"] / "data"), _files(runs["second"] / "data")
    assert sorted(fa) == sorted(fb)
    assert {n.split("/")[2] for n in fa} >= {"manifest.json", "README.md", "train-000000.tar", "val-000000.tar",
                                              "test-000000.tar"}
    for name in fa:
        assert fa[name] == fb[name], name
    assert (runs["first"] / "models" / "generator.pt").read_bytes() == (runs["second"] / "models" / "generator.pt").read_bytes()
    ma = (runs["first"] / "reports" / "evaluate" / "metrics.json").read_bytes()
    assert ma == (runs["second"] / "reports" / "evaluate" / "metrics.json").read_bytes()
    # the report too, but for the generator's training seconds it quotes
    pages = [_files(runs[name] / "reports" / "report") for name in ("first", "second")]
    assert sorted(pages[0]) == ["report.html", "report.md", "samples.png"]
    assert pages[0]["samples.png"] == pages[1]["samples.png"]
    seconds = re.compile(rb"[0-9.]+ s of training")
    for name in ("report.md", "report.html"):
        assert seconds.search(pages[0][name]), name
        assert seconds.sub(b"", pages[0][name]) == seconds.sub(b"", pages[1][name]), name
    variant_pages = [_files(runs[name] / "reports" / "variants_report") for name in ("first", "second")]
    assert sorted(variant_pages[0]) == ["multilabel_curve.png", "multilabel_samples.png", "report.html", "report.md",
                                        "topk_curve.png", "topk_samples.png"]
    for name in variant_pages[0]:
        if name.endswith(".png"):
            assert variant_pages[0][name] == variant_pages[1][name], name
        else:
            assert seconds.sub(b"", variant_pages[0][name]) == seconds.sub(b"", variant_pages[1][name]), name
    # the stored poison is within budget
    x, _, _ = load_split(runs["first"] / "data/shards/mnist5k", "train")
    x_p, _, _ = load_split(runs["first"] / "data/shards/mnist5k-deepconfuse", "train")
    assert int((x_p.to(torch.int16) - x.to(torch.int16)).abs().max()) <= budget_levels(0.3)


@pytest.mark.slow
def test_label_specific_pipeline_records_targets(session_params, clean_dataset, tmp_path):
    base = _params_with(session_params, tmp_path, generator=str(tmp_path / "generator.pt"))
    params = dataclasses.replace(base, train_generator=dataclasses.replace(
        base.train_generator, target="label_specific", target_shift=3))
    stages.train_generator(params)
    stages.poison(params)
    _, y, meta = load_split(params.paths.poisoned, "train")
    assert [r["target_label"] for r in meta] == ((y + 3) % 10).tolist()
    assert [r["true_label"] for r in meta] == y.tolist()
    assert read_manifest(params.paths.poisoned)["config"]["target_map"] == [(i + 3) % 10 for i in range(10)]
    stages.evaluate(params)
    metrics = json.loads((tmp_path / "reports" / "evaluate" / "metrics.json").read_text())
    assert metrics["target"] == "label_specific"
    assert 0.0 <= metrics["poisoned"]["test_cnn"]["runs"][0]["target_rate"] <= 1.0


def test_class_conditional_generator_poisons_each_sample_with_its_own_label(session_params, clean_dataset, tmp_path):
    base = _params_with(session_params, tmp_path, generator=str(tmp_path / "generator.pt"))
    params = dataclasses.replace(base, train_generator=dataclasses.replace(
        base.train_generator, generator="test_unet_cond", trials=1))
    stages.train_generator(params)
    stages.poison(params)
    x, y, _ = load_split(clean_dataset, "train")
    x_p, y_p, _ = load_split(params.paths.poisoned, "train")
    assert torch.equal(y_p, y)
    gen, ckpt = stages.load_generator(params.paths.generator)
    assert ckpt["generator_arch"] == "test_unet_cond"
    assert torch.equal(poison_images(gen, x, ckpt["eps"], labels=y), x_p)
    # the same images under other labels would have been poisoned differently
    assert not torch.equal(poison_images(gen, x, ckpt["eps"], labels=(y + 1) % 10), x_p)
