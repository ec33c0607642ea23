"""poison.data: sources (mnist5k, image folders, torchvision roots) and deterministic splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poison.data import Dataset, load_source, stratified_split, subsample_per_class
from poison.errors import ConfigError, DataSourceError


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_source("mnist5k")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ mnist5k
def test_mnist5k_shape_dtype_and_balance(mnist5k):
    assert mnist5k.images.shape == (5000, 1, 28, 28)
    assert mnist5k.images.dtype == torch.uint8
    assert mnist5k.labels.dtype == torch.int64
    assert mnist5k.classes == tuple(str(i) for i in range(10))
    assert torch.bincount(mnist5k.labels, minlength=10).tolist() == [500] * 10
    # real digits: dark background, bright strokes
    assert int(mnist5k.images.min()) == 0 and int(mnist5k.images.max()) == 255
    assert 0.05 < float(mnist5k.images.float().mean() / 255) < 0.3


def test_mnist5k_split_per_class_counts(mnist5k):
    split = stratified_split(mnist5k.labels, {"train": -1, "val": 500, "test": 1000}, _gen(0))
    counts = {k: torch.bincount(mnist5k.labels[v], minlength=10).tolist() for k, v in split.items()}
    assert counts["test"] == [100] * 10
    assert counts["val"] == [50] * 10
    assert counts["train"] == [350] * 10


# ------------------------------------------------------------------ splits
def _labels() -> torch.Tensor:
    # imbalanced: 40 / 25 / 20 / 15 samples, interleaved
    labels = torch.tensor([0] * 40 + [1] * 25 + [2] * 20 + [3] * 15)
    return labels[torch.randperm(100, generator=_gen(123))]


def test_split_same_seed_same_indices_different_seed_differs():
    labels = _labels()
    sizes = {"train": -1, "val": 10, "test": 20}
    a = stratified_split(labels, sizes, _gen(7))
    b = stratified_split(labels, sizes, _gen(7))
    c = stratified_split(labels, sizes, _gen(8))
    assert a.keys() == b.keys() == {"train", "val", "test"}
    for k in a:
        assert torch.equal(a[k], b[k])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_split_disjoint_covering_sorted_and_exact_sizes():
    labels = _labels()
    split = stratified_split(labels, {"train": -1, "val": 10, "test": 20}, _gen(0))
    assert len(split["val"]) == 10 and len(split["test"]) == 20 and len(split["train"]) == 70
    everything = torch.cat(list(split.values()))
    assert sorted(everything.tolist()) == list(range(100))  # disjoint and covering
    for idx in split.values():
        assert torch.equal(idx, torch.sort(idx).values)


def test_split_class_shares_proportional_within_one():
    labels = _labels()
    counts = torch.bincount(labels).double()
    sizes = {"train": -1, "val": 10, "test": 20}
    split = stratified_split(labels, sizes, _gen(0))
    for name, size in (("val", 10), ("test", 20)):
        got = torch.bincount(labels[split[name]], minlength=4).double()
        expected = counts * size / labels.numel()
        assert torch.all((got - expected).abs() < 1.0), (name, got, expected)


def test_split_sizes_exact_when_rounding_favours_the_same_class():
    # Four classes of one sample: val and test each want one sample; largest-remainder
    # rounding gives both quotas to class 0, which has only one sample.
    labels = torch.tensor([0, 1, 2, 3])
    split = stratified_split(labels, {"train": -1, "val": 1, "test": 1}, _gen(0))
    assert len(split["val"]) == 1
    assert len(split["test"]) == 1, f"test split asked for 1 sample, got {split['test'].tolist()}"
    assert sorted(torch.cat(list(split.values())).tolist()) == [0, 1, 2, 3]


def test_split_rejects_bad_sizes():
    labels = _labels()
    with pytest.raises(ValueError, match="exactly one split"):
        stratified_split(labels, {"train": -1, "val": -1}, _gen(0))
    with pytest.raises(ConfigError, match="test_size"):
        stratified_split(labels, {"train": -1, "val": 50, "test": 50}, _gen(0))


def test_subsample_per_class_deterministic_and_capped():
    labels = _labels()
    a = subsample_per_class(labels, 18, _gen(1))
    b = subsample_per_class(labels, 18, _gen(1))
    c = subsample_per_class(labels, 18, _gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(labels[a]).tolist() == [18, 18, 18, 15]  # class 3 has only 15
    assert torch.equal(a, torch.sort(a).values) and len(set(a.tolist())) == len(a)


# ------------------------------------------------------------------ image folders
def _write_folder(root: Path, mode: str) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    shape = (6, 5) if mode == "L" else (6, 5, 3)
    written: dict[str, list[np.ndarray]] = {}
    for cls in ("zebra", "ant"):  # classes are sorted by name: ant=0, zebra=1
        (root / cls).mkdir(parents=True)
        for i in range(2):
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr, mode=None).save(root / cls / f"{i}.png")
            written.setdefault(cls, []).append(arr)
        (root / cls / "notes.txt").write_text("not an image")
    return written


def test_imagefolder_grayscale_exact(tmp_path):
    written = _write_folder(tmp_path, "L")
    ds = load_source("imagefolder", str(tmp_path), channels=1)
    assert ds.classes == ("ant", "zebra")
    assert ds.images.shape == (4, 1, 6, 5) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(ds.images[0, 0].numpy(), written["ant"][0])
    assert np.array_equal(ds.images[3, 0].numpy(), written["zebra"][1])


def test_imagefolder_rgb_exact(tmp_path):
    written = _write_folder(tmp_path, "RGB")
    ds = load_source("imagefolder", str(tmp_path), channels=3)
    assert ds.images.shape == (4, 3, 6, 5)
    assert np.array_equal(ds.images[1].numpy().transpose(1, 2, 0), written["ant"][1])
    assert np.array_equal(ds.images[2].numpy().transpose(1, 2, 0), written["zebra"][0])


def test_imagefolder_rgb_to_one_channel(tmp_path):
    _write_folder(tmp_path, "RGB")
    ds = load_source("imagefolder", str(tmp_path), channels=1)
    assert ds.images.shape == (4, 1, 6, 5)


def test_imagefolder_mixed_sizes_names_file(tmp_path):
    _write_folder(tmp_path, "L")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "zebra" / "big.png")
    with pytest.raises(DataSourceError, match=r"big\.png.*resize"):
        load_source("imagefolder", str(tmp_path), channels=1)


def test_imagefolder_missing_or_empty_root(tmp_path):
    with pytest.raises(DataSourceError, match=r"data\.root.*not a folder"):
        load_source("imagefolder", str(tmp_path / "absent"), channels=1)
    with pytest.raises(DataSourceError, match="no class folders"):
        load_source("imagefolder", str(tmp_path), channels=1)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataSourceError, match="no images"):
        load_source("imagefolder", str(tmp_path), channels=1)
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_source("imagefolder", None, channels=1)


# ------------------------------------------------------------------ torchvision roots
@pytest.fixture(scope="module")
def torchvision_datasets():
    """Import torchvision.datasets once (about a second), outside the timed tests."""
    import torchvision.datasets

    return torchvision.datasets


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "svhn"])
def test_torchvision_source_without_root_says_how_to_provide_it(name):
    with pytest.raises(ConfigError, match=r"set data\.root.*nothing is downloaded"):
        load_source(name, None)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "svhn"])
def test_torchvision_source_with_empty_root_is_a_clear_error(tmp_path, name, torchvision_datasets):
    with pytest.raises(DataSourceError) as info:
        load_source(name, str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path) in msg and f"torchvision {name} files" in msg and "mnist5k" in msg
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing may be downloaded"


def _cifar10_binary(root, per_batch=3):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(1, 6):
        rec = rng.integers(0, 256, size=(per_batch, 3073), dtype=np.uint8)
        rec[:, 0] = (np.arange(per_batch) + i) % 10
        (folder / f"data_batch_{i}.bin").write_bytes(rec.tobytes())
        records.append(rec)
    (folder / "batches.meta.txt").write_text("\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                           "frog", "horse", "ship", "truck"]) + "\n\n")
    return np.concatenate(records)


def test_cifar10_reads_the_binary_release_without_pickles(tmp_path):
    records = _cifar10_binary(tmp_path)
    # the python release beside it is never opened: a pickle that would run code if loaded
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"cos\nsystem\n(S'false'\ntR.")
    ds = load_source("cifar10", str(tmp_path), channels=3)
    assert ds.images.shape == (15, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == records[:, 0].tolist()
    # record layout: label byte, then the red plane, green plane, blue plane, each 32x32 row-major
    assert ds.images[4, 1, 2, 5] == records[4, 1 + 1024 + 2 * 32 + 5]
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"


def test_cifar10_python_release_or_damaged_batches_are_refused_with_the_fix(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataSourceError, match=r"data_batch_1\.bin.*cifar-10-binary\.tar\.gz.*pickles, which are never read"):
        load_source("cifar10", str(tmp_path), channels=3)
    _cifar10_binary(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-7])
    with pytest.raises(DataSourceError, match=r"data_batch_3\.bin holds 9212 bytes.*re-extract"):
        load_source("cifar10", str(tmp_path), channels=3)


def test_unknown_source_lists_known():
    with pytest.raises(ConfigError, match=r"unknown source 'imagenet'.*mnist5k"):
        load_source("imagenet")


def test_channels_setting_is_honoured_or_rejected():
    # data.channels is validated for every source; it must not be silently ignored.
    try:
        ds = load_source("mnist5k", None, channels=3)
    except ConfigError as exc:
        assert "channels" in str(exc)
    else:
        assert ds.images.shape[1] == 3, "data.channels: 3 was ignored for source mnist5k"


def test_dataset_validates_shapes():
    with pytest.raises(ValueError, match="uint8"):
        Dataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="labels"):
        Dataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ("a",))
