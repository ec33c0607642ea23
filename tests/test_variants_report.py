"""poison/report/variants.py: the variants_report stage's page of the top-k and multi-label poisons."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import latest_artifact
from poison import stages
from poison.config import to_dict
from poison.report import VARIANT_INPUTS, ReportError, build_variants_report
from poison.report import render as rep_render
from poison.shards import read_manifest

FILES = ["multilabel_curve.png", "multilabel_samples.png", "report.html", "report.md", "topk_curve.png",
         "topk_samples.png"]


@pytest.fixture()
def params(session_params, variant_datasets, tmp_path):
    """The session's variant datasets with a copy of their reports that this test may change."""
    reports = tmp_path / "reports"
    for stage in ("topk", "multilabel"):
        shutil.copytree(Path(session_params.paths.reports) / stage, reports / stage)
    return dataclasses.replace(session_params, paths=dataclasses.replace(session_params.paths, reports=str(reports)))


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _metrics(params, stage: str) -> dict:
    return json.loads((Path(params.paths.reports) / stage / "metrics.json").read_text())


def _edit(params, stage: str, edit) -> None:
    path = Path(params.paths.reports) / stage / "metrics.json"
    metrics = json.loads(path.read_text())
    edit(metrics)
    path.write_text(json.dumps(metrics))


def _page(params) -> str:
    return (Path(params.paths.reports) / "variants_report" / "report.md").read_text()


def _spread(values: list[float]) -> str:
    return f"{100 * sum(values) / len(values):.2f}% ({100 * min(values):.2f}%-{100 * max(values):.2f}%)"


def test_page_names_the_hazard_and_shows_every_measured_figure(params):
    result = build_variants_report(params)
    out = Path(params.paths.reports) / "variants_report"
    assert result["path"] == str(out) and result["files"] == FILES == sorted(p.name for p in out.iterdir())
    md = _page(params)
    assert md.splitlines()[2] == f"> **{read_manifest(params.paths.topk_poisoned)['hazard']}**"
    topk, multi = _metrics(params, "topk"), _metrics(params, "multilabel")
    # every downstream figure, mean (min-max) over the seeds' runs, in the stage's column order
    row = [_spread([r[key] for r in topk[kind]["test_cnn"]["runs"]])
           for key in ("accuracy", "target_rate", "topk_rate") for kind in ("clean", "poisoned")]
    assert "| `test_cnn` | " + " | ".join(row) + " |" in md
    row = [_spread([r[key] for r in multi[kind]["test_cnn"]["runs"]])
           for key in ("exact_match", "hamming_loss", "macro_f1", "target_rate") for kind in ("clean", "poisoned")]
    assert "| `test_cnn` | " + " | ".join(row) + " |" in md
    f1 = [f"{100 * v:.1f}" if v is not None else "-" for v in multi["poisoned"]["test_cnn"]["runs"][0]["per_label_f1"]]
    assert "| `test_cnn` on poisoned | " + " | ".join(f1) + " |" in md  # one seed: its own values
    # the target lists, one row per class, and the generators' kept trials
    for y, targets in enumerate(topk["target_lists"]):
        assert f"| {y} | " + " | ".join(str(t) for t in targets) + " |" in md
    assert f"## Ordered top-{topk['k']} poison" in md
    sections = md.split("## Ordered top-")[1].split("## Multi-label poison")
    for section, m, scores in ((sections[0], topk, "val accuracy, ordered top-2 rate"),
                               (sections[1], multi, "val exact match, goal-vector rate")):
        g = m["generator"]
        assert (f"kept: trial {g['best_trial']} (0-based), chosen on the **validation** split: a victim trained on "
                f"its stored poison scores {100 * g['best_val_accuracy']:.1f}% {scores.split(', ')[0]}") in section
        assert scores.split(", ")[1] in section
    assert "flip label(s) 0 (present -> absent" in md  # conftest's multilabel flips label 0
    for key in ("clean", "topk_poisoned", "multilabel_clean", "multilabel_poisoned"):
        assert f"`{getattr(params.paths, key)}`" in md
    # every image the Markdown links is in the folder; the HTML embeds them all
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == [f for f in FILES if f.endswith(".png")]
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "POISONED DATA" in page.split('<p class="warn">')[1].split("</p>")[0]


def test_page_bytes_are_the_same_twice(params):
    build_variants_report(params)
    out = Path(params.paths.reports) / "variants_report"
    first = _files(out)
    build_variants_report(params)
    assert _files(out) == first


def test_an_untargeted_multilabel_poison_has_no_goal_column(params):
    def edit(m):
        m["flip_labels"] = None
        for kind in ("clean", "poisoned"):
            for run in m[kind]["test_cnn"]["runs"]:
                run.pop("target_rate")

    _edit(params, "multilabel", edit)
    build_variants_report(params)
    md = _page(params)
    assert "untargeted (any wrong label vector)" in md
    section = md.split("## Multi-label poison")[1]
    assert "goal" not in section and "| macro F1, poison-trained |" in section


@pytest.mark.parametrize("stage, rel", sorted(VARIANT_INPUTS.values()))
def test_a_missing_input_names_the_file_and_stage_and_keeps_the_previous_page(params, stage, rel):
    build_variants_report(params)
    out = Path(params.paths.reports) / "variants_report"
    before = _files(out)
    (Path(params.paths.reports) / rel).unlink()
    with pytest.raises(ReportError, match=rf"{re.escape(rel)}: missing.*`dvc repro variants/dvc\.yaml:{stage}`"):
        build_variants_report(params)
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".variants_report")] == []


def test_a_missing_dataset_names_the_stage_that_writes_it(params, tmp_path):
    other = dataclasses.replace(params, paths=dataclasses.replace(params.paths,
                                                                  multilabel_clean=str(tmp_path / "nowhere")))
    with pytest.raises(ReportError, match=r"nowhere: no dataset \(manifest.json missing\); run `dvc repro variants/dvc\.yaml:compose`"):
        build_variants_report(other)


@pytest.mark.parametrize("stage", ["topk", "multilabel"])
def test_metrics_of_another_poisoned_dataset_are_refused(params, stage):
    _edit(params, stage, lambda m: m["datasets"]["poisoned"].update(manifest_sha256="0" * 64))
    with pytest.raises(ReportError, match=rf"{stage}/metrics\.json: describes another poisoned dataset.*"
                                          rf"rerun the {stage} stage: `dvc repro -s -f variants/dvc\.yaml:{stage}`"):
        build_variants_report(params)
    assert not (Path(params.paths.reports) / "variants_report").exists()


@pytest.mark.parametrize("key, message", [
    ("multilabel_poisoned", r"made from another multi-label dataset than .*rerun the multilabel stage"),
    ("topk_poisoned", r"made from another clean dataset than .*rerun the topk stage"),
    ("multilabel_clean", r"made from another clean dataset than .*rerun the compose stage"),
])
def test_a_dataset_made_from_another_source_is_refused(params, tmp_path, key, message):
    copy = tmp_path / key
    shutil.copytree(getattr(params.paths, key), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["manifest_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    other = dataclasses.replace(params, paths=dataclasses.replace(params.paths, **{key: str(copy)}))
    with pytest.raises(ReportError, match=rf"{key}: {message}"):
        build_variants_report(other)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("generator"), r"no \['generator'\]"),
    (lambda m: m["generator"].pop("best_trial"), r"generator has no \['best_trial'\]"),
    (lambda m: m["poisoned"]["test_cnn"]["runs"][0].pop("topk_rate"), r"poisoned\.test_cnn lacks"),
    (lambda m: m["clean"]["test_cnn"].pop("mean"), r"clean\.test_cnn lacks its mean"),
    (lambda m: m["poisoned"].pop("test_cnn"), "different \\(or no\\) classifiers"),
    (lambda m: m.pop("k"), r"no \['k'\]"),
    (lambda m: m["target_lists"].pop(), r"target_lists is not 10 lists of k = 2 class indices"),
    (lambda m: m["target_lists"][0].append(0), r"target_lists is not 10 lists"),
])
def test_topk_metrics_without_a_key_name_it(params, edit, message):
    _edit(params, "topk", edit)
    with pytest.raises(ReportError, match=rf"topk/metrics\.json: .*{message}.*rerun the topk stage"):
        build_variants_report(params)


def test_a_curve_that_is_not_trial_records_is_refused(params):
    (Path(params.paths.reports) / "multilabel" / "curve.json").write_text(json.dumps({"trial": 0}))
    with pytest.raises(ReportError, match=r"multilabel/curve\.json: not a list of trial records.*multilabel stage"):
        build_variants_report(params)


def test_a_curve_from_another_run_is_refused(params):
    path = Path(params.paths.reports) / "topk" / "curve.json"
    curve = json.loads(path.read_text())
    for record in curve:
        if record["val_accuracy"] is not None:
            record["val_accuracy"] += 0.01
    path.write_text(json.dumps(curve))
    with pytest.raises(ReportError, match=r"topk/curve\.json: no record of the kept trial \d+ .*another run"):
        build_variants_report(params)


def test_multilabel_samples_cover_every_label_the_training_split_carries(params):
    from poison.report.inputs import first_per_class
    from poison.shards import load_split

    p = params.paths
    poisoned, clean, labels = first_per_class(p.multilabel_clean, p.multilabel_poisoned, 10, "multilabel")
    _, y, _ = load_split(p.multilabel_clean, "train")
    assert labels.ndim == 2 and labels.shape[1] == 10 and poisoned.shape == clean.shape
    assert set(torch.nonzero(labels.sum(0)).flatten().tolist()) == set(torch.nonzero(y.sum(0)).flatten().tolist())
    # each row adds a label the rows before it did not carry
    for i in range(1, len(labels)):
        assert bool(((labels[i] == 1) & (labels[:i].sum(0) == 0)).any())
    x_p, _, _ = load_split(p.multilabel_poisoned, "train")
    first = int(torch.nonzero((y == labels[0]).all(1)).flatten()[0])
    assert torch.equal(poisoned[0], x_p[first])


def test_multilabel_samples_that_do_not_match_the_composites_name_the_stage(params, monkeypatch):
    import poison.shards as shards

    original = shards.iter_samples

    def shifted(path, split, verify=True):
        samples = original(path, split, verify)
        if str(path) == str(params.paths.multilabel_poisoned):
            next(samples)
        return samples

    monkeypatch.setattr(shards, "iter_samples", shifted)
    with pytest.raises(ReportError, match=r"does not match .*rerun the multilabel stage: `dvc repro -s -f "
                                          r"variants/dvc\.yaml:multilabel`"):
        build_variants_report(params)


def test_a_failure_while_writing_leaves_the_previous_page_whole(params, monkeypatch):
    build_variants_report(params)
    out = Path(params.paths.reports) / "variants_report"
    before = _files(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rep_render, "render_html", broken)
    with pytest.raises(OSError, match="disk full"):
        build_variants_report(params)
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".variants_report")] == []


def test_the_stage_returns_where_it_wrote(params):
    assert stages.variants_report(params) == {"path": str(Path(params.paths.reports) / "variants_report"),
                                              "files": FILES}


@pytest.mark.slow
def test_variants_report_flow_writes_the_page_and_its_artifact(prefect_harness, params, tmp_path):
    from flows.variants_report import variants_report

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(params)))
    result = variants_report(params_path=str(path))
    assert result == {"path": str(Path(params.paths.reports) / "variants_report"), "files": FILES}

    text = latest_artifact("variants-report")
    assert read_manifest(params.paths.topk_poisoned)["hazard"] in text and "![" not in text
