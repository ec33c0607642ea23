"""The ``poison`` command line: run the pipeline, inspect and verify datasets.

    poison run [--params params.yaml] [--stages prepare train_generator poison evaluate]
    poison inspect DIR [--clean DIR] [--out grid.png]
    poison verify DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from poison.errors import PoisonError

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace) -> int:
    from poison import stages
    from poison.config import load_params

    params = load_params(args.params)
    for name in args.stages:
        result = stages.STAGES[name](params)
        print(f"{name}: {json.dumps(result, default=str)}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from poison.shards import read_manifest, verify_dataset

    problems = verify_dataset(args.dir)
    if problems:
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        print(f"verify: {len(problems)} bad shard(s) in {args.dir}", file=sys.stderr)
        return 1
    m = read_manifest(args.dir)
    print(f"verify: OK, {len(m['shards'])} shard(s), {m['totals']['samples']} samples match {Path(args.dir) / 'manifest.json'}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from poison.shards import load_split, manifest_sha256, read_manifest

    m = read_manifest(args.dir)
    budget = m.get("budget") or {}
    if m.get("hazard"):
        print(m["hazard"])
    print(f"dataset: {m['dataset']}  kind: {m['kind']}  method: {m.get('method')}  "
          f"norm: {budget.get('norm')}  eps: {budget.get('eps')}  seed: {m['seed']}")
    for split, info in m["splits"].items():
        print(f"  {split}: {info['samples']} samples; per class {info['class_counts']}")
    split = "train" if "train" in m["splits"] else next(iter(m["splits"]))
    images, labels, metas = load_split(args.dir, split)
    clean_images = None
    clean_dir = args.clean or (m.get("source") or {}).get("path")
    if m["kind"] != "clean" and clean_dir:
        if not Path(clean_dir, "manifest.json").is_file():
            print(f"  (clean source {clean_dir} not found; pass --clean DIR for perturbation columns)")
        elif manifest_sha256(clean_dir) != m["source"]["manifest_sha256"]:
            raise PoisonError(f"--clean {clean_dir}: its manifest sha256 differs from the one {args.dir} was made from")
        else:
            clean_images, _, _ = load_split(clean_dir, split)
    out = Path(args.out or f"{m['dataset']}-inspect.png")
    _save_grid(images, labels, clean_images, m["classes"], out, m)
    print(f"  grid: {out}")
    return 0


def _save_grid(images: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor | None, classes: list[str],
               out: Path, manifest: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["clean", "poisoned", "perturbation"] if clean is not None else ["image"]
    fig, axes = plt.subplots(len(classes), len(cols), figsize=(1.4 * len(cols), 1.3 * len(classes)), dpi=100,
                             squeeze=False)
    for ci in range(len(classes)):
        hits = torch.nonzero(labels == ci).flatten()
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    from poison.stages import STAGES

    parser = argparse.ArgumentParser(prog="poison", description="Data-poisoning datasets as WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run pipeline stages in order without Prefect (see flows/ for Prefect)")
    run.add_argument("--params", default="params.yaml")
    run.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    run.set_defaults(func=_cmd_run)
    ins = sub.add_parser("inspect", help="print a dataset's kind, method, budget, counts; save a sample grid PNG")
    ins.add_argument("dir")
    ins.add_argument("--clean", help="clean dataset the poison was made from (default: the manifest's source path)")
    ins.add_argument("--out", help="PNG path (default: ./<dataset>-inspect.png)")
    ins.set_defaults(func=_cmd_inspect)
    ver = sub.add_parser("verify", help="check every shard's sha256 against the manifest")
    ver.add_argument("dir")
    ver.set_defaults(func=_cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``poison`` console script; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PoisonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
