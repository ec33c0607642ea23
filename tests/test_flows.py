"""flows/: thin Prefect flows over poison.stages, one per dvc.yaml stage."""

from __future__ import annotations

import importlib

import pytest
import yaml

from conftest import REPO, pipeline_stages, tiny_params_dict
from poison.shards import read_manifest, verify_dataset

STAGES = pipeline_stages()
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_stage_runs_its_flow_and_declares_real_inputs(stage):
    spec = STAGES[stage]
    # a pipeline outside the root runs at the root, so its paths read as in dvc.yaml
    assert spec.get("wdir", ".") == ("." if spec["pipeline"] == "dvc.yaml" else "..")
    assert spec["cmd"] == f"python -m flows.{stage}"
    assert (REPO / "flows" / f"{stage}.py").is_file()
    for key in spec.get("params", []):
        _lookup(PARAMS, key)  # KeyError: dvc.yaml names a key params.yaml does not have
    for dep in spec.get("deps", []):
        if "${" not in dep:
            assert (REPO / dep).exists(), f"{stage}: dependency {dep} does not exist"
    assert f"flows/{stage}.py" in spec["deps"]


def test_dvc_stages_chain_through_declared_paths():
    deps = {name: set(s.get("deps", [])) for name, s in STAGES.items()}
    assert "${paths.clean}" in deps["train_generator"]
    assert {"${paths.clean}", "${paths.generator}"} <= deps["poison"]
    assert {"${paths.clean}", "${paths.poisoned}"} <= deps["evaluate"]


@pytest.mark.parametrize("stage", ["prepare", "train_generator", "poison", "augment", "evaluate", "pipeline"])
def test_each_flow_module_defines_a_flow_of_the_stage_name(prefect_env, stage):
    from prefect import Flow

    module = importlib.import_module(f"flows.{stage}")
    flow = getattr(module, stage)
    assert isinstance(flow, Flow) and flow.name == stage


def test_flow_entry_point_reports_bad_params_without_running(prefect_env, tmp_path, capsys):
    from flows.common import main
    from flows.prepare import prepare

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(tmp_path, evaluate={"archs": ["nope"]})))
    assert main(prepare, ["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "evaluate.archs" in err and "'nope'" in err
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_prepare_flow_runs_in_process(prefect_harness, tmp_path):
    from flows.prepare import prepare

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(tmp_path)))
    result = prepare(params_path=str(params))
    clean = tmp_path / "data" / "shards" / "mnist5k"
    assert result == {"path": str(clean), "splits": {"train": 210, "val": 30, "test": 60}}
    assert read_manifest(clean)["kind"] == "clean" and verify_dataset(clean) == []
