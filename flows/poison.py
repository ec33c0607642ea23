"""Flow ``poison``: apply the trained generator to the training split -> POISONED shards.

One task per shard on the task runner of params.yaml's ``orchestration`` section; the
bytes equal ``poison run poison``'s (sequential) whatever the runner.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import fan_out, load_params_task, main
from poison import stages
from poison.card import HAZARD
from poison.config import Params
from poison.shards import manifest_sha256


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards(params: Params) -> dict[str, Any]:
    return stages.poison_plan(params)


@task(name="write-poisoned-shard", cache_policy=NO_CACHE)
def write_shard(params: Params, plan: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    return stages.poison_shard(params, plan, job)


@task(name="write-manifest-and-card", cache_policy=NO_CACHE)
def finish(params: Params, plan: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    return stages.poison_finish(params, plan, results)


@flow(name="poison")
def poison(params_path: str = "params.yaml") -> dict[str, Any]:
    """Write the poisoned training shards (fanned out), then the manifest and card."""
    params = load_params_task(params_path)
    plan = plan_shards(params)
    try:
        results = fan_out(write_shard, [{"params": params, "plan": plan, "job": job} for job in plan["jobs"]],
                          params.orchestration, "poisoned shards")
    except BaseException:
        stages.abandon(plan)
        raise
    summary = finish(params, plan, results)
    create_table_artifact(
        key="poisoned-shards",
        table=[{"file": r["shard"]["file"], "samples": r["shard"]["samples"], "bytes": r["shard"]["bytes"],
                "sha256": r["shard"]["sha256"], "max_linf": r["max_levels"] / 255.0} for r in results],
        description="the shards written",
    )
    create_markdown_artifact(
        key="poisoned-dataset",
        markdown="\n".join([
            f"# {plan['dataset']}", "", f"**{HAZARD}**", "",
            f"- written to `{summary['path']}` ({summary['samples']} samples in {summary['shards']} shards)",
            f"- manifest sha256 `{manifest_sha256(summary['path'])}`",
            f"- method DeepConfuse, {plan['config'].get('target')}; source `{params.paths.clean}`",
            f"- budget: L-inf eps {summary['eps']}, largest change stored {summary['max_linf']:.4f}",
            f"- task runner: {params.orchestration.task_runner} x {params.orchestration.workers}",
        ]),
        description="what the poison stage wrote",
    )
    return summary


if __name__ == "__main__":
    raise SystemExit(main(poison))
