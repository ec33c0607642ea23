"""Flow ``prepare``: clean, stratified train/val/test shards of the source dataset."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.common import load_params_task, main
from poison import stages
from poison.config import Params


@task(name="write-clean-shards")
def write_clean_shards(params: Params) -> dict[str, Any]:
    return stages.prepare(params)


@flow(name="prepare")
def prepare(params_path: str = "params.yaml") -> dict[str, Any]:
    """Write the clean dataset's shards, manifest and card."""
    return write_clean_shards(load_params_task(params_path))


if __name__ == "__main__":
    raise SystemExit(main(prepare))
