"""The pipeline's report: one page, in Markdown and in self-contained HTML, of what the core
pipeline made and what it measured.

The ``report`` stage reads only what the other stages wrote: the datasets' manifests, the
generator's summary and curve, the downstream metrics and confusion matrices, the augment
stage's summary and diagnosis. It computes no new metric (it averages per-class accuracy
over seeds and draws one training image per class: clean, poisoned, perturbation).
It checks what can be checked against the datasets on disk: downstream metrics that describe
another clean or poisoned dataset, and a poisoned or augmented set made from another clean
one, are errors naming the stage to rerun. The generator's summary and curve record no dataset
hash; the curve must be the summary's run (its kept trial with the score the summary quotes), and
the poisoned dataset must name the checkpoint the summary describes (its sha256). The augment
stage's summary is taken as it is.

Output (``<paths.reports>/report/``, replaced as a whole folder, never half-written):
``report.md`` (images linked by relative path), ``report.html`` (images embedded, one file to
send or open anywhere) and ``samples.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from poison.report.inputs import (ReportError, budget as budget_text, check_curve, check_described, check_source,
                                  first_per_class, pct, per_class_means, read_json, read_manifest, rerun, revisions,
                                  samples, spread)
from poison.report.render import Block, render_markdown, sample_grid_png, write_page

__all__ = ["INPUTS", "build_report"]

#: (stage that writes it, path under ``<paths.reports>``) of every report input besides the manifests.
INPUTS = {
    "generator_summary": ("train_generator", "train_generator/summary.json"),
    "generator_curve": ("train_generator", "train_generator/curve.json"),
    "generator_curve_png": ("train_generator", "train_generator/curve.png"),
    "metrics": ("evaluate", "evaluate/metrics.json"),
    "augment_summary": ("augment", "augment/summary.json"),
    "augment_diagnosis_png": ("augment", "augment/diagnosis.png"),
}


# ---------------------------------------------------------------------------- inputs
#: keys the page reads from each JSON input (a file without one is from an older or damaged run)
REQUIRED = {
    "generator_summary": ("best_trial", "best_val_accuracy", "trials", "steps", "train_seconds", "device",
                          "checkpoint_sha256"),
    "metrics": ("datasets", "clean", "poisoned", "budget", "recipe", "seeds", "test_samples"),
    "augment_summary": ("victim", "victim_clean_test_accuracy", "victim_accuracy_under_sia_test",
                        "adversarial_success_rate_train", "adversarial_success_rate_test", "longtail",
                        "single_attribute_success_rate", "already_successful_test",
                        "adversarial_success_rate_test_attacked"),
}


def _inputs(params: Any) -> dict[str, Any]:
    from poison.shards import manifest_sha256

    p = params.paths
    reports = Path(p.reports)
    got: dict[str, Any] = {
        "clean": read_manifest(p.clean, "prepare"),
        "poisoned": read_manifest(p.poisoned, "poison"),
        "augmented": read_manifest(p.augmented, "augment"),
        "sha": {k: manifest_sha256(getattr(p, k)) for k in ("clean", "poisoned", "augmented")},
    }
    for key, (stage, rel) in INPUTS.items():
        if rel.endswith(".json"):
            got[key] = read_json(reports / rel, stage, REQUIRED.get(key, ()))
        elif not (reports / rel).is_file():
            raise ReportError(f"{reports / rel}: missing; run `dvc repro {stage}` (or `poison run --stages {stage}`) "
                              "first")
    check_curve(got["generator_curve"], got["generator_summary"], reports / INPUTS["generator_curve"][1],
                "train_generator")
    made_by = (got["poisoned"].get("source") or {}).get("generator_sha256")
    if made_by != got["generator_summary"]["checkpoint_sha256"]:
        raise ReportError(f"{p.poisoned}: made by another generator (checkpoint sha256 {str(made_by)[:12]}) than the "
                          f"one {reports / INPUTS['generator_summary'][1]} describes "
                          f"({got['generator_summary']['checkpoint_sha256'][:12]}); rerun the poison stage: "
                          f"{rerun('poison')}")
    # The report must describe one run: every input made from the datasets on disk.
    for kind, stage in (("poisoned", "poison"), ("augmented", "augment")):
        check_source(got[kind], getattr(p, kind), got["sha"]["clean"], p.clean, stage, "clean dataset")
    metrics_file = reports / INPUTS["metrics"][1]
    check_described(got["metrics"], metrics_file, {k: got["sha"][k] for k in ("clean", "poisoned")},
                    {"clean": p.clean, "poisoned": p.poisoned}, "evaluate")
    for kind in ("clean", "poisoned"):
        for arch, res in got["metrics"][kind].items():
            if not isinstance(res, dict) or not {"accuracy_mean", "accuracy_min", "accuracy_max", "runs"} <= set(res):
                raise ReportError(f"{metrics_file}: {kind}.{arch} lacks accuracy_mean/min/max or runs; rerun the "
                                  f"evaluate stage: {rerun('evaluate')}")
            png = reports / "evaluate" / "confusion" / f"{kind}_{arch}.png"
            if not png.is_file():
                raise ReportError(f"{png}: missing; rerun the evaluate stage: {rerun('evaluate')}")
    if set(got["metrics"]["clean"]) != set(got["metrics"]["poisoned"]):
        raise ReportError(f"{metrics_file}: the clean and poisoned sections name different classifiers; rerun the "
                          f"evaluate stage: {rerun('evaluate')}")
    defended = got["metrics"].get("defenses", {})
    if not isinstance(defended, dict):
        raise ReportError(f"{metrics_file}: defenses: expected an object (defense -> clean / poisoned -> classifier), "
                          f"got {type(defended).__name__}; rerun the evaluate stage: {rerun('evaluate')}")
    for spec, by_kind in defended.items():
        for kind in ("clean", "poisoned"):
            res = by_kind.get(kind) if isinstance(by_kind, dict) else None
            if not isinstance(res, dict) or set(res) != set(got["metrics"]["poisoned"]) or not all(
                    isinstance(r, dict) and "accuracy_mean" in r for r in res.values()):
                raise ReportError(f"{metrics_file}: defenses.{spec}.{kind}: expected the accuracy_mean of every "
                                  f"classifier of the poisoned section; rerun the evaluate stage: {rerun('evaluate')}")
    return got


# ---------------------------------------------------------------------------- content
def _blocks(params: Any, got: dict[str, Any]) -> list[Block]:
    p = params.paths
    clean, poisoned, augmented = got["clean"], got["poisoned"], got["augmented"]
    gsum, curve, metrics, aug = got["generator_summary"], got["generator_curve"], got["metrics"], got["augment_summary"]
    cfg = poisoned.get("config") or {}
    classes = clean["classes"]
    blocks: list[Block] = [
        ("h", 1, f"Pipeline report: `{poisoned['dataset']}`"),
        ("warn", poisoned.get("hazard") or "POISONED DATA"),
        ("p", f"Written by the `report` stage from the files the other stages wrote (each section names "
              f"them); it computes no new metric. Code revision that made the datasets: "
              f"{revisions(poisoned, augmented)}."),
        ("h", 2, "Datasets"),
        ("table", ["dataset", "kind", "method", "samples", "budget", "path", "manifest sha256"],
         [[f"`{m['dataset']}`", m["kind"], m.get("method") or "-", samples(m), budget_text(m), f"`{path}`",
           f"`{got['sha'][key][:12]}`"]
          for key, m, path in (("clean", clean, p.clean), ("poisoned", poisoned, p.poisoned),
                               ("augmented", augmented, p.augmented))]),
        ("p", f"`{augmented['dataset']}`: {augmented.get('hazard') or 'no hazard line in its manifest'}"),
        ("img", "samples.png", "One training image per class: clean, poisoned, and the perturbation "
                               "(grey = no change, scaled to its largest change)"),
    ]
    # generator
    target = cfg.get("target", "untargeted")
    tm = cfg.get("target_map")
    goal = "untargeted (any wrong class)" if target == "untargeted" else (
        f"{target}, target map {tm}" if tm is not None else target)
    restarts = gsum.get("restarts", 1)
    kept_run = gsum.get("best_restart", 0)
    scored = [r for r in curve if r.get("val_accuracy") is not None and r.get("restart", 0) == kept_run]
    effort = (f"{gsum['trials']} trials, {gsum['steps']} generator steps" if restarts == 1
              else f"{restarts} runs of {gsum['trials']} trials each, the best kept")
    blocks += [
        ("h", 2, "Generator (`train_generator`)"),
        ("ul", [
            f"DeepConfuse, {goal}; generator `{cfg.get('generator')}` against surrogate `{cfg.get('surrogate')}`, "
            f"objective `{cfg.get('objective')}`"
            + (f", loss `{cfg.get('untargeted_loss')}`" if target == "untargeted" else ""),
            f"{effort}; {gsum['train_seconds']} s of training on {gsum['device']}",
            f"kept: trial {gsum['best_trial']} (0-based)" + (f" of run {kept_run}" if restarts > 1 else "")
            + ", chosen on the **validation** split: a victim trained on its stored poison scores "
            f"{pct(gsum.get('best_val_accuracy'), 1)} clean val accuracy"
            + (f", target rate {pct(gsum['best_val_target_rate'], 1)}" if gsum.get("best_val_target_rate") is not None
               else "") + f" ({len(scored)} trials of that run scored)",
            f"files: `{p.reports}/train_generator/summary.json`, `curve.json`; checkpoint `{p.generator}`",
        ]),
        ("img", "../train_generator/curve.png", "Validation victim's clean accuracy on each scored trial's poison"),
    ]
    # evaluate
    recipe, budget = metrics["recipe"], metrics["budget"]
    archs = list(metrics["poisoned"])
    targeted = any(metrics[k][a].get("target_rate_mean") is not None for k in ("clean", "poisoned") for a in archs)
    header = ["classifier", "trained on clean data", "trained on the poison"] + (
        ["target rate, clean-trained", "target rate, poison-trained"] if targeted else [])
    rows = []
    for arch in archs:
        row = [f"`{arch}`", spread(metrics["clean"][arch], "accuracy"), spread(metrics["poisoned"][arch], "accuracy")]
        if targeted:
            row += [spread(metrics["clean"][arch], "target_rate"), spread(metrics["poisoned"][arch], "target_rate")]
        rows.append(row)
    per_class = [[f"`{arch}` on {kind}"]
                 + per_class_means(metrics[kind][arch]["runs"], "per_class_accuracy", len(classes))
                 for kind in ("clean", "poisoned") for arch in archs]
    if budget.get("max_linf_stored") is None or budget.get("eps") is None:
        stored = "Stored perturbation: not recorded in metrics.json."
    else:
        stored = (f"Stored perturbation: largest change {budget['max_linf_stored']:.4f} against eps {budget['eps']}: "
                  + ("**within budget**." if budget.get("within_budget") else "**OVER BUDGET**."))
    blocks += [
        ("h", 2, "Downstream classifiers (`evaluate`)"),
        ("p", f"Each classifier trained from scratch on the dataset's training split "
              f"({recipe.get('optimizer')} lr {recipe.get('lr')}, {recipe.get('epochs')} epochs, batch "
              f"{recipe.get('batch_size')}), seeds {metrics['seeds']}, then tested on the **clean test split** "
              f"({metrics['test_samples']} images). Accuracy: mean over seeds (min-max)."
              + (" Target rate: the share of test images answered with their target class t(y)." if targeted else "")),
        ("table", header, rows),
        *_defense_blocks(metrics, archs, targeted),
        ("p", stored),
        ("p", "Per-class clean test accuracy, % (mean over seeds):"),
        ("table", ["model"] + classes, per_class),
    ]
    for kind in ("clean", "poisoned"):
        for arch in archs:
            blocks.append(("img", f"../evaluate/confusion/{kind}_{arch}.png",
                           f"Confusion matrix of `{arch}` trained on {kind} data (first seed), clean test split"))
    blocks.append(("p", f"File: `{p.reports}/evaluate/metrics.json` (every run, confusion matrices)."))
    # augment
    tail = aug["longtail"] or {}
    blocks += [
        ("h", 2, "Semantic augmentation (`augment`)"),
        ("ul", [
            f"victim `{aug['victim']}` trained on clean data: clean test accuracy "
            f"{pct(aug['victim_clean_test_accuracy'])}, under the semantic attack "
            f"{pct(aug['victim_accuracy_under_sia_test'])}",
            f"attack success: {pct(aug['adversarial_success_rate_train'])} of training images, "
            f"{pct(aug['adversarial_success_rate_test'])} of test images ({pct(aug['already_successful_test'])} "
            "of the test images succeeded before the attack: misclassified, or already the target; success "
            f"on the others: {pct(aug['adversarial_success_rate_test_attacked'])})",
            f"long-tailed split (imbalance {tail.get('imbalance_ratio')}): class counts {tail.get('class_counts')}, "
            f"filled with {tail.get('variants')} attacked variants ({pct(tail.get('variant_success_rate'))} "
            "of them successful attacks)",
            f"file: `{p.reports}/augment/summary.json`, `diagnosis.json`; the `evaluate` stage trains no "
            "classifier on this set",
        ]),
        ("table", ["attribute alone", "success rate"],
         [[f"`{k}`", pct(v, 1)] for k, v in (aug["single_attribute_success_rate"] or {}).items()]),
        ("img", "../augment/diagnosis.png", "Which attributes the successful semantic attacks used"),
    ]
    return blocks


# ---------------------------------------------------------------------------- stage
def _defense_blocks(metrics: dict[str, Any], archs: list[str], targeted: bool) -> list[Block]:
    """The table of ``evaluate.defenses``: each classifier trained on defended training data."""
    defended = metrics.get("defenses") or {}
    if not defended:
        return []
    rows = [[f"`{spec}`", f"`{arch}`", spread(by_kind["clean"][arch], "accuracy"),
             spread(by_kind["poisoned"][arch], "accuracy")]
            + ([spread(by_kind["poisoned"][arch], "target_rate")] if targeted else [])
            for spec, by_kind in defended.items() for arch in archs]
    return [("p", "Under cheap training-data defenses (`evaluate.defenses`, `poison.defenses`): the defender "
                  "transforms every training image, clean or poisoned, before training; test images stay clean. "
                  "A poison that survives keeps the poison-trained accuracy low; the clean-trained column is the "
                  "cost of the defense itself."),
            ("table", ["defense", "classifier", "trained on clean data", "trained on the poison"]
             + (["target rate, poison-trained"] if targeted else []), rows)]


def build_report(params: Any) -> dict[str, Any]:
    """Write ``<paths.reports>/report/`` (report.md, report.html, samples.png); return what was written.

    The folder is built beside its final place and swapped in whole: an interrupted run leaves
    the previous report (or none), never a mix. ``summary`` is the page without its figures.
    """
    got = _inputs(params)
    if got["clean"].get("label_type") == "multi_label":
        raise ReportError(f"{params.paths.clean}: multi-label; the core pipeline's report needs single-label data")
    blocks = _blocks(params, got)
    classes = got["clean"]["classes"]
    poisoned, clean, labels = first_per_class(params.paths.clean, params.paths.poisoned, len(classes), "poison")
    out = Path(params.paths.reports) / "report"
    write_page(out, blocks, f"Pipeline report: {got['poisoned']['dataset']}",
               {"samples.png": sample_grid_png(poisoned, labels, clean, classes, got["poisoned"])})
    return {"path": str(out), "files": ["report.html", "report.md", "samples.png"],
            "summary": render_markdown(blocks, images=False)}
