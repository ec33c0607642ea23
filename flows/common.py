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


def main(flow: Callable[..., Any], argv: list[str] | None = None, *,
         options: Callable[[argparse.ArgumentParser], None] | None = None,
         flow_kwargs: Callable[[argparse.Namespace], dict[str, Any]] | None = None, params: bool = True) -> int:
    """Run ``flow`` from the command line; exit 1 with the message on a known error.

    By default the flow gets ``params_path`` from ``--params``, checked before the run.
    ``options`` adds a flow's own arguments and ``flow_kwargs`` maps them to the flow's
    keyword arguments; ``params=False`` drops ``--params`` (flows that read it elsewhere).
    """
    parser = argparse.ArgumentParser(prog=f"python -m flows.{flow.__name__}", description=flow.__doc__)
    if params:
        parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    kwargs = flow_kwargs(args) if flow_kwargs is not None else {"params_path": args.params}
    try:
        if params:
            load_params(args.params)  # a bad params file is reported plainly, without a flow run
        flow(**kwargs)
    except PoisonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
