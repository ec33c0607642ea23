"""A materialization killed with SIGKILL midway leaves nothing that looks complete, and a rerun
ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_params_dict
from poison.shards import verify_dataset
from poison.utils import remove_stale_folders

# Runs the `poison` CLI, SIGKILLing itself at a chosen point of the dataset write.
KILLER = r"""
import os, signal, sys
from poison import shards
from poison.cli import main

where, at = os.environ["KILL_WHERE"], int(os.environ["KILL_AT"])
count = {"n": 0}
def die_on(name):
    real = getattr(shards, name)
    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(shards, name, wrapper)
if where == "swap":  # between swap_in_folder's renames: the previous dataset moved aside, the new one not yet in
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(src)).startswith(".") and ".staging-" in os.path.basename(os.fspath(src)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
else:
    die_on(where)
sys.exit(main(sys.argv[1:]))
"""


def _params_file(tmp: Path, session_params, stage: str) -> tuple[Path, Path]:
    """Params whose output of ``stage`` goes under ``tmp``; inputs are the session's datasets."""
    d = tiny_params_dict()
    d["paths"] = {"clean": session_params.paths.clean, "generator": session_params.paths.generator,
                  "poisoned": session_params.paths.poisoned, "reports": str(tmp / "reports")}
    key = "clean" if stage == "prepare" else "poisoned"
    d["paths"][key] = str(tmp / "data" / Path(d["paths"][key]).name)
    if stage == "poison":
        d["poison"]["shard_size"] = 30  # 7 shards: room to die in the middle
    else:
        d["data"]["shard_size"] = 30
    path = tmp / "params.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d))
    return path, Path(d["paths"][key])


def _run(params: Path, stage: str, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kill:
        env.update(KILL_WHERE=kill[0], KILL_AT=str(kill[1]))
        cmd = [sys.executable, "-c", KILLER, "run", "--params", str(params), "--stages", stage]
    else:
        cmd = [sys.executable, "-m", "poison.cli", "run", "--params", str(params), "--stages", stage]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("stage, kill", [
    ("poison", ("_add_member", 200)),   # inside the 3rd of 7 shards (3 members per sample)
    ("poison", ("dataset_card", 1)),    # every shard and the manifest written, card not yet
    ("prepare", ("_add_member", 400)),  # inside a shard of the clean train split
])
def test_sigkill_midway_then_rerun_is_byte_identical(tmp_path, session_params, poisoned_dataset, stage, kill):
    ref_params, ref_out = _params_file(tmp_path / "reference", session_params, stage)
    proc = _run(ref_params, stage)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _files(ref_out)

    params, out = _params_file(tmp_path / "killed", session_params, stage)
    proc = _run(params, stage, kill)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    # nothing under the dataset's name; only hidden leftovers that no reader lists
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == []
    assert any(p.name.startswith(f".{out.name}.staging-") for p in out.parent.iterdir())

    proc = _run(params, stage)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(out) == reference
    assert verify_dataset(out) == []
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the rerun swept the leftovers


def _killed_rewrite(tmp_path: Path, session_params, kill: tuple[str, int]) -> tuple[Path, dict[str, bytes]]:
    """Write the poisoned dataset, then rewrite it in a run SIGKILLed at ``kill``; return it and its files before."""
    params, out = _params_file(tmp_path / "p", session_params, "poison")
    assert _run(params, "poison").returncode == 0
    before = _files(out)
    proc = _run(params, "poison", kill)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    return out, before


@pytest.mark.slow
def test_sigkill_while_replacing_keeps_the_previous_dataset(tmp_path, session_params, poisoned_dataset):
    out, before = _killed_rewrite(tmp_path, session_params, ("_add_member", 350))
    assert _files(out) == before and verify_dataset(out) == []


@pytest.mark.slow
def test_sigkill_between_the_swap_renames_loses_neither_dataset(tmp_path, session_params, poisoned_dataset):
    out, before = _killed_rewrite(tmp_path, session_params, ("swap", 0))
    assert not out.exists()  # killed in the window: the dataset's name is empty
    # the next write puts the previous dataset back before sweeping the leftovers
    remove_stale_folders(out)
    assert _files(out) == before and verify_dataset(out) == []
    assert [p.name for p in out.parent.iterdir()] == [out.name]
