"""Flow ``pipeline``: every stage in order, for Prefect users who do not use DVC."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import main
from flows.augment import augment
from flows.compose import compose
from flows.multilabel import multilabel
from flows.topk import topk
from flows.evaluate import evaluate
from flows.poison import poison
from flows.prepare import prepare
from flows.report import report
from flows.train_generator import train_generator
from flows.variants_report import variants_report


@flow(name="pipeline")
def pipeline(params_path: str = "params.yaml") -> dict[str, Any]:
    """prepare -> train_generator -> poison -> augment -> evaluate -> report -> topk -> compose -> multilabel
    -> variants_report (subflows)."""
    return {
        "prepare": prepare(params_path),
        "train_generator": train_generator(params_path),
        "poison": poison(params_path),
        "augment": augment(params_path),
        "evaluate": evaluate(params_path),
        "report": report(params_path),
        "topk": topk(params_path),
        "compose": compose(params_path),
        "multilabel": multilabel(params_path),
        "variants_report": variants_report(params_path),
    }


if __name__ == "__main__":
    raise SystemExit(main(pipeline))
