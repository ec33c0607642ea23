"""Flow ``variants_report``: one human-readable page (Markdown + HTML) of the variants pipeline's outputs."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import load_params_task, main
from poison.config import Params
from poison.report import build_variants_report


@task(name="write-variants-report", cache_policy=NO_CACHE)
def write_variants_report(params: Params) -> dict[str, Any]:
    return build_variants_report(params)


@flow(name="variants_report")
def variants_report(params_path: str = "params.yaml") -> dict[str, Any]:
    """Write reports/variants_report/{report.md, report.html, figures} from the topk and multilabel stages' outputs."""
    result = write_variants_report(load_params_task(params_path))
    # the page itself, less its figures (their paths mean nothing in the Prefect UI)
    create_markdown_artifact(key="variants-report", description=f"{result['path']}/report.html has the figures",
                             markdown=result.pop("summary"))
    return result


if __name__ == "__main__":
    raise SystemExit(main(variants_report))
