"""poison.utils: derived seeds, atomic writes, devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from poison.errors import PoisonError
from poison.utils import (atomic_path, atomic_write_json, canonical_json, cpu_has_bfloat16, derive_seed, make_generator,
                          resolve_device)


def test_derive_seed_is_stable_distinct_and_63_bit():
    assert derive_seed(0, "split") == derive_seed(0, "split")
    seeds = {derive_seed(s, p, t) for s in (0, 1) for p in ("split", "subset", "generator-init") for t in (0, 1)}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(3, "a", 1) != derive_seed(3, "a1")  # parts are separated


def test_make_generator_streams():
    a = torch.randperm(20, generator=make_generator(0, "x"))
    b = torch.randperm(20, generator=make_generator(0, "x"))
    c = torch.randperm(20, generator=make_generator(0, "y"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == canonical_json({"a": [1, 2], "b": 1})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_reported_configuration_error():
    # The CLI and the flows print PoisonErrors as one line; anything else is a traceback.
    with pytest.raises(PoisonError, match=r"device.*set device: auto or cpu"):
        resolve_device("cuda")


def test_update_json_merges_atomically_and_keeps_concurrent_updates(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from poison.utils import update_json

    path = tmp_path / "results" / "runs.json"
    assert update_json(path, lambda r: r | {"a": 1}) == {"a": 1}
    # many writers, each adding its own key: none loses another's (each re-reads under the lock)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: update_json(path, lambda r: r | {f"k{i}": i}), range(16)))
    assert json.loads(path.read_text()) == {"a": 1} | {f"k{i}": i for i in range(16)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["runs.json"]  # no temporary file left


def test_update_json_failure_leaves_the_file_and_names_a_bad_one(tmp_path):
    from poison.utils import update_json

    path = tmp_path / "runs.json"
    path.write_text('{"kept": true}\n')

    def boom(results):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        update_json(path, boom)
    assert path.read_text() == '{"kept": true}\n'
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="runs.json: expected a JSON object"):
        update_json(path, lambda r: r)
    for damaged in (b'{"a": 1', b"\xff\xfe\x00binary"):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match="runs.json: not valid JSON"):
            update_json(path, lambda r: r)
        assert path.read_bytes() == damaged


def test_update_json_without_flock_still_writes_atomically(tmp_path, monkeypatch):
    import poison.utils as utils

    monkeypatch.setattr(utils, "fcntl", None)  # not POSIX: no lock, the same atomic replace
    path = tmp_path / "runs.json"
    utils.update_json(path, lambda r: r | {"a": 1})
    assert utils.update_json(path, lambda r: r | {"b": 2}) == {"a": 1, "b": 2} == json.loads(path.read_text())


@pytest.mark.parametrize(("text", "expected"), [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n", True),  # x86 with AVX-512 BF16
    ("processor\t: 0\nflags\t\t: fpu sse avx2 amx_bf16\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n", False),  # AVX-512, no bf16
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm FEAT_BF16
    ("processor\t: 0\nFeatures\t: fp asimd crc32\n", False),
    ("processor\t: 0\nmodel name\t: something\n", None),  # no flags line: unknown, not "absent"
])
def test_cpu_has_bfloat16_reads_the_instruction_flags(tmp_path, text, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_has_bfloat16(cpuinfo) is expected
    assert cpu_has_bfloat16(tmp_path / "missing") is None  # not Linux: unknown


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the children through /proc")
def test_run_command_stops_every_process_the_command_started_on_a_timeout(tmp_path):
    # regenerate's `dvc repro` and publish's `dvc push` run through it
    import subprocess
    import sys
    import time

    from poison.utils import run_command

    pid_file = tmp_path / "grandchild.pid"
    # like `dvc repro`: the process we start starts another (a stage) that would outlive it
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              "'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(120)', "
              f"{str(pid_file)!r}]); time.sleep(120)")
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([sys.executable, "-c", script], tmp_path, timeout=3)
    pid = int(pid_file.read_text())
    for _ in range(50):  # reparented to init, which reaps it
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the stage process {pid} outlived the timeout")


def test_swap_in_folder_flushes_every_staged_file_before_the_rename(tmp_path, monkeypatch):
    import os

    from poison import utils

    staging, out = tmp_path / "staging", tmp_path / "out"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.tar").write_bytes(b"a")
    (staging / "sub" / "manifest.json").write_text("{}")
    out.mkdir()
    (out / "old").write_text("old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").is_dir() else fd))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", Path(a).name, Path(b).name))
        return real_replace(a, b)

    monkeypatch.setattr(utils.os, "fsync", fsync)
    monkeypatch.setattr(utils.os, "replace", replace)
    utils.swap_in_folder(staging, out)
    assert (out / "a.tar").read_bytes() == b"a" and not (out / "old").exists()
    first_replace = next(i for i, e in enumerate(events) if e[0] == "replace")
    synced = [e[1] for e in events[:first_replace] if e[0] == "fsync"]
    assert len(synced) >= 2 + (2 if os.name != "nt" else 0)  # both files (and, on POSIX, both folders)
    if Path("/proc/self/fd").is_dir():
        assert {str(staging.resolve() / "a.tar"), str(staging.resolve() / "sub" / "manifest.json")} <= set(synced)
    if os.name != "nt":  # the parent folder, after the renames (Windows cannot open a folder to flush it)
        assert events[-1][0] == "fsync" and events[-2][0] == "replace"
