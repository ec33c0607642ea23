"""Flow ``train_generator``: train the DeepConfuse generator against a surrogate victim."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import load_params_task, main
from poison import stages
from poison.card import GENERATOR_HAZARD
from poison.config import Params


@task(name="train-deepconfuse-generator", cache_policy=NO_CACHE)
def train(params: Params) -> dict[str, Any]:
    logger = get_run_logger()
    trials, restarts = params.train_generator.trials, params.train_generator.restarts
    progress = create_progress_artifact(progress=0.0, description="DeepConfuse trials")

    def on_trial(record) -> None:
        done = record.restart * trials + record.trial + 1
        update_progress_artifact(progress, progress=100.0 * done / (trials * restarts))
        run = f" (run {record.restart + 1}/{restarts})" if restarts > 1 else ""
        logger.info("trial %d/%d%s: clean val accuracy %s, target rate %s, %.1fs", record.trial + 1, trials, run,
                    record.val_accuracy, record.val_target_rate, record.seconds)

    return stages.train_generator(params, on_trial=on_trial)


@flow(name="train_generator")
def train_generator(params_path: str = "params.yaml") -> dict[str, Any]:
    """Train the generator; keep the one best on the validation split."""
    result = train(load_params_task(params_path))
    create_markdown_artifact(
        key="generator-summary",
        markdown="\n".join([f"**{GENERATOR_HAZARD}**", "", "| key | value |", "|---|---|"]
                            + [f"| {k} | {v} |" for k, v in result.items()]),
        description="DeepConfuse generator training",
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main(train_generator))
