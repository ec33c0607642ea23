"""Flow ``publish`` (opt-in, not a DVC stage): verify, ``dvc push``, copy to a readable prefix.

Not part of ``dvc repro``: a push belongs after the pipeline has finished and dvc.lock is
written (the ``regenerate`` flow runs it after ``dvc repro``). What is published, where,
comes from params.yaml's ``publish`` section; a run only chooses whether to push.

    python -m flows.publish [--params params.yaml] [--no-push]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from poison.config import Params
from poison.publish import (PublishError, dvc_push, evaluate_metrics, pipeline_datasets, publication_hazards,
                            publish_dataset, verify_all, writable_store)
from flows.common import load_params_task, main


@task(name="verify-datasets", cache_policy=NO_CACHE)
def verify(params: Params) -> dict[str, str]:
    """Every dataset to publish, checked shard by shard; any problem stops the flow before a push."""
    return verify_all(params)


@task(name="dvc-push", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def push(remote: str | None) -> str:
    # the core pipeline only, as `poison publish` does: the variants of variants/dvc.yaml need not have run
    return dvc_push(".", remote=remote, targets=("dvc.yaml",))


@task(name="copy-to-prefix", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def copy(path: str, params: Params) -> dict[str, Any]:
    cfg = params.publish
    return publish_dataset(path, cfg.prefix, version=cfg.version, endpoint_url=cfg.endpoint_url,
                           metrics=evaluate_metrics(params), repo_path=Path(path).as_posix())


@flow(name="publish")
def publish(params_path: str = "params.yaml", push_to_dvc: bool | None = None) -> dict[str, Any]:
    """Verify the datasets, push them with DVC and copy them to ``publish.prefix`` (if set)."""
    params = load_params_task(params_path)
    cfg = params.publish
    do_push = cfg.dvc_push if push_to_dvc is None else push_to_dvc
    if not do_push and not cfg.prefix:
        raise PublishError("publish: nothing to do: dvc push is off and publish.prefix is null in params.yaml")
    if cfg.prefix:  # a read-only prefix is refused before anything is verified, pushed or retried
        writable_store(cfg.prefix, cfg.endpoint_url)
    dirs = verify(params)
    out: dict[str, Any] = {"dvc_push": None, "datasets": {},
                           "hazards": publication_hazards(list(dirs.values()), do_push, pipeline_datasets(params))}
    for note in out["hazards"]:  # on the terminal too, before anything goes out (the artifact comes last)
        get_run_logger().warning(note)
    if do_push:
        push(cfg.remote)
        out["dvc_push"] = {"remote": cfg.remote or "default"}
    if cfg.prefix:
        for name, path in dirs.items():
            out["datasets"][name] = copy(path, params)
    lines = ["# Published", ""]
    # the same warnings as the poisoned datasets' cards and the generator checkpoints, pushed or copied
    lines += [line for note in out["hazards"] for line in (f"**{note}**", "")]
    lines += [f"- dvc push: {out['dvc_push'] or 'skipped'}"]
    lines += [f"- {name}: `{r['url']}` ({r['samples']} samples, {r.get('kind', '-')}, "
              f"{'new' if r['published'] else 'already there'})" for name, r in out["datasets"].items()]
    create_markdown_artifact(key="published", markdown="\n".join(lines), description="where the datasets went")
    return out


if __name__ == "__main__":
    raise SystemExit(main(
        publish,
        options=lambda p: p.add_argument("--no-push", action="store_true",
                                         help="skip dvc push (only copy to publish.prefix)"),
        flow_kwargs=lambda a: {"params_path": a.params, "push_to_dvc": False if a.no_push else None},
    ))
