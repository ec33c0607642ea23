"""Flow ``poison``: apply the trained generator to the training split -> POISONED shards."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.common import load_params_task, main
from poison import stages
from poison.config import Params


@task(name="materialize-poison")
def materialize(params: Params) -> dict[str, Any]:
    return stages.poison(params)


@flow(name="poison")
def poison(params_path: str = "params.yaml") -> dict[str, Any]:
    """Write the poisoned training shards, manifest and card."""
    return materialize(load_params_task(params_path))


if __name__ == "__main__":
    raise SystemExit(main(poison))
