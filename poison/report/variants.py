"""The variants pipeline's report: one page, in Markdown and in self-contained HTML, of the ordered
top-k poison (ALGORITHMS.md section 2) and the multi-label poison (section 3), ``variants/dvc.yaml``.

The ``variants_report`` stage reads only what the ``topk``, ``compose`` and ``multilabel`` stages
wrote: the four datasets' manifests and each generator stage's ``metrics.json`` and
``curve.json``. It computes no new metric (it quotes the stage's means over seeds, takes min
and max over the seeds' runs, averages per-label F1 over seeds, and draws one training image
per class). It refuses inputs from different runs: a poison made from another clean set than
the one on disk, metrics that describe other datasets, or a curve that is not the one of the
generator the metrics describe, are errors naming the stage to rerun.

Output (``<paths.reports>/variants_report/``, replaced as a whole folder, never half-written):
``report.md``, ``report.html`` (figures embedded), ``topk_samples.png``, ``multilabel_samples.png``,
``topk_curve.png`` and ``multilabel_curve.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from poison.report.inputs import (ReportError, budget, check_curve, check_described, check_source, first_per_class, pct,
                                  per_class_means, read_json, read_manifest, rerun, revisions, samples)
from poison.report.render import Block, curve_png, render_markdown, sample_grid_png, write_page

__all__ = ["VARIANT_INPUTS", "build_variants_report"]

#: (stage that writes it, path under ``<paths.reports>``) of every input besides the manifests.
VARIANT_INPUTS = {
    "topk_metrics": ("topk", "topk/metrics.json"),
    "topk_curve": ("topk", "topk/curve.json"),
    "multilabel_metrics": ("multilabel", "multilabel/metrics.json"),
    "multilabel_curve": ("multilabel", "multilabel/curve.json"),
}

#: the downstream metrics each stage records per classifier and seed
METRICS = {
    "topk": ("accuracy", "target_rate", "topk_rate"),
    "multilabel": ("exact_match", "hamming_loss", "macro_f1"),  # + target_rate when label-specific
}

_COMMON = ("generator", "recipe", "seeds", "datasets", "clean", "poisoned")
#: keys each stage's metrics.json must hold
REQUIRED = {"topk": _COMMON + ("k", "target_lists"), "multilabel": _COMMON + ("target", "flip_labels")}
_GENERATOR_KEYS = ("best_trial", "best_restart", "best_val_accuracy", "trials", "steps", "train_seconds", "device")


def _check_metrics(metrics: dict[str, Any], path: Path, stage: str, num_classes: int) -> None:
    """Every classifier of both sections has its means and each run's metrics; the generator summary is whole."""
    fix = f"rerun the {stage} stage: {rerun(stage)}"
    missing = [k for k in _GENERATOR_KEYS if k not in (metrics["generator"] or {})]
    if missing:
        raise ReportError(f"{path}: generator has no {missing}; {fix}")
    if not metrics["clean"] or set(metrics["clean"]) != set(metrics["poisoned"]):
        raise ReportError(f"{path}: the clean and poisoned sections name different (or no) classifiers; {fix}")
    for kind in ("clean", "poisoned"):
        for arch, res in metrics[kind].items():
            runs = res.get("runs") if isinstance(res, dict) else None
            if (not runs or not isinstance(res.get("mean"), dict)
                    or any(not isinstance(r, dict) or any(m not in r for m in METRICS[stage]) for r in runs)):
                raise ReportError(f"{path}: {kind}.{arch} lacks its mean or, for some seed's run, one of "
                                  f"{list(METRICS[stage])}; {fix}")
    if stage == "topk":
        lists, k = metrics["target_lists"], metrics["k"]
        if not isinstance(k, int) or k < 1 or not isinstance(lists, list) or len(lists) != num_classes or any(
                not isinstance(row, list) or len(row) != k or not all(isinstance(t, int) and 0 <= t < num_classes
                                                                      for t in row) for row in lists):
            raise ReportError(f"{path}: target_lists is not {num_classes} lists of k = {k} class indices; {fix}")


def _inputs(params: Any) -> dict[str, Any]:
    from poison.shards import manifest_sha256

    p = params.paths
    reports = Path(p.reports)
    paths = {"clean": p.clean, "topk": p.topk_poisoned, "composites": p.multilabel_clean,
             "multilabel": p.multilabel_poisoned}
    writers = {"clean": "prepare", "topk": "topk", "composites": "compose", "multilabel": "multilabel"}
    got: dict[str, Any] = {k: read_manifest(path, writers[k]) for k, path in paths.items()}
    got["sha"] = {k: manifest_sha256(path) for k, path in paths.items()}
    got["paths"] = paths
    for key, (stage, rel) in VARIANT_INPUTS.items():
        got[key] = read_json(reports / rel, stage, REQUIRED[stage] if key.endswith("metrics") else ())
    # one run: each poison made from the clean set on disk, each metrics file about those datasets
    check_source(got["topk"], p.topk_poisoned, got["sha"]["clean"], p.clean, "topk", "clean dataset")
    check_source(got["composites"], p.multilabel_clean, got["sha"]["clean"], p.clean, "compose", "clean dataset")
    check_source(got["multilabel"], p.multilabel_poisoned, got["sha"]["composites"], p.multilabel_clean,
                 "multilabel", "multi-label dataset")
    for stage, clean_key in (("topk", "clean"), ("multilabel", "composites")):
        metrics_file = reports / VARIANT_INPUTS[f"{stage}_metrics"][1]
        check_described(got[f"{stage}_metrics"], metrics_file,
                        {"clean": got["sha"][clean_key], "poisoned": got["sha"][stage]},
                        {"clean": paths[clean_key], "poisoned": paths[stage]}, stage)
        _check_metrics(got[f"{stage}_metrics"], metrics_file, stage, len(got[clean_key]["classes"]))
        check_curve(got[f"{stage}_curve"], got[f"{stage}_metrics"]["generator"],
                     reports / VARIANT_INPUTS[f"{stage}_curve"][1], stage)
    if got["composites"].get("label_type") != "multi_label":
        raise ReportError(f"{p.multilabel_clean}: not multi-label; rerun the compose stage: {rerun('compose')}")
    return got


# ---------------------------------------------------------------------------- content
def _over_seeds(res: dict[str, Any], key: str) -> str:
    """The stage's mean over seeds (min-max of the seeds' runs), in %; "-" where the stage has no mean."""
    mean = res["mean"].get(key)
    if mean is None:
        return "-"
    values = [r[key] for r in res["runs"] if r.get(key) is not None]
    return f"{pct(mean)} ({pct(min(values))}-{pct(max(values))})"


def _generator_lines(cfg: dict[str, Any], gsum: dict[str, Any], curve: list[dict[str, Any]], goal: str,
                     scores: str, files: str) -> list[str]:
    kept_run = gsum.get("best_restart", 0)
    scored = [r for r in curve if r.get("val_accuracy") is not None and r.get("restart", 0) == kept_run]
    restarts = gsum.get("restarts", 1)
    effort = (f"{gsum['trials']} trials, {gsum['steps']} generator steps" if restarts == 1
              else f"{restarts} runs of {gsum['trials']} trials each, the best kept")
    return [
        f"DeepConfuse, {goal}; generator `{cfg.get('generator')}` against surrogate `{cfg.get('surrogate')}`, "
        f"objective `{cfg.get('objective')}`",
        f"{effort}; {gsum['train_seconds']} s of training on {gsum['device']}",
        f"kept: trial {gsum['best_trial']} (0-based)" + (f" of run {kept_run}" if restarts > 1 else "")
        + ", chosen on the **validation** split: a victim trained on its stored poison scores "
        + scores.format(accuracy=pct(gsum.get("best_val_accuracy"), 1), rate=pct(gsum.get("best_val_target_rate"), 1))
        + f" ({len(scored)} trials of that run scored)",
        f"files: {files}",
    ]


def _downstream(metrics: dict[str, Any], columns: list[tuple[str, str]]) -> list[Block]:
    """The table of each classifier's metrics, trained on clean data and on the poison."""
    header = ["classifier"] + [f"{label}, {kind}-trained" for key, label in columns for kind in ("clean", "poison")]
    rows = [[f"`{arch}`"] + [_over_seeds(metrics[kind][arch], key)
                             for key, _ in columns for kind in ("clean", "poisoned")]
            for arch in metrics["poisoned"]]
    recipe = metrics["recipe"]
    return [
        ("p", f"Each classifier trained from scratch on the dataset's training split ({recipe.get('optimizer')} lr "
              f"{recipe.get('lr')}, {recipe.get('epochs')} epochs, batch {recipe.get('batch_size')}), seeds "
              f"{metrics['seeds']}, then tested on the **clean test split**. Mean over seeds (min-max), as the stage "
              "recorded it."),
        ("table", header, rows),
    ]


def _blocks(params: Any, got: dict[str, Any]) -> list[Block]:
    p = params.paths
    topk, multi, composites = got["topk"], got["multilabel"], got["composites"]
    tm, mm = got["topk_metrics"], got["multilabel_metrics"]
    classes = got["clean"]["classes"]
    blocks: list[Block] = [
        ("h", 1, f"Variants report: `{topk['dataset']}`, `{multi['dataset']}`"),
        ("warn", topk.get("hazard") or multi.get("hazard") or "POISONED DATA"),
        ("p", "Written by the `variants_report` stage from the files the `topk`, `compose` and `multilabel` "
              f"stages wrote (each section names them); it computes no new metric. Code revision that made the "
              f"datasets: {revisions(topk, composites, multi)}."),
        ("h", 2, "Datasets"),
        ("table", ["dataset", "kind", "labels", "method", "samples", "budget", "path", "manifest sha256"],
         [[f"`{got[k]['dataset']}`", got[k]["kind"], got[k].get("label_type", "-"), got[k].get("method") or "-",
           samples(got[k]), budget(got[k]), f"`{got['paths'][k]}`", f"`{got['sha'][k][:12]}`"]
          for k in ("clean", "topk", "composites", "multilabel")]),
    ]
    # ordered top-k
    k = tm.get("k")
    lists = tm.get("target_lists") or []
    blocks += [
        ("h", 2, f"Ordered top-{k} poison (`topk`)"),
        ("p", f"Each training image of class y is perturbed so that a classifier trained on the set ranks, for a "
              f"clean image of class y, the target list t(y) = (t1, ..., t{k}) as its {k} highest classes, in that "
              "order (ALGORITHMS.md section 2)."),
        ("ul", _generator_lines(topk.get("config") or {}, tm["generator"], got["topk_curve"],
                                f"ordered top-{k}", f"{{accuracy}} val accuracy, ordered top-{k} rate {{rate}}",
                                f"`{p.reports}/topk/metrics.json`, `curve.json`; checkpoint `{p.topk_generator}`")),
        ("table", ["class y"] + [f"t{i + 1}" for i in range(k or 0)],
         [[classes[y]] + [classes[t] for t in row] for y, row in enumerate(lists)]),
        ("img", "topk_curve.png", f"Validation victim's accuracy and ordered top-{k} rate on each scored trial's "
                                  "poison"),
        ("h", 3, "Downstream classifiers"),
        *_downstream(tm, [("accuracy", "accuracy"), ("target_rate", "top-1 = t1"),
                          ("topk_rate", f"ordered top-{k} = t(y)")]),
        ("p", "Accuracy: the share of test images classified as their true class. Top-1 = t1: the share whose "
              f"highest class is t1(y). Ordered top-{k}: the share whose {k} highest classes are exactly t(y), in "
              "order (the poison's goal)."),
        ("img", "topk_samples.png", "One training image per class: clean, poisoned, and the perturbation "
                                    "(grey = no change, scaled to its largest change)"),
    ]
    # multi-label
    ccfg = composites.get("config") or {}
    labels = composites["classes"]
    flip = mm["flip_labels"]
    goal = ("untargeted (any wrong label vector)" if not flip else
            f"label-specific: flip label(s) {', '.join(labels[i] for i in flip)} (present -> absent, absent -> "
            "present), keep every other label")
    per_label = [[f"`{arch}` on {kind}"] + per_class_means(mm[kind][arch]["runs"], "per_label_f1", len(labels))
                 for kind in ("clean", "poisoned") for arch in mm["poisoned"]]
    blocks += [
        ("h", 2, "Multi-label poison (`compose`, `multilabel`)"),
        ("p", f"`{composites['dataset']}`: {ccfg.get('grid')}x{ccfg.get('grid')} grids of digits from "
              f"`{got['clean']['dataset']}` (each cell left blank with probability {ccfg.get('empty')}, at least one "
              "digit per image); an image's labels are the digits it shows (ALGORITHMS.md section 3)."),
        ("ul", _generator_lines(multi.get("config") or {}, mm["generator"], got["multilabel_curve"], goal,
                                "{accuracy} val exact match" + (", goal-vector rate {rate}" if flip else ""),
                                f"`{p.reports}/multilabel/metrics.json`, `curve.json`; checkpoint "
                                f"`{p.multilabel_generator}`")),
        ("img", "multilabel_curve.png", "Validation victim's exact match" + (" and goal-vector rate" if flip else "")
         + " on each scored trial's poison"),
        ("h", 3, "Downstream classifiers"),
        *_downstream(mm, [("exact_match", "exact match"), ("hamming_loss", "Hamming loss"),
                          ("macro_f1", "macro F1")] + ([("target_rate", "goal-vector rate")] if flip else [])),
        ("p", "Exact match: the share of test images whose predicted label vector (logit > 0) is exactly right. "
              "Hamming loss: the share of wrong labels. Macro F1: the mean over labels of each label's F1."
              + (" Goal-vector rate: the share whose predicted vector is exactly the goal (chosen labels flipped, "
                 "every other label kept)." if flip else "")),
        ("p", "Per-label F1, % (mean over seeds):"),
        ("table", ["model"] + labels, per_label),
        ("img", "multilabel_samples.png", "For each label, the first training image carrying it: clean, poisoned, "
                                          "and the perturbation (grey = no change, scaled to its largest change)"),
    ]
    return blocks


# ---------------------------------------------------------------------------- stage
def build_variants_report(params: Any) -> dict[str, Any]:
    """Write ``<paths.reports>/variants_report/``; return what was written (``summary``: the page, no figures).

    The folder is built beside its final place and swapped in whole: an interrupted run leaves
    the previous report (or none), never a mix.
    """
    got = _inputs(params)
    p = params.paths
    blocks = _blocks(params, got)
    k = got["topk_metrics"]["k"]
    figures = {"topk_curve.png": curve_png(got["topk_curve"], "clean val accuracy", f"ordered top-{k} rate"),
               "multilabel_curve.png": curve_png(got["multilabel_curve"], "val exact match", "goal-vector rate")}
    for name, clean_key, stage, clean_path, poisoned_path in (
            ("topk", "clean", "topk", p.clean, p.topk_poisoned),
            ("multilabel", "composites", "multilabel", p.multilabel_clean, p.multilabel_poisoned)):
        classes = got[clean_key]["classes"]
        poisoned, clean, labels = first_per_class(clean_path, poisoned_path, len(classes), stage)
        figures[f"{name}_samples.png"] = sample_grid_png(poisoned, labels, clean, classes, got[name])
    out = Path(p.reports) / "variants_report"
    write_page(out, blocks, f"Variants report: {got['topk']['dataset']}, {got['multilabel']['dataset']}", figures)
    return {"path": str(out), "files": sorted(["report.html", "report.md", *figures]),
            "summary": render_markdown(blocks, images=False)}
