"""poison.defenses: cheap training-data defenses, and benchmarks/defenses.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from poison.defenses import apply_defense, grayscale, jpeg, parse_defense, posterize


def _images(n=6, c=1, size=16, seed=0):
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_posterize_keeps_the_most_significant_bits():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert posterize(x, 1).unique().tolist() == [0, 128]
    assert posterize(x, 2).unique().tolist() == [0, 64, 128, 192]
    assert torch.equal(posterize(x, 8), x)
    # an eps-0.3 poison (|delta| <= 76/255) on a binary image: thresholding at 128 undoes it
    binary = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).to(torch.uint8) * 255
    delta = torch.randint(-76, 77, binary.shape, generator=torch.Generator().manual_seed(2))
    poisoned = (binary.int() + delta).clamp(0, 255).to(torch.uint8)
    assert torch.equal(posterize(poisoned, 1), posterize(binary, 1))


def test_jpeg_changes_images_less_at_higher_quality_and_keeps_shape_and_dtype():
    x = _images()
    low, high = jpeg(x, 10), jpeg(x, 95)
    assert low.shape == x.shape and low.dtype == torch.uint8
    err = [(y.float() - x.float()).abs().mean().item() for y in (low, high)]
    assert err[0] > err[1] > 0
    colour = _images(c=3)
    assert jpeg(colour, 10).shape == colour.shape and 0 < (jpeg(colour, 10).float() - colour.float()).abs().mean() < 80
    assert jpeg(colour[:, :, ::2, ::2], 50).shape == (6, 3, 8, 8)  # a strided view is fine
    smooth = torch.full((2, 3, 16, 16), 120, dtype=torch.uint8)  # a flat image survives any quality
    assert (jpeg(smooth, 10).int() - 120).abs().max() <= 2
    assert jpeg(x[:0], 10).shape == (0, 1, 16, 16)


def test_grayscale_uses_luma_on_colour_and_leaves_one_channel_alone():
    x = _images(c=3)
    g = grayscale(x)
    assert g.shape == x.shape and torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    red = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red[:, 0] = 255
    assert grayscale(red).unique().tolist() == [76]  # 0.299 * 255
    one = _images(c=1)
    assert torch.equal(grayscale(one), one)


@pytest.mark.parametrize("spec, expected", [("jpeg:10", ("jpeg", 10)), ("posterize:2", ("posterize", 2)),
                                            ("grayscale", ("grayscale", None))])
def test_parse_defense(spec, expected):
    assert parse_defense(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("median:3", r"--defenses: unknown defense 'median:3'; expected one of jpeg:N .*posterize:N .*grayscale"),
    ("jpeg", r"jpeg needs an integer argument in 1..100, got 'jpeg'; write e.g. jpeg:10"),
    ("jpeg:101", r"jpeg takes 1..100, got 101"),
    ("posterize:0", r"posterize takes 1..8, got 0"),
    ("grayscale:2", r"grayscale takes no argument"),
    ("grayscale:", r"grayscale takes no argument"),
    ("jpeg:010", r"write 'jpeg:010' as jpeg:10"),  # one spelling: it names a metrics section and a cache key
    ("jpeg:+10", r"jpeg needs an integer argument"),
])
def test_a_bad_defense_names_the_setting_and_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        apply_defense(spec, _images(), key="--defenses")


def test_defenses_refuse_images_not_as_stored():
    with pytest.raises(ValueError, match=r"images: expected an \(N, C, H, W\) uint8 tensor"):
        posterize(_images().float() / 255, 2)
    with pytest.raises(ValueError, match="uint8 tensor with C 1 or 3"):
        jpeg(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), 10)


def test_the_benchmark_refuses_a_bad_defense_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/defenses.py", "--clean", str(tmp_path / "missing"),
                           "--defenses", "none", "jpeg:0", "--out", str(tmp_path / "out.json")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "--defenses: jpeg takes 1..100, got 0" in proc.stderr
    assert not (tmp_path / "out.json").exists()


def test_the_benchmark_scores_a_poison_with_and_without_a_defense(clean_dataset, poisoned_dataset, tmp_path):
    clean, poisoned = clean_dataset, poisoned_dataset
    out = tmp_path / "defenses.json"
    proc = subprocess.run([sys.executable, "benchmarks/defenses.py", "--clean", str(clean), "--poisoned", str(poisoned),
                           "--defenses", "none", "posterize:1", "--recipes", "A", "--seeds", "0", "--split", "val",
                           "--threads", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["defense"], r["dataset"]) for r in rows] == [("none", "clean"), ("none", "poisoned"),
                                                            ("posterize:1", "clean"), ("posterize:1", "poisoned")]
    assert rows[0]["mean_abs_change"] == 0 and rows[3]["mean_abs_change"] > 0
    assert all(0 <= r["accuracy_mean"] <= 1 for r in rows)
    assert "| posterize:1 | poisoned |" in proc.stdout


# ------------------------------------------------------------- evaluate.defenses: the evaluate stage, flow, report, card
@pytest.fixture(scope="module")
def defended(session_params, poisoned_dataset, tmp_path_factory):
    """One evaluate run with a defense, its reports in a folder of this module; what each cell trained on."""
    import dataclasses

    from poison import stages

    reports = tmp_path_factory.mktemp("defended") / "reports"
    params = dataclasses.replace(
        session_params, paths=dataclasses.replace(session_params.paths, reports=str(reports)),
        evaluate=dataclasses.replace(session_params.evaluate, defenses=("posterize:1",)))
    seen, real = [], stages.train_and_test

    def spy(x, y, *args, **kwargs):
        seen.append(x.clone())
        return real(x, y, *args, **kwargs)

    stages.train_and_test, saved = spy, stages.train_and_test
    try:
        result = stages.evaluate(params)
    finally:
        stages.train_and_test = saved
    return {"params": params, "result": result, "seen": seen,
            "metrics": json.loads((reports / "evaluate" / "metrics.json").read_text())}


def test_evaluate_trains_on_defended_training_data_and_keeps_the_undefended_figures(defended, session_params):
    from poison import stages
    from poison.shards import load_split

    params, metrics = defended["params"], defended["metrics"]
    plan = stages.evaluate_plan(params)
    assert [(c["dataset"], c.get("defense")) for c in plan["cells"]] == [
        ("clean", None), ("poisoned", None), ("clean", "posterize:1"), ("poisoned", "posterize:1")]
    x_clean = load_split(params.paths.clean, "train")[0]
    x_poisoned = load_split(params.paths.poisoned, "train")[0]
    assert [torch.equal(x, want) for x, want in zip(defended["seen"], [
        x_clean, x_poisoned, posterize(x_clean, 1), posterize(x_poisoned, 1)])] == [True] * 4
    arch = params.evaluate.archs[0]
    section = metrics["defenses"]["posterize:1"]
    assert set(section) == {"clean", "poisoned"} and set(section["poisoned"][arch]) >= {
        "accuracy_mean", "accuracy_min", "accuracy_max", "runs"}
    assert [set(r) & {"dataset", "arch", "defense"} for r in section["poisoned"][arch]["runs"]] == [set()]
    assert defended["result"][arch]["poisoned under posterize:1"] == section["poisoned"][arch]["accuracy_mean"]
    # the undefended cells are the ones a run without defenses trains: the same records
    plain_plan = stages.evaluate_plan(session_params)
    plain = [stages.evaluate_cell(session_params, plain_plan, cell) for cell in plain_plan["cells"]]
    for kind in ("clean", "poisoned"):
        assert metrics[kind][arch]["runs"] == [{k: v for k, v in r.items() if k not in ("dataset", "arch")}
                                               for r in plain if r["dataset"] == kind]


def test_the_report_and_the_card_show_the_defended_figures(defended, session_params, augmented_dataset):
    import shutil
    from pathlib import Path

    from poison.publish import card_metrics
    from poison.report import build_report

    params = defended["params"]
    reports = Path(params.paths.reports)
    for stage in ("train_generator", "augment"):
        if not (reports / stage).exists():
            shutil.copytree(Path(session_params.paths.reports) / stage, reports / stage)
    build_report(params)
    page = (reports / "report" / "report.md").read_text()
    assert "Under cheap training-data defenses" in page and f"| `posterize:1` | `{params.evaluate.archs[0]}` |" in page
    card = card_metrics(defended["metrics"], params.paths.poisoned)
    assert set(card["clean_test_accuracy_under_defenses"]["posterize:1"]) == {"clean", "poisoned"}


def test_the_evaluate_flow_runs_the_defended_cells_like_the_stage(defended, prefect_harness, tmp_path):
    import dataclasses

    import yaml

    from flows.evaluate import evaluate
    from poison.config import to_dict

    params = defended["params"]
    params = dataclasses.replace(params, paths=dataclasses.replace(params.paths, reports=str(tmp_path / "reports")))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    result = evaluate(params_path=str(tmp_path / "params.yaml"))
    assert result == defended["result"]
    metrics = json.loads((tmp_path / "reports" / "evaluate" / "metrics.json").read_text())
    assert metrics["defenses"] == defended["metrics"]["defenses"]


def test_a_bad_defense_in_params_names_the_key(tmp_path):
    import yaml

    from conftest import tiny_params_dict
    from poison.config import load_params
    from poison.errors import ConfigError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(tmp_path, evaluate={"defenses": ["posterize:2", "jpeg:0"]})))
    with pytest.raises(ConfigError, match=r"evaluate.defenses\[1\]: jpeg takes 1..100, got 0"):
        load_params(path)
    path.write_text(yaml.safe_dump(tiny_params_dict(tmp_path, evaluate={"defenses": ["grayscale", "grayscale"]})))
    with pytest.raises(ConfigError, match=r"evaluate.defenses: expected no repeats"):
        load_params(path)


def test_a_defended_cell_has_its_own_cache_key(prefect_env, tmp_path):
    from conftest import tiny_params
    from flows.evaluate import cell_key

    params = tiny_params(tmp_path)
    plan = {"manifest_sha256": {"clean": "a" * 64, "poisoned": "b" * 64}}
    cell = {"dataset": "poisoned", "arch": "test_cnn", "seed": 0}
    keys = {cell_key(None, {"params": params, "plan": plan, "cell": {**cell, **extra}})
            for extra in ({}, {"defense": "jpeg:10"}, {"defense": "posterize:1"})}
    assert len(keys) == 3


def test_the_report_refuses_a_malformed_defenses_section(defended, session_params):
    import shutil
    from pathlib import Path

    from poison.report import ReportError, build_report

    params = defended["params"]
    reports = Path(params.paths.reports)
    for stage in ("train_generator", "augment"):
        if not (reports / stage).exists():
            shutil.copytree(Path(session_params.paths.reports) / stage, reports / stage)
    path = reports / "evaluate" / "metrics.json"
    good = path.read_text()
    try:
        for bad, message in ((["jpeg:10"], r"defenses: expected an object .* got list; rerun the evaluate stage"),
                             ({"posterize:1": {"clean": {}}},
                              r"defenses.posterize:1.clean: expected the accuracy_mean of every classifier")):
            path.write_text(json.dumps({**json.loads(good), "defenses": bad}))
            with pytest.raises(ReportError, match=message):
                build_report(params)
    finally:
        path.write_text(good)


def test_only_the_evaluate_stage_depends_on_the_defenses():
    # toggling evaluate.defenses must not retrain the variants' generators
    from conftest import pipeline_stages

    stages = pipeline_stages()
    for name, spec in stages.items():
        params = spec.get("params", [])
        if name == "evaluate":
            assert "evaluate" in params
        else:
            assert "evaluate" not in params and "evaluate.defenses" not in params, name
