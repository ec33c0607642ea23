"""Serve the ``regenerate`` flow on a cron schedule, without a work pool or worker.

    python -m flows.serve [--cron "0 3 * * *"] [--name nightly-serve] [--repo .]
                          [--no-pull] [--no-push] [--commit]

Registers the deployment ``regenerate/<name>`` with the running Prefect server and then
runs its scheduled runs itself, in this process, until stopped (Ctrl-C pauses the
schedule). The cron schedule is in UTC. Only run-level arguments are deployment
parameters, never hyperparameters (those come from params.yaml). Run it from the
repository root. ``prefect.yaml`` holds the same deployment for a work pool
(``prefect deploy -n nightly``).

Needs a Prefect server (PREFECT_API_URL): Prefect's temporary per-process server runs no
scheduler, so a cron schedule would never fire there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NO_SERVER = """\
error: no Prefect server is configured (PREFECT_API_URL is not set), and a schedule needs one:
Prefect's temporary per-process server runs no scheduler. Start a server in another terminal
and point Prefect at it, then run this again:

    prefect server start
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.serve", description="Serve `regenerate` on a cron schedule.")
    p.add_argument("--cron", default="0 3 * * *", help='cron schedule, UTC (default: "0 3 * * *")')
    p.add_argument("--name", default="nightly-serve", help="deployment name (default: nightly-serve)")
    p.add_argument("--repo", default=".", help="the repository to regenerate (default: .)")
    p.add_argument("--no-pull", action="store_true", help="skip `dvc pull` before `dvc repro`")
    p.add_argument("--no-push", action="store_true", help="skip `dvc push` after `dvc repro`")
    p.add_argument("--commit", action="store_true", help="git commit the lock files and reports/ after each run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        print(NO_SERVER, file=sys.stderr, end="")
        return 1
    from prefect.client.orchestration import get_client
    from prefect.types.entrypoint import EntrypointType

    from flows.regenerate import check_repo, regenerate
    from poison.errors import PoisonError

    repo = Path(args.repo).resolve()
    try:
        check_repo(repo)  # now, not at the first scheduled run
    except PoisonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        print(f"error: the Prefect server at {url} (PREFECT_API_URL) does not answer ({failure!r}). "
              f"Start it, or point PREFECT_API_URL at a running one:\n\n    prefect server start\n",
              file=sys.stderr)
        return 1
    parameters = {"repo": str(repo), "pull_first": not args.no_pull,
                  "push_after": not args.no_push, "git_commit": args.commit}
    regenerate.serve(name=args.name, cron=args.cron, parameters=parameters,
                     description="`dvc pull -> dvc repro --all-pipelines -> dvc push` on a schedule (python -m flows.serve)",
                     tags=["poison", "regenerate", "serve"],
                     limit=1,  # one regeneration at a time (a run also locks the repository itself)
                     # imported as flows.regenerate: run as a file, flows/poison.py would shadow `poison`
                     entrypoint_type=EntrypointType.MODULE_PATH)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
