"""Flow ``multilabel``: DeepConfuse on the multi-label composites, its shards and downstream evaluation."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import load_params_task, main, poison_variant_artifacts
from poison import stages
from poison.config import Params


@task(name="multilabel-poison", cache_policy=NO_CACHE)
def run_multilabel(params: Params) -> dict[str, Any]:
    return stages.multilabel(params)


@flow(name="multilabel")
def multilabel(params_path: str = "params.yaml") -> dict[str, Any]:
    """Train the multi-label generator, write its poisoned shards, evaluate them downstream."""
    params = load_params_task(params_path)
    result = run_multilabel(params)
    poison_variant_artifacts(params, "multilabel", result["path"],
                             ("exact_match", "hamming_loss", "macro_f1", "target_rate"))
    return result


if __name__ == "__main__":
    raise SystemExit(main(multilabel))
