"""Small helpers shared by the library: devices, seeds, atomic writes, hashing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # not POSIX: update_json writes atomically, without the lock
    fcntl = None  # type: ignore[assignment]

import torch

from poison.errors import ConfigError

__all__ = [
    "resolve_device",
    "cpu_has_bfloat16",
    "make_generator",
    "derive_seed",
    "atomic_write_bytes",
    "atomic_write_json",
    "update_json",
    "atomic_path",
    "swap_in_folder",
    "fsync_tree",
    "fsync_folder",
    "remove_stale_folders",
    "sha256_file",
    "sha256_bytes",
    "git_revision",
    "run_command",
    "canonical_json",
    "torch_threads",
    "GLOBAL_RNG_LOCK",
    "code_fingerprint",
]

_log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device named by ``name`` (``auto`` picks CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device: expected 'auto', 'cpu' or an available CUDA device, got {name!r} "
            "but CUDA is not available; set device: auto or cpu in params.yaml"
        )
    return device


#: /proc/cpuinfo flags of bfloat16 instructions: x86 (AVX-512 BF16, AMX) and Arm (FEAT_BF16).
BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_bfloat16(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bfloat16 instructions; None where that cannot be read (not Linux).

    Without them torch's bfloat16 autocast emulates the arithmetic: one DeepConfuse step pair
    measured 2x slower than float32 with AVX-512 alone and 8-15x slower with AVX2
    (BENCHMARKS.md section 3), so ``precision: bfloat16`` only pays where this is True.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return not BFLOAT16_CPU_FLAGS.isdisjoint(flags)


def derive_seed(seed: int, *names: str | int) -> int:
    """Return a 63-bit seed derived from ``seed`` and a purpose, stable across runs.

    Separate purposes (splitting, generator init, each downstream model) get
    independent streams without ever seeding torch globally.
    """
    text = ":".join([str(seed), *map(str, names)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def make_generator(seed: int, *names: str | int) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded with ``derive_seed(seed, *names)``."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *names))
    return gen


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    An interrupted write leaves at most a ``.tmp-*`` file, never a file under the
    final name that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes 0600 files; published data must be readable like any other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_folder(path: Path) -> None:
    """Flush a folder's entries (its renames and new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: a folder cannot be opened, NTFS orders its metadata itself
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush one file's data to disk (Windows needs a handle open for writing to flush)."""
    with open(path, "rb+" if os.name == "nt" else "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the folders holding them to disk.

    Done before a folder is renamed into place, so that after a power loss the final name
    never points at a manifest beside zero-length or missing shards.
    """
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                fsync_file(path)
        fsync_folder(Path(folder))


def swap_in_folder(staging: Path, out: Path) -> None:
    """Replace the folder ``out`` with the complete folder ``staging`` (same parent), by renames.

    Everything in ``staging`` is flushed to disk first (``fsync_tree``), and the parent folder
    after the renames, so the swap is durable, not only atomic. The previous ``out`` is moved
    aside first and put back if the second rename fails or is interrupted (any exception,
    Ctrl-C too). A process killed between the renames leaves it moved aside as
    ``.<name>.old-*/<name>``, where ``remove_stale_folders`` finds it.
    """
    os.chmod(staging, 0o755)
    fsync_tree(staging)
    if not out.exists():
        os.replace(staging, out)
        fsync_folder(out.parent)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, trash / out.name)
    try:
        os.replace(staging, out)
    except BaseException:  # an OSError, or Ctrl-C between the two renames
        os.replace(trash / out.name, out)  # put the previous dataset back
        raise
    else:
        fsync_folder(out.parent)  # the new one is durably in place before the old one is deleted
    finally:
        if out.exists():  # else the restore failed too: leave the previous one for remove_stale_folders
            shutil.rmtree(trash, ignore_errors=True)


def remove_stale_folders(out: Path, marker: str = "manifest.json") -> None:
    """Remove staging / old folders a killed run left beside ``out`` (never the dataset itself).

    A run killed inside ``swap_in_folder``, between moving the previous dataset aside and moving
    the new one in, leaves no ``out`` at all: the previous one, complete (it holds ``marker``),
    is put back first.
    """
    if not out.exists():
        saved = [p / out.name for p in out.parent.glob(f".{out.name}.old-*") if (p / out.name / marker).is_file()]
        if saved:
            os.replace(max(saved, key=lambda p: p.stat().st_mtime), out)
            _log.warning("%s: restored the previous dataset that an interrupted replacement had moved aside", out)
    for pattern in (f".{out.name}.staging-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def canonical_json(obj: Any) -> str:
    """Return ``obj`` as JSON with sorted keys and a trailing newline (stable bytes)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as canonical JSON to ``path`` atomically."""
    atomic_write_bytes(path, canonical_json(obj).encode())


def update_json(path: str | os.PathLike[str], update: Callable[[dict], dict], indent: int = 2) -> dict:
    """Read the JSON object at ``path`` ({} if absent), apply ``update``, write the result back; return it.

    The file is replaced atomically, and on POSIX the read-update-write holds an exclusive
    ``flock`` on the file's folder, so runs that add results to one file side by side keep
    each other's (each re-reads the file under the lock instead of overwriting it with an
    older copy). A file that is not a JSON object raises ``ValueError`` naming it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY) if fcntl is not None else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = json.loads(path.read_bytes()) if path.is_file() else {}
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path}: not valid JSON ({exc}); move the file away or pass another output path") from None
        if not isinstance(current, dict):
            raise ValueError(f"{path}: expected a JSON object of results, got {type(current).__name__}; "
                             "move the file away or pass another output path")
        result = update(current)
        atomic_write_bytes(path, (json.dumps(result, indent=indent, sort_keys=True) + "\n").encode())
        return result
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Return the hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def git_revision(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """Return the git commit of the code at ``cwd`` (suffix ``-dirty`` if it has uncommitted
    changes there), or None outside git. Only ``cwd`` is checked, so pipeline outputs and
    dvc.lock written elsewhere in the repository do not count."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        rev = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + "-dirty" if dirty else rev) or None


def run_command(cmd: list[str], cwd: str | os.PathLike[str] | None = None, *, timeout: float | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` capturing its output; on a timeout or any interruption stop it and every
    process it started, then re-raise (``subprocess.TimeoutExpired`` on a timeout).

    ``subprocess.run`` kills only the process it started: a ``dvc repro`` or ``dvc push``
    killed that way leaves its stage or transfer processes running. The command stays in
    this process's group, so a signal to the whole group (a Prefect worker cancelling a flow
    run) reaches them too.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        stop_process_tree(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def process_descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_process_tree(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM ``proc`` and its descendants, then SIGKILL what is left after ``grace`` s."""
    pids = [proc.pid, *process_descendants(proc.pid)]  # before any dies: orphans are re-parented
    for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(0.5)  # the children's own exits after the parent's; SIGKILL what is left


#: Held while code reseeds torch's global CPU generator (under ``fork_rng``) to build a
#: model: tasks running in threads would otherwise interleave their draws.
GLOBAL_RNG_LOCK = threading.RLock()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads (None: leave them), then restore them.

    Safe to nest and to overlap from several Python threads: the count set before the first
    block is restored when the last block ends (while blocks overlap, the latest one's count
    holds).

    CPU kernels split their sums by thread, so the thread count is part of a result's
    bytes: stages that must give the same bytes wherever they run fix it.
    """
    if count is None:
        yield
        return
    token = object()
    with _THREADS_LOCK:
        # the count is process-wide: blocks that overlap (thread task runners) or nest share it,
        # so the count from before the first block comes back only when the last one ends
        if not _ACTIVE_THREADS:
            _THREADS_BEFORE[0] = torch.get_num_threads()
        _ACTIVE_THREADS.append((token, count))
        torch.set_num_threads(count)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _ACTIVE_THREADS[:] = [(t, c) for t, c in _ACTIVE_THREADS if t is not token]
            torch.set_num_threads(_ACTIVE_THREADS[-1][1] if _ACTIVE_THREADS else _THREADS_BEFORE[0])


_THREADS_LOCK = threading.Lock()
_ACTIVE_THREADS: list[tuple[object, int]] = []   # the blocks of torch_threads now running, oldest first
_THREADS_BEFORE = [0]                            # the count before the first of them


def code_fingerprint() -> str:
    """Return the sha256 of the ``poison`` package's source files (a cache key for pure tasks)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@contextmanager
def frozen(model: Any) -> Iterator[Any]:
    """Put ``model`` in eval mode with its parameters' requires_grad off; restore both on exit.

    What an attack needs: gradients with respect to its inputs only, the model left as it was.
    """
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
