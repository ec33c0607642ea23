"""Flow ``evaluate``: downstream classifiers trained on clean vs poisoned shards.

One task per (dataset x architecture x seed) cell on the task runner of params.yaml's
``orchestration`` section. A cell is pure, so its result is cached (JSON, in Prefect's
result storage) under a key of everything it depends on: both manifests' sha256, the
recipe, the threads, the device, the ``poison`` source code, torch's version and the
task's own source. Adding a seed or an architecture trains only the new cells.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torchvision
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy

from flows.common import fan_out, load_params_task, main
from poison import stages
from poison.config import Params, to_dict
from poison.utils import canonical_json, code_fingerprint, resolve_device


def cell_key(_context: Any, parameters: dict[str, Any]) -> str:
    """The cache key of one evaluation cell: a hash of everything its result depends on."""
    params: Params = parameters["params"]
    return hashlib.sha256(canonical_json({
        "cell": parameters["cell"],
        "manifests": parameters["plan"]["manifest_sha256"],
        "recipe": to_dict(params.evaluate.recipe),
        # null (torch's default) keys the count it means on this host: CPU sums split by thread
        "threads": params.evaluate.threads if params.evaluate.threads is not None else torch.get_num_threads(),
        "device": str(resolve_device(params.device)),
        "code": code_fingerprint(),
        "torch": torch.__version__,
        # a defense's JPEG codec ships with torchvision (undefended cells keep their keys)
        **({"torchvision": torchvision.__version__} if parameters["cell"].get("defense") else {}),
    }).encode()).hexdigest()


@task(name="plan-evaluation", cache_policy=NO_CACHE)
def plan_cells(params: Params) -> dict[str, Any]:
    return stages.evaluate_plan(params)


def _run_name() -> str:
    """``poisoned-dc_cnn-seed0`` (``...-jpeg:10`` under a defense), from the running task's parameters."""
    from prefect.runtime import task_run

    cell = task_run.parameters["cell"]
    return f"{cell['dataset']}-{cell['arch']}-seed{cell['seed']}" + (f"-{cell['defense']}" if cell.get("defense") else "")


@task(name="train-and-test", cache_policy=TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=cell_key),
      persist_result=True, result_serializer="json",
      task_run_name=_run_name)
def train_and_test(params: Params, plan: dict[str, Any], cell: dict[str, Any]) -> dict[str, Any]:
    return stages.evaluate_cell(params, plan, cell)


@task(name="write-metrics", cache_policy=NO_CACHE)
def finish(params: Params, plan: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    return stages.evaluate_finish(params, plan, runs)


@flow(name="evaluate")
def evaluate(params_path: str = "params.yaml") -> dict[str, Any]:
    """Train each architecture on clean and poisoned data (fanned out); test on the clean test split."""
    params = load_params_task(params_path)
    plan = plan_cells(params)
    cell = train_and_test if params.orchestration.cache else train_and_test.with_options(
        cache_policy=NO_CACHE, persist_result=False)
    runs = fan_out(cell, [{"params": params, "plan": plan, "cell": c} for c in plan["cells"]],
                   params.orchestration, "evaluation cells")
    result = finish(params, plan, runs)
    rows = [{"arch": a, "clean_acc": r["clean"], "poisoned_acc": r["poisoned"]} for a, r in result.items()]
    defended = [(a, spec, r[f"clean under {spec}"], r[f"poisoned under {spec}"]) for a, r in result.items()
                for spec in params.evaluate.defenses]
    create_table_artifact(key="downstream-accuracy", table=rows,
                          description="clean test accuracy of downstream classifiers (mean over seeds)")
    create_markdown_artifact(
        key="evaluation",
        markdown="\n".join([
            "# Downstream evaluation", "",
            f"- clean `{params.paths.clean}` (manifest sha256 `{plan['manifest_sha256']['clean'][:12]}`), "
            f"poisoned `{params.paths.poisoned}` (`{plan['manifest_sha256']['poisoned'][:12]}`)",
            f"- seeds {list(params.evaluate.seeds)}, {params.evaluate.recipe.epochs} epochs "
            f"{params.evaluate.recipe.optimizer} lr {params.evaluate.recipe.lr}; metrics in "
            f"`{params.paths.reports}/evaluate/metrics.json`", "",
            "| arch | clean-trained accuracy | poisoned-trained accuracy |", "|---|---|---|",
            *[f"| {r['arch']} | {r['clean_acc']:.4f} | {r['poisoned_acc']:.4f} |" for r in rows],
            *(["", "Under training-data defenses (the training split transformed; test images clean):", "",
               "| arch | defense | clean-trained accuracy | poisoned-trained accuracy |", "|---|---|---|---|"]
              if defended else []),
            *[f"| {a} | `{spec}` | {c:.4f} | {q:.4f} |" for a, spec, c, q in defended],
        ]),
        description="clean test accuracy, clean vs poisoned training data",
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main(evaluate))
