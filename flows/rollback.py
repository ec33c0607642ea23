"""What a failed ``regenerate`` run owes the workspace, and how it is paid back (flows/regenerate.py).

Before ``dvc pull`` / ``dvc repro`` run, ``write_record`` stores what a rollback needs in
``.dvc/tmp/regenerate-rollback/`` (the lock files' bytes or their absence, a copy of reports/,
the commit checked out), whole or not at all. ``rollback`` puts the lock files, the outputs
they record (``dvc checkout --force``) and reports/ back, holding DVC's own repository lock,
and removes the record; every step can be repeated, so a rollback cut short (a Prefect worker
SIGKILLs a cancelled run 30 s after its SIGTERM; a crash) is finished by the next call.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from poison.publish import PublishError
from poison.utils import atomic_write_bytes, fsync_folder, fsync_tree

__all__ = ["JOURNAL", "RepoBusy", "stage_env", "write_record", "discard", "rollback", "restore_reports"]


class RepoBusy(PublishError):
    """Another DVC process (or regenerate run) holds the repository; this run changed nothing."""


def stage_env() -> dict[str, str]:
    # DVC runs each stage's `python -m flows.X` through PATH: make it this interpreter's, so a
    # worker started as `.venv/bin/prefect worker start` (venv not activated) runs the stages in it
    return os.environ | {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def _recorded_outputs(root: Path, lock: str) -> list[Path]:
    """The outputs ``lock`` records, resolved against each stage's ``wdir`` (from its dvc.yaml);
    only paths inside ``root``. A lock file that cannot be read records none."""
    folder = (root / lock).parent
    try:
        stages = (yaml.safe_load((root / lock).read_text()) or {}).get("stages") or {}
        specs = (yaml.safe_load((folder / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return []
    found, top = [], Path(os.path.normpath(os.path.abspath(root)))
    for name, stage in stages.items() if isinstance(stages, dict) else ():
        spec = specs.get(str(name).split("@")[0]) if isinstance(specs, dict) else None
        wdir = folder / ((spec.get("wdir") if isinstance(spec, dict) else None) or ".")
        outs = stage.get("outs") if isinstance(stage, dict) else None
        for out in outs if isinstance(outs, list) else ():
            if isinstance(out, dict) and isinstance(out.get("path"), str):
                # normalised, not resolved: with `cache.type symlink` an output is a link into the
                # DVC cache, and the link is what goes, never the cached file it points to
                path = Path(os.path.normpath(os.path.abspath(wdir / out["path"])))
                if path.is_relative_to(top) and path != top:
                    found.append(path)
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


#: What a run that has not finished owes the workspace if it fails: written whole before anything
#: runs, removed once nothing is owed. Found at the start of a run, it is an earlier run's, killed
#: before it could roll back.
JOURNAL = Path(".dvc", "tmp", "regenerate-rollback")


def _head(root: Path) -> str | None:
    """The commit checked out in ``root`` (None outside a git work tree or without git)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def write_record(root: Path, locks: list[str], reports: Path) -> Path:
    """Record what a rollback needs: each lock file (a copy under ``locks/``, or its absence), a copy
    of ``reports``, and the commit checked out.

    Built in a staging folder, flushed to disk and renamed into place: the journal exists only whole,
    and a rename never replaces another run's.
    """
    final = root / JOURNAL
    if final.exists():
        raise PublishError(f"{final}: an earlier run's rollback is still owed; run `python -m flows.regenerate "
                           f"--repo {root} --recover` once no other regenerate run is active; nothing was run")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        saved: dict[str, bool] = {}
        for lock in locks:
            saved[lock] = (root / lock).is_file()
            if saved[lock]:
                (staging / "locks" / lock).parent.mkdir(parents=True, exist_ok=True)
                (staging / "locks" / lock).write_bytes((root / lock).read_bytes())
        if reports.is_dir():
            shutil.copytree(reports, staging / "reports", symlinks=True)
        place = reports.relative_to(root).as_posix() if reports.is_relative_to(root) else str(reports)
        (staging / "journal.json").write_text(json.dumps(
            {"locks": saved, "reports": place, "had_reports": reports.is_dir(), "head": _head(root),
             "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
        fsync_tree(staging)
        os.rename(staging, final)  # fails rather than replace a journal written meanwhile
        fsync_folder(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def discard(journal: Path) -> None:
    """Remove ``journal`` by renaming it aside first: a half-deleted journal never reads as one."""
    trash = Path(tempfile.mkdtemp(prefix=f".{journal.name}-done-", dir=journal.parent))
    os.replace(journal, trash / journal.name)
    fsync_folder(journal.parent)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _dvc_lock(root: Path, journal: Path):
    """Hold DVC's own repository lock (``.dvc/tmp/lock``, which every dvc command takes) for the block.

    A rollback must not rewrite lock files and outputs under a running ``dvc repro`` (a hand-run
    one, or a stage a SIGKILLed run left behind): then it raises ``RepoBusy`` and keeps the journal.
    """
    import zc.lockfile  # DVC's own lock backend (dvc/lock.py), installed with dvc

    path = root / ".dvc" / "tmp" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        held = zc.lockfile.LockFile(str(path))
    except zc.lockfile.LockError:
        raise RepoBusy(f"{root}: another DVC process holds the repository ({path}), so the rollback an earlier "
                       f"regenerate run owes was not done; it is kept in {journal}. Run again when that process "
                       "has finished.") from None
    try:
        yield
    finally:
        held.close()


def rollback(root: Path, *, moved_on_ok: bool = False) -> list[str] | None:
    """Put the workspace back as the journal recorded it; ``None`` if no rollback is owed.

    Restores the lock files (a pipeline that had none loses the one written since and the outputs
    it records) and ``reports/``, holding DVC's repository lock, then runs ``dvc checkout --force``
    for the outputs the lock files record. Every step can be repeated, so a rollback cut short is
    finished by the next call. Returns notes on what could not be restored (a checkout that failed
    for want of cached outputs). The journal is kept, and this raises, when something could not be
    written, when another DVC process holds the repository, and (unless ``moved_on_ok``) when
    another commit is checked out than when it was written: then it may describe a workspace the
    user has since replaced on purpose.
    """
    journal = root / JOURNAL
    for leftover in journal.parent.glob(f".{journal.name}-*"):  # a staging or discarded copy cut short
        shutil.rmtree(leftover, ignore_errors=True)
    if not journal.is_dir():
        return None
    try:
        record = json.loads((journal / "journal.json").read_text())
        saved, place, had_reports = dict(record["locks"]), str(record["reports"]), bool(record["had_reports"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PublishError(f"{journal}: the record of an unfinished run cannot be read ({exc}). It holds the lock "
                           "files (locks/) and reports/ from before that run: put back what you need by hand, then "
                           "delete the folder") from None
    then, now = record.get("head"), _head(root)
    if not moved_on_ok and then and now and then != now:
        raise PublishError(
            f"{journal}: a regenerate run written at {record.get('written')} (commit {then[:12]}) ended before it "
            f"could roll back, and {now[:12]} is checked out now, so its record may be stale. To put back the lock "
            f"files, outputs and reports from before that run anyway: `python -m flows.regenerate --repo {root} "
            f"--recover`; to keep the workspace as it is: delete {journal}; nothing was run")
    reports = root / place
    with _dvc_lock(root, journal):
        try:
            for lock, had in saved.items():
                if had:
                    atomic_write_bytes(root / lock, (journal / "locks" / lock).read_bytes())
                elif (root / lock).is_file():
                    # a pipeline that had no lock file: the failed run's stages recorded their outputs in a new
                    # one; those outputs go with it (DVC had removed any earlier ones before running each
                    # stage, and keeps these in its cache)
                    for path in _recorded_outputs(root, lock):
                        _remove(path)
                    (root / lock).unlink()
            for leftover in [*reports.parent.glob(f".{reports.name}.old-*"),
                             *reports.parent.glob(f".{reports.name}.restore-*")]:  # an earlier restore cut short
                shutil.rmtree(leftover, ignore_errors=True)
            restore_reports(journal / "reports" if had_reports else journal / "no-reports", reports)
        except OSError as failed:  # shutil.Error too
            raise PublishError(f"restoring from {journal} failed ({failed}); the record is kept: fix the cause, "
                               f"then run `python -m flows.regenerate --repo {root} --recover`") from failed
    notes = []
    if any(saved.values()):
        proc = subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force"], cwd=root, capture_output=True,
                              text=True, env=stage_env())
        if "Unable to acquire lock" in proc.stdout + proc.stderr:
            raise RepoBusy(f"{root}: another DVC process took the repository before `dvc checkout --force` could "
                           f"restore the outputs; the rollback is kept in {journal}. Run again (or `--recover`) when "
                           "it has finished.")
        if proc.returncode != 0:
            notes.append(f"restoring: `dvc checkout --force` failed (exit {proc.returncode}), so the outputs may not "
                         f"match the restored lock files; run `dvc checkout --force` in {root}")
    discard(journal)
    return notes


def restore_reports(saved: Path, reports: Path) -> None:
    """Put ``reports`` back as ``saved`` holds it, by renames (no ``saved``: there were none; remove the new ones).

    The copy is made beside ``reports`` first, so a failure midway leaves the failed run's
    reports in place and ``saved`` intact, never a half-copied folder under the name.
    """
    trash = Path(tempfile.mkdtemp(prefix=f".{reports.name}.old-", dir=reports.parent)) if reports.exists() else None
    try:
        if saved.is_dir():
            fresh = Path(tempfile.mkdtemp(prefix=f".{reports.name}.restore-", dir=reports.parent))
            try:
                shutil.copytree(saved, fresh / reports.name, symlinks=True)
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
