"""The dataset card: the README.md written next to every dataset's shards.

A poisoned (or augmented) dataset says so first; then how it was made, the three ways
to load it, the licence, metrics when evaluated, and the sha256 of every shard.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["HAZARD", "AUGMENTED", "GENERATOR_HAZARD", "dataset_card"]

HAZARD = (
    "POISONED DATA: this dataset was deliberately perturbed to harm models trained on it. "
    "For robustness and security research only; never mix it into production training data."
)
GENERATOR_HAZARD = (
    "POISON GENERATOR: this checkpoint makes poisoned training data, perturbations that harm models "
    "trained on them. For robustness and security research only; never apply it to production training data."
)
AUGMENTED = (
    "SEMANTICALLY AUGMENTED DATA: images were adversarially transformed. For robustness "
    "research; not a faithful copy of the source data."
)


def dataset_card(manifest: dict[str, Any], metrics: dict[str, Any] | None = None,
                 repo_path: str | None = None) -> str:
    """Return the README.md card of a dataset from its manifest (and metrics if evaluated).

    ``repo_path`` is the dataset's path in its DVC project (for the ``dvc import`` recipe).
    """
    kind = manifest["kind"]
    multi = manifest.get("label_type") == "multi_label"
    lines = []
    if kind == "poisoned":
        lines += [f"# ⚠ POISONED DATASET: {manifest['dataset']}", "", f"> **{HAZARD}**", ""]
    elif kind == "semantic":
        lines += [f"# ⚠ AUGMENTED DATASET: {manifest['dataset']}", "", f"> **{AUGMENTED}**", ""]
    else:
        lines += [f"# Clean dataset: {manifest['dataset']}", ""]
    budget = manifest.get("budget") or {}
    src = manifest.get("source") or {}
    first = "train" if "train" in manifest["splits"] else next(iter(manifest["splits"]), "train")
    count = sum(1 for r in manifest["shards"] if r["split"] == first)
    urls = f"{first}-{{000000..{max(count - 1, 0):06d}}}.tar"
    dvc_path = repo_path or f"data/shards/{manifest['dataset']}"
    lines += [
        "## How it was made",
        f"- kind: `{kind}`; method: `{manifest.get('method') or 'none (clean copy of the source)'}`",
        ("- budget: none (the source's images, unchanged)" if not budget else
         (f"- budget: {budget.get('norm', '-')} eps = {budget.get('eps', '-')} "
          f"(<= {budget.get('levels', '-')} uint8 levels per pixel, checked after quantization)")
         if kind != "semantic" else
         (f"- budget: semantic attributes within identity +- {budget.get('attributes', {})}, then an image-space "
          f"{budget.get('norm', '-')} perturbation of at most {budget.get('eps', '-')}")),
        f"- seed: {manifest['seed']}; source: `{src.get('dataset') or '-'}`"
        + (f" (manifest sha256 `{src['manifest_sha256']}`)" if src.get("manifest_sha256") else ""),
        f"- produced by poison {manifest['package']['version']} at git revision `{manifest['package']['git_rev']}`",
        f"- images: {manifest['image']['channels']}x{manifest['image']['height']}x{manifest['image']['width']} uint8 PNG; "
        f"classes: {', '.join(manifest['classes'])}",
        "- splits: " + ", ".join(f"{k} {v['samples']}" for k, v in manifest["splits"].items()),
        "",
        "The full method configuration is in `manifest.json` (`config`).",
        "",
        "## How to load it",
        "Three ways. Only the first checks every shard's sha256 against `manifest.json` before using it: "
        "before the second, run `poison verify <prefix>/<dataset>/<version>`; after the third, `poison verify` the "
        "imported folder (`dvc import` checks DVC's own hashes, not the manifest's).",
        "",
        "1. Python, from this folder, a published prefix (`https://...`, `s3://...`) or a DVC project:",
        "```python",
        "from poison import open_dataset",
        f"ds = open_dataset('.', split='{first}')          # iterable of (image float [0,1] CxHxW, label)"
        + ("  # label: int64 0/1 vector (multi-label)" if multi else ""),
        f"ds = open_dataset('s3://<bucket>/<prefix>/{manifest['dataset']}/<version>')",
        f"ds = open_dataset('{dvc_path}', repo='<git URL of the producing project>', rev='<tag or commit>')",
        *([f"ds = open_dataset('{dvc_path}', ratio=0.5, clean='{src.get('path') or '<the clean source dataset>'}')"
           "  # partial poisoning; both paths from the producing project's root"] if kind == "poisoned" else []),
        "```",
        "2. WebDataset, from a prefix that `poison publish --to` copied it to (members: "
        + ("`png`, `json` whose `labels` is the 0/1 label vector (multi-label: no `cls`); " if multi
           else "`png`, `cls`, `json`; ")
        + "a `wids` index per split is published as `<split>.wids.json`). Do not use `.decode()`: its default "
        "decoders unpickle `.pyd`/`.pkl` and `torch.load` `.pth` members of a tampered shard.",
        "```python",
        "import io, json, webdataset as wds",
        "from PIL import Image",
        f"ds = (wds.WebDataset('<prefix>/{manifest['dataset']}/<version>/{urls}', shardshuffle=False)",
        *(["      .to_tuple('png', 'json')",
           "      .map_tuple(lambda b: Image.open(io.BytesIO(b)), lambda b: json.loads(b)['labels']))"] if multi else
          ["      .to_tuple('png', 'cls')",
           "      .map_tuple(lambda b: Image.open(io.BytesIO(b)), lambda b: int(b)))"]),
        "```",
        "3. DVC, into another project (then load the folder with 1.):",
        "```bash",
        f"dvc import <git URL of the producing project> {dvc_path} --rev <tag or commit>",
        "```",
        "From the command line: `poison verify .` and `poison inspect .`.",
        "",
        "## Licence",
        f"Derived from the source dataset `{src.get('dataset', manifest['dataset'])}`; the source dataset's "
        "licence applies (mnist5k / MNIST: Y. LeCun and C. Cortes, distributed for research).",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "```json", json.dumps(metrics, indent=2, sort_keys=True), "```", ""]
    elif kind != "clean":
        lines += ["## Metrics",
                  "Downstream accuracy of models trained on this data, tested on the clean test split of the "
                  "source, is written by the stage that evaluates it: `reports/evaluate/metrics.json` (the DeepConfuse "
                  "poison), `reports/topk/metrics.json` or `reports/multilabel/metrics.json`.", ""]
    lines += ["## Shards", "| file | split | samples | bytes | sha256 |", "|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['split']} | {r['samples']} | {r['bytes']} | `{r['sha256']}` |" for r in manifest["shards"]]
    return "\n".join(lines) + "\n"
