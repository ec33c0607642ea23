"""Shared fixtures: tiny params, a tiny prepared clean dataset, a tiny generator, its poison.

Everything is built under pytest's temporary folders; nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from poison import stages
from poison.config import Params, from_dict

# The suite shares two cores with other work: several intra-op threads contending for
# them make tiny convolutions ~100x slower, so tests (and their subprocesses) use one.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
# The first optimizer built in a process imports torch._dynamo (~1.5 s); pay it once here so
# per-test durations measure the tests.
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

REPO = Path(__file__).resolve().parents[1]
# the repository's DVC pipelines: the core one (`dvc repro`) and the poison variants
PIPELINES = ("dvc.yaml", "variants/dvc.yaml")


def pipeline_stages() -> dict[str, dict[str, Any]]:
    """Every stage of every pipeline file, by stage name (names are unique across the files)."""
    import yaml

    stages: dict[str, dict[str, Any]] = {}
    for name in PIPELINES:
        for stage, spec in yaml.safe_load((REPO / name).read_text())["stages"].items():
            assert stage not in stages, f"stage {stage!r} is defined twice"
            stages[stage] = spec | {"pipeline": name}
    return stages

#: Tiny sizes: mnist5k cut to 30 per class (300), of which test 60 (6/class), val 30 (3/class).
TINY = {
    "seed": 0,
    "device": "cpu",
    "data": {"source": "mnist5k", "root": None, "channels": 1, "test_size": 60, "val_size": 30,
             "per_class": 30, "shard_size": 100},
    "train_generator": {
        "generator": "test_autoencoder", "surrogate": "test_cnn", "eps": 0.3, "norm": "linf",
        "target": "untargeted", "target_shift": 1, "target_map": None, "trials": 1, "victim_epochs": 1,
        "batch_size": 64, "victim_lr": 0.01, "unroll_lr": 0.01, "generator_lr": 0.001, "quantize": True,
        "select_every": 1, "validation": {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 64},
    },
    "poison": {"batch_size": 100, "shard_size": 100, "write_delta": False},
    "augment": {"victim": "test_cnn", "attack": {"steps": 2}, "tail": {"imbalance_ratio": 10.0, "share": 0.5},
                "diagnosis_samples": 20, "batch_size": 100, "shard_size": 100},
    "evaluate": {"archs": ["test_cnn"], "seeds": [0],
                 "recipe": {"optimizer": "adam", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
                            "epochs": 1, "batch_size": 64}},
    "topk": {"generator": {
        "generator": "test_unet", "surrogate": "test_cnn", "eps": 0.3, "target": "ordered_topk", "topk": 2,
        "trials": 1, "batch_size": 64, "generator_lr": 0.001, "select_every": 1,
        "pretrain": {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 64},
        "validation": {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 64}},
        "batch_size": 100, "shard_size": 100},
    "compose": {"grid": 2, "empty": 0.25, "train_size": 80, "val_size": 20, "test_size": 30, "shard_size": 50},
    "multilabel": {"generator": {
        "generator": "test_unet", "surrogate": "test_cnn", "eps": 0.3, "target": "label_specific", "flip_labels": [0],
        "trials": 1, "batch_size": 32, "generator_lr": 0.001, "select_every": 1,
        "validation": {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 32}},
        "batch_size": 100, "shard_size": 50},
    "paths": {"clean": "data/shards/mnist5k", "generator": "models/generator.pt",
              "poisoned": "data/shards/mnist5k-deepconfuse", "augmented": "data/shards/mnist5k-sia",
              "topk_generator": "models/generator-topk.pt", "topk_poisoned": "data/shards/mnist5k-topk",
              "multilabel_clean": "data/shards/mnist5k-grid", "multilabel_generator": "models/generator-multilabel.pt",
              "multilabel_poisoned": "data/shards/mnist5k-grid-deepconfuse", "reports": "reports"},
}


def reload_generator(state: dict[str, Any], channels: int, size: int) -> torch.nn.Module:
    """A generator rebuilt from ``DeepConfuse.state()`` through a ``weights_only`` checkpoint round trip."""
    import io

    from poison.models import create_generator

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    gen = create_generator(ckpt["generator_arch"], channels, size, num_classes=ckpt["num_classes"])
    gen.load_state_dict(ckpt["state_dict"])
    return gen


def tiny_params_dict(base: str | os.PathLike[str] | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """Return the tiny params as a params.yaml-shaped dict.

    ``base`` None keeps the repository's relative paths; otherwise every path is put under
    ``base``. Keyword arguments update sections (``train_generator={"trials": 2}``).
    """
    d = copy.deepcopy(TINY)
    if base is not None:
        d["paths"] = {k: str(Path(base) / v) for k, v in d["paths"].items()}
    for name, update in sections.items():
        if isinstance(d.get(name), dict):
            d[name].update(update)
        else:
            d[name] = update
    return d


def tiny_params(base: str | os.PathLike[str] | None = None, **sections: dict[str, Any]) -> Params:
    """Return validated tiny ``Params`` (see ``tiny_params_dict``)."""
    return from_dict(Params, tiny_params_dict(base, **sections))


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory):
    """Keep matplotlib's cache inside the test's temporary folder (it is imported lazily)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("mplconfig")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def session_params(session_root: Path) -> Params:
    """Tiny params whose outputs live in one session folder (read-only for tests)."""
    return tiny_params(session_root)


@pytest.fixture(scope="session")
def clean_dataset(session_params: Params) -> Path:
    """A tiny clean dataset written by ``stages.prepare`` (train 210, val 30, test 60)."""
    stages.prepare(session_params)
    return Path(session_params.paths.clean)


@pytest.fixture(scope="session")
def generator_checkpoint(session_params: Params, clean_dataset: Path) -> Path:
    """A generator checkpoint from ``stages.train_generator`` (1 tiny trial)."""
    stages.train_generator(session_params)
    return Path(session_params.paths.generator)


@pytest.fixture(scope="session")
def poisoned_dataset(session_params: Params, generator_checkpoint: Path) -> Path:
    """The poisoned training shards written by ``stages.poison`` from the session checkpoint."""
    stages.poison(session_params)
    return Path(session_params.paths.poisoned)


@pytest.fixture(scope="session")
def augmented_dataset(session_params: Params, clean_dataset: Path) -> Path:
    """The SIA-augmented shards and diagnosis written by ``stages.augment``."""
    stages.augment(session_params)
    return Path(session_params.paths.augmented)


@pytest.fixture(scope="session")
def variant_datasets(session_params: Params, clean_dataset: Path) -> dict[str, Path]:
    """The ordered top-k poison, the multi-label composites and their poison (``poison.variants``)."""
    stages.topk(session_params)
    stages.compose(session_params)
    stages.multilabel(session_params)
    p = session_params.paths
    return {"topk": Path(p.topk_poisoned), "multilabel_clean": Path(p.multilabel_clean),
            "multilabel": Path(p.multilabel_poisoned)}


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory: pytest.TempPathFactory):
    """Environment for anything that imports Prefect: its home and temp files stay in tmp.

    Prefect reads its settings when first imported, so tests import it only after this.
    """
    import tempfile

    home = tmp_path_factory.mktemp("prefect_home")
    tmp = tmp_path_factory.mktemp("prefect_tmp")
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("PREFECT_LOGGING_TO_API_ENABLED", "false")
    mp.setenv("TMPDIR", str(tmp))
    mp.setattr(tempfile, "tempdir", str(tmp))
    import prefect  # noqa: F401  (first import, ~1 s, reads the settings above)

    yield home
    mp.undo()


@pytest.fixture(scope="session")
def prefect_harness(prefect_env: Path):
    """A temporary Prefect API server and database for in-process flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def latest_artifact(key: str) -> str:
    """The data of the newest Prefect artifact named ``key`` (with ``prefect_harness`` active)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return found[-1].data

    return asyncio.run(read())
