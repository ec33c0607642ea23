"""poison.config: params.yaml -> frozen dataclasses; errors name the dotted key and the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_params_dict
from poison.config import Params, from_dict, load_params, to_dict
from poison.errors import ConfigError
from poison.models import CLASSIFIERS, GENERATORS


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _load_error(tmp_path: Path, data) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert str(path) in msg, "load_params should say which file is wrong"
    return msg


def test_committed_params_yaml_loads_with_its_values():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.seed == raw["seed"]
    assert params.train_generator.eps == raw["train_generator"]["eps"]
    assert params.train_generator.generator == raw["train_generator"]["generator"]
    assert params.evaluate.archs == tuple(raw["evaluate"]["archs"])
    assert params.evaluate.recipe.epochs == raw["evaluate"]["recipe"]["epochs"]
    assert params.paths.clean == raw["paths"]["clean"]


def test_committed_params_yaml_sets_every_section_key():
    # params.yaml is the single source of truth: no section key left to a hidden default.
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == {f.name for f in dataclasses.fields(Params)}
    params = Params()
    for section in ("data", "train_generator", "poison", "evaluate", "paths", "topk", "compose", "multilabel"):
        fields = {f.name for f in dataclasses.fields(getattr(params, section))}
        assert set(raw[section]) == fields, f"params.yaml section {section!r}"
    for section in ("topk", "multilabel"):
        fields = {f.name for f in dataclasses.fields(getattr(params, section).generator)}
        assert set(raw[section]["generator"]) == fields, f"params.yaml section {section}.generator"


def test_to_dict_from_dict_round_trip():
    params = load_params(REPO / "params.yaml")
    assert from_dict(Params, to_dict(params)) == params
    tiny = from_dict(Params, tiny_params_dict())
    assert from_dict(Params, to_dict(tiny)) == tiny
    _assert_contains(to_dict(tiny), tiny_params_dict(), "")


def _assert_contains(actual, expected, where: str) -> None:
    """Every key given in ``expected`` comes back from to_dict with the same value."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            _assert_contains(actual[key], value, f"{where}.{key}" if where else key)
    else:
        assert actual == expected, where


def test_empty_mapping_gives_defaults():
    assert from_dict(Params, {}) == Params()
    assert from_dict(Params, None) == Params()


def test_a_partial_nested_section_keeps_the_defaults_of_its_place_not_of_its_class():
    # topk.generator / multilabel.generator default to other settings than a bare DeepConfuseConfig
    p = from_dict(Params, {"multilabel": {"generator": {"target": "label_specific", "flip_labels": [0],
                                                        "pretrain": {"epochs": 1}}}})
    g, default = p.multilabel.generator, Params().multilabel.generator
    assert g.flip_labels == (0,) and g.target == "label_specific"
    assert to_dict(dataclasses.replace(g, flip_labels=default.flip_labels, target=default.target,
                                       pretrain=default.pretrain)) == to_dict(default)
    assert g.pretrain == dataclasses.replace(default.pretrain, epochs=1)  # merged key by key, one level down


def test_the_core_generator_refuses_the_ordered_topk_target_and_names_the_stage_that_makes_it():
    with pytest.raises(ConfigError, match=r"train_generator.target: ordered_topk is made and scored by the topk stage"):
        from_dict(Params, {"train_generator": {"target": "ordered_topk"}})


def test_params_are_frozen():
    params = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train_generator.eps = 0.1  # type: ignore[misc]


def test_unknown_section_key_names_dotted_key_and_lists_known(tmp_path):
    data = tiny_params_dict()
    data["train_generator"]["epss"] = 0.3
    msg = _load_error(tmp_path, data)
    assert "train_generator.epss" in msg
    assert "known keys" in msg
    for known in ("eps", "generator", "surrogate", "trials"):
        assert known in msg


def test_unknown_nested_key_names_full_path():
    data = tiny_params_dict()
    data["train_generator"]["validation"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match=r"train_generator\.validation\.lrr.*known keys.*lr"):
        from_dict(Params, data)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"^sed: unknown key.*known keys: seed"):
        from_dict(Params, {"sed": 1})


@pytest.mark.parametrize("eps", [1.5, 0, -0.1])
def test_eps_out_of_range_names_key_and_range(tmp_path, eps):
    data = tiny_params_dict(train_generator={"eps": eps})
    msg = _load_error(tmp_path, data)
    assert "train_generator.eps" in msg
    assert "0 < eps <= 1" in msg
    assert str(eps) in msg


def test_eps_at_upper_bound_is_accepted():
    assert from_dict(Params, tiny_params_dict(train_generator={"eps": 1})).train_generator.eps == 1.0


def test_unknown_classifier_in_evaluate_archs_lists_known(tmp_path):
    msg = _load_error(tmp_path, tiny_params_dict(evaluate={"archs": ["nope"]}))
    assert "evaluate.archs" in msg and "'nope'" in msg
    for name in CLASSIFIERS:
        assert name in msg


def test_unknown_generator_lists_known(tmp_path):
    msg = _load_error(tmp_path, tiny_params_dict(train_generator={"generator": "nope"}))
    assert "train_generator.generator" in msg and "'nope'" in msg
    for name in GENERATORS:
        assert name in msg


def test_unknown_surrogate_lists_known():
    with pytest.raises(ConfigError, match=r"train_generator\.surrogate.*'nope'.*dc_cnn"):
        from_dict(Params, tiny_params_dict(train_generator={"surrogate": "nope"}))


@pytest.mark.parametrize(
    "data, key, expected",
    [
        ({"seed": "x"}, "seed", "integer"),
        ({"seed": True}, "seed", "integer"),
        ({"seed": 1.5}, "seed", "integer"),
        ({"train_generator": {"eps": "0.3"}}, "train_generator.eps", "number"),
        ({"train_generator": {"quantize": "yes"}}, "train_generator.quantize", "true or false"),
        ({"train_generator": {"norm": "l2"}}, "train_generator.norm", "linf"),
        ({"train_generator": {"target_map": [1, "a"]}}, "train_generator.target_map", "integer"),
        ({"evaluate": {"archs": "dc_cnn"}}, "evaluate.archs", "list"),
        ({"evaluate": {"recipe": {"optimizer": "rmsprop"}}}, "evaluate.recipe.optimizer", "adam"),
        ({"data": 3}, "data", "mapping"),
        ({"data": {"per_class": "all"}}, "data.per_class", "integer"),
        ({"paths": {"clean": 5}}, "paths.clean", "string"),
    ],
)
def test_wrong_type_names_key_and_expectation(data, key, expected):
    with pytest.raises(ConfigError) as info:
        from_dict(Params, data)
    msg = str(info.value)
    assert msg.startswith(key), msg
    assert expected in msg


def test_wrong_type_seed_from_yaml(tmp_path):
    msg = _load_error(tmp_path, {"seed": "x"})
    assert "seed: expected an integer, got 'x'" in msg


@pytest.mark.parametrize(
    "data, key",
    [
        ({"seed": -1}, "seed"),
        ({"device": "tpu"}, "device"),
        ({"data": {"channels": 2}}, "data.channels"),
        ({"data": {"source": "imagenet"}}, "data.source"),
        ({"data": {"test_size": 0}}, "data.test_size"),
        ({"data": {"per_class": 2}}, "data.per_class"),
        ({"train_generator": {"trials": 0}}, "train_generator.trials"),
        ({"train_generator": {"generator_lr": 0}}, "train_generator.generator_lr"),
        ({"train_generator": {"validation": {"epochs": 0}}}, "train_generator.validation.epochs"),
        ({"poison": {"batch_size": 0}}, "poison.batch_size"),
        ({"evaluate": {"archs": []}}, "evaluate.archs"),
        ({"evaluate": {"recipe": {"lr": 0}}}, "evaluate.recipe.lr"),
        ({"evaluate": {"recipe": {"momentum": 1.0}}}, "evaluate.recipe.momentum"),
        ({"evaluate": {"seeds": [-1, 0]}}, "evaluate.seeds"),
        ({"device": "cudax"}, "device"),
        ({"device": "cuda:abc"}, "device"),
        # not finite: every `x < 0` range check lets nan through, and inf means nothing here
        ({"evaluate": {"recipe": {"weight_decay": float("nan")}}}, "evaluate.recipe.weight_decay"),
        ({"train_generator": {"adversarial_weight": float("inf")}}, "train_generator.adversarial_weight"),
        ({"augment": {"tail": {"imbalance_ratio": float("inf")}}}, "augment.tail.imbalance_ratio"),
        # a section given as null would silently take its class's defaults, not the documented ones
        ({"train_generator": None}, "train_generator"),
        ({"topk": {"generator": None}}, "topk.generator"),
    ],
)
def test_out_of_range_names_dotted_key(data, key):
    with pytest.raises(ConfigError) as info:
        from_dict(Params, data)
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_target_map_list_becomes_tuple():
    cfg = from_dict(Params, {"train_generator": {"target": "label_specific",
                                                  "target_map": [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]}})
    assert cfg.train_generator.target_map == (1, 2, 3, 4, 5, 6, 7, 8, 9, 0)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_cuda_with_an_index_is_a_device():
    assert from_dict(Params, {"device": "cuda:1"}).device == "cuda:1"


def test_unreadable_empty_and_ambiguous_params_files_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "params.yaml"
    cases = [
        (b"\xff\xfeseed: 0\n", "cannot read it as UTF-8 text.*save it as UTF-8"),
        (b"", "empty; expected the sections of params.yaml"),
        (b"# only a comment\n", "empty; expected the sections of params.yaml"),
        (b"seed: 1\nseed: 2\n", "key 'seed' is given twice"),
        (b"evaluate:\n  seeds: [0]\n  seeds: [1]\n", "key 'seeds' is given twice"),
        (b"1: a\nfoo: b\n", "unknown key in params.yaml"),  # keys of mixed types: sorted without a TypeError
    ]
    for text, message in cases:
        path.write_bytes(text)
        with pytest.raises(ConfigError, match=message) as info:
            load_params(path)
        assert str(path) in str(info.value), text
