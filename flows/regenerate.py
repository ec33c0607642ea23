"""Flow ``regenerate`` (the scheduled one): ``dvc pull`` -> ``dvc repro`` -> ``dvc push``.

Reproduces every pipeline of the repository (``dvc repro --all-pipelines``: the core
``dvc.yaml`` and the poison variants of ``variants/dvc.yaml``) and keeps scheduled runs
recorded in their lock files. Optionally commits the lock files and the reports with git
and tags the commit as a dataset version. A failure leaves the workspace as it was: the
lock files are put back and ``dvc checkout --force`` restores every output they record
from the DVC cache (a pipeline that had no lock file loses the one the failed run started
and the outputs it records), and the reports folder (uncached metrics and plots) is put back from a
copy taken at the start (params.yaml and code are never touched). Once ``dvc repro`` has
succeeded its outputs are consistent with the lock files and are kept: a failed push then
fails the run without undoing the regeneration.

What the rollback needs (the lock files' bytes, the copy of reports/) is written before
anything runs to ``.dvc/tmp/regenerate-rollback/`` and removed once it is no longer owed
(``dvc repro`` succeeded, or the rollback finished). A run killed before it could roll back
(SIGKILL: a Prefect worker kills a cancelled run 30 s after its SIGTERM; a crash, a power
loss) leaves that record: the next run finishes the rollback first (holding DVC's repository
lock; not if another commit is checked out by then, or where there are no POSIX file locks),
and ``--recover`` does only that (the record and the rollback: flows/rollback.py).

One run at a time per repository: a run holds an exclusive lock (``.dvc/tmp/regenerate.lock``)
from start to end, and a DVC command refused because another DVC process holds the
repository (a hand-run ``dvc repro``) fails the run without rolling anything back, as
nothing of this run's doing needs undoing. A timeout or cancellation stops every process
``dvc`` started (the stages), not only ``dvc``, before anything is restored.

    python -m flows.regenerate [--repo .] [--no-pull] [--no-push] [--commit] [--tag v2026.11.24]
    python -m flows.regenerate [--repo .] --recover
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from flows.common import main
from flows.rollback import JOURNAL, RepoBusy, discard, rollback, stage_env, write_record  # noqa: F401 (JOURNAL)
from poison.config import load_params
from poison.publish import PublishError, dvc_push, publication_hazards
from poison.utils import run_command


def pipelines(root: Path) -> list[str]:
    """Every ``dvc.yaml`` that ``dvc repro --all-pipelines`` runs (here: dvc.yaml, variants/dvc.yaml),
    relative to ``root``. Like DVC, it skips dot-folders (.dvc, .git, virtual environments) and
    nested DVC repositories (a folder with a ``.dvc`` of its own, e.g. a scratch clone)."""
    found = []
    for folder, dirs, files in os.walk(root):
        if Path(folder) != Path(root) and ".dvc" in dirs:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "dvc.yaml" in files:
            found.append(Path(folder, "dvc.yaml").relative_to(root).as_posix())
    return found


def lock_files(root: Path) -> list[str]:
    """The lock file of every pipeline (beside its dvc.yaml), whether or not it exists yet."""
    return [str(Path(p).with_name("dvc.lock").as_posix()) for p in pipelines(root)]


def _run(cmd: list[str], cwd: Path, timeout: float = 6 * 3600) -> str:
    """Run ``cmd``; on a timeout or any interruption stop it and every process it started.

    ``dvc repro`` starts each stage as a shell and a Python process of their own: killing only
    ``dvc`` would leave a stage writing outputs after a rollback (``poison.utils.run_command``).
    """
    name = " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd)
    try:
        proc = run_command(cmd, cwd, timeout=timeout, env=stage_env())
    except subprocess.TimeoutExpired:
        raise PublishError(f"{cwd}: `{name}` took longer than {timeout:.0f} s and was stopped, with every process "
                           "it started") from None
    stdout, stderr = proc.stdout, proc.stderr
    if proc.returncode != 0:
        tail = "\n".join((stderr + stdout).strip().splitlines()[-12:])
        if "Unable to acquire lock" in stderr + stdout:
            raise RepoBusy(f"{cwd}: `{name}` refused: another DVC process holds the repository; nothing was changed "
                           f"by this run. Run again when it has finished.\n{tail}")
        raise PublishError(f"{cwd}: `{name}` failed:\n{tail}")
    return stdout + stderr


@contextlib.contextmanager
def _exclusive(root: Path):
    """Hold ``.dvc/tmp/regenerate.lock`` for the block; another holder makes it raise ``RepoBusy``.

    Yields whether the lock is held (False where there are no POSIX file locks)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (the deployment's concurrency limit still holds)
        yield False
        return
    path = root / ".dvc" / "tmp" / "regenerate.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RepoBusy(f"{root}: another regenerate run holds {path}; nothing was changed by this run. "
                           "Run again when it has finished.") from None
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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


#: What a commit of recorded outputs must be reproducible from, with every pipeline's dvc.yaml:
#: refused while any has uncommitted changes.
SOURCES = ("params.yaml", "poison", "flows")


def _git(args: list[str], repo: Path) -> str:
    """stdout of ``git args`` in ``repo``; ``PublishError`` naming the command and git's message if it fails.

    (``git status`` outside a work tree, or one git refuses as of "dubious ownership", exits
    128 with no output, which must not read as "no changes".)
    """
    try:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    except FileNotFoundError:
        raise PublishError("--commit/--tag: git is not installed (or not on PATH); install it or run without "
                           "--commit") from None
    if proc.returncode != 0:
        raise PublishError(f"{repo}: `git {' '.join(args[:2])}` failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-800:]}\n--commit/--tag need a git work tree "
                           "git accepts; fix that or run without --commit; nothing was run")
    return proc.stdout


def _gitignores(repo: Path) -> dict[str, str]:
    """``git status`` of every .gitignore (DVC adds its outputs to them), by path."""
    out = _git(["status", "--porcelain", "--untracked-files=all", "--", ":(glob)**/.gitignore"], repo)
    return {line[3:]: line[:2] for line in out.splitlines() if line[3:]}


def check_committable(repo: Path) -> None:
    """Refuse ``--commit``/``--tag`` before anything runs if the sources have uncommitted changes.

    The commit records outputs: it must hold the code and params that made them.
    """
    # a work tree git accepts, and an identity to commit with: checked now, not after an hour of repro
    _git(["rev-parse", "--is-inside-work-tree"], repo)
    try:
        _git(["var", "GIT_COMMITTER_IDENT"], repo)
    except PublishError:
        raise PublishError(f"{repo}: --commit/--tag: git has no identity to commit with; set one (`git config "
                           "user.name NAME` and `git config user.email EMAIL`) or run without --commit; "
                           "nothing was run") from None
    # the .gitignore files too: the commit adds the entries DVC writes there, and only those
    dirty = _git(["status", "--porcelain", "--untracked-files=all", "--", *SOURCES, *pipelines(repo),
                  ":(glob)**/.gitignore"], repo).strip()
    if dirty:
        raise PublishError(f"{repo}: --commit/--tag records outputs with the code that made them, but these have "
                           f"uncommitted changes:\n{dirty}\ncommit or stash them first, or run without --commit")


def check_tag(repo: Path, tag: str) -> None:
    """Refuse a tag git would refuse, or one that exists, before anything runs."""
    valid = not tag.startswith("-") and subprocess.run(
        ["git", "check-ref-format", f"refs/tags/{tag}"], cwd=repo, capture_output=True).returncode == 0
    if not valid:
        raise PublishError(f"--tag {tag!r}: not a valid git tag name (see `git check-ref-format`); choose another, "
                           "e.g. v2026.11.24; nothing was run")
    if subprocess.run(["git", "rev-parse", "-q", "--verify", f"refs/tags/{tag}"], cwd=repo,
                      capture_output=True).returncode == 0:
        raise PublishError(f"--tag {tag!r}: the tag exists in {repo}; choose a new name (a dataset version is never "
                           "moved); nothing was run")


@task(name="git-commit", cache_policy=NO_CACHE)
def commit(repo: Path, tag: str | None, reports: Path, gitignores_before: dict[str, str] | None = None) -> str | None:
    # reports: params.yaml's paths.reports, committed when it lies inside the repository; only these
    # paths are committed (`git commit -- paths`), whatever else the user had staged
    locks = [lock for lock in lock_files(repo) if (repo / lock).is_file()]
    # a pipeline in a folder git ignores runs, but its lock file cannot be committed
    ignored = subprocess.run(["git", "check-ignore", "--", *locks], cwd=repo, capture_output=True,
                             text=True).stdout.split() if locks else []
    paths = [lock for lock in locks if lock not in ignored]
    paths += [reports.relative_to(repo).as_posix()] if reports.is_dir() and reports.is_relative_to(repo) else []
    before = gitignores_before or {}
    paths += [p for p, st in _gitignores(repo).items() if before.get(p) != st]  # the ones DVC edited in this run
    _run(["git", "add", "--", *paths], repo)
    if subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=repo).returncode != 0:
        _run(["git", "commit", "-q", "-m", "regenerate: outputs of `dvc repro` recorded in dvc.lock", "--", *paths],
             repo)
    if tag:
        _run(["git", "tag", tag], repo)
    return _run(["git", "rev-parse", "HEAD"], repo).strip()


def check_repo(root: Path) -> None:
    """Refuse a ``--repo`` that is not this project's checkout before anything is written there."""
    missing = [name for name in (".dvc", "params.yaml") if not (root / name).exists()]
    if missing:
        raise PublishError(f"--repo {root}: not a checkout of this project (no {' or '.join(missing)}); pass the "
                           "repository root (the folder holding dvc.yaml and params.yaml); nothing was run")


@flow(name="regenerate")
def regenerate(repo: str = ".", pull_first: bool = True, push_after: bool = True, git_commit: bool = False,
               tag: str | None = None, recover_only: bool = False) -> dict[str, Any]:
    """Bring the datasets up to date with params.yaml and the code, recorded in dvc.lock.

    ``recover_only``: only finish the rollback an earlier, killed run owed (if any), then stop."""
    root = Path(repo).resolve()
    check_repo(root)  # before the lock: a mistyped path must not become a folder with a .dvc/
    log = get_run_logger()
    with _exclusive(root) as locked:
        if locked or recover_only:  # unlocked, a journal may be a live run's: only --recover touches it
            notes = rollback(root, moved_on_ok=recover_only)
            if notes is not None:
                log.warning("an earlier regenerate run ended before it could roll back: the lock files, the "
                            "outputs they record and the reports are back as they were before it")
                for note in notes:
                    log.warning(note)
        if recover_only:
            return {"repo": str(root), "recovered": notes is not None, "notes": notes or []}
        return _regenerate(log, root, pull_first, push_after, git_commit, tag)


def _regenerate(log: Any, root: Path, pull_first: bool, push_after: bool, git_commit: bool,
                tag: str | None) -> dict[str, Any]:
    if git_commit or tag:
        check_committable(root)
    if tag:
        check_tag(root, tag)
    gitignores = _gitignores(root) if git_commit or tag else {}
    paths = load_params(root / "params.yaml").paths
    reports = root / paths.reports
    # DVC deletes a stage's outputs before running it; the cached ones come back with
    # `dvc checkout`, the uncached metrics and plots (cache: false, kept in git) from the journal's copy
    journal = write_record(root, lock_files(root), reports)
    out: dict[str, Any] = {"repo": str(root), "pulled": False, "pushed": False, "commit": None, "tag": None,
                           "hazards": []}
    try:
        if pull_first:
            pull(root)
            out["pulled"] = True
        log.info("dvc repro in %s", root)
        out["repro"] = [line for line in repro(root).splitlines() if line.startswith(("Running stage", "Stage "))]
    except RepoBusy:
        discard(journal)
        raise  # another DVC process holds the repository: nothing of this run's doing to undo
    except BaseException as exc:
        log.error("regenerate failed: restoring the lock files and the outputs they record")
        try:
            for note in rollback(root, moved_on_ok=True) or []:
                exc.add_note(note)
        except Exception as failed:
            exc.add_note(str(failed))
        raise
    # the outputs are complete and consistent with the lock files: nothing is owed from here on
    discard(journal)
    if push_after:
        # the outputs are complete and recorded in the lock files: a failed push keeps them
        try:
            push(root)
        except BaseException as exc:
            exc.add_note(f"the regenerated outputs are kept in {root} (consistent with its lock files); push them "
                         "with `dvc push` once the remote is reachable")
            raise
        out["pushed"] = True
        # every pipeline's outputs went to the remote: its poisons, the augmented set, the generators
        out["hazards"] = publication_hazards([], True, [root / d for d in (
            paths.poisoned, paths.augmented, paths.topk_poisoned, paths.multilabel_poisoned)])
        for note in out["hazards"]:
            log.warning(note)
    if git_commit or tag:
        out["commit"] = commit(root, tag, reports, gitignores)
        out["tag"] = tag
    lines = ["# Regenerated", ""] + [line for note in out["hazards"] for line in (f"**{note}**", "")]
    lines += [f"- repository: `{root}`"]
    lines += [f"- {k}: {out[k]}" for k in ("pulled", "pushed", "commit", "tag")]
    lines += ["", "```", *out["repro"], "```"]
    create_markdown_artifact(key="regenerate", markdown="\n".join(lines), description="what dvc repro did")
    return out


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", default=".", help="the repository root to regenerate (default: .)")
    p.add_argument("--no-pull", action="store_true", help="skip `dvc pull` before `dvc repro`")
    p.add_argument("--no-push", action="store_true", help="skip `dvc push` after `dvc repro`")
    p.add_argument("--commit", action="store_true", help="git commit the lock files and reports/")
    p.add_argument("--tag", help="git tag for the commit (implies --commit)")
    p.add_argument("--recover", action="store_true",
                   help="only finish the rollback of an earlier run that was killed before it could roll back "
                        "(.dvc/tmp/regenerate-rollback/), then stop")


if __name__ == "__main__":
    raise SystemExit(main(
        regenerate, options=_options, params=False,
        flow_kwargs=lambda a: {"repo": a.repo, "pull_first": not a.no_pull, "push_after": not a.no_push,
                               "git_commit": a.commit, "tag": a.tag, "recover_only": a.recover},
    ))
