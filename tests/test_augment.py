"""The augment stage: SIA-augmented shards (kind ``semantic``), the diagnosis, the long tail."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from poison import stages
from poison.augment import AugmentConfig, long_tail_indices, tail_plan
from poison.attacks.semantic import ATTRIBUTES
from poison.config import to_dict, Params, from_dict
from poison.errors import ConfigError
from poison.shards import iter_samples, read_manifest, verify_dataset
from conftest import tiny_params_dict


def _tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _params(session_params: Params, out: Path) -> Params:
    paths = dataclasses.replace(session_params.paths, augmented=str(out / "data" / "mnist5k-sia"),
                                reports=str(out / "reports"))
    return dataclasses.replace(session_params, paths=paths)


@pytest.fixture(scope="module")
def augmented(session_params, clean_dataset, tmp_path_factory):
    params = _params(session_params, tmp_path_factory.mktemp("augment"))
    return params, stages.augment(params)


def test_augment_writes_a_labelled_semantic_dataset(augmented, clean_dataset):
    params, result = augmented
    out = Path(params.paths.augmented)
    manifest = read_manifest(out)
    assert manifest["kind"] == "semantic" and manifest["method"] == "sia" and manifest["hazard"]
    # the victim's recipe (evaluate.recipe) decides the bytes too: recorded with the augment section
    assert manifest["config"]["victim_recipe"] == to_dict(params.evaluate.recipe)
    assert verify_dataset(out) == []
    assert "AUGMENTED" in (out / "README.md").read_text().splitlines()[0]
    assert result["samples"]["adversarial"] == read_manifest(clean_dataset)["splits"]["train"]["samples"] == 210
    cfg = params.augment.attack
    half = dict(zip(cfg.attributes, cfg.half_ranges()))
    clean = {s["meta"]["source_index"]: s for s in iter_samples(clean_dataset, "train")}
    for s in iter_samples(out, "adversarial"):
        m = s["meta"]
        assert m["kind"] == "semantic" and m["augmented"] is True and m["method"] == "sia"
        assert s["label"] == m["true_label"] == clean[m["source_index"]]["label"]
        assert m["image_linf"] <= cfg.eps + 1e-6
        for name, value in m["attributes"].items():
            assert abs(value - ATTRIBUTES[name].identity) <= half[name] + 1e-5, (name, value)


def test_long_tail_split_keeps_originals_and_fills_the_tail(augmented, clean_dataset):
    params, _ = augmented
    samples = list(iter_samples(params.paths.augmented, "longtail"))
    originals = [s for s in samples if not s["meta"]["augmented"]]
    variants = [s for s in samples if s["meta"]["augmented"]]
    counts = torch.bincount(torch.tensor([s["label"] for s in originals]), minlength=10)
    summary = json.loads((Path(params.paths.reports) / "augment" / "summary.json").read_text())
    assert counts.tolist() == summary["longtail"]["class_counts"]
    assert counts[0] == 21 and counts[9] == 2  # 21 per class, imbalance ratio 10
    after = torch.bincount(torch.tensor([s["label"] for s in samples]), minlength=10)
    goal = int(torch.ceil(torch.tensor(params.augment.tail.share * 21)))
    assert after.tolist() == [max(int(c), goal) for c in counts]
    assert len(variants) == summary["longtail"]["variants"]
    clean = {s["meta"]["source_index"]: s for s in iter_samples(clean_dataset, "train")}
    for s in originals:  # unchanged copies of the clean images
        assert torch.equal(s["image"], clean[s["meta"]["source_index"]]["image"])
    for s in variants:
        assert s["label"] == clean[s["meta"]["source_index"]]["label"]


def test_diagnosis_counts_equal_the_successes_and_the_figure_exists(augmented):
    params, _ = augmented
    reports = Path(params.paths.reports) / "augment"
    diag = json.loads((reports / "diagnosis.json").read_text())
    samples = list(iter_samples(params.paths.augmented, "adversarial"))
    successes = sum(s["meta"]["success"] for s in samples)
    assert diag["samples"] == len(samples) and diag["successes"] == successes
    assert sum(diag["dominant_counts"].values()) == successes
    assert set(diag["single_attribute_success_rate"]) == set(params.augment.attack.attributes)
    assert diag["single_attribute_samples"] == min(params.augment.diagnosis_samples, len(samples))
    # every class that has successes gets a usage row (the split is ordered by class)
    per_class = {s["label"] for s in samples if s["meta"]["success"]}
    assert {c for c, row in enumerate(diag["mean_usage_per_class"]) if row is not None} == per_class
    assert (reports / "diagnosis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_the_same_shards_with_or_without_a_second_worker(augmented, session_params, tmp_path):
    params, _ = augmented
    assert params.orchestration.workers == 2  # the long tail was built beside the adversarial split
    again = _params(session_params, tmp_path)
    again = dataclasses.replace(again, orchestration=dataclasses.replace(again.orchestration, workers=1))
    stages.augment(again)  # one after the other
    assert _tree(Path(again.paths.augmented)) == _tree(Path(params.paths.augmented))
    for name in ("diagnosis.json", "summary.json", "diagnosis.png"):
        a = (Path(params.paths.reports) / "augment" / name).read_bytes()
        assert a == (Path(again.paths.reports) / "augment" / name).read_bytes(), name


def test_long_tail_profile_and_tail_plan():
    labels = torch.arange(10).repeat_interleave(100)
    idx = long_tail_indices(labels, 10, 100.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[idx], minlength=10).tolist()
    assert counts == [max(1, round(100 * 100 ** (-k / 9))) for k in range(10)]
    assert counts[0] == 100 and counts[-1] == 1
    plan = tail_plan(labels[idx], 10, 0.5)
    filled = torch.bincount(torch.cat([labels[idx], labels[idx][torch.tensor(plan)]]), minlength=10)
    assert filled.tolist() == [max(c, 50) for c in counts]
    assert tail_plan(labels[idx], 10, 0.01) == []


@pytest.mark.parametrize("section, message", [
    ({"victim": "nope"}, "augment.victim: unknown classifier 'nope'"),
    ({"attack": {"attributes": ["hue"]}}, None),  # valid alone; refused by the stage on 1-channel data
    ({"attack": {"ranges": {"rotation": -1}}}, r"augment.attack.ranges.rotation: expected a half-range > 0"),
    ({"attack": {"ranges": "x"}}, r"augment.attack.ranges: expected a mapping"),
    ({"tail": {"share": 0}}, r"augment.tail.share: expected 0 < share <= 1"),
    ({"tail": {"imbalance_ratio": 0.5}}, r"augment.tail.imbalance_ratio: expected >= 1"),
    ({"threads": 0}, r"augment.threads: expected null"),
])
def test_augment_section_is_validated(section, message):
    if message is None:
        from_dict(Params, tiny_params_dict(augment=section))
        return
    with pytest.raises(ConfigError, match=message):
        from_dict(Params, tiny_params_dict(augment=section))


def test_colour_attributes_on_grey_data_are_refused_before_any_work(session_params, clean_dataset, tmp_path):
    params = _params(session_params, tmp_path)
    attack = dataclasses.replace(params.augment.attack, attributes=("rotation", "hue"))
    params = dataclasses.replace(params, augment=dataclasses.replace(params.augment, attack=attack))
    with pytest.raises(ConfigError, match=r"augment.attack.attributes: \['hue'\] need colour"):
        stages.augment(params)
    out = Path(params.paths.augmented)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    assert not (Path(params.paths.reports) / "augment").exists()


@pytest.mark.parametrize("shift", [0, 10, -20])
def test_a_targeted_shift_onto_the_true_label_is_refused_before_any_work(session_params, clean_dataset, tmp_path, shift):
    params = _params(session_params, tmp_path)
    params = dataclasses.replace(params, augment=dataclasses.replace(params.augment, targeted=True, target_shift=shift))
    with pytest.raises(ConfigError, match=rf"augment.target_shift: must not be a multiple of 10 .*got {shift}"):
        stages.augment(params)
    assert not Path(params.paths.augmented).exists()


def test_default_augment_config_matches_the_algorithm_notes():
    cfg = AugmentConfig()
    assert cfg.attack.eps == 0.1 and cfg.attack.steps == 10 and cfg.attack.step_scale == 2.5
    assert dict(zip(cfg.attack.attributes, cfg.attack.half_ranges()))["rotation"] == 15.0


def _bench():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_semantic", REPO / "benchmarks" / "semantic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["plain", "oversample", "reweight", "random_attributes", "sia", "sia_attributes",
                                    "sia_mix"])
def test_imbalance_benchmark_methods_run_on_tiny_data(clean_dataset, method):
    r = _bench().imbalance(0, 1, str(clean_dataset), 10.0, method, "val")
    assert r["split"] == "val"
    assert 0 <= r["balanced_accuracy"] <= 1 and 0 <= r["tail_accuracy"] <= 1
    lt = 21 + 16 + 13 + 10 + 8 + 6 + 5 + 4 + 3 + 2
    assert r["train_samples"] == (lt if method in ("plain", "reweight") else 210)


def test_strength_and_advtrain_benchmarks_run_on_tiny_data(clean_dataset):
    bench = _bench()
    s = bench.strength(0, 1, str(clean_dataset))
    assert set(s) >= {"sia", "pgd", "attributes_only", "random_attributes", "single_attribute"}
    a = bench.advtrain(0, 1, str(clean_dataset), "sia_at")
    assert all(0 <= a[k] <= 1 for k in ("clean", "pgd", "fgsm", "sia"))
    assert "| SIA, attributes + L-inf 0.1 |" in bench.markdown({"strength": {"runs": [s]}})


class _FractionDetector(torch.nn.Module):
    """Predicts class 1 exactly when some pixel is off the uint8 grid: wrong on float images only."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        off = ((x * 255 - (x * 255).round()).abs() > 1e-3).flatten(1).any(1).float()
        return torch.stack([torch.zeros_like(off), off * self.w + 0 * x.flatten(1).sum(1)], 1)  # grads: zero


def test_single_attribute_and_attack_successes_are_judged_on_the_stored_images():
    from poison.augment import attack_dataset, single_attribute_rates

    cfg = AugmentConfig(attack=dataclasses.replace(AugmentConfig().attack, attributes=("brightness",), eps=0.0),
                        batch_size=4)
    x = torch.full((6, 1, 8, 8), 100, dtype=torch.uint8)
    y = torch.zeros(6, dtype=torch.long)
    model = _FractionDetector().eval()
    # a brightness change off the grid fools the model on float images, never once stored as uint8
    assert single_attribute_rates(model, x, y, cfg, 2, 0, torch.device("cpu")) == {"brightness": 0.0}
    res = attack_dataset(model, x, y, cfg, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert not res["success"].any() and not res["already"].any()
    # images the model already gets wrong count as successes, and are marked as such
    res = attack_dataset(model, x, torch.ones(6, dtype=torch.long), cfg, 2, torch.Generator().manual_seed(0),
                         torch.device("cpu"))
    assert res["already"].all() and res["success"].all()


def test_summary_separates_the_images_that_succeed_unattacked(augmented):
    params, _ = augmented
    s = json.loads((Path(params.paths.reports) / "augment" / "summary.json").read_text())
    n = read_manifest(params.paths.clean)["splits"]["test"]["samples"]
    # untargeted: succeeding unattacked = the victim's clean test errors
    assert abs(s["already_successful_test"] - (1 - s["victim_clean_test_accuracy"])) < 0.5 / n
    assert 0 <= s["adversarial_success_rate_test_attacked"] <= 1
    assert s["device"] == str(torch.device("cpu"))  # the tests' params pin the cpu


def test_success_rates_split_the_test_images_by_their_state_before_the_attack():
    from poison.augment import success_rates

    t = torch.tensor
    train = {"success": t([True, False, True, True])}
    #            already:  yes    yes    no     no     no
    test = {"success": t([True, False, True, False, False]), "already": t([True, True, False, False, False])}
    r = success_rates(train, test, targeted=False)
    assert r["adversarial_success_rate_train"] == 0.75
    assert r["adversarial_success_rate_test"] == pytest.approx(2 / 5)
    assert r["already_successful_test"] == pytest.approx(2 / 5)
    assert r["adversarial_success_rate_test_attacked"] == pytest.approx(1 / 3)  # of the three not already wrong
    assert r["victim_accuracy_under_sia_test"] == pytest.approx(3 / 5)
    assert success_rates(train, test, targeted=True)["victim_accuracy_under_sia_test"] is None
    # nothing to count: None, never NaN (summary.json must stay valid JSON)
    empty = {"success": t([], dtype=torch.bool), "already": t([], dtype=torch.bool)}
    r = success_rates(empty, empty, targeted=False)
    assert all(v is None for v in r.values())
    every = {"success": t([True, True]), "already": t([True, True])}
    assert success_rates(train, every, targeted=False)["adversarial_success_rate_test_attacked"] is None
