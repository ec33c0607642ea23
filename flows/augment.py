"""Flow ``augment``: semantically augmented shards (SIA) and the attack's diagnosis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import load_params_task, main
from poison import stages
from poison.card import AUGMENTED
from poison.config import Params
from poison.shards import manifest_sha256


@task(name="sia-augment", cache_policy=NO_CACHE)
def run_augment(params: Params) -> dict[str, Any]:
    return stages.augment(params)


@flow(name="augment")
def augment(params_path: str = "params.yaml") -> dict[str, Any]:
    """Write the SIA adversarial and long-tail-filled splits, the diagnosis JSON and PNG."""
    params = load_params_task(params_path)
    result = run_augment(params)
    reports = Path(params.paths.reports) / "augment"
    summary = json.loads((reports / "summary.json").read_text())
    diag = json.loads((reports / "diagnosis.json").read_text())
    create_table_artifact(
        key="sia-attribute-histogram",
        table=[{"attribute": k, "dominant_count": diag["dominant_counts"][k], "mean_usage": diag["mean_usage"][k],
                "alone_success_rate": diag["single_attribute_success_rate"].get(k)} for k in diag["attributes"]],
        description="which attributes the successful attacks used",
    )
    create_markdown_artifact(
        key="augmented-dataset",
        markdown="\n".join([
            f"# {Path(result['path']).name}", "", f"**{AUGMENTED}**", "",
            f"- written to `{result['path']}`, manifest sha256 `{manifest_sha256(result['path'])}`",
            *[f"- {split}: {n} samples" for split, n in result["samples"].items()],
            f"- victim {summary['victim']}: clean test accuracy {summary['victim_clean_test_accuracy']:.4f}, "
            f"SIA success on test {summary['adversarial_success_rate_test']:.4f}",
            f"- budget: image L-inf eps {params.augment.attack.eps}, {params.augment.attack.steps} steps; "
            f"diagnosis `{reports / 'diagnosis.png'}`",
        ]),
        description="what the augment stage wrote",
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main(augment))
