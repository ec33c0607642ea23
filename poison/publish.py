"""Publishing: push with DVC, and copy a dataset to a readable prefix for plain WebDataset URLs.

DVC's remote is content-addressed (files are stored by md5), so WebDataset brace URLs
cannot point into it. ``publish_dataset`` copies one verified dataset to

    <prefix>/<dataset>/<version>/{<split>-NNNNNN.tar, manifest.json, README.md, <split>.wids.json}

where ``prefix`` is a folder or ``s3://bucket/prefix`` and ``version`` defaults to the
first 12 hex digits of the manifest's sha256 (so a version names exactly one content).
Nothing half-written is ever published:

- the dataset is verified (every shard against its manifest) before anything is copied;
- into a folder, the version is assembled in a hidden staging folder and renamed into
  place; on S3 every file is one PUT and ``manifest.json`` goes last, so a reader (who
  starts from the manifest) never sees a version whose shards are not all there;
- an existing version is never overwritten with different content.

``dvc_push`` runs ``dvc push`` in a subprocess (the library never imports DVC) after
checking that the workspace matches ``dvc.lock``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Sequence

from poison.errors import ShardError
from poison.card import AUGMENTED, GENERATOR_HAZARD, HAZARD, dataset_card
from poison.manifest import check_shard_bytes, parse_manifest, read_manifest, shard_name, verify_dataset
from poison.stores import LocalStore, Store, open_store
from poison.utils import canonical_json, remove_stale_folders, run_command, sha256_bytes, sha256_file, swap_in_folder

__all__ = ["publish", "verify_all", "evaluate_metrics", "publish_dataset", "wids_index", "card_metrics", "dvc_push", "PublishError", "default_version",
           "publication_hazards", "pipeline_datasets"]

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PublishError(ShardError):
    """A dataset could not be published (unverified, conflicting version, remote failure)."""


def default_version(dataset_dir: str | os.PathLike[str]) -> str:
    """Return the default published version of a dataset: its manifest sha256, 12 hex digits."""
    return sha256_file(Path(dataset_dir) / "manifest.json")[:12]


def wids_index(manifest: dict[str, Any], split: str) -> dict[str, Any]:
    """Return the ``wids`` shard index (wids-shard-index-v1) of one split; URLs are relative to it."""
    where = f"manifest of {manifest.get('dataset')}"
    shards = [r for r in manifest["shards"] if r.get("split") == split]
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": f"{manifest['dataset']}-{split}",
        # the index is all a wids / plain-WebDataset consumer may read: it carries the dataset's warning
        "description": (manifest.get("hazard") or {"poisoned": HAZARD, "semantic": AUGMENTED}.get(manifest.get("kind"))
                        or f"{manifest['dataset']}, split {split} ({manifest.get('kind')})"),
        "shardlist": [{"url": shard_name(r, where), "nsamples": int(r["samples"]), "filesize": int(r["bytes"])}
                      for r in shards],
    }


def _files(dataset_dir: Path, manifest: dict[str, Any], manifest_bytes: bytes, card: bytes
           ) -> list[tuple[str, Callable[[], bytes]]]:
    """(name, read) of everything published, manifest last; each shard is re-checked as it is read.

    ``manifest_bytes`` are the very bytes ``manifest`` was parsed from: the manifest published
    is the one the shards were checked against, even if the folder changes meanwhile.
    """
    where = str(dataset_dir / "manifest.json")

    def shard(rec: dict[str, Any]) -> Callable[[], bytes]:
        def read() -> bytes:
            path = dataset_dir / shard_name(rec, where)
            data = path.read_bytes()
            check_shard_bytes(data, rec, str(path))  # the bytes copied are the bytes checked
            return data
        return read

    out: list[tuple[str, Callable[[], bytes]]] = [(shard_name(r, where), shard(r)) for r in manifest["shards"]]
    for split in manifest["splits"]:
        index = canonical_json(wids_index(manifest, split)).encode()
        out.append((f"{split}.wids.json", lambda index=index: index))
    out.append(("README.md", lambda: card))
    out.append(("manifest.json", lambda: manifest_bytes))
    return out


def card_metrics(metrics: dict[str, Any] | None, dataset_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the summary of the evaluate stage's ``metrics`` that describes this dataset, else None.

    ``metrics`` (reports/evaluate/metrics.json) names the manifest sha256 of the clean and
    poisoned datasets it measured; numbers of any other dataset are never attached.
    """
    if not metrics or "datasets" not in metrics:
        return None
    sha = sha256_file(Path(dataset_dir) / "manifest.json")
    role = next((r for r, d in metrics["datasets"].items() if d.get("manifest_sha256") == sha), None)
    if role is None:
        return None
    # the keys evaluate.summarise writes
    keep = tuple(f"{m}_{s}" for m in ("accuracy", "target_rate") for s in ("mean", "min", "max"))
    summary: dict[str, Any] = {
        "measured_as": role, "target": metrics.get("target"), "test_samples": metrics.get("test_samples"),
        "recipe": metrics.get("recipe"), "seeds": metrics.get("seeds"),
        "clean_test_accuracy": {
            trained_on: {arch: {k: v for k, v in m.items() if k in keep} for arch, m in metrics[trained_on].items()}
            for trained_on in ("clean", "poisoned") if isinstance(metrics.get(trained_on), dict)
        },
    }
    if isinstance(metrics.get("defenses"), dict) and metrics["defenses"]:
        # each classifier trained on the training split transformed by a defense (evaluate.defenses)
        summary["clean_test_accuracy_under_defenses"] = {
            spec: {trained_on: {arch: {k: v for k, v in m.items() if k in keep} for arch, m in by_kind[trained_on].items()}
                   for trained_on in ("clean", "poisoned") if isinstance(by_kind.get(trained_on), dict)}
            for spec, by_kind in metrics["defenses"].items() if isinstance(by_kind, dict)}
    if role == "poisoned":
        summary["budget"] = metrics.get("budget")
    return summary


def publish_dataset(dataset_dir: str | os.PathLike[str], prefix: str | os.PathLike[str], *,
                    version: str | None = None, endpoint_url: str | None = None,
                    metrics: dict[str, Any] | None = None, repo_path: str | None = None) -> dict[str, Any]:
    """Copy a verified dataset to ``<prefix>/<dataset>/<version>/``; return where and what.

    ``metrics`` (the evaluate stage's metrics.json) goes into the published card when it
    describes this very dataset (``card_metrics``); ``repo_path`` is the dataset's path in
    its DVC project, for the card's ``dvc import`` line. Returns {"url", "dataset",
    "version", "files", "samples", "kind", "metrics", "published"} where ``published`` is
    False when that version was already there with identical content; then ``checked`` says how
    its shards were compared: ``sha256`` (a folder) or ``size`` (a remote store: ``poison verify
    <url>`` checks every sha256).
    """
    root = writable_store(prefix, endpoint_url)  # refused before the dataset is hashed
    base = Path(dataset_dir)
    if not (base / "manifest.json").is_file():
        read_manifest(base)  # raises the usual "not a complete dataset" error
    manifest_bytes = (base / "manifest.json").read_bytes()  # read once: parsed, hashed and published
    manifest = parse_manifest(manifest_bytes, str(base / "manifest.json"))
    problems = verify_dataset(base)
    if problems:
        raise PublishError(f"{base}: not published, {len(problems)} shard(s) fail verification:\n  "
                           + "\n  ".join(problems) + "\nregenerate the dataset (`dvc repro`) first")
    if not (base / "README.md").is_file():
        raise PublishError(f"{base / 'README.md'}: missing dataset card; regenerate the dataset first")
    version = version or sha256_bytes(manifest_bytes)[:12]
    if not _VERSION.match(version):
        raise PublishError(f"version: expected letters, digits, '.', '_' or '-' (at most 64), got {version!r}")
    dataset = manifest["dataset"]  # a plain name: parse_manifest refuses paths
    dest = root.child(dataset, version)
    summary = card_metrics(metrics, base)
    if summary is not None or repo_path is not None:
        card = dataset_card(manifest, summary, repo_path=repo_path).encode()
    else:
        card = (base / "README.md").read_bytes()
    files = _files(base, manifest, manifest_bytes, card)
    result = {"url": dest.url, "dataset": dataset, "version": version, "files": [n for n, _ in files],
              "samples": manifest["totals"]["samples"], "kind": manifest["kind"], "metrics": summary is not None}
    if dest.exists("manifest.json"):
        if dest.read("manifest.json") != manifest_bytes:
            raise PublishError(f"{dest.join('manifest.json')}: version {version!r} is already published with other "
                               "content; versions are immutable: publish under a new version")
        # same manifest: every shard must be there, whole (an earlier copy may have been killed or damaged).
        # A folder's shards are hashed; a remote's are compared by size (hashing would download them all).
        local = isinstance(dest, LocalStore)
        damaged = [n for n, r in zip(result["files"], manifest["shards"])
                   if (dest.size(n) != int(r["bytes"])
                       or (local and sha256_file(dest.path / n) != r["sha256"]))]
        missing = [n for n, _ in files[len(manifest["shards"]):] if not dest.exists(n)]
        if not damaged and not missing:
            result["checked"] = "sha256" if local else "size"
            if dest.read("README.md") == card:
                return dict(result, published=False)
            dest.write("README.md", card)  # same data, newer card (e.g. metrics measured since)
            return dict(result, published=True)
    if isinstance(dest, LocalStore):
        _publish_to_folder(dest, files)
    else:
        _publish_to_store(dest, files)
    return dict(result, published=True)


def writable_store(prefix: str | os.PathLike[str], endpoint_url: str | None = None) -> Store:
    """Open the store of a publish prefix; ``PublishError`` if it is one that cannot be written (http(s))."""
    scheme = urllib.parse.urlparse(prefix).scheme if isinstance(prefix, str) else ""
    if len(scheme) > 1 and scheme not in ("file", "s3", "http", "https"):  # (one letter: a Windows drive)
        raise PublishError(f"publish prefix (--to / publish.prefix): {prefix}: unsupported scheme {scheme!r}; "
                           "publish to a folder or an s3:// prefix")
    store = open_store(prefix, endpoint_url=endpoint_url)
    if not store.writable:
        raise PublishError(f"publish prefix (--to / publish.prefix): {store.url} is read-only (http(s) serves, "
                           "it does not take uploads); publish to a folder or an s3:// prefix and serve that")
    return store


def _publish_to_folder(dest: LocalStore, files: Sequence[tuple[str, Callable[[], bytes]]]) -> None:
    final = dest.path
    if final.exists() and not (final / "manifest.json").is_file():
        raise PublishError(f"{final}: exists and is not a published version (no manifest.json); move it away "
                           "or publish under another version")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(final)  # a killed copy's staging folder; a copy a killed swap moved aside goes back first
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        for name, read in files:
            (staging / name).write_bytes(read())
            os.chmod(staging / name, 0o644)
        # same manifest with files missing or damaged: the earlier copy is replaced by renames (as a
        # dataset is), never deleted first, so no kill leaves a manifest beside a partial set of shards
        swap_in_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_to_store(dest: Store, files: Sequence[tuple[str, Callable[[], bytes]]]) -> None:
    for name, read in files:  # manifest.json is last: it is what makes the version visible
        dest.write(name, read())


def dvc_push(repo: str | os.PathLike[str] = ".", *, remote: str | None = None,
             targets: Sequence[str] = (), check_status: bool = True, timeout: float = 1800) -> str:
    """Run ``dvc push`` in ``repo`` (optionally to ``remote``, for ``targets``); return its output.

    With ``check_status`` it first requires ``dvc status`` to report the workspace in step
    with dvc.lock, so outputs of an interrupted or modified run are never pushed.
    """
    repo = Path(repo).resolve()
    dvc = [sys.executable, "-m", "dvc"]

    def run(args: list[str]) -> subprocess.CompletedProcess:
        try:  # a timeout stops dvc and every process it started (poison.utils.run_command)
            return run_command(dvc + args, repo, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PublishError(f"{repo}: `dvc {' '.join(args)}` took longer than {timeout:.0f} s; check the remote") from None

    if check_status:
        proc = run(["status", "--json", *targets])
        if proc.returncode != 0:
            raise PublishError(f"{repo}: `dvc status` failed: {_tail(proc)}")
        try:
            status = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        except json.JSONDecodeError:
            raise PublishError(f"{repo}: could not read `dvc status --json` output: {_tail(proc)}") from None
        if status:
            stages = ", ".join(sorted(status))
            raise PublishError(f"{repo}: the workspace is out of step with the lock file dvc.lock ({stages}); run `dvc repro` to finish "
                               "the pipeline before publishing; nothing was pushed")
    args = ["push", *(["--remote", remote] if remote else []), *targets]
    proc = run(args)
    if proc.returncode != 0:
        raise PublishError(f"{repo}: `dvc {' '.join(args)}` failed: {_tail(proc)}\n(check the remote's URL and "
                           "credentials: `dvc remote list`; the default is a local folder, see .dvc/config)")
    return proc.stdout + proc.stderr


def _tail(proc: subprocess.CompletedProcess, lines: int = 8) -> str:
    return "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-lines:])


def verify_all(params: Any, repo: str | os.PathLike[str] = ".") -> dict[str, str]:
    """Return {name: path} of the datasets ``params.publish`` names, after verifying every shard of each.

    Raises ``PublishError`` listing every bad shard: one bad shard publishes nothing.
    """
    repo = Path(repo)
    dirs = {name: getattr(params.paths, name) for name in params.publish.datasets}
    for name, rel in dirs.items():
        problems = verify_dataset(repo / rel)
        if problems:
            raise PublishError(f"{repo / rel}: not published ({name}), {len(problems)} shard(s) fail verification:\n  "
                               + "\n  ".join(problems) + "\nrun `dvc repro` (or `dvc checkout`) first; nothing was pushed")
    return dirs


def evaluate_metrics(params: Any, repo: str | os.PathLike[str] = ".") -> dict[str, Any] | None:
    """Return the evaluate stage's metrics.json, or None when it has not run."""
    path = Path(repo) / params.paths.reports / "evaluate" / "metrics.json"
    try:
        metrics = json.loads(path.read_bytes()) if path.is_file() else None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise PublishError(f"{path}: not valid JSON ({exc}); rerun the evaluate stage (`dvc repro`)") from None
    if metrics is not None and not (isinstance(metrics, dict) and isinstance(metrics.get("datasets", {}), dict)
                                    and all(isinstance(d, dict) for d in metrics.get("datasets", {}).values())):
        raise PublishError(f"{path}: not the evaluate stage's metrics (expected an object whose 'datasets' maps each "
                           "role to an object); rerun the evaluate stage (`dvc repro`)")
    return metrics


def pipeline_datasets(params: Any, repo: str | os.PathLike[str] = ".") -> list[Path]:
    """The datasets among the core pipeline's outputs that carry a warning (a ``dvc push dvc.yaml`` sends them)."""
    return [Path(repo) / params.paths.poisoned, Path(repo) / params.paths.augmented]


def publication_hazards(dataset_dirs: Sequence[str | os.PathLike[str]], pipeline_pushed: bool,
                        pipeline_datasets: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """The warnings a publication carries, for the CLI and the flows to show before anything else.

    ``HAZARD`` naming the poisoned datasets and ``AUGMENTED`` naming the adversarially augmented
    ones among ``dataset_dirs`` (pushed or copied), and ``GENERATOR_HAZARD`` when a ``dvc push``
    of the core pipeline also sent its generator checkpoints, which make poisons. Such a push
    sends every output of ``dvc.yaml``, whichever datasets ``publish.datasets`` names: with
    ``pipeline_pushed``, the ``pipeline_datasets`` present on disk (``paths.poisoned``,
    ``paths.augmented``) are named too.
    """
    dirs = list(dict.fromkeys(Path(d) for d in dataset_dirs))
    if pipeline_pushed:
        dirs += [Path(d) for d in pipeline_datasets if (Path(d) / "manifest.json").is_file() and Path(d) not in dirs]
    kinds = {d: read_manifest(d).get("kind") for d in dirs}
    notes = []
    for kind, text, word in (("poisoned", HAZARD, "poisoned"), ("semantic", AUGMENTED, "augmented")):
        named = [d.as_posix() for d in dirs if kinds[d] == kind]
        if named:
            notes.append(f"{text} ({word}: {', '.join(named)})")
    if pipeline_pushed:
        notes.append(f"{GENERATOR_HAZARD} (pushed with the pipeline's outputs)")
    return notes


def publish(params: Any, *, repo: str | os.PathLike[str] = ".", push: bool | None = None,
            prefix: str | None = None, version: str | None = None, remote: str | None = None,
            endpoint_url: str | None = None) -> dict[str, Any]:
    """Publish the datasets ``params.publish`` names: verify all, ``dvc push``, copy to a prefix.

    Keyword arguments override the ``publish`` section for this run. Every dataset is
    verified before anything is pushed or copied, so one bad shard publishes nothing. The
    result's ``hazards`` holds the warnings to show (``publication_hazards``).
    """
    cfg = params.publish
    push = cfg.dvc_push if push is None else push
    prefix = cfg.prefix if prefix is None else prefix
    version = cfg.version if version is None else version
    remote = cfg.remote if remote is None else remote
    endpoint_url = cfg.endpoint_url if endpoint_url is None else endpoint_url
    if not push and not prefix:
        raise PublishError("publish: nothing to do: enable dvc_push or give a prefix (--to / publish.prefix)")
    if prefix:
        writable_store(prefix, endpoint_url)  # refused before anything is verified, pushed or copied
    repo = Path(repo)
    dirs = verify_all(params, repo)
    out: dict[str, Any] = {"dvc_push": None, "datasets": {},
                           "hazards": publication_hazards([repo / rel for rel in dirs.values()], bool(push),
                                                          pipeline_datasets(params, repo))}
    if push:
        # the datasets published here are the core pipeline's: its status and outputs only
        # (the poison variants of variants/dvc.yaml need not have run)
        dvc_push(repo, remote=remote, targets=("dvc.yaml",))
        out["dvc_push"] = {"remote": remote or "default"}
    if prefix:
        metrics = evaluate_metrics(params, repo)
        for name, rel in dirs.items():
            out["datasets"][name] = publish_dataset(repo / rel, prefix, version=version, endpoint_url=endpoint_url,
                                                    metrics=metrics, repo_path=Path(rel).as_posix())
    return out
