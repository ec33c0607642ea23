"""Flow ``topk``: the ordered top-k DeepConfuse poison, its shards and downstream evaluation."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import load_params_task, main, poison_variant_artifacts
from poison import stages
from poison.config import Params


@task(name="ordered-topk-poison", cache_policy=NO_CACHE)
def run_topk(params: Params) -> dict[str, Any]:
    return stages.topk(params)


@flow(name="topk")
def topk(params_path: str = "params.yaml") -> dict[str, Any]:
    """Train the ordered top-k generator, write its poisoned shards, evaluate them downstream."""
    params = load_params_task(params_path)
    result = run_topk(params)
    poison_variant_artifacts(params, "topk", result["path"],
                             ("accuracy", "target_rate", "topk_rate"))
    return result


if __name__ == "__main__":
    raise SystemExit(main(topk))
