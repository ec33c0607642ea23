"""Flow ``evaluate``: downstream classifiers trained on clean vs poisoned shards."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from flows.common import load_params_task, main
from poison import stages
from poison.config import Params


@task(name="train-and-test-downstream")
def run_evaluation(params: Params) -> dict[str, Any]:
    return stages.evaluate(params)


@flow(name="evaluate")
def evaluate(params_path: str = "params.yaml") -> dict[str, Any]:
    """Train each architecture on clean and poisoned data; test on the clean test split."""
    result = run_evaluation(load_params_task(params_path))
    create_table_artifact(
        key="downstream-accuracy",
        table=[{"arch": a, "clean_acc": r["clean"], "poisoned_acc": r["poisoned"]} for a, r in result.items()],
        description="clean test accuracy of downstream classifiers",
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main(evaluate))
