"""Rendering for the reports: blocks to Markdown and to self-contained HTML, figures, the page folder.

Nothing here knows a pipeline. A page is a list of blocks (below); ``write_page`` writes it as
``report.md`` (figures linked by relative path) and ``report.html`` (figures embedded as data
URIs: one file to send or open anywhere), with its figures, into a folder that replaces the
previous one whole: an interrupted run leaves the previous page (or none), never a mix.
"""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from poison.utils import atomic_path, remove_stale_folders, swap_in_folder

__all__ = ["Block", "render_markdown", "render_html", "write_page", "save_sample_grid", "sample_grid_png",
           "curve_png"]


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

    changed = {"poisoned": "poisoned", "semantic": "augmented"}.get(manifest.get("kind"), "changed")
    cols = ["clean", changed, "perturbation"] if clean is not None else ["image"]
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
    # the figure travels without its card: it says what it shows (the full warning is in the manifest)
    banner = {"poisoned": "POISONED DATA: research only", "semantic": "ADVERSARIALLY AUGMENTED"}.get(manifest["kind"])
    fig.suptitle(f"{manifest['dataset']} ({manifest['kind']})" + (f"\n{banner}" if banner else ""), fontsize=9,
                 color="darkred" if banner else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------- generator curve
def curve_png(records: list[dict[str, Any]], accuracy: str = "clean val accuracy", rate: str = "target rate") -> bytes:
    """Return the PNG bytes of a generator's curve: the validation victim's scores on each scored trial.

    ``records``: the ``curve.json`` a generator stage writes (``trial``, ``val_accuracy``,
    ``val_target_rate``, ``restart``); unscored trials (``val_accuracy`` None) are skipped.
    ``accuracy``, ``rate``: the legend's names of those two scores (what they measure differs
    by target: exact match on multi-label data, the ordered top-k rate for ``ordered_topk``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    restarts = sorted({r.get("restart", 0) for r in records})
    for restart in restarts:
        pts = [r for r in records if r["val_accuracy"] is not None and r.get("restart", 0) == restart]
        run = f" (run {restart})" if len(restarts) > 1 else ""
        ax.plot([r["trial"] for r in pts], [r["val_accuracy"] for r in pts], marker="o",
                label=accuracy + run)
        if pts and pts[0]["val_target_rate"] is not None:
            ax.plot([r["trial"] for r in pts], [r["val_target_rate"] for r in pts], marker="s",
                    label=rate + run)
    ax.set_xlabel("trial (0-based)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole: no 0.5 ticks on short curves
    ax.set_ylim(0, 1)
    ax.set_title("victim trained on the current poison", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------- page folder
def write_page(out: Path, blocks: list[Block], title: str, figures: dict[str, bytes]) -> None:
    """Write ``out/`` = report.md + report.html of ``blocks`` + ``figures`` (file name -> PNG bytes).

    The folder is built beside its final place and swapped in whole. Image blocks name their
    files relative to ``out`` (``figures`` or a sibling stage's folder, ``../stage/file.png``).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(out, marker="report.md")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        for name, data in figures.items():
            (staging / name).write_bytes(data)
        (staging / "report.md").write_text(render_markdown(blocks))
        # image paths are relative to the report folder; the staging folder sits beside it
        (staging / "report.html").write_text(render_html(blocks, staging, title))
        swap_in_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
