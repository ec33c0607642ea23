"""Flow ``report``: one human-readable page (Markdown + HTML) of the core pipeline's outputs."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import load_params_task, main
from poison.config import Params
from poison.report import build_report


@task(name="write-report", cache_policy=NO_CACHE)
def write_report(params: Params) -> dict[str, Any]:
    return build_report(params)


@flow(name="report")
def report(params_path: str = "params.yaml") -> dict[str, Any]:
    """Write reports/report/{report.md, report.html, samples.png} from what the other stages wrote."""
    result = write_report(load_params_task(params_path))
    # the page itself, less its figures (their paths mean nothing in the Prefect UI)
    create_markdown_artifact(key="pipeline-report", description=f"{result['path']}/report.html has the figures",
                             markdown=result.pop("summary"))
    return result


if __name__ == "__main__":
    raise SystemExit(main(report))
