"""poison/report/ (core.py, render.py, inputs.py): the report stage's one page (Markdown + HTML) of the core
pipeline's outputs; the variants pipeline's page is in test_variants_report.py."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import latest_artifact
from poison import stages
from poison.config import to_dict
from poison.report import ReportError, build_report, render_html, render_markdown
from poison.report import render as rep_render
from poison.shards import read_manifest


@pytest.fixture(scope="module")
def evaluated_reports(session_params, poisoned_dataset, augmented_dataset, tmp_path_factory) -> Path:
    """The session's generator and augment reports, and one evaluate run, in a folder of this module."""
    reports = tmp_path_factory.mktemp("report-inputs") / "reports"
    for stage in ("train_generator", "augment"):
        shutil.copytree(Path(session_params.paths.reports) / stage, reports / stage)
    stages.evaluate(dataclasses.replace(session_params, paths=dataclasses.replace(session_params.paths,
                                                                                  reports=str(reports))))
    return reports


@pytest.fixture()
def params(session_params, evaluated_reports, tmp_path):
    """The session's datasets with a copy of those reports that this test may change."""
    reports = tmp_path / "reports"
    shutil.copytree(evaluated_reports, reports)
    return dataclasses.replace(session_params, paths=dataclasses.replace(session_params.paths, reports=str(reports)))


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _edit_metrics(params, edit) -> None:
    path = Path(params.paths.reports) / "evaluate" / "metrics.json"
    metrics = json.loads(path.read_text())
    edit(metrics)
    path.write_text(json.dumps(metrics))


def _page(params) -> str:
    return (Path(params.paths.reports) / "report" / "report.md").read_text()


def test_report_names_the_hazard_and_shows_every_measured_figure(params):
    result = build_report(params)
    out = Path(params.paths.reports) / "report"
    assert result["path"] == str(out) and sorted(p.name for p in out.iterdir()) == result["files"]
    md = _page(params)
    hazard = read_manifest(params.paths.poisoned)["hazard"]
    assert md.splitlines()[2] == f"> **{hazard}**"  # right under the title
    metrics = json.loads((Path(params.paths.reports) / "evaluate" / "metrics.json").read_text())
    for kind in ("clean", "poisoned"):
        m = metrics[kind]["test_cnn"]
        assert f"{100 * m['accuracy_mean']:.2f}% ({100 * m['accuracy_min']:.2f}%-{100 * m['accuracy_max']:.2f}%)" in md
        per_class = [f"{100 * a:.1f}" if a is not None else "-" for a in m["runs"][0]["per_class_accuracy"]]
        assert f"| `test_cnn` on {kind} | " + " | ".join(per_class) + " |" in md  # one seed: its own values
    summary = json.loads((Path(params.paths.reports) / "train_generator" / "summary.json").read_text())
    assert f"kept: trial {summary['best_trial']} (0-based), chosen on the **validation** split" in md
    augment = json.loads((Path(params.paths.reports) / "augment" / "summary.json").read_text())
    assert f"clean test accuracy {100 * augment['victim_clean_test_accuracy']:.2f}%" in md
    assert (f"({100 * augment['already_successful_test']:.2f}% of the test images succeeded before the attack: "
            "misclassified, or already the target; success on the others: "
            f"{100 * augment['adversarial_success_rate_test_attacked']:.2f}%)") in md
    assert "target rate" not in md.split("## Downstream")[1].split("##")[0]  # untargeted: no such column
    # every image the Markdown links exists, relative to the report folder
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 5 and all((out / link).is_file() for link in links)
    # the HTML stands alone: every image embedded, the hazard in its warning box
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert f'<p class="warn">{hazard}</p>' in page
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the text without figures (the Prefect artifact) is the page less its images and captions
    assert result["summary"] == re.sub(r"\n\n!\[[^\]]*\]\([^)]+\)\n\n\*[^\n]*\*", "", md)


def test_report_bytes_are_the_same_twice(params):
    build_report(params)
    out = Path(params.paths.reports) / "report"
    first = _files(out)
    build_report(params)
    assert _files(out) == first


def test_label_specific_metrics_show_both_target_rates(params):
    def edit(m):
        for kind, rate in (("clean", 0.1), ("poisoned", 0.5)):
            m[kind]["test_cnn"].update(target_rate_mean=rate, target_rate_min=rate / 2, target_rate_max=rate * 1.5)

    _edit_metrics(params, edit)
    build_report(params)
    md = _page(params)
    assert ("| classifier | trained on clean data | trained on the poison | target rate, clean-trained | "
            "target rate, poison-trained |") in md
    assert "| 10.00% (5.00%-15.00%) | 50.00% (25.00%-75.00%) |" in md


def test_several_classifiers_and_a_class_missing_from_a_seed(params):
    confusion = Path(params.paths.reports) / "evaluate" / "confusion"

    def edit(m):
        for kind in ("clean", "poisoned"):
            other = json.loads(json.dumps(m[kind]["test_cnn"]))
            a, b = dict(other["runs"][0]), dict(other["runs"][0])
            a["per_class_accuracy"] = [None] + [0.5] * 9
            b["per_class_accuracy"] = [None, 0.25] + [1.0] * 8
            other["runs"] = [a, b]
            m[kind]["mlp"] = other
            shutil.copy(confusion / f"{kind}_test_cnn.png", confusion / f"{kind}_mlp.png")
        m["poisoned"]["test_cnn"]["runs"][0]["per_class_accuracy"][3] = None

    _edit_metrics(params, edit)
    build_report(params)
    md = _page(params)
    assert "| `mlp` on poisoned | - | 37.5 | 75.0 |" in md  # mean of the seeds; "-" where none defines it
    assert re.search(r"\| `test_cnn` on poisoned \| [\d.]+ \| [\d.]+ \| [\d.]+ \| - \|", md)
    assert "../evaluate/confusion/poisoned_mlp.png" in md


@pytest.mark.parametrize("missing, stage", [("evaluate/metrics.json", "evaluate"),
                                            ("train_generator/summary.json", "train_generator"),
                                            ("augment/diagnosis.png", "augment"),
                                            ("evaluate/confusion/poisoned_test_cnn.png", "evaluate")])
def test_a_missing_input_names_the_file_and_stage_and_keeps_the_previous_report(params, missing, stage):
    build_report(params)
    out = Path(params.paths.reports) / "report"
    before = _files(out)
    (Path(params.paths.reports) / missing).unlink()
    with pytest.raises(ReportError, match=rf"{re.escape(missing)}: missing.*dvc repro (-s -f )?{stage}"):
        build_report(params)
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".report")] == []


@pytest.mark.parametrize("key", ["budget", "datasets", "poisoned"])
def test_metrics_without_a_key_name_it(params, key):
    _edit_metrics(params, lambda m: m.pop(key))
    with pytest.raises(ReportError, match=rf"metrics\.json: no \['{key}'\].*rerun the evaluate stage"):
        build_report(params)
    assert not (Path(params.paths.reports) / "report").exists()


def test_metrics_of_another_poisoned_dataset_are_refused(params):
    _edit_metrics(params, lambda m: m["datasets"]["poisoned"].update(manifest_sha256="0" * 64))
    with pytest.raises(ReportError, match=r"metrics\.json: describes another poisoned dataset.*rerun the evaluate stage"):
        build_report(params)
    assert not (Path(params.paths.reports) / "report").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda curve: {"trial": 0}, r"not a list of trial records"),
    (lambda curve: [r for r in curve if r["val_accuracy"] is None], r"no record of the kept trial \d+"),
    (lambda curve: [dict(r, val_accuracy=None if r["val_accuracy"] is None else r["val_accuracy"] + 0.5)
                    for r in curve], r"no record of the kept trial \d+ .*another run"),
])
def test_a_generator_curve_from_another_run_is_refused(params, edit, message):
    build_report(params)
    out = Path(params.paths.reports) / "report"
    before = _files(out)
    path = Path(params.paths.reports) / "train_generator" / "curve.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ReportError, match=rf"train_generator/curve\.json: {message}.*"
                                          r"dvc repro -s -f train_generator"):
        build_report(params)
    assert _files(out) == before


def test_a_poison_made_by_another_generator_than_the_summary_describes_is_refused(params):
    path = Path(params.paths.reports) / "train_generator" / "summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps(dict(summary, checkpoint_sha256="0" * 64)))  # a later train_generator run's
    with pytest.raises(ReportError, match=r"made by another generator .* than the one .*summary\.json describes "
                                          r"\(000000000000\); rerun the poison stage: `dvc repro -s -f poison`"):
        build_report(params)


def test_an_augmented_set_made_from_another_clean_set_is_refused(params, tmp_path):
    copy = tmp_path / "augmented"
    shutil.copytree(params.paths.augmented, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["manifest_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    other = dataclasses.replace(params, paths=dataclasses.replace(params.paths, augmented=str(copy)))
    with pytest.raises(ReportError, match=r"augmented: made from another clean dataset.*rerun the augment stage"):
        build_report(other)


def test_poisoned_samples_that_do_not_match_the_clean_ones_are_refused(params, monkeypatch):
    import poison.shards as shards  # poison.report imports iter_samples from it when it runs

    original = shards.iter_samples

    def shifted(path, split, verify=True):
        samples = original(path, split, verify)
        if str(path) == str(params.paths.poisoned):
            next(samples)  # the poisoned stream one sample ahead of the clean one
        return samples

    monkeypatch.setattr(shards, "iter_samples", shifted)
    with pytest.raises(ReportError, match=r"training sample 'train_00000001' does not match .*'train_00000000'"):
        build_report(params)


def test_a_failure_while_writing_leaves_the_previous_report_whole(params, monkeypatch):
    build_report(params)
    out = Path(params.paths.reports) / "report"
    before = _files(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rep_render, "render_html", broken)
    with pytest.raises(OSError, match="disk full"):
        build_report(params)
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".report")] == []


def test_renderers_escape_what_they_are_given(tmp_path):
    blocks = [("h", 1, "a <b> title"), ("table", ["x|y"], [["a | b"]]), ("p", "`x<y` and **bold**")]
    md = render_markdown(blocks)
    assert "| x\\|y |" in md and "| a \\| b |" in md  # a pipe in a cell does not split the row
    page = render_html(blocks, tmp_path, "t<")
    assert "<h1>a &lt;b&gt; title</h1>" in page and "<title>t&lt;</title>" in page
    assert "<code>x&lt;y</code> and <strong>bold</strong>" in page and "<td>a | b</td>" in page
    with pytest.raises(ValueError, match="unknown report block 'nope'"):
        render_markdown([("nope",)])


@pytest.mark.slow
def test_report_flow_writes_the_page_and_its_artifact(prefect_harness, params, tmp_path):
    from flows.report import report

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(params)))
    result = report(params_path=str(path))
    assert result == {"path": str(Path(params.paths.reports) / "report"),
                      "files": ["report.html", "report.md", "samples.png"]}

    text = latest_artifact("pipeline-report")
    assert read_manifest(params.paths.poisoned)["hazard"] in text and "![" not in text


def test_an_augment_rate_with_nothing_to_count_shows_a_dash(params):
    path = Path(params.paths.reports) / "augment" / "summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps(summary | {"adversarial_success_rate_test_attacked": None}))  # this test's copy
    build_report(params)
    assert "success on the others: -)" in _page(params)
