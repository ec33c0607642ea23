"""Shared pieces of the flows: the params task, fan-out on the configured task runner, the CLI."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Callable, Iterator

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from poison.config import OrchestrationConfig, Params, load_params
from poison.errors import ConfigError, PoisonError


@task(name="load-params", cache_policy=NO_CACHE)
def load_params_task(params_path: str) -> Params:
    """Return the validated params (fails fast, before any compute, on a bad key)."""
    return load_params(params_path)


def task_runner(cfg: OrchestrationConfig) -> TaskRunner:
    """Return the Prefect task runner that params.yaml's ``orchestration`` section names (not started)."""
    if cfg.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("orchestration.task_runner: 'dask' needs prefect-dask, which is not installed; "
                          "run `pip install -e \".[dask]\"` or choose thread / process") from None
    if cfg.address is not None:
        return DaskTaskRunner(address=cfg.address)
    import dask

    # Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand
    # memory back after nearly every free: torch's allocation-heavy training ran 1.7x slower
    # than in a plain process (BENCHMARKS.md section 6). None removes it from the workers' env.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    # one single-threaded worker process per slot: torch's threads come from the stage's `threads`
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def fan_out(fn: Any, calls: list[dict[str, Any]], cfg: OrchestrationConfig, label: str) -> list[Any]:
    """Run task ``fn`` once per keyword-argument dict of ``calls`` on the configured runner.

    Returns the results in the order of ``calls`` (whichever finished first); the first
    failure is raised once every call has ended. A progress artifact counts finished calls.
    """
    log = get_run_logger()
    total = len(calls)
    progress = create_progress_artifact(progress=0.0, description=f"{label}: finished tasks of {total}")
    log.info("%s: %d tasks on the %s runner (%d workers%s)", label, total, cfg.task_runner, cfg.workers,
             f", scheduler {cfg.address}" if cfg.address else "")
    with _api_url_for_workers(cfg), task_runner(cfg) as runner:
        futures = [runner.submit(fn, kwargs) for kwargs in calls]
        for done, _ in enumerate(as_completed(futures), start=1):
            update_progress_artifact(progress, progress=100.0 * done / max(total, 1))
        return [f.result() for f in futures]


@contextlib.contextmanager
def _api_url_for_workers(cfg: OrchestrationConfig) -> Iterator[None]:
    """Point worker processes at this run's API server while the runner starts and runs.

    Without ``PREFECT_API_URL`` the flow talks to a temporary server of its own; process
    and LocalCluster workers would each start another one (seconds each) and record their
    task runs where nobody looks.
    """
    if cfg.task_runner == "thread" or cfg.address is not None or os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def poison_variant_artifacts(params: Params, stage: str, path: str, keys: tuple[str, ...]) -> None:
    """A hazard note and a table of downstream means (clean vs poisoned) for a poison variant stage."""
    import json
    from pathlib import Path

    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from poison.card import HAZARD
    from poison.shards import manifest_sha256

    metrics = json.loads((Path(params.paths.reports) / stage / "metrics.json").read_text())
    rows = [{"dataset": kind, "arch": arch, **{k: metrics[kind][arch]["mean"].get(k) for k in keys}}
            for kind in ("clean", "poisoned") for arch in params.evaluate.archs]
    create_table_artifact(key=f"{stage}-downstream", table=rows,
                          description=f"downstream models trained on clean vs poisoned data (mean of {len(params.evaluate.seeds)} seeds)")
    create_markdown_artifact(
        key=f"{stage}-poisoned-dataset",
        markdown="\n".join([f"# {Path(path).name}", "", f"**{HAZARD}**", "",
                            f"- written to `{path}`, manifest sha256 `{manifest_sha256(path)}`",
                            f"- metrics: `{Path(params.paths.reports) / stage / 'metrics.json'}`"]),
        description=f"what the {stage} stage wrote",
    )


def main(flow: Callable[..., Any], argv: list[str] | None = None, *,
         options: Callable[[argparse.ArgumentParser], None] | None = None,
         flow_kwargs: Callable[[argparse.Namespace], dict[str, Any]] | None = None, params: bool = True) -> int:
    """Run ``flow`` from the command line; exit 1 with the message on a known error.

    By default the flow gets ``params_path`` from ``--params``, checked before the run.
    ``options`` adds a flow's own arguments and ``flow_kwargs`` maps them to the flow's
    keyword arguments; ``params=False`` drops ``--params`` (flows that read it elsewhere).
    """
    parser = argparse.ArgumentParser(prog=f"python -m flows.{flow.__name__}", description=flow.__doc__)
    if params:
        parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    kwargs = flow_kwargs(args) if flow_kwargs is not None else {"params_path": args.params}
    try:
        if params:
            load_params(args.params)  # a bad params file is reported plainly, without a flow run
        flow(**kwargs)
    except PoisonError as exc:
        notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))  # e.g. what a failed push kept
        print(f"error: {exc}{notes}", file=sys.stderr)
        return 1
    return 0
