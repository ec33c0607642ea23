"""Flow ``prepare``: clean, stratified train/val/test shards of the source dataset."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import load_params_task, main
from poison import stages
from poison.config import Params
from poison.shards import manifest_sha256


@task(name="write-clean-shards", cache_policy=NO_CACHE)
def write_clean_shards(params: Params) -> dict[str, Any]:
    return stages.prepare(params)


@flow(name="prepare")
def prepare(params_path: str = "params.yaml") -> dict[str, Any]:
    """Write the clean dataset's shards, manifest and card."""
    params = load_params_task(params_path)
    result = write_clean_shards(params)
    create_markdown_artifact(
        key="clean-dataset",
        markdown="\n".join([
            f"# {params.data.source} (clean)", "",
            f"- written to `{result['path']}`, manifest sha256 `{manifest_sha256(result['path'])}`",
            *[f"- {split}: {n} samples" for split, n in result["splits"].items()],
        ]),
        description="what the prepare stage wrote",
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main(prepare))
