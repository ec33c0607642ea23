"""Flow ``compose``: the multi-label dataset (grid mosaics of clean digits, multi-hot labels)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import load_params_task, main
from poison import stages
from poison.config import Params
from poison.shards import manifest_sha256


@task(name="grid-composites", cache_policy=NO_CACHE)
def run_compose(params: Params) -> dict[str, Any]:
    return stages.compose(params)


@flow(name="compose")
def compose(params_path: str = "params.yaml") -> dict[str, Any]:
    """Compose each clean split into multi-label mosaics; write them as shards."""
    params = load_params_task(params_path)
    result = run_compose(params)
    create_markdown_artifact(
        key="multilabel-dataset",
        markdown="\n".join([
            f"# {result['path']} (clean, multi-label)", "",
            f"- {params.compose.grid}x{params.compose.grid} mosaics of `{params.paths.clean}`, manifest sha256 "
            f"`{manifest_sha256(result['path'])}`",
            *[f"- {split}: {n} samples, {result['mean_positives'][split]} labels per image on average"
              for split, n in result["splits"].items()],
        ]),
        description="what the compose stage wrote",
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main(compose))
