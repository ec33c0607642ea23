"""Fan-out speed of the flows, and Prefect's overhead per stage (issue 5).

Part 1, fan-out: the ``poison`` flow (materialization, one task per shard) and the
``evaluate`` flow (one task per dataset x architecture x seed cell) on each task runner
(thread, process, dask LocalCluster) with 1 and 2 workers, against the library's
sequential stage (``stages.poison`` / ``stages.evaluate``, no Prefect). Each flow call is
timed whole, in this process, after a warm-up flow has started Prefect's temporary server:
so a process pool or a Dask cluster pays its start-up every call, as a stage run does.
Every run's outputs are checked byte for byte against the sequential ones.

Part 2, overhead: each stage run the way ``dvc repro`` runs it (``python -m flows.<stage>``,
a fresh interpreter) without a server (Prefect starts a temporary one) and against a
running ``prefect server start``, vs the same stage through ``poison run <stage>`` (no
Prefect). Overhead = flow wall - library wall.

Usage:
    python benchmarks/orchestration.py [--workdir build/bench-orchestration] [--epochs 5]
        [--clean DIR --generator FILE] [--runners thread process dask] [--skip-overhead]
Without --clean/--generator it prepares mnist5k and trains a 1-trial generator (the
weights do not change the timings). Results: benchmarks/results/orchestration.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _metrics(path: Path) -> dict[str, Any]:
    m = json.loads((path / "evaluate" / "metrics.json").read_bytes())
    for d in m["datasets"].values():
        d.pop("path")
    return m


def _write_params(params: Any, path: Path) -> Path:
    from poison.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return path


def _workspace(args: argparse.Namespace) -> Any:
    """Params whose clean data and generator exist (copied or built) under the workdir."""
    from poison import stages
    from poison.config import load_params

    work = Path(args.workdir).resolve()
    base = load_params(REPO / "params.yaml")
    paths = dataclasses.replace(base.paths, clean=str(work / "data/mnist5k"), generator=str(work / "models/generator.pt"),
                                poisoned=str(work / "data/mnist5k-deepconfuse"), reports=str(work / "reports"))
    recipe = dataclasses.replace(base.evaluate.recipe, epochs=args.epochs)
    params = dataclasses.replace(base, device="cpu", paths=paths,
                                 evaluate=dataclasses.replace(base.evaluate, recipe=recipe))
    if args.clean:
        if not Path(paths.clean).exists():
            shutil.copytree(args.clean, paths.clean)
            Path(paths.generator).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(args.generator, paths.generator)
    elif not Path(paths.generator).exists():
        stages.prepare(params)
        quick = dataclasses.replace(params, train_generator=dataclasses.replace(params.train_generator, trials=1))
        stages.train_generator(quick)
    return params


def fan_out(params: Any, runners: list[str], workers: list[int], repeats: int) -> list[dict[str, Any]]:
    from flows.common import load_params_task  # noqa: F401  (imports prefect)
    from flows.evaluate import evaluate
    from flows.poison import poison
    from poison import stages
    from poison.config import OrchestrationConfig

    work = Path(params.paths.reports).parent
    rows: list[dict[str, Any]] = []

    def sequential() -> dict[str, float]:
        t0 = time.perf_counter()
        stages.poison(params)
        t1 = time.perf_counter()
        stages.evaluate(params)
        return {"materialize": t1 - t0, "evaluate": time.perf_counter() - t1}

    times = [sequential() for _ in range(repeats)]
    reference = {"poisoned": _tree(Path(params.paths.poisoned)), "metrics": _metrics(Path(params.paths.reports))}
    rows.append({"runner": "sequential (library, no Prefect)", "workers": 1,
                 **{k: min(t[k] for t in times) for k in times[0]}, "identical": True})
    print(rows[-1], flush=True)
    warm = dataclasses.replace(params, orchestration=OrchestrationConfig("thread", 1, cache=False))
    poison(params_path=str(_write_params(warm, work / "params-warm.yaml")))  # starts the temporary server
    for runner in runners:
        for n in workers:
            cfg = OrchestrationConfig(runner, n, cache=False)
            path = _write_params(dataclasses.replace(params, orchestration=cfg), work / f"params-{runner}-{n}.yaml")
            times, identical = [], True
            for _ in range(repeats):
                t0 = time.perf_counter()
                poison(params_path=str(path))
                t1 = time.perf_counter()
                evaluate(params_path=str(path))
                times.append({"materialize": t1 - t0, "evaluate": time.perf_counter() - t1})
                identical &= (_tree(Path(params.paths.poisoned)) == reference["poisoned"]
                              and _metrics(Path(params.paths.reports)) == reference["metrics"])
            rows.append({"runner": runner, "workers": n, **{k: min(t[k] for t in times) for k in times[0]},
                         "identical": identical})
            print(rows[-1], flush=True)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(env: dict[str, str]) -> Iterator[str]:
    port = _free_port()
    log = open(Path(env["PREFECT_HOME"]) / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("prefect server did not start in 120 s")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()


def overhead(params: Any, repeats: int) -> list[dict[str, Any]]:
    work = Path(params.paths.reports).parent
    quick = dataclasses.replace(params, train_generator=dataclasses.replace(params.train_generator, trials=1))
    from poison.config import OrchestrationConfig

    quick = dataclasses.replace(quick, orchestration=OrchestrationConfig("thread", 1, cache=False))
    path = _write_params(quick, work / "params-overhead.yaml")
    home = Path(tempfile.mkdtemp(prefix="prefect-home-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def wall(cmd: list[str], extra: dict[str, str]) -> float:
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env=env | extra, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{cmd} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            best = seconds if best is None else min(best, seconds)
        return best

    rows = []
    stages_ = ["prepare", "train_generator", "poison", "evaluate"]
    library = {s: wall([sys.executable, "-m", "poison.cli", "run", "--stages", s, "--params", str(path)], {}) for s in stages_}
    ephemeral = {s: wall([sys.executable, "-m", f"flows.{s}", "--params", str(path)], {}) for s in stages_}
    with _server(env) as url:
        served = {s: wall([sys.executable, "-m", f"flows.{s}", "--params", str(path)], {"PREFECT_API_URL": url})
                  for s in stages_}
    shutil.rmtree(home, ignore_errors=True)
    for s in stages_:
        rows.append({"stage": s, "library": library[s], "flow_temporary_server": ephemeral[s], "flow_running_server": served[s],
                     "overhead_temporary_server": ephemeral[s] - library[s], "overhead_running_server": served[s] - library[s]})
        print(rows[-1], flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = ["| runner | workers | materialize (s) | speed-up | evaluation matrix (s) | speed-up | bytes = sequential |",
             "|---|---|---|---|---|---|---|"]
    one = {r["runner"]: r for r in result["fan_out"] if r["workers"] == 1}
    for r in result["fan_out"]:
        base = one.get(r["runner"], r)
        lines.append(f"| {r['runner']} | {r['workers']} | {r['materialize']:.1f} | {base['materialize'] / r['materialize']:.2f}x "
                     f"| {r['evaluate']:.1f} | {base['evaluate'] / r['evaluate']:.2f}x | {'yes' if r['identical'] else 'NO'} |")
    if result.get("overhead"):
        lines += ["", "| stage | library (s) | flow, temporary server (s) | flow, running server (s) | overhead temporary | overhead running |",
                  "|---|---|---|---|---|---|"]
        for r in result["overhead"]:
            lines.append(f"| {r['stage']} | {r['library']:.1f} | {r['flow_temporary_server']:.1f} | {r['flow_running_server']:.1f} "
                         f"| {r['overhead_temporary_server']:+.1f} | {r['overhead_running_server']:+.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="build/bench-orchestration")
    ap.add_argument("--clean", help="an existing clean mnist5k dataset folder to copy")
    ap.add_argument("--generator", help="an existing generator checkpoint to copy (with --clean)")
    ap.add_argument("--epochs", type=int, default=5, help="downstream epochs per cell (params.yaml: 10)")
    ap.add_argument("--runners", nargs="+", default=["thread", "process", "dask"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/orchestration.json")
    args = ap.parse_args()
    if bool(args.clean) != bool(args.generator):
        ap.error("--clean and --generator go together")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    params = _workspace(args)
    result: dict[str, Any] = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "cells": 2 * len(params.evaluate.archs) * len(params.evaluate.seeds), "epochs": args.epochs,
        "fan_out": fan_out(params, args.runners, args.workers, args.repeats),
    }
    if not args.skip_overhead:
        result["overhead"] = overhead(params, args.repeats)
    from poison.utils import atomic_write_json

    atomic_write_json(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
