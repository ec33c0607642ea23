"""poison.variants and the multi-label plumbing: composites, multi-label shards, the topk and multilabel stages."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from poison import stages
from poison.card import GENERATOR_HAZARD, HAZARD
from poison.data import grid_composites
from poison.errors import ShardError
from poison.evaluate import multilabel_metrics
from poison.loader import open_dataset
from poison.shards import SplitSamples, load_split, read_manifest, verify_dataset, write_dataset


# ------------------------------------------------------------------ composites
def test_grid_composites_layout_labels_and_blanks():
    pool = (torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1) + 1).expand(4, 1, 2, 2).contiguous()
    labels = torch.tensor([0, 1, 2, 2])
    images, hot, src = grid_composites(pool, labels, 5, 200, torch.Generator().manual_seed(0), grid=2, empty=0.5)
    assert images.shape == (200, 1, 4, 4) and hot.shape == (200, 5) and src.shape == (200, 4)
    assert bool((src >= 0).any(1).all())  # at least one digit in every mosaic
    for i in range(200):
        cells = [images[i, 0, r * 2 : r * 2 + 2, c * 2 : c * 2 + 2] for r in range(2) for c in range(2)]
        for cell, s in zip(cells, src[i].tolist()):
            assert torch.equal(cell, torch.zeros_like(cell) if s < 0 else pool[s, 0])
        shown = {int(labels[s]) for s in src[i].tolist() if s >= 0}
        assert set(torch.nonzero(hot[i]).flatten().tolist()) == shown  # a repeated class counts once
    again = grid_composites(pool, labels, 5, 200, torch.Generator().manual_seed(0), grid=2, empty=0.5)
    assert torch.equal(again[0], images) and torch.equal(again[1], hot)


def test_grid_composites_refuses_an_empty_pool():
    from poison.errors import ConfigError

    with pytest.raises(ConfigError, match="empty"):
        grid_composites(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), 3, 4,
                        torch.Generator())


# -------------------------------------------------------------- multi-label shards
def _multi(tmp_path: Path, n: int = 5) -> tuple[Path, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = (torch.rand(n, 3, generator=g) < 0.5).long()
    out = tmp_path / "ml"
    write_dataset(out, {"train": SplitSamples(images, labels, [{"i": i} for i in range(n)])}, dataset="ml",
                  kind="clean", classes=["a", "b", "c"], seed=0, shard_size=2)
    return out, labels


def test_multilabel_shards_round_trip_without_cls(tmp_path):
    out, labels = _multi(tmp_path)
    m = read_manifest(out)
    assert m["label_type"] == "multi_label"
    assert m["splits"]["train"]["class_counts"] == {str(i): int(v) for i, v in enumerate(labels.sum(0).tolist())}
    with tarfile.open(out / "train-000000.tar") as tar:
        names = tar.getnames()
        assert not any(n.endswith(".cls") for n in names)
        meta = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert meta["labels"] == labels[0].tolist() and meta["i"] == 0
    _, y, metas = load_split(out, "train")
    assert torch.equal(y, labels) and [mm["i"] for mm in metas] == list(range(5))
    assert verify_dataset(out) == []
    x2, y2 = open_dataset(str(out), "train", shuffle=0).tensors()
    assert torch.equal(y2, labels) and x2.shape == (5, 1, 4, 4)


def test_single_label_manifest_says_so(tmp_path):
    write_dataset(tmp_path / "s", {"train": SplitSamples(torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
                                                         torch.tensor([0, 1]), [{}, {}])},
                  dataset="s", kind="clean", classes=["a", "b"], seed=0)
    assert read_manifest(tmp_path / "s")["label_type"] == "single_label"


def test_multilabel_labels_must_be_zero_or_one(tmp_path):
    with pytest.raises(ShardError, match="only 0 and 1"):
        SplitSamples(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([[0, 2], [1, 0]]), [{}, {}])


def test_a_bad_label_vector_in_a_shard_is_refused(tmp_path):
    out, _ = _multi(tmp_path)
    m = read_manifest(out)
    m["classes"] = ["a", "b", "c", "d"]  # vectors of 3 no longer fit: as a tampered shard would not
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="'labels' list of 4"):
        load_split(out, "train", verify=False)


# ---------------------------------------------------------------------- metrics
def test_multilabel_metrics_by_hand():
    true = torch.tensor([[1, 0, 1], [0, 1, 0]])
    pred = torch.tensor([[1, 0, 0], [0, 1, 0]])
    m = multilabel_metrics(pred, true, target=torch.tensor([[1, 0, 0], [1, 1, 0]]))
    assert m["exact_match"] == 0.5 and m["hamming_loss"] == pytest.approx(1 / 6)
    assert m["per_label_f1"] == [1.0, 1.0, 0.0] and m["macro_f1"] == pytest.approx(2 / 3)
    assert m["target_rate"] == 0.5
    assert multilabel_metrics(torch.zeros(1, 2), torch.zeros(1, 2))["per_label_f1"] == [None, None]


# ----------------------------------------------------------------------- stages
def _source_indices(clean: Path, split: str) -> dict[str, int]:
    from poison.shards import iter_samples

    return {s["key"]: s["meta"]["source_index"] for s in iter_samples(clean, split)}


def test_compose_splits_never_share_a_base_image(variant_datasets, clean_dataset):
    seen = {}
    for split in ("train", "val", "test"):
        keys = _source_indices(clean_dataset, split)
        _, y, metas = load_split(variant_datasets["multilabel_clean"], split)
        _, y_clean, _ = load_split(clean_dataset, split)
        used = set()
        for row, meta in zip(y, metas):
            shown = {int(y_clean[int(k.split("_")[1])]) for k in meta["source_keys"] if k is not None}
            assert set(torch.nonzero(row).flatten().tolist()) == shown
            used |= {keys[k] for k in meta["source_keys"] if k is not None}
        seen[split] = used
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])


def test_compose_is_deterministic(session_params, variant_datasets, tmp_path):
    params = dataclasses.replace(session_params, paths=dataclasses.replace(
        session_params.paths, multilabel_clean=str(tmp_path / "grid")))
    stages.compose(params)
    a, b = read_manifest(tmp_path / "grid"), read_manifest(variant_datasets["multilabel_clean"])
    assert [r["sha256"] for r in a["shards"]] == [r["sha256"] for r in b["shards"]]


def test_topk_stage_writes_a_labelled_poison_and_metrics(session_params, variant_datasets, clean_dataset):
    out = variant_datasets["topk"]
    m = read_manifest(out)
    assert m["kind"] == "poisoned" and m["hazard"] == HAZARD and m["method"] == "deepconfuse-ordered-topk"
    card = (out / "README.md").read_text().splitlines()
    assert card[0].startswith("# ⚠ POISONED DATASET") and HAZARD in "\n".join(card[:4])
    x_p, y_p, metas = load_split(out, "train")
    x, y, _ = load_split(clean_dataset, "train")
    assert torch.equal(y_p, y) and int((x_p.int() - x.int()).abs().max()) <= m["budget"]["levels"]
    k = session_params.topk.generator.topk
    for label, meta in zip(y.tolist(), metas):
        assert meta["target"] == [(label + 1 + i) % 10 for i in range(k)]  # ordered, true label excluded
    metrics = json.loads((Path(session_params.paths.reports) / "topk" / "metrics.json").read_text())
    for kind in ("clean", "poisoned"):
        assert set(metrics[kind]["test_cnn"]["mean"]) == {"accuracy", "target_rate", "topk_rate"}
    assert metrics["datasets"]["poisoned"]["manifest_sha256"]
    # the kept trial's validation rate is the ordered top-k one, unlike the downstream target_rate (top-1)
    assert metrics["generator"]["best_val_target_rate_of"].startswith(f"ordered top-{k}:")
    ckpt = torch.load(session_params.paths.topk_generator, weights_only=True)
    assert ckpt["topk_targets"][0] == list(range(1, k + 1)) and ckpt["hazard"] == GENERATOR_HAZARD


def test_multilabel_stage_writes_the_goal_and_metrics(session_params, variant_datasets):
    out = variant_datasets["multilabel"]
    m = read_manifest(out)
    assert m["kind"] == "poisoned" and m["label_type"] == "multi_label" and m["config"]["flip_labels"] == [0]
    assert m["hazard"] == HAZARD
    card = (out / "README.md").read_text().splitlines()
    assert card[0].startswith("# ⚠ POISONED DATASET") and HAZARD in "\n".join(card[:4])
    ckpt = torch.load(session_params.paths.multilabel_generator, weights_only=True)
    assert ckpt["hazard"] == GENERATOR_HAZARD and ckpt["multi_label"]
    _, y, metas = load_split(out, "train")
    for row, meta in zip(y.tolist(), metas):
        assert meta["target"] == [1 - row[0], *row[1:]]  # label 0 flipped, the others kept
    metrics = json.loads((Path(session_params.paths.reports) / "multilabel" / "metrics.json").read_text())
    assert {"exact_match", "hamming_loss", "macro_f1", "target_rate"} <= set(metrics["poisoned"]["test_cnn"]["mean"])
    assert metrics["generator"]["best_val_target_rate_of"] == "exact match of the goal label vector"


def test_downstream_cells_are_the_same_on_one_or_several_worker_threads(session_params, variant_datasets,
                                                                      clean_dataset):
    from poison.variants import _downstream

    params = dataclasses.replace(session_params, evaluate=dataclasses.replace(session_params.evaluate, seeds=[0, 1]))

    def metrics(logits: torch.Tensor, y: torch.Tensor) -> dict:
        # the logits' sum changes with any difference in training, down to the last bit
        return {"accuracy": float((logits.argmax(1) == y).float().mean()), "logit_sum": float(logits.double().sum())}

    def run(workers: int) -> dict:
        p = dataclasses.replace(params, orchestration=dataclasses.replace(params.orchestration, workers=workers))
        return _downstream(p, str(clean_dataset), str(variant_datasets["topk"]), metrics)

    one, three = run(1), run(3)
    assert one == three
    assert [r["seed"] for r in one["poisoned"]["test_cnn"]["runs"]] == [0, 1]
    assert one["clean"]["test_cnn"]["runs"][0]["logit_sum"] != one["poisoned"]["test_cnn"]["runs"][0]["logit_sum"]


def test_downstream_mean_is_undefined_when_a_seed_leaves_the_metric_undefined(session_params, variant_datasets,
                                                                           clean_dataset):
    from poison.variants import _downstream

    params = dataclasses.replace(session_params, evaluate=dataclasses.replace(session_params.evaluate, seeds=[0, 1]),
                                 orchestration=dataclasses.replace(session_params.orchestration, workers=1))
    calls = []

    def metrics(logits: torch.Tensor, y: torch.Tensor) -> dict:
        calls.append(1)  # one call per cell, in order: clean seeds 0, 1, then poisoned seeds 0, 1
        return {"accuracy": float((logits.argmax(1) == y).float().mean()),
                "macro_f1": 0.5 if len(calls) % 2 else None}  # like an F1 no label defines

    result = _downstream(params, str(clean_dataset), str(variant_datasets["topk"]), metrics)
    for kind in ("clean", "poisoned"):
        mean, runs = result[kind]["test_cnn"]["mean"], result[kind]["test_cnn"]["runs"]
        assert mean["macro_f1"] is None  # not the first seed's value, not a TypeError
        assert mean["accuracy"] == pytest.approx(sum(r["accuracy"] for r in runs) / 2)


def test_multilabel_stage_refuses_single_label_data(session_params, clean_dataset, tmp_path):
    import shutil

    shutil.copytree(clean_dataset, tmp_path / "single")
    params = dataclasses.replace(session_params, paths=dataclasses.replace(
        session_params.paths, multilabel_clean=str(tmp_path / "single"),
        multilabel_poisoned=str(tmp_path / "p"), multilabel_generator=str(tmp_path / "g.pt")))
    with pytest.raises(ShardError, match="compose"):
        stages.multilabel(params)
    assert not (tmp_path / "p").exists() and not (tmp_path / "g.pt").exists()


def test_compose_refuses_multilabel_source(session_params, variant_datasets, tmp_path):
    params = dataclasses.replace(session_params, paths=dataclasses.replace(
        session_params.paths, clean=str(variant_datasets["multilabel_clean"]), multilabel_clean=str(tmp_path / "g")))
    with pytest.raises(ShardError, match="already multi-label"):
        stages.compose(params)


@pytest.mark.parametrize("section, overrides, key", [
    ("topk.generator", {"target": "ordered_topk", "topk": 10}, "topk"),
    ("train_generator", {"target": "label_specific", "target_shift": 10}, "target_shift"),
])
def test_generator_errors_that_need_the_data_name_their_params_section(clean_dataset, section, overrides, key):
    # these checks need the number of classes, so they run when the stage reads the data, not
    # when params.yaml is loaded: the message still says which section of params.yaml to fix
    from poison.attacks.deepconfuse import DeepConfuseConfig
    from poison.errors import ConfigError
    from poison.variants import fit_generator

    cfg = DeepConfuseConfig(generator="test_autoencoder", surrogate="test_cnn", trials=1, **overrides)
    with pytest.raises(ConfigError, match=rf"^{section.replace('.', '[.]')}[.]{key}: .*\(data: .*10 classes\)"):
        fit_generator(cfg, str(clean_dataset), 0, torch.device("cpu"), multi_label=False, section=section)
