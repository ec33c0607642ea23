"""poison/report.py: the report stage's one page (Markdown + HTML) of the core pipeline's outputs."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from poison import report as rep
from poison import stages
from poison.report import ReportError, build_report, render_html, render_markdown
from poison.shards import read_manifest


@pytest.fixture()
def params(session_params, poisoned_dataset, augmented_dataset, tmp_path):
    """The session's datasets with a reports folder of this test's own (generator reports copied,
    evaluate run into it)."""
    reports = tmp_path / "reports"
    for stage in ("train_generator", "augment"):
        shutil.copytree(Path(session_params.paths.reports) / stage, reports / stage)
    p = dataclasses.replace(session_params, paths=dataclasses.replace(session_params.paths, reports=str(reports)))
    stages.evaluate(p)
    return p


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_report_names_the_hazard_and_shows_every_measured_figure(params):
    result = build_report(params)
    out = Path(params.paths.reports) / "report"
    assert result["path"] == str(out) and sorted(p.name for p in out.iterdir()) == sorted(result["files"])
    md = (out / "report.md").read_text()
    hazard = read_manifest(params.paths.poisoned)["hazard"]
    assert md.splitlines()[2] == f"> **{hazard}**"  # right under the title
    metrics = json.loads((Path(params.paths.reports) / "evaluate" / "metrics.json").read_text())
    for kind in ("clean", "poisoned"):
        assert f"{100 * metrics[kind]['test_cnn']['accuracy_mean']:.2f}%" in md
    summary = json.loads((Path(params.paths.reports) / "train_generator" / "summary.json").read_text())
    assert f"trial {summary['best_trial']} (0-based)" in md
    augment = json.loads((Path(params.paths.reports) / "augment" / "summary.json").read_text())
    assert f"{100 * augment['victim_clean_test_accuracy']:.2f}%" in md
    # every image the Markdown links exists, relative to the report folder
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 5 and all((out / link).is_file() for link in links)
    # the HTML stands alone: the same images embedded, nothing fetched, the hazard in its warning box
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5 and "src=\"http" not in page and "../" not in page
    assert f'<p class="warn">{hazard}</p>' in page
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_bytes_are_the_same_twice(params):
    build_report(params)
    out = Path(params.paths.reports) / "report"
    first = _files(out)
    build_report(params)
    assert _files(out) == first


def test_label_specific_metrics_get_a_target_rate_column(params):
    path = Path(params.paths.reports) / "evaluate" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["poisoned"]["test_cnn"].update(target_rate_mean=0.5, target_rate_min=0.25, target_rate_max=0.75)
    path.write_text(json.dumps(metrics))
    build_report(params)
    md = (Path(params.paths.reports) / "report" / "report.md").read_text()
    assert "| classifier | trained on clean data | trained on the poison | target rate |" in md
    assert "50.00% (25.00%-75.00%) |" in md


@pytest.mark.parametrize("missing, stage", [("evaluate/metrics.json", "evaluate"),
                                            ("train_generator/summary.json", "train_generator"),
                                            ("augment/diagnosis.png", "augment")])
def test_a_missing_input_names_the_file_and_stage_and_keeps_the_previous_report(params, missing, stage):
    build_report(params)
    out = Path(params.paths.reports) / "report"
    before = _files(out)
    (Path(params.paths.reports) / missing).unlink()
    with pytest.raises(ReportError, match=rf"{re.escape(missing)}: missing.*dvc repro {stage}"):
        build_report(params)
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".report")] == []


def test_metrics_of_another_poisoned_dataset_are_refused(params):
    path = Path(params.paths.reports) / "evaluate" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["datasets"]["poisoned"]["manifest_sha256"] = "0" * 64
    path.write_text(json.dumps(metrics))
    with pytest.raises(ReportError, match=r"metrics\.json: describes another poisoned dataset.*rerun the evaluate stage"):
        build_report(params)
    assert not (Path(params.paths.reports) / "report").exists()


def test_a_failure_while_writing_leaves_the_previous_report_whole(params, monkeypatch):
    build_report(params)
    out = Path(params.paths.reports) / "report"
    before = _files(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rep, "render_html", broken)
    with pytest.raises(OSError, match="disk full"):
        build_report(params)
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".report")] == []


def test_renderers_escape_what_they_are_given(tmp_path):
    blocks = [("h", 1, "a <b> title"), ("table", ["x"], [["a | b"]]), ("p", "`x<y` and **bold**")]
    md = render_markdown(blocks)
    assert "| a \\| b |" in md  # a pipe in a cell does not split the row
    page = render_html(blocks, tmp_path, "t<")
    assert "<h1>a &lt;b&gt; title</h1>" in page and "<title>t&lt;</title>" in page
    assert "<code>x&lt;y</code> and <strong>bold</strong>" in page and "<td>a | b</td>" in page
    with pytest.raises(ValueError, match="unknown report block 'nope'"):
        render_markdown([("nope",)])
