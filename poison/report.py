"""The pipeline's report: one page, in Markdown and in self-contained HTML, of what the core
pipeline made and what it measured.

The ``report`` stage reads only what the other stages wrote: the datasets' manifests, the
generator's summary and curve, the downstream metrics and confusion matrices, the augment
stage's summary and diagnosis. It computes no new figure except a grid of sample images
(one training image per class: clean, poisoned, perturbation) read from the shards.
It refuses to mix runs: metrics that describe another poisoned dataset than the one on disk
are an error naming the stage to rerun.

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


def render_markdown(blocks: list[Block]) -> str:
    """Return ``blocks`` as GitHub-flavoured Markdown."""
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
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*")
        else:
            raise ValueError(f"unknown report block {kind!r}")
    return "\n\n".join(out) + "\n"


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
def _read_json(path: Path, stage: str) -> Any:
    if not path.is_file():
        raise ReportError(f"{path}: missing; the report needs the {stage} stage's output: "
                          f"run `dvc repro {stage}` (or `poison run --stages {stage}`) first")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc}); rerun the {stage} stage") from exc


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
            got[key] = _read_json(reports / rel, stage)
        elif not (reports / rel).is_file():
            raise ReportError(f"{reports / rel}: missing; run `dvc repro {stage}` first")
    # The report must describe one run: every input made from the datasets on disk.
    for kind in ("poisoned", "augmented"):
        if got[kind]["source"]["manifest_sha256"] != got["sha"]["clean"]:
            raise ReportError(f"{getattr(p, kind)}: made from another clean dataset than {p.clean}; rerun "
                              f"`dvc repro` (the {'poison' if kind == 'poisoned' else 'augment'} stage)")
    described = got["metrics"].get("datasets", {})
    for kind in ("clean", "poisoned"):
        if described.get(kind, {}).get("manifest_sha256") != got["sha"][kind]:
            raise ReportError(f"{reports / INPUTS['metrics'][1]}: describes another {kind} dataset than "
                              f"{getattr(p, kind)}; rerun the evaluate stage (`dvc repro evaluate`)")
    for kind, arch in ((k, a) for k in ("clean", "poisoned") for a in got["metrics"].get(kind, {})):
        png = reports / "evaluate" / "confusion" / f"{kind}_{arch}.png"
        if not png.is_file():
            raise ReportError(f"{png}: missing; rerun the evaluate stage (`dvc repro evaluate`)")
    return got


# ---------------------------------------------------------------------------- content
def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _spread(d: dict[str, Any], key: str) -> str:
    return f"{_pct(d[f'{key}_mean'])} ({_pct(d[f'{key}_min'])}-{_pct(d[f'{key}_max'])})"


def _samples(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{split} {info['samples']}" for split, info in manifest["splits"].items())


def _budget(manifest: dict[str, Any]) -> str:
    b = manifest.get("budget") or {}
    if not b:
        return "-"
    text = f"{b.get('norm', 'linf')} eps {b['eps']}"
    if "levels" in b:
        text += f" ({b['levels']}/255; largest used {b.get('max_levels_used')}/255, mean change {b['mean_abs']:.3f})"
    elif "max_image_linf_used" in b:
        text += f" on pixels (largest used {b['max_image_linf_used']:.3f}) + transforms of {', '.join(b.get('attributes', {}))}"
    return text


def _blocks(params: Any, got: dict[str, Any]) -> list[Block]:
    p = params.paths
    clean, poisoned, augmented = got["clean"], got["poisoned"], got["augmented"]
    gsum, curve, metrics, aug = got["generator_summary"], got["generator_curve"], got["metrics"], got["augment_summary"]
    cfg = poisoned.get("config") or {}
    classes = clean["classes"]
    revs = sorted({str((m.get("package") or {}).get("git_rev")) for m in (poisoned, augmented)})
    blocks: list[Block] = [
        ("h", 1, f"Pipeline report: `{poisoned['dataset']}`"),
        ("warn", poisoned.get("hazard") or "POISONED DATA"),
        ("p", f"Written by the `report` stage from the files the other stages wrote (each section names "
              f"them); it measures nothing itself. Code revision of the datasets: {', '.join(f'`{r}`' for r in revs)}."),
        ("h", 2, "Datasets"),
        ("table", ["dataset", "kind", "method", "samples", "budget", "path", "manifest sha256"],
         [[f"`{m['dataset']}`", m["kind"], m.get("method") or "-", _samples(m), _budget(m), f"`{path}`",
           f"`{got['sha'][key][:12]}`"]
          for key, m, path in (("clean", clean, p.clean), ("poisoned", poisoned, p.poisoned),
                               ("augmented", augmented, p.augmented))]),
        ("p", f"`{augmented['dataset']}`: {augmented.get('hazard') or ''}"),
        ("img", "samples.png", "One training image per class: clean, poisoned, and the perturbation "
                               "(grey = no change, scaled to its largest change)"),
    ]
    # generator
    target = cfg.get("target", "untargeted")
    tm = cfg.get("target_map")
    goal = "untargeted (any wrong class)" if target == "untargeted" else (
        f"{target}, target map {tm}" if tm is not None else target)
    scored = [r for r in curve if r.get("val_accuracy") is not None]
    kept = gsum.get("best_trial")
    blocks += [
        ("h", 2, "Generator (`train_generator`)"),
        ("ul", [
            f"DeepConfuse, {goal}; generator `{cfg.get('generator')}` against surrogate `{cfg.get('surrogate')}`, "
            f"objective `{cfg.get('objective')}`"
            + (f", loss `{cfg.get('untargeted_loss')}`" if target == "untargeted" else ""),
            f"{gsum.get('trials')} trials x {gsum.get('restarts', 1)} run(s), {gsum.get('steps')} generator steps, "
            f"{gsum.get('train_seconds')} s of training on {gsum.get('device')}",
            f"kept: trial {kept} (0-based) of run {gsum.get('best_restart', 0)}, chosen on the **validation** split: "
            f"a victim trained on its stored poison scores {_pct(gsum.get('best_val_accuracy'), 1)} clean val accuracy"
            + (f", target rate {_pct(gsum['best_val_target_rate'], 1)}" if gsum.get("best_val_target_rate") is not None
               else "") + f" ({len(scored)} trials scored)",
            f"files: `{p.reports}/train_generator/summary.json`, `curve.json`; checkpoint `{p.generator}`",
        ]),
        ("img", "../train_generator/curve.png", "Validation victim's clean accuracy on each scored trial's poison"),
    ]
    # evaluate
    recipe = metrics.get("recipe", {})
    budget = metrics.get("budget", {})
    label_specific = any("target_rate_mean" in r for r in metrics.get("poisoned", {}).values())
    header = ["classifier", "trained on clean data", "trained on the poison"] + (
        ["target rate"] if label_specific else [])
    rows = []
    for arch, res in metrics.get("poisoned", {}).items():
        row = [f"`{arch}`", _spread(metrics["clean"][arch], "accuracy"), _spread(res, "accuracy")]
        if label_specific:
            row.append(_spread(res, "target_rate") if "target_rate_mean" in res else "-")
        rows.append(row)
    per_class = []
    for kind in ("clean", "poisoned"):
        for arch, res in metrics.get(kind, {}).items():
            accs = torch.tensor([r["per_class_accuracy"] for r in res["runs"]], dtype=torch.float64).mean(0)
            per_class.append([f"`{arch}` on {kind}"] + [f"{100 * float(a):.1f}" for a in accs])
    blocks += [
        ("h", 2, "Downstream classifiers (`evaluate`)"),
        ("p", f"Each classifier trained from scratch on the dataset's training split "
              f"({recipe.get('optimizer')} lr {recipe.get('lr')}, {recipe.get('epochs')} epochs, batch "
              f"{recipe.get('batch_size')}), seeds {metrics.get('seeds')}, then tested on the **clean test split** "
              f"({metrics.get('test_samples')} images). Accuracy: mean over seeds (min-max)."),
        ("table", header, rows),
        ("p", f"Stored perturbation: largest change {budget.get('max_linf_stored', float('nan')):.4f} against eps "
              f"{budget.get('eps')}: " + ("**within budget**." if budget.get("within_budget") else "**OVER BUDGET**.")),
        ("p", "Per-class clean test accuracy, % (mean over seeds):"),
        ("table", ["model"] + classes, per_class),
    ]
    for kind in ("clean", "poisoned"):
        for arch in metrics.get(kind, {}):
            blocks.append(("img", f"../evaluate/confusion/{kind}_{arch}.png",
                           f"Confusion matrix of `{arch}` trained on {kind} data (first seed), clean test split"))
    blocks.append(("p", f"File: `{p.reports}/evaluate/metrics.json` (every run, confusion matrices)."))
    # augment
    tail = aug.get("longtail", {})
    blocks += [
        ("h", 2, "Semantic augmentation (`augment`)"),
        ("ul", [
            f"victim `{aug.get('victim')}` trained on clean data: clean test accuracy "
            f"{_pct(aug.get('victim_clean_test_accuracy'))}, under the semantic attack "
            f"{_pct(aug.get('victim_accuracy_under_sia_test'))}",
            f"attack success: {_pct(aug.get('adversarial_success_rate_train'))} of training images, "
            f"{_pct(aug.get('adversarial_success_rate_test'))} of test images",
            f"long-tailed split (imbalance {tail.get('imbalance_ratio')}): class counts {tail.get('class_counts')}, "
            f"filled with {tail.get('variants')} attacked variants ({_pct(tail.get('variant_success_rate'))} "
            "of them successful attacks)",
            f"file: `{p.reports}/augment/summary.json`, `diagnosis.json`; the `evaluate` stage trains no "
            "classifier on this set",
        ]),
        ("table", ["attribute alone", "success rate"],
         [[f"`{k}`", _pct(v, 1)] for k, v in (aug.get("single_attribute_success_rate") or {}).items()]),
        ("img", "../augment/diagnosis.png", "Which attributes the successful semantic attacks used"),
    ]
    return blocks


# ---------------------------------------------------------------------------- stage
def build_report(params: Any) -> dict[str, Any]:
    """Write ``<paths.reports>/report/`` (report.md, report.html, samples.png); return what was written.

    The folder is built beside its final place and swapped in whole: an interrupted run leaves
    the previous report (or none), never a mix.
    """
    from poison.shards import load_split

    got = _inputs(params)
    p = params.paths
    images, labels, _ = load_split(p.poisoned, "train")
    clean_images, clean_labels, _ = load_split(p.clean, "train")
    if clean_images.shape != images.shape or not torch.equal(clean_labels, labels):
        raise ReportError(f"{p.poisoned}: its training split does not match {p.clean}'s sample for sample; "
                          "rerun the poison stage (`dvc repro poison`)")
    out = Path(p.reports) / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(out, marker="report.md")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        (staging / "samples.png").write_bytes(
            sample_grid_png(images, labels, clean_images, got["clean"]["classes"], got["poisoned"]))
        blocks = _blocks(params, got)
        # the HTML embeds images relative to the final folder: the stage's other reports, and samples.png
        (staging / "report.md").write_text(render_markdown(blocks))
        (staging / "report.html").write_text(render_html(_rebase(blocks, staging, out), out.parent,
                                                         f"Pipeline report: {got['poisoned']['dataset']}"))
        swap_in_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return {"path": str(out), "files": ["report.md", "report.html", "samples.png"]}


def _rebase(blocks: list[Block], staging: Path, out: Path) -> list[Block]:
    """Image blocks re-pointed from the report folder to its parent (samples.png: the staging copy)."""
    rebased = []
    for block in blocks:
        if block[0] == "img":
            rel = block[1]
            target = (staging / rel) if not rel.startswith("../") else (out / rel)
            rebased.append(("img", str(target.resolve().relative_to(out.parent.resolve())), block[2]))
        else:
            rebased.append(block)
    return rebased
