"""Training throughput of the downstream CNN fed by ``open_dataset`` vs in-memory tensors vs tarfile + PIL.

Trains ``dc_cnn`` (Adam 1e-3, batch 64) on a dataset's training split for a few epochs,
three ways, and reports samples per second of the whole training (data + steps):

- ``memory``: the split as one uint8 tensor in RAM, a fresh permutation per epoch (the
  pipeline's own evaluate stage; the upper bound);
- ``open_dataset``: ``poison.open_dataset`` from the local shards, sha256 verified per shard,
  shuffled through a buffer, through a ``DataLoader`` with ``--workers`` processes;
- ``tarfile+PIL``: the shards read with ``tarfile`` and decoded with PIL in the training
  loop, in shard order, no verification (what a consumer writes by hand).

Usage:
    python benchmarks/loader_throughput.py [--dataset DIR] [--epochs 3] [--threads 2] [--workers 0 1]
Default dataset: the clean training split of the default params (written by ``dvc repro``).
Results: benchmarks/results/loader_throughput.json (and printed as a Markdown table).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from poison.loader import open_dataset
from poison.shards import load_split, read_manifest
from poison.train import build_model
from poison.utils import atomic_write_json, make_generator


def _model(shape, classes):
    return build_model("dc_cnn", shape[0], shape[1], classes, seed=0, device=torch.device("cpu"))


def _step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run_memory(dataset: Path, epochs: int, batch: int) -> int:
    x, y, _ = load_split(dataset, "train")
    model = _model(x.shape[1:], 10)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = make_generator(0, "bench-memory")
    n = 0
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0], batch):
            idx = order[s : s + batch]
            _step(model, opt, x[idx].float().div_(255), y[idx])
            n += idx.numel()
    return n


def run_open_dataset(dataset: Path, epochs: int, batch: int, workers: int) -> int:
    ds = open_dataset(dataset, shuffle=1000, seed=0)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
    shape = tuple(read_manifest(dataset)["image"][k] for k in ("channels", "height", "width"))
    model = _model(shape, 10)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    n = 0
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for xb, yb in loader:
            _step(model, opt, xb, yb)
            n += yb.numel()
    return n


def run_tarfile(dataset: Path, epochs: int, batch: int) -> int:
    shards = sorted(dataset.glob("train-*.tar"))
    m = read_manifest(dataset)["image"]
    model = _model((m["channels"], m["height"]), 10)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    n = 0
    for _ in range(epochs):
        xs, ys = [], []
        for shard in shards:
            with tarfile.open(shard) as tar:
                label = None
                for info in tar:
                    data = tar.extractfile(info).read()
                    if info.name.endswith(".cls"):
                        label = int(data)
                    elif info.name.endswith(".png"):
                        arr = np.array(Image.open(io.BytesIO(data)))
                        xs.append(torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()))
                        ys.append(label)
                    if len(xs) == batch:
                        _step(model, opt, torch.stack(xs).float().div_(255), torch.tensor(ys))
                        n += len(xs)
                        xs, ys = [], []
        if xs:
            _step(model, opt, torch.stack(xs).float().div_(255), torch.tensor(ys))
            n += len(xs)
    return n


def timed(fn, *args) -> dict:
    t = time.perf_counter()
    n = fn(*args)
    s = time.perf_counter() - t
    return {"samples": n, "seconds": round(s, 3), "samples_per_s": round(n / s, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="data/shards/mnist5k", help="dataset folder with a train split")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=2, help="runs per variant; the best is kept")
    p.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dataset = Path(args.dataset)
    variants = {"memory": (run_memory, dataset, args.epochs, args.batch),
                "tarfile+PIL": (run_tarfile, dataset, args.epochs, args.batch)}
    for w in args.workers:
        variants[f"open_dataset (workers={w})"] = (run_open_dataset, dataset, args.epochs, args.batch, w)
    timed(run_memory, dataset, 1, args.batch)  # warm-up: first-optimizer import, page cache
    results = {}
    for name, (fn, *a) in variants.items():
        runs = [timed(fn, *a) for _ in range(args.repeats)]
        results[name] = max(runs, key=lambda r: r["samples_per_s"])
        print(f"{name}: {results[name]}", flush=True)
    base = results["memory"]["samples_per_s"]
    tar = results["tarfile+PIL"]["samples_per_s"]
    for r in results.values():
        r["vs_memory"] = round(r["samples_per_s"] / base, 3)
        r["vs_tarfile"] = round(r["samples_per_s"] / tar, 3)
    out = {"dataset": str(dataset), "samples": len(load_split(dataset, "train")[1]), "epochs": args.epochs,
           "batch": args.batch, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "results": results}
    atomic_write_json(args.out, out)
    print("\n| feed | samples/s | vs in-memory | vs tarfile+PIL |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['samples_per_s']:.0f} | {r['vs_memory']:.2f} | {r['vs_tarfile']:.2f} |")


if __name__ == "__main__":
    main()
