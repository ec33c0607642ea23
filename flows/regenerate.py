"""Flow ``regenerate`` (the scheduled one): ``dvc pull`` -> ``dvc repro`` -> ``dvc push``.

Reproduces every pipeline of the repository (``dvc repro --all-pipelines``: the core
``dvc.yaml`` and the poison variants of ``variants/dvc.yaml``) and keeps scheduled runs
recorded in their lock files. Optionally commits the lock files and the reports with git
and tags the commit as a dataset version. A failure leaves the workspace as it was: the
lock files are put back and ``dvc checkout --force`` restores every output they record
from the DVC cache, and the reports folder (uncached metrics and plots) is put back from a
copy taken at the start (params.yaml and code are never touched).

    python -m flows.regenerate [--no-pull] [--no-push] [--commit] [--tag v2026.11.24]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from flows.common import main
from poison.config import load_params
from poison.publish import PublishError, dvc_push, publication_hazards
from poison.utils import atomic_write_bytes


# the lock files of the repository's pipelines (dvc.yaml, variants/dvc.yaml)
LOCK_FILES = ("dvc.lock", "variants/dvc.lock")


def _run(cmd: list[str], cwd: Path, timeout: float = 6 * 3600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-12:])
        raise PublishError(f"{cwd}: `{' '.join(cmd[2:] if cmd[:2] == [sys.executable, '-m'] else cmd)}` failed:\n{tail}")
    return proc.stdout + proc.stderr


def _dvc(*args: str, cwd: Path) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


@task(name="dvc-pull", retries=2, retry_delay_seconds=30, cache_policy=NO_CACHE)
def pull(repo: Path) -> str:
    # outputs the remote does not hold yet (a first run) are rebuilt by repro, not an error
    return _dvc("pull", "--allow-missing", cwd=repo)


@task(name="dvc-repro", cache_policy=NO_CACHE)
def repro(repo: Path) -> str:
    return _dvc("repro", "--all-pipelines", cwd=repo)


@task(name="dvc-push", retries=2, retry_delay_seconds=30, cache_policy=NO_CACHE)
def push(repo: Path) -> str:
    return dvc_push(repo)


@task(name="git-commit", cache_policy=NO_CACHE)
def commit(repo: Path, tag: str | None, reports: Path) -> str | None:
    # reports: params.yaml's paths.reports, committed when it lies inside the repository
    paths = [lock for lock in LOCK_FILES if (repo / lock).is_file()]
    paths += [reports.relative_to(repo).as_posix()] if reports.is_dir() and reports.is_relative_to(repo) else []
    _run(["git", "add", "--", *paths], repo)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=repo).returncode != 0:
        _run(["git", "commit", "-q", "-m", "regenerate: outputs of `dvc repro` recorded in dvc.lock"], repo)
    if tag:
        _run(["git", "tag", tag], repo)
    return _run(["git", "rev-parse", "HEAD"], repo).strip()


@flow(name="regenerate")
def regenerate(repo: str = ".", pull_first: bool = True, push_after: bool = True, git_commit: bool = False,
               tag: str | None = None) -> dict[str, Any]:
    """Bring the datasets up to date with params.yaml and the code, recorded in dvc.lock."""
    log = get_run_logger()
    root = Path(repo).resolve()
    saved = {lock: (root / lock).read_bytes() for lock in LOCK_FILES if (root / lock).is_file()}
    # DVC deletes a stage's outputs before running it; the cached ones come back with
    # `dvc checkout`, the uncached metrics and plots (cache: false, kept in git) from this copy
    paths = load_params(root / "params.yaml").paths
    reports = root / paths.reports
    backup = Path(tempfile.mkdtemp(prefix="poison-regenerate-"))
    if reports.is_dir():
        shutil.copytree(reports, backup / "reports")
    out: dict[str, Any] = {"repo": str(root), "pulled": False, "pushed": False, "commit": None, "tag": None,
                           "hazards": []}
    keep_backup = False
    try:
        if pull_first:
            pull(root)
            out["pulled"] = True
        log.info("dvc repro in %s", root)
        out["repro"] = [line for line in repro(root).splitlines() if line.startswith(("Running stage", "Stage "))]
        if push_after:
            push(root)
            out["pushed"] = True
            # every pipeline's outputs went to the remote: its poisons, the augmented set, the generators
            out["hazards"] = publication_hazards([], True, [root / d for d in (
                paths.poisoned, paths.augmented, paths.topk_poisoned, paths.multilabel_poisoned)])
            for note in out["hazards"]:
                log.warning(note)
    except BaseException as exc:
        log.error("regenerate failed: restoring the lock files and the outputs they record")
        for lock in LOCK_FILES:  # a lock file the failed run created is removed
            if lock in saved:
                atomic_write_bytes(root / lock, saved[lock])
            else:
                (root / lock).unlink(missing_ok=True)
        if saved:
            rc = subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force"], cwd=root,
                                capture_output=True).returncode
            if rc != 0:
                exc.add_note(f"restoring: `dvc checkout --force` failed (exit {rc}), so the outputs may not match the "
                             f"restored lock files; run `dvc checkout --force` in {root}")
        try:
            _restore_reports(backup / "reports", reports)
        except Exception as failed:
            keep_backup = True
            exc.add_note(f"restoring: {reports} could not be put back ({failed}); the copy from before the run is "
                         f"{backup / 'reports'}")
        raise
    finally:
        if not keep_backup:
            shutil.rmtree(backup, ignore_errors=True)
    if git_commit or tag:
        out["commit"] = commit(root, tag, reports)
        out["tag"] = tag
    lines = ["# Regenerated", ""] + [line for note in out["hazards"] for line in (f"**{note}**", "")]
    lines += [f"- repository: `{root}`"]
    lines += [f"- {k}: {out[k]}" for k in ("pulled", "pushed", "commit", "tag")]
    lines += ["", "```", *out["repro"], "```"]
    create_markdown_artifact(key="regenerate", markdown="\n".join(lines), description="what dvc repro did")
    return out


def _restore_reports(saved: Path, reports: Path) -> None:
    """Put ``reports`` back as ``saved`` holds it, by renames (no ``saved``: there were none; remove the new ones).

    The copy is made beside ``reports`` first, so a failure midway leaves the failed run's
    reports in place and ``saved`` intact, never a half-copied folder under the name.
    """
    trash = Path(tempfile.mkdtemp(prefix=f".{reports.name}.old-", dir=reports.parent)) if reports.exists() else None
    try:
        if saved.is_dir():
            fresh = Path(tempfile.mkdtemp(prefix=f".{reports.name}.restore-", dir=reports.parent))
            try:
                shutil.copytree(saved, fresh / reports.name)
                if trash is not None:
                    os.replace(reports, trash / reports.name)
                os.replace(fresh / reports.name, reports)
            finally:
                shutil.rmtree(fresh, ignore_errors=True)
        elif trash is not None:
            os.replace(reports, trash / reports.name)
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", default=".")
    p.add_argument("--no-pull", action="store_true")
    p.add_argument("--no-push", action="store_true")
    p.add_argument("--commit", action="store_true", help="git commit the lock files and reports/")
    p.add_argument("--tag", help="git tag for the commit (implies --commit)")


if __name__ == "__main__":
    raise SystemExit(main(
        regenerate, options=_options, params=False,
        flow_kwargs=lambda a: {"repo": a.repo, "pull_first": not a.no_pull, "push_after": not a.no_push,
                               "git_commit": a.commit, "tag": a.tag},
    ))
