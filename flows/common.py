"""Shared pieces of the flows: the params task and the command-line entry point."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from prefect import task

from poison.config import Params, load_params
from poison.errors import PoisonError


@task(name="load-params")
def load_params_task(params_path: str) -> Params:
    """Return the validated params (fails fast, before any compute, on a bad key)."""
    return load_params(params_path)


def main(flow: Callable[..., Any], argv: list[str] | None = None) -> int:
    """Run ``flow`` with ``--params`` from the command line; exit 1 with the message on a known error."""
    parser = argparse.ArgumentParser(prog=f"python -m flows.{flow.__name__}", description=flow.__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        load_params(args.params)  # a bad params file is reported plainly, without a flow run
        flow(params_path=args.params)
    except PoisonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
