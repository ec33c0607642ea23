"""The pipeline's report: one page, in Markdown and in self-contained HTML, of what the core
pipeline made and what it measured.

The ``report`` stage reads only what the other stages wrote: the datasets' manifests, the
generator's summary and curve, the downstream metrics and confusion matrices, the augment
stage's summary and diagnosis. It computes no new metric (it averages per-class accuracy
over seeds and draws one training image per class: clean, poisoned, perturbation).
It checks what can be checked against the datasets on disk: downstream metrics that describe
another clean or poisoned dataset, and a poisoned or augmented set made from another clean
one, are errors naming the stage to rerun. (The generator's and augment stage's summaries
record no dataset hash, so they are taken as they are.)

Output (``<paths.reports>/report/``, replaced as a whole folder, never half-written):
``report.md`` (images linked by relative path), ``report.html`` (images embedded, one file to
send or open anywhere) and ``samples.png``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from poison.errors import PoisonError
from poison.utils import atomic_path, remove_stale_folders, swap_in_folder

__all__ = ["ReportError", "build_report", "render_markdown", "render_html", "save_sample_grid", "sample_grid_png"]

#: (stage that writes it, path under ``<paths.reports>``) of every report input besides the manifests.
INPUTS = {
    "generator_summary": ("train_generator", "train_generator/summary.json"),
    "generator_curve": ("train_generator", "train_generator/curve.json"),
    "generator_curve_png": ("train_generator", "train_generator/curve.png"),
    "metrics": ("evaluate", "evaluate/metrics.json"),
    "augment_summary": ("augment", "augment/summary.json"),
    "augment_diagnosis_png": ("augment", "augment/diagnosis.png"),
}


class ReportError(PoisonError):
    """An input of the report is missing, unreadable, or from another run than its neighbours."""


# ---------------------------------------------------------------------------- blocks
# A report is a list of blocks, rendered to Markdown and to HTML by the same walk:
#   ("h", level, text) | ("p", text) | ("warn", text) | ("ul", [text, ...])
#   | ("table", [header, ...], [[cell, ...], ...]) | ("img", path relative to the report folder, caption)
# Text may hold `code` and **bold**, nothing else.

Block = tuple


def render_markdown(blocks: list[Block], images: bool = True) -> str:
    """Return ``blocks`` as GitHub-flavoured Markdown (``images=False``: without the figures)."""
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"{'#' * block[1]} {block[2]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "warn":
            out.append(f"> **{block[1]}**")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            if images:
                out.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*")
        else:
            raise ValueError(f"unknown report block {kind!r}")
    return "\n\n".join(out) + "\n"


def _cell(value: Any) -> str:
    """A Markdown table cell: a pipe in it does not split the row."""
    return str(value).replace("|", "\\|")


_CSS = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        ".warn{background:#fde8e8;border:2px solid #c62828;padding:.6rem 1rem;font-weight:bold}"
        "figure{margin:1rem 0}figcaption{font-size:.9rem;color:#555}img{max-width:100%}"
        "code{background:#f3f3f3;padding:0 .2rem}")


def _inline_html(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def render_html(blocks: list[Block], folder: Path, title: str) -> str:
    """Return ``blocks`` as one HTML page; images (paths relative to ``folder``) are embedded as data URIs."""
    out = ["<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head>", "<body>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "warn":
            out.append(f'<p class="warn">{_inline_html(block[1])}</p>')
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>"
                           for row in block[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((folder / block[1]).read_bytes()).decode("ascii")
            caption = _inline_html(block[2])
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block[2])}">'
                       f"<figcaption>{caption}</figcaption></figure>")
        else:
            raise ValueError(f"unknown report block {kind!r}")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- sample grid
def save_sample_grid(images: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor | None, classes: list[str],
                     out: Path, manifest: dict) -> None:
    """Write a PNG grid, one row per class: its first image (and, given ``clean``, clean and perturbation)."""
    with atomic_path(out) as tmp:  # an interrupted save leaves no half-written figure under its name
        tmp.write_bytes(sample_grid_png(images, labels, clean, classes, manifest))


def sample_grid_png(images: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor | None, classes: list[str],
                    manifest: dict) -> bytes:
    """Return the PNG bytes of ``save_sample_grid``'s grid (the same bytes for the same inputs).

    Shape:
        images, clean: (N, C, H, W) uint8, the same samples in the same order
        labels: (N,) class indices or (N, L) multi-hot (a row shows a sample carrying that label)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["clean", "poisoned", "perturbation"] if clean is not None else ["image"]
    fig, axes = plt.subplots(len(classes), len(cols), figsize=(1.4 * len(cols), 1.3 * len(classes)), dpi=100,
                             squeeze=False)
    for ci in range(len(classes)):
        hits = torch.nonzero(labels[:, ci] == 1 if labels.ndim == 2 else labels == ci).flatten()
        for j, col in enumerate(cols):
            ax = axes[ci, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if ci == 0:
                ax.set_title(col, fontsize=8)
            if j == 0:
                ax.set_ylabel(classes[ci], fontsize=8)
            if hits.numel() == 0:
                continue
            i = int(hits[0])
            if col == "perturbation":
                d = images[i].float() - clean[i].float()
                scale = max(float(d.abs().max()), 1.0)
                arr = (d / (2 * scale) + 0.5).clamp(0, 1)
            else:
                arr = (clean[i] if col == "clean" else images[i]).float() / 255
            arr = arr.permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1)
    fig.suptitle(f"{manifest['dataset']} ({manifest['kind']})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------- inputs
#: keys the page reads from each JSON input (a file without one is from an older or damaged run)
REQUIRED = {
    "generator_summary": ("best_trial", "trials", "steps", "train_seconds", "device"),
    "metrics": ("datasets", "clean", "poisoned", "budget", "recipe", "seeds", "test_samples"),
    "augment_summary": ("victim", "victim_clean_test_accuracy", "victim_accuracy_under_sia_test",
                        "adversarial_success_rate_train", "adversarial_success_rate_test", "longtail",
                        "single_attribute_success_rate"),
}


def _read_json(path: Path, stage: str, keys: tuple[str, ...] = ()) -> Any:
    if not path.is_file():
        raise ReportError(f"{path}: missing; the report needs the {stage} stage's output: "
                          f"run `dvc repro {stage}` (or `poison run --stages {stage}`) first")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc}); rerun the {stage} stage") from exc
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ReportError(f"{path}: no {missing} (written by an older or interrupted run); rerun the {stage} stage "
                          f"(`dvc repro -f {stage}`)")
    return data


def _read_manifest(path: str, stage: str) -> dict[str, Any]:
    from poison.shards import read_manifest

    if not Path(path, "manifest.json").is_file():
        raise ReportError(f"{path}: no dataset (manifest.json missing); run `dvc repro {stage}` "
                          f"(or `poison run --stages {stage}`) first")
    return read_manifest(path)


def _inputs(params: Any) -> dict[str, Any]:
    from poison.shards import manifest_sha256

    p = params.paths
    reports = Path(p.reports)
    got: dict[str, Any] = {
        "clean": _read_manifest(p.clean, "prepare"),
        "poisoned": _read_manifest(p.poisoned, "poison"),
        "augmented": _read_manifest(p.augmented, "augment"),
        "sha": {k: manifest_sha256(getattr(p, k)) for k in ("clean", "poisoned", "augmented")},
    }
    for key, (stage, rel) in INPUTS.items():
        if rel.endswith(".json"):
            got[key] = _read_json(reports / rel, stage, REQUIRED.get(key, ()))
        elif not (reports / rel).is_file():
            raise ReportError(f"{reports / rel}: missing; run `dvc repro {stage}` first")
    # The report must describe one run: every input made from the datasets on disk.
    for kind, stage in (("poisoned", "poison"), ("augmented", "augment")):
        source = got[kind].get("source") or {}
        if source.get("manifest_sha256") != got["sha"]["clean"]:
            raise ReportError(f"{getattr(p, kind)}: made from another clean dataset than {p.clean} "
                              f"(its manifest's source.manifest_sha256); rerun the {stage} stage (`dvc repro {stage}`)")
    metrics_file = reports / INPUTS["metrics"][1]
    for kind in ("clean", "poisoned"):
        described = (got["metrics"]["datasets"].get(kind) or {}).get("manifest_sha256")
        if described != got["sha"][kind]:
            raise ReportError(f"{metrics_file}: describes another {kind} dataset than {getattr(p, kind)} "
                              f"(datasets.{kind}.manifest_sha256); rerun the evaluate stage (`dvc repro evaluate`)")
    for kind in ("clean", "poisoned"):
        for arch, res in got["metrics"][kind].items():
            if not isinstance(res, dict) or not {"accuracy_mean", "accuracy_min", "accuracy_max", "runs"} <= set(res):
                raise ReportError(f"{metrics_file}: {kind}.{arch} lacks accuracy_mean/min/max or runs; rerun the "
                                  "evaluate stage (`dvc repro -f evaluate`)")
            png = reports / "evaluate" / "confusion" / f"{kind}_{arch}.png"
            if not png.is_file():
                raise ReportError(f"{png}: missing; rerun the evaluate stage (`dvc repro -f evaluate`)")
    if set(got["metrics"]["clean"]) != set(got["metrics"]["poisoned"]):
        raise ReportError(f"{metrics_file}: the clean and poisoned sections name different classifiers; rerun the "
                          "evaluate stage (`dvc repro -f evaluate`)")
    return got


# ---------------------------------------------------------------------------- content
def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _spread(d: dict[str, Any], key: str) -> str:
    if d.get(f"{key}_mean") is None:
        return "-"
    return f"{_pct(d[f'{key}_mean'])} ({_pct(d.get(f'{key}_min'))}-{_pct(d.get(f'{key}_max'))})"


def _samples(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{split} {info['samples']}" for split, info in manifest["splits"].items())


def _budget(manifest: dict[str, Any]) -> str:
    b = manifest.get("budget") or {}
    if not b:
        return "-"
    text = f"{b.get('norm', 'linf')} eps {b.get('eps')}"
    if "levels" in b:
        text += f" ({b['levels']}/255; largest used {b.get('max_levels_used')}/255"
        text += f", mean change {b['mean_abs']:.3f})" if b.get("mean_abs") is not None else ")"
    elif b.get("max_image_linf_used") is not None:
        text += f" on pixels (largest used {b['max_image_linf_used']:.3f})"
        text += f" + transforms of {', '.join(b['attributes'])}" if b.get("attributes") else ""
    return text


def _per_class_means(runs: list[dict[str, Any]], n: int) -> list[str]:
    """Per-class accuracy in %, mean over the runs that define it ("-" where none does: class absent)."""
    out = []
    for c in range(n):
        values = [r["per_class_accuracy"][c] for r in runs
                  if len(r.get("per_class_accuracy") or []) == n and r["per_class_accuracy"][c] is not None]
        out.append(f"{100 * sum(values) / len(values):.1f}" if values else "-")
    return out


def _blocks(params: Any, got: dict[str, Any]) -> list[Block]:
    p = params.paths
    clean, poisoned, augmented = got["clean"], got["poisoned"], got["augmented"]
    gsum, curve, metrics, aug = got["generator_summary"], got["generator_curve"], got["metrics"], got["augment_summary"]
    cfg = poisoned.get("config") or {}
    classes = clean["classes"]
    revs = sorted({str((m.get("package") or {}).get("git_rev") or "unknown") for m in (poisoned, augmented)})
    blocks: list[Block] = [
        ("h", 1, f"Pipeline report: `{poisoned['dataset']}`"),
        ("warn", poisoned.get("hazard") or "POISONED DATA"),
        ("p", f"Written by the `report` stage from the files the other stages wrote (each section names "
              f"them); it computes no new metric. Code revision that made the datasets: "
              f"{', '.join(f'`{r}`' for r in revs)}."),
        ("h", 2, "Datasets"),
        ("table", ["dataset", "kind", "method", "samples", "budget", "path", "manifest sha256"],
         [[f"`{m['dataset']}`", m["kind"], m.get("method") or "-", _samples(m), _budget(m), f"`{path}`",
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
            f"{_pct(gsum.get('best_val_accuracy'), 1)} clean val accuracy"
            + (f", target rate {_pct(gsum['best_val_target_rate'], 1)}" if gsum.get("best_val_target_rate") is not None
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
        row = [f"`{arch}`", _spread(metrics["clean"][arch], "accuracy"), _spread(metrics["poisoned"][arch], "accuracy")]
        if targeted:
            row += [_spread(metrics["clean"][arch], "target_rate"), _spread(metrics["poisoned"][arch], "target_rate")]
        rows.append(row)
    per_class = [[f"`{arch}` on {kind}"] + _per_class_means(metrics[kind][arch]["runs"], len(classes))
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
            f"{_pct(aug['victim_clean_test_accuracy'])}, under the semantic attack "
            f"{_pct(aug['victim_accuracy_under_sia_test'])}",
            f"attack success: {_pct(aug['adversarial_success_rate_train'])} of training images, "
            f"{_pct(aug['adversarial_success_rate_test'])} of test images",
            f"long-tailed split (imbalance {tail.get('imbalance_ratio')}): class counts {tail.get('class_counts')}, "
            f"filled with {tail.get('variants')} attacked variants ({_pct(tail.get('variant_success_rate'))} "
            "of them successful attacks)",
            f"file: `{p.reports}/augment/summary.json`, `diagnosis.json`; the `evaluate` stage trains no "
            "classifier on this set",
        ]),
        ("table", ["attribute alone", "success rate"],
         [[f"`{k}`", _pct(v, 1)] for k, v in (aug["single_attribute_success_rate"] or {}).items()]),
        ("img", "../augment/diagnosis.png", "Which attributes the successful semantic attacks used"),
    ]
    return blocks


def _first_per_class(params: Any, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first poisoned training sample of each class and its clean original: (poisoned, clean, labels).

    Reads the two training splits side by side and stops once every class is found; a sample whose
    key or label differs between them means the poison was not made from this clean set.
    """
    from poison.shards import iter_samples

    p = params.paths
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for c, q in zip(iter_samples(p.clean, "train"), iter_samples(p.poisoned, "train")):
        if c["key"] != q["key"] or not torch.equal(torch.as_tensor(c["label"]), torch.as_tensor(q["label"])):
            raise ReportError(f"{p.poisoned}: training sample {q['key']!r} does not match {p.clean}'s "
                              f"{c['key']!r}; rerun the poison stage (`dvc repro poison`)")
        label = int(q["label"])
        if label not in found:
            found[label] = (q["image"], c["image"])
        if len(found) == len(classes):
            break
    order = sorted(found)
    if not order:
        raise ReportError(f"{p.poisoned}: no training samples; rerun the poison stage (`dvc repro poison`)")
    return (torch.stack([found[k][0] for k in order]), torch.stack([found[k][1] for k in order]),
            torch.tensor(order, dtype=torch.long))


# ---------------------------------------------------------------------------- stage
def build_report(params: Any) -> dict[str, Any]:
    """Write ``<paths.reports>/report/`` (report.md, report.html, samples.png); return what was written.

    The folder is built beside its final place and swapped in whole: an interrupted run leaves
    the previous report (or none), never a mix. ``summary`` is the page without its figures.
    """
    got = _inputs(params)
    if got["clean"].get("label_type") == "multi_label":
        raise ReportError(f"{params.paths.clean}: multi-label; the core pipeline's report needs single-label data")
    blocks = _blocks(params, got)
    poisoned, clean, labels = _first_per_class(params, got["clean"]["classes"])
    out = Path(params.paths.reports) / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(out, marker="report.md")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        (staging / "samples.png").write_bytes(
            sample_grid_png(poisoned, labels, clean, got["clean"]["classes"], got["poisoned"]))
        (staging / "report.md").write_text(render_markdown(blocks))
        # image paths are relative to the report folder; the staging folder sits beside it
        (staging / "report.html").write_text(render_html(blocks, staging,
                                                         f"Pipeline report: {got['poisoned']['dataset']}"))
        swap_in_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return {"path": str(out), "files": ["report.html", "report.md", "samples.png"],
            "summary": render_markdown(blocks, images=False)}
