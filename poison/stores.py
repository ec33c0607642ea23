"""Where datasets live: a local folder, an http(s) prefix, an S3 prefix, or a DVC repository.

A ``Store`` reads (and, for folders and S3, writes) the files of one dataset prefix by
name. It is how ``open_dataset`` streams shards and how ``publish_dataset`` copies them:

    open_store("data/shards/mnist5k")                     # a folder (or file://...)
    open_store("https://example.org/poison/mnist5k/v1")   # read-only
    open_store("s3://bucket/prefix/mnist5k/v1")           # s3fs (``pip install 'poison[s3]'``)

S3 endpoints other than AWS (MinIO, moto, ...) come from ``endpoint_url`` or the
standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables; credentials come from
botocore's usual chain (environment, profile, instance role). DVC locations are fetched with ``dvc get`` in a subprocess
(``fetch_from_dvc``): the library never imports DVC.

Errors name the URL, what went wrong (missing, unreachable, denied) and what to check.
"""

from __future__ import annotations

import http.client
from abc import ABC, abstractmethod
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from poison.errors import ShardError
from poison.utils import atomic_write_bytes

__all__ = ["Store", "LocalStore", "HttpStore", "S3Store", "open_store", "fetch_from_dvc"]

#: Seconds before a remote read gives up (per attempt).
TIMEOUT = 30


class Store(ABC):
    """Files of one prefix, by name (no ``/`` needed in names, but allowed for children)."""

    url: str
    writable = False

    @abstractmethod
    def read(self, name: str) -> bytes:
        """Return the bytes of file ``name``; ``ShardError`` naming the URL if missing or unreachable."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether file ``name`` is there."""

    @abstractmethod
    def size(self, name: str) -> int | None:
        """Bytes of file ``name``, or None when it is missing."""

    def write(self, name: str, data: bytes) -> None:
        raise ShardError(f"{self.url}: read-only location; publish to a folder or an s3:// prefix")

    @abstractmethod
    def child(self, *parts: str) -> "Store":
        """The store of a sub-prefix."""

    def join(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalStore(Store):
    """A local folder; writes are atomic (temporary file, then rename)."""

    writable = True

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.url = str(self.path)

    def read(self, name: str) -> bytes:
        path = self.path / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"{path}: not found; check the path (a dataset folder holds manifest.json "
                             "and its shards), or `dvc pull` / regenerate it") from None
        except OSError as exc:
            raise ShardError(f"{path}: cannot read ({exc}); check its permissions and that it is a file, "
                             "or re-fetch the dataset") from exc

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def size(self, name: str) -> int | None:
        path = self.path / name
        return path.stat().st_size if path.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.path / name, data)

    def child(self, *parts: str) -> "LocalStore":
        return LocalStore(self.path.joinpath(*parts))

    def join(self, name: str) -> str:
        return str(self.path / name)


class HttpStore(Store):
    """An http(s) prefix, read-only (a static file server, a CDN, a public bucket's web endpoint)."""

    def __init__(self, url: str, timeout: float = TIMEOUT):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def read(self, name: str) -> bytes:
        url = self.join(name)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            what = "not found" if exc.code == 404 else f"HTTP {exc.code} {exc.reason}"
            raise ShardError(f"{url}: {what}; check the prefix (it should hold manifest.json and the shards "
                             "that `poison publish` copied there)") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ShardError(f"{url}: cannot reach the server ({reason}); check the URL and the network") from None
        except http.client.HTTPException as exc:  # e.g. IncompleteRead: the connection dropped mid-file
            raise ShardError(f"{url}: the transfer broke off ({type(exc).__name__}); retry, or check the server") from None

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        req = urllib.request.Request(self.join(name), method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                length = resp.headers.get("Content-Length")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise ShardError(f"{self.join(name)}: HTTP {exc.code} {exc.reason}; check the prefix (it should hold "
                             "manifest.json and the shards)") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise ShardError(f"{self.join(name)}: cannot reach the server ({getattr(exc, 'reason', exc)}); check the "
                             "URL and the network") from None
        if length is None:
            return -1
        if not length.strip().isdigit():
            raise ShardError(f"{self.join(name)}: the server sent Content-Length {length!r}, not a byte count; "
                             "check the server")
        return int(length)

    def child(self, *parts: str) -> "HttpStore":
        return HttpStore("/".join([self.url, *(p.strip("/") for p in parts)]), self.timeout)


class S3Store(Store):
    """An ``s3://bucket/prefix`` (s3fs, as DVC's S3 remote uses; any S3-compatible endpoint)."""

    writable = True

    def __init__(self, url: str, endpoint_url: str | None = None, fs=None):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ShardError(f"{url}: expected s3://bucket/prefix; give the bucket and the dataset's prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self._fs = fs

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _fs=None)  # connections do not cross process boundaries

    @property
    def fs(self):
        if self._fs is None:
            try:
                import s3fs
            except ImportError:
                raise ShardError(f"{self.url}: s3:// locations need s3fs: pip install 'poison[s3]'") from None
            # few, short retries: an unreachable endpoint must fail in seconds, not minutes
            self._fs = s3fs.S3FileSystem(
                endpoint_url=self.endpoint_url, skip_instance_cache=True, use_listings_cache=False,
                config_kwargs={"connect_timeout": 5, "read_timeout": TIMEOUT,
                               "retries": {"max_attempts": 2, "mode": "standard"}},
            )
        return self._fs

    def _path(self, name: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, name) if p)

    def _error(self, name: str, exc: BaseException) -> ShardError:
        url = self.join(name)
        endpoint = self.endpoint_url or "AWS"
        text = f"{type(exc).__name__}: {exc}"
        if "NoSuchBucket" in text or "bucket does not exist" in text:
            return ShardError(f"{url}: bucket {self.bucket!r} does not exist at {endpoint}; create it or fix the URL")
        if isinstance(exc, FileNotFoundError):
            return ShardError(f"{url}: not found; check the prefix (it should hold manifest.json and the shards "
                              "that `poison publish` copied there)")
        if isinstance(exc, PermissionError) or "Credentials" in text:
            return ShardError(f"{url}: access denied at {endpoint} ({text}); check AWS_ACCESS_KEY_ID / "
                              "AWS_SECRET_ACCESS_KEY or the profile, and the bucket policy")
        if "Could not connect" in text or "ConnectTimeout" in text or "EndpointConnection" in text:
            return ShardError(f"{url}: cannot reach the S3 endpoint {endpoint} ({exc}); check endpoint_url / "
                              "AWS_ENDPOINT_URL and the network")
        return ShardError(f"{url}: S3 request to {endpoint} failed ({text}); check the bucket, prefix, credentials "
                          "and endpoint_url")

    def _call(self, name: str, fn, *args):
        fs = self.fs  # first: without s3fs this raises the "pip install 'poison[s3]'" error
        try:
            return fn(fs, *args)
        except ShardError:
            raise
        except Exception as exc:  # s3fs/botocore raise OSError subclasses and their own types
            raise self._error(name, exc) from None

    def read(self, name: str) -> bytes:
        return self._call(name, lambda fs, p: fs.cat_file(p), self._path(name))

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        def info(fs, p):
            try:
                return int(fs.info(p)["size"])
            except FileNotFoundError as exc:
                if "NoSuchBucket" in str(exc) or "bucket does not exist" in str(exc):
                    raise
                return None
        return self._call(name, info, self._path(name))

    def write(self, name: str, data: bytes) -> None:
        # one PUT: S3 never shows a partly written object
        self._call(name, lambda fs, p, d: fs.pipe_file(p, d), self._path(name), data)

    def child(self, *parts: str) -> "S3Store":
        return S3Store("/".join([self.url, *(p.strip("/") for p in parts)]), self.endpoint_url, self._fs)


def open_store(location: str | os.PathLike[str], *, endpoint_url: str | None = None) -> Store:
    """Return the ``Store`` for a folder path, ``file://``, ``http(s)://`` or ``s3://`` prefix."""
    if isinstance(location, os.PathLike):
        return LocalStore(location)
    if not isinstance(location, str) or not location:
        raise ShardError(f"source: expected a folder, an http(s):// or s3:// prefix, got {location!r}")
    scheme = urllib.parse.urlparse(location).scheme
    if scheme in ("http", "https"):
        return HttpStore(location)
    if scheme == "s3":
        return S3Store(location, endpoint_url)
    if scheme == "file":
        return LocalStore(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    if scheme and len(scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise ShardError(f"{location}: unsupported scheme {scheme!r}; use a folder, http(s)://, s3:// "
                         "or repo=/path= for a DVC location")
    return LocalStore(location)


def fetch_from_dvc(repo: str, path: str, rev: str | None, dest: str | os.PathLike[str],
                   timeout: float = 600) -> Path:
    """Download ``path`` of the DVC project ``repo`` (git URL or folder) at ``rev`` into ``dest``.

    Runs ``python -m dvc get`` (DVC resolves the git revision and pulls from that project's
    remote). Returns the folder written; raises ``ShardError`` with DVC's own message.
    """
    dest = Path(dest)
    if dest.exists():
        raise ShardError(f"{dest}: already exists; fetch a DVC location into a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    target = staging / "data"
    cmd = [sys.executable, "-m", "dvc", "get", repo, path, "-o", str(target)]
    if rev:
        cmd += ["--rev", rev]
    where = f"{repo}:{path}" + (f"@{rev}" if rev else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise ShardError(f"{where}: `dvc get` failed: {tail}\n(check the repository, revision and path, and "
                             "that the project's DVC remote is reachable)")
        os.replace(target, dest)
    except subprocess.TimeoutExpired:
        raise ShardError(f"{where}: `dvc get` took longer than {timeout:.0f} s; check the remote") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
