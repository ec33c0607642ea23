"""params.yaml -> frozen dataclasses, validated at load time.

One dataclass per params.yaml section. Unknown keys, wrong types and out-of-range
values raise ``ConfigError`` naming the key (``train_generator.eps``), the value and
what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from poison.attacks.deepconfuse_config import DeepConfuseConfig
from poison.augment import AugmentConfig
from poison.data import SOURCES
from poison.defenses import parse_defense
from poison.errors import ConfigError
from poison.models import check_classifiers
from poison.train import TrainConfig
from poison.variants import ComposeConfig, MultiLabelPoisonConfig, TopKPoisonConfig

__all__ = ["DataConfig", "PoisonConfig", "EvaluateConfig", "PathsConfig", "PublishConfig", "OrchestrationConfig", "Params", "load_params", "from_dict", "to_dict"]


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section: which source, and how it is split and sharded."""

    source: str = "mnist5k"
    root: str | None = None
    channels: int = 1
    test_size: int = 1000
    val_size: int = 500
    shard_size: int = 1000
    per_class: int | None = None  # keep this many samples per class (seeded) before splitting

    def __post_init__(self) -> None:
        if self.per_class is not None and self.per_class < 3:
            raise ConfigError(f"per_class: expected null or an integer >= 3, got {self.per_class}")
        if self.source not in SOURCES:
            raise ConfigError(f"source: unknown source {self.source!r}; known: {', '.join(sorted(SOURCES))}")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels: expected 1 or 3, got {self.channels}")
        for key in ("test_size", "val_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: expected an integer >= 1, got {self.shard_size}")


@dataclass(frozen=True)
class PoisonConfig:
    """The ``poison`` section: how the trained generator is applied to the training split."""

    batch_size: int = 500
    shard_size: int = 1000
    write_delta: bool = False
    threads: int | None = 1  # torch CPU threads per shard task: part of the bytes; None = torch's default

    def __post_init__(self) -> None:
        for key in ("batch_size", "shard_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        _check_threads(self.threads)


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` section: downstream classifiers trained on each dataset."""

    archs: tuple[str, ...] = ("dc_cnn",)
    seeds: tuple[int, ...] = (0,)
    recipe: TrainConfig = field(default_factory=TrainConfig)
    threads: int | None = 1  # torch CPU threads per training run: part of the result; None = torch's default
    # training-data defenses (poison.defenses: jpeg:Q, posterize:B, grayscale): each also trains every
    # classifier and seed on the clean and the poisoned training split transformed by it
    defenses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_classifiers(self.archs, "archs")
        for i, spec in enumerate(self.defenses):
            try:
                parse_defense(spec, f"defenses[{i}]")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if len(set(self.defenses)) != len(self.defenses):
            raise ConfigError(f"defenses: expected no repeats, got {list(self.defenses)}")
        if not self.seeds:
            raise ConfigError("seeds: expected at least one integer seed")
        if any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds: expected integers >= 0 (like seed), got {list(self.seeds)}")
        if len(set(self.archs)) != len(self.archs) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"archs/seeds: expected no repeats, got archs {list(self.archs)}, seeds {list(self.seeds)}")
        _check_threads(self.threads)


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ConfigError(f"threads: expected null (torch's default) or an integer >= 1, got {threads}")


@dataclass(frozen=True)
class OrchestrationConfig:
    """The ``orchestration`` section: how the flows fan out. Never changes a result's bytes.

    Materialization (one task per shard) and evaluation (one task per architecture x
    dataset x seed) run on this Prefect task runner.
    """

    task_runner: Literal["thread", "process", "dask"] = "thread"
    workers: int = 2               # threads / processes / Dask LocalCluster workers
    address: str | None = None     # dask: a running scheduler (tcp://host:8786); None = a LocalCluster
    cache: bool = True             # reuse evaluation results of unchanged inputs and code (Prefect cache)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers: expected an integer >= 1, got {self.workers}")
        if self.address is not None and self.task_runner != "dask":
            raise ConfigError(f"address: a scheduler address needs task_runner dask, got task_runner {self.task_runner!r}")
        if self.address is not None and "://" not in self.address:
            raise ConfigError(f"address: expected a Dask scheduler URL like tcp://host:8786, got {self.address!r}")


@dataclass(frozen=True)
class PublishConfig:
    """The ``publish`` section (opt-in flow ``publish`` / ``poison publish``): where datasets go."""

    datasets: tuple[str, ...] = ("poisoned",)  # names of paths.* datasets: clean, poisoned
    dvc_push: bool = True          # `dvc push` to the DVC remote (.dvc/config: a local folder by default)
    remote: str | None = None      # DVC remote name; None = the project's default remote
    prefix: str | None = None      # also copy to a readable prefix: a folder or s3://bucket/prefix
    version: str | None = None     # <prefix>/<dataset>/<version>/; None = manifest sha256, 12 hex digits
    endpoint_url: str | None = None  # S3-compatible endpoint for prefix (None: AWS_ENDPOINT_URL or AWS)

    def __post_init__(self) -> None:
        allowed = ("clean", "poisoned", "augmented")
        bad = [d for d in self.datasets if d not in allowed]
        if bad or not self.datasets or len(set(self.datasets)) != len(self.datasets):
            raise ConfigError(f"datasets: expected distinct names from {list(allowed)}, got {list(self.datasets)}")
        if self.version is not None:
            import re

            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", self.version):
                raise ConfigError(f"version: expected letters, digits, '.', '_' or '-' (at most 64), got {self.version!r}")
        if self.prefix is not None and not self.prefix:
            raise ConfigError("prefix: expected a folder or s3://bucket/prefix, or null for none")
        if not self.dvc_push and self.prefix is None:
            raise ConfigError("dvc_push/prefix: with dvc_push false a prefix is needed, else publish does nothing")


@dataclass(frozen=True)
class PathsConfig:
    """The ``paths`` section: where each stage reads and writes (relative to the repo root)."""

    clean: str = "data/shards/mnist5k"
    generator: str = "models/generator.pt"
    poisoned: str = "data/shards/mnist5k-deepconfuse"
    augmented: str = "data/shards/mnist5k-sia"
    topk_generator: str = "models/generator-topk.pt"
    topk_poisoned: str = "data/shards/mnist5k-topk"
    multilabel_clean: str = "data/shards/mnist5k-grid"
    multilabel_generator: str = "models/generator-multilabel.pt"
    multilabel_poisoned: str = "data/shards/mnist5k-grid-deepconfuse"
    reports: str = "reports"

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in values.items():
            if not value:
                raise ConfigError(f"{key}: expected a non-empty path")
        resolved = {k: Path(v).resolve() for k, v in values.items()}
        for a in resolved:
            for b in resolved:
                if a < b and (resolved[a] == resolved[b] or resolved[a] in resolved[b].parents
                              or resolved[b] in resolved[a].parents):
                    raise ConfigError(
                        f"{a}/{b}: {values[a]!r} and {values[b]!r} overlap; each stage output needs its own "
                        "path (a poisoned dataset must never replace the clean one)"
                    )


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    train_generator: DeepConfuseConfig = field(default_factory=DeepConfuseConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    topk: TopKPoisonConfig = field(default_factory=TopKPoisonConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    multilabel: MultiLabelPoisonConfig = field(default_factory=MultiLabelPoisonConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed: expected an integer >= 0, got {self.seed}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {self.device!r}")
        if self.train_generator.target == "ordered_topk":
            # the core pipeline's poison is scored by accuracy or one target label; the list is the topk stage's
            raise ConfigError("train_generator.target: ordered_topk is made and scored by the topk stage (the topk "
                              "section, `dvc repro variants/dvc.yaml:topk`); use untargeted or label_specific here")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(value, opt, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan / .inf slip past every `x < 0` range check
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported field type {tp!r}")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys replacing its own, mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _over_default(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """A partial mapping for a nested section, completed from the parent field's own default.

    A section's default can differ from its class's (``topk.generator`` is not a bare
    ``DeepConfuseConfig``), so a params file that gives a few of its keys keeps the others
    at the defaults documented for that place, not at the class's.
    """
    if not (isinstance(value, dict) and dataclasses.is_dataclass(tp)):
        return value
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING and f.default is not None:
        default = f.default
    else:
        return value
    return _deep_merge(to_dict(default), value)


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Return dataclass ``cls`` built from ``data``, validated; errors name the dotted key."""
    where = key or "params.yaml"
    if data is None:
        if key:  # `section:` with nothing under it would silently mean the class's defaults
            raise ConfigError(f"{key}: expected a mapping of keys, got nothing (null); give its keys, or remove "
                              "the line to keep the section's defaults")
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise ConfigError(
            f"{(key + '.') if key else ''}{unknown[0]}: unknown key in {where}; "
            f"known keys: {', '.join(names)}. Fix the spelling or remove it."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {name: _convert(_over_default(fields[name], hints[name], data[name]), hints[name],
                             f"{key}.{name}" if key else name) for name in names if name in data}
    try:
        return cls(**values)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(f"{key}.{msg}" if key and not msg.startswith(key) else msg) from None


def to_dict(obj: Any) -> Any:
    """Return a dataclass (nested) as plain JSON-ready values (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing a key given twice in one mapping (YAML keeps the last, silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            continue  # construct_mapping refuses an unhashable key with its own message
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping (only one can hold)", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Return the validated ``Params`` of a params.yaml file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file; run from the repository root or pass --params PATH")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it as UTF-8 text ({exc}); save it as UTF-8 YAML") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}; fix the line shown (or restore it: "
                          "`git checkout params.yaml`)") from exc
    if data is None:  # an empty or comment-only file would run every section at its class's defaults
        raise ConfigError(f"{path}: empty; expected the sections of params.yaml (`git checkout params.yaml` "
                          "restores the project's)")
    try:
        return from_dict(Params, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
