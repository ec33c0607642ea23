"""The ``poison`` command line: run the pipeline, inspect and verify datasets.

    poison run [--params params.yaml] [--stages prepare train_generator poison augment evaluate report
                                            topk compose multilabel variants_report]
    poison inspect DIR [--clean DIR] [--out grid.png]
    poison inspect CHECKPOINT.pt
    poison verify DIR|URL
    poison publish [DIR ...] [--to PREFIX] [--version V] [--no-push] [--remote NAME]
    poison bench [--params params.yaml] [--untargeted JSON] [--label-specific JSON] [--only JOB ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from poison.errors import PoisonError, ShardError

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace) -> int:
    from poison import stages
    from poison.config import load_params

    params = load_params(args.params)
    for name in args.stages:
        result = stages.STAGES[name](params)
        print(f"{name}: {json.dumps(result, default=str)}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from poison import publish as pub
    from poison.config import load_params

    params = load_params(args.params)
    if not args.dirs:
        result = pub.publish(params, push=False if args.no_push else None, prefix=args.prefix,
                             version=args.version, remote=args.remote, endpoint_url=args.endpoint_url)
    else:
        push = params.publish.dvc_push and not args.no_push
        args.prefix = args.prefix or params.publish.prefix
        if not push and not args.prefix:
            raise PoisonError("publish: nothing to do: give --to PREFIX, or leave dvc push on")
        if args.prefix:  # a read-only prefix is refused before anything is verified or pushed
            pub.writable_store(args.prefix, args.endpoint_url or params.publish.endpoint_url)
        for d in args.dirs:
            problems = pub.verify_dataset(d)
            if problems:
                raise pub.PublishError(f"{d}: not published, {len(problems)} shard(s) fail verification:\n  "
                                       + "\n  ".join(problems))
        result = {"dvc_push": None, "datasets": {}, "hazards": pub.publication_hazards(args.dirs, False)}
        if push:
            pub.dvc_push(".", remote=args.remote or params.publish.remote, targets=args.dirs)
            result["dvc_push"] = {"remote": args.remote or params.publish.remote or "default", "targets": args.dirs}
        if args.prefix:
            metrics = pub.evaluate_metrics(params)
            for d in args.dirs:
                result["datasets"][d] = pub.publish_dataset(
                    d, args.prefix, version=args.version or params.publish.version,
                    endpoint_url=args.endpoint_url or params.publish.endpoint_url, metrics=metrics,
                    repo_path=None if Path(d).is_absolute() else Path(d).as_posix())
    for note in result["hazards"]:  # before anything else: what went out is hazardous
        print(f"publish: WARNING: {note}")
    if result["dvc_push"]:
        print(f"publish: dvc push to the {result['dvc_push']['remote']} remote: done")
    for name, r in result["datasets"].items():
        state = ("published" if r["published"] else "already published (identical)" if r.get("checked") != "size"
                 else f"already published (shard sizes match; `poison verify {r['url']}` checks their sha256)")
        print(f"publish: {name}: {state} at {r['url']} ({r['samples']} samples, {len(r['files'])} files)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from poison import bench
    from poison.config import load_params
    from poison.utils import atomic_write_json

    params = load_params(args.params)
    if args.threads < 0:
        raise PoisonError(f"--threads: expected 0 (torch's default) or a positive count, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench.BenchConfig(
        seeds=tuple(args.seeds), recipes=tuple(args.recipes), archs=tuple(args.archs),
        sklearn=() if args.no_sklearn else bench.SKLEARN_MODELS, eps_sweep=tuple(args.eps_sweep),
        label_specific=not args.no_label_specific, split=args.split,
    )

    def overrides(flag: str, text: str) -> object:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise PoisonError(f"{flag}: expected a JSON object of train_generator keys, got {text!r} ({exc})") from None

    unt = bench.generator_config(params, overrides("--untargeted", args.untargeted), "untargeted", "--untargeted")
    ls = None
    if not args.no_label_specific:
        ls = bench.generator_config(params, overrides("--label-specific", args.label_specific), "label_specific",
                                    "--label-specific")
    results = bench.run_strength(params, args.workdir, cfg, unt, ls,
                                 only=tuple(args.only) if args.only else None, fresh=args.fresh)
    out = Path(args.out)
    atomic_write_json(out, results)
    command = "poison bench " + " ".join(args.argv_echo)
    body = bench.render_markdown(results, command.strip())
    if args.markdown:
        bench.update_markdown(args.markdown, body)
    print(body)
    done = [k for k in results if not k.startswith("_")]
    print(f"bench: {len(done)} job(s) in {out}" + (f", tables in {args.markdown}" if args.markdown else ""))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from urllib.parse import unquote, urlparse

    from poison.loader import verify_location
    from poison.shards import read_manifest, verify_dataset

    target = unquote(urlparse(args.dir).path) if args.dir.startswith("file://") else args.dir
    if "://" in target:
        m, problems = verify_location(target, endpoint_url=args.endpoint_url)
        where = target.rstrip("/") + "/manifest.json"
    else:
        problems = verify_dataset(target)
        where = str(Path(target) / "manifest.json")
    if problems:
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        print(f"verify: {len(problems)} bad shard(s) in {args.dir}; re-fetch the dataset (`dvc pull`, `dvc checkout`, "
              "or download it again) or regenerate it (`dvc repro`)", file=sys.stderr)
        return 1
    if "://" not in target:
        m = read_manifest(target)
    print(f"verify: OK, {len(m['shards'])} shard(s), {m['totals']['samples']} samples match {where}")
    return 0


def _inspect_checkpoint(path: Path) -> int:
    """Print a generator checkpoint's hazard, what it was trained for and on (no PNG)."""
    from poison.card import GENERATOR_HAZARD
    from poison.stages import load_generator

    _, ckpt = load_generator(path)
    cfg = ckpt["config"]
    print(ckpt.get("hazard") or GENERATOR_HAZARD)  # checkpoints before the field are generators too
    print(f"generator: {ckpt['generator_arch']}  target: {cfg.get('target')}  eps: {ckpt['eps']}  "
          f"seed: {ckpt.get('seed')}  kept trial: {ckpt.get('best_trial')}")
    for key in ("target_map", "topk_targets", "flip_labels"):
        if ckpt.get(key) is not None:
            print(f"  {key}: {ckpt[key]}")
    src = ckpt["source"]
    print(f"  trained on {src.get('dataset')} (manifest sha256 {src.get('manifest_sha256')}): "
          f"{ckpt['in_channels']}x{ckpt['image_size']}px, {ckpt['num_classes']} classes")
    return 0


def _clean_counterparts(clean_dir: str, split: str, metas: list[dict], where: str):
    """The clean image each sample of ``where``'s ``split`` was made from, in its order (uint8 (N, C, H, W)).

    A poisoned dataset keeps the clean split's names and order; an augmented (SIA) one has
    splits of its own whose samples name their clean sample (``source_key``, e.g. ``train_00000042``).
    """
    import torch

    from poison.shards import iter_samples, load_split

    if not all("source_key" in meta for meta in metas):
        return load_split(clean_dir, split)[0]
    wanted = {meta["source_key"] for meta in metas}
    splits = {key.rsplit("_", 1)[0] for key in wanted}
    found = {s["key"]: s["image"] for name in sorted(splits) for s in iter_samples(clean_dir, name)
             if s["key"] in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise PoisonError(f"--clean {clean_dir}: has no sample {missing[0]!r}, which {where}'s {split!r} split "
                          f"was made from ({len(missing)} missing); pass the clean dataset its manifest's source names")
    return torch.stack([found[meta["source_key"]] for meta in metas])


def _cmd_inspect(args: argparse.Namespace) -> int:
    from poison.report import save_sample_grid
    from poison.shards import load_split, manifest_sha256, read_manifest

    if Path(args.dir).name == "manifest.json":
        raise ShardError(f"{args.dir}: pass the dataset folder, not its manifest: "
                         f"`poison inspect {Path(args.dir).parent}`")
    if Path(args.dir).is_file() or Path(args.dir).suffix == ".pt":
        return _inspect_checkpoint(Path(args.dir))
    m = read_manifest(args.dir)
    # read (and verify) the shards before printing: a damaged dataset prints its error only
    split = "train" if "train" in m["splits"] else next(iter(m["splits"]))
    images, labels, metas = load_split(args.dir, split)
    clean_images, note = None, None
    clean_dir = args.clean or (m.get("source") or {}).get("path")
    if m["kind"] != "clean" and clean_dir:
        if not Path(clean_dir, "manifest.json").is_file():
            note = f"  (clean source {clean_dir} not found; pass --clean DIR for perturbation columns)"
        elif manifest_sha256(clean_dir) != m["source"]["manifest_sha256"]:
            raise PoisonError(f"--clean {clean_dir}: its manifest sha256 differs from the one {args.dir} was made from")
        else:
            clean_images = _clean_counterparts(clean_dir, split, metas, args.dir)
    budget = m.get("budget") or {}
    if m.get("hazard"):
        print(m["hazard"])
    print(f"dataset: {m['dataset']}  kind: {m['kind']}  method: {m.get('method')}  "
          f"norm: {budget.get('norm')}  eps: {budget.get('eps')}  seed: {m['seed']}")
    for name, info in m["splits"].items():
        print(f"  {name}: {info['samples']} samples; per class {info['class_counts']}")
    if note:
        print(note)
    out = Path(args.out or f"{m['dataset']}-inspect.png")
    save_sample_grid(images, labels, clean_images, m["classes"], out, m)
    print(f"  grid: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from poison.stages import STAGES

    parser = argparse.ArgumentParser(prog="poison", description="Data-poisoning datasets as WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run pipeline stages in order without Prefect (see flows/ for Prefect)")
    run.add_argument("--params", default="params.yaml")
    run.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    run.set_defaults(func=_cmd_run)
    ins = sub.add_parser("inspect", help="print a dataset's kind, method, budget, counts; save a sample grid PNG "
                                         "(or print what a generator checkpoint .pt makes)")
    ins.add_argument("dir", help="dataset folder, or a generator checkpoint file")
    ins.add_argument("--clean", help="clean dataset the poison was made from (default: the manifest's source path)")
    ins.add_argument("--out", help="PNG path (default: ./<dataset>-inspect.png)")
    ins.set_defaults(func=_cmd_inspect)
    ver = sub.add_parser("verify", help="check every shard's sha256 against the manifest")
    ver.add_argument("dir", help="dataset folder, or an http(s):// or s3:// prefix")
    ver.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    ver.set_defaults(func=_cmd_verify)
    pub = sub.add_parser("publish", help="verify datasets, dvc push them and/or copy them to a readable prefix")
    pub.add_argument("dirs", nargs="*", help="dataset folders (default: the publish section's datasets)")
    pub.add_argument("--params", default="params.yaml")
    pub.add_argument("--to", dest="prefix", help="readable prefix: a folder or s3://bucket/prefix (default: publish.prefix)")
    pub.add_argument("--version", help="<prefix>/<dataset>/<version>/ (default: manifest sha256, 12 hex digits)")
    pub.add_argument("--no-push", action="store_true", help="skip dvc push")
    pub.add_argument("--remote", help="DVC remote name (default: publish.remote, else the default remote)")
    pub.add_argument("--endpoint-url", help="S3-compatible endpoint of the prefix")
    pub.set_defaults(func=_cmd_publish)
    add_bench_parser(sub)
    return parser


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand (shared with ``benchmarks/strength.py``)."""
    from poison.bench import RECIPES, BenchConfig

    d = BenchConfig()
    b = sub.add_parser("bench", help="strength benchmark of the DeepConfuse configuration (issue 3's protocol)")
    b.add_argument("--params", default="params.yaml", help="base configuration (train_generator, data, seed)")
    b.add_argument("--untargeted", default="{}", help="JSON overrides of train_generator for the untargeted poison")
    b.add_argument("--label-specific", default="{}", help="JSON overrides for the label-specific poison")
    b.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="downstream seeds")
    b.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(d.recipes))
    b.add_argument("--archs", nargs="+", default=list(d.archs), help="neural classifiers (must include the generator's surrogate)")
    b.add_argument("--eps-sweep", type=float, nargs="+", default=list(d.eps_sweep))
    b.add_argument("--no-sklearn", action="store_true", help="skip the random forest and RBF SVM")
    b.add_argument("--no-label-specific", action="store_true")
    b.add_argument("--split", choices=["val", "test"], default="test",
                   help="clean split the downstream models are scored on (tune on val)")
    b.add_argument("--only", nargs="+", help="run only these jobs now (clean, untargeted, label_specific, eps<e>)")
    b.add_argument("--fresh", action="store_true", help="ignore cached job results")
    b.add_argument("--workdir", default="build/strength", help="shards, checkpoints and per-job results")
    b.add_argument("--out", default="benchmarks/results/strength.json")
    b.add_argument("--markdown", default="BENCHMARKS.md", help="file whose generated block gets the tables ('' for none)")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    b.set_defaults(func=_cmd_bench)
    return b


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``poison`` console script; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv_echo = argv[1:]
    try:
        return args.func(args)
    except PoisonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
