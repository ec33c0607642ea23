"""Fan-out: the stages' plan / job / finish pieces, task runners, caching (issue 5).

Whatever runs the jobs (a loop, threads, processes, a Dask cluster), in whatever order
they finish, the dataset and the metrics have the same bytes as the sequential stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_params_dict
from poison import stages
from poison.config import OrchestrationConfig, Params, from_dict, load_params
from poison.errors import ConfigError, ShardError
from poison.shards import load_range, load_split, read_manifest
from poison.utils import code_fingerprint, torch_threads


def _tree(path: str | Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative names), hidden leftovers included."""
    root = Path(path)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _metrics(path: Path) -> dict:
    """metrics.json without the dataset paths (each test writes its poisoned set elsewhere)."""
    m = json.loads(path.read_bytes())
    for d in m["datasets"].values():
        d.pop("path")
    return m


def _reports(params: Params) -> dict:
    """The evaluate stage's outputs: PNG hashes and the path-free metrics."""
    root = Path(params.paths.reports) / "evaluate"
    return {"files": {k: v for k, v in _tree(root).items() if k != "metrics.json"},
            "metrics": _metrics(root / "metrics.json")}


def _params(session_params: Params, out: Path, **orchestration) -> Params:
    """The session's clean data and generator (read only); this test's poisoned set and reports."""
    paths = dataclasses.replace(session_params.paths, poisoned=str(out / "poisoned" / "mnist5k-deepconfuse"),
                                reports=str(out / "reports"))
    params = dataclasses.replace(session_params, paths=paths,
                                 poison=dataclasses.replace(session_params.poison, shard_size=50),
                                 evaluate=dataclasses.replace(session_params.evaluate, seeds=(0, 1)))
    if orchestration:
        params = dataclasses.replace(params, orchestration=OrchestrationConfig(**orchestration))
    return params


def _params_file(params: Params, path: Path) -> str:
    from poison.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def sequential(session_params, generator_checkpoint, tmp_path_factory):
    """The sequential stages' outputs (poison with 5 shards, evaluate with 2 x 1 x 2 cells)."""
    out = tmp_path_factory.mktemp("sequential")
    params = _params(session_params, out)
    stages.poison(params)
    stages.evaluate(params)
    return {"poisoned": _tree(params.paths.poisoned), "reports": _reports(params)}


# ----------------------------------------------------------------- library pieces
def test_load_range_reads_the_samples_of_a_range_across_shards(clean_dataset):
    x, y, meta = load_split(clean_dataset, "train")
    for begin, end in ((0, 0), (0, 100), (95, 205), (199, 210), (0, 210)):
        xr, yr, mr = load_range(clean_dataset, "train", begin, end)
        assert torch.equal(xr, x[begin:end]) and torch.equal(yr, y[begin:end]) and mr == meta[begin:end]
    with pytest.raises(ShardError, match=r"\[200, 211\) is outside split 'train' of 210"):
        load_range(clean_dataset, "train", 200, 211)
    with pytest.raises(ShardError, match="no split 'nope'"):
        load_range(clean_dataset, "nope", 0, 1)


def test_poison_jobs_in_any_order_give_the_sequential_bytes(session_params, generator_checkpoint, sequential, tmp_path):
    params = _params(session_params, tmp_path)
    plan = stages.poison_plan(params)
    assert [(j["begin"], j["end"]) for j in plan["jobs"]] == [(0, 50), (50, 100), (100, 150), (150, 200), (200, 210)]
    json.dumps(plan)  # a small JSON-ready record, no tensors
    results = {j["index"]: stages.poison_shard(params, plan, j) for j in reversed(plan["jobs"])}
    assert not Path(params.paths.poisoned).exists()  # nothing looks complete before finish
    stages.poison_finish(params, plan, [results[j["index"]] for j in plan["jobs"]])
    assert _tree(params.paths.poisoned) == sequential["poisoned"]
    assert not list(Path(params.paths.poisoned).parent.glob(".*"))  # no staging leftovers


def test_poison_finish_refuses_a_missing_or_foreign_shard(session_params, generator_checkpoint, tmp_path):
    params = _params(session_params, tmp_path)
    plan = stages.poison_plan(params)
    results = [stages.poison_shard(params, plan, j) for j in plan["jobs"]]
    with pytest.raises(ShardError, match="do not match the plan's jobs"):
        stages.poison_finish(params, plan, results[:-1])
    (Path(plan["staging"]) / results[2]["shard"]["file"]).unlink()
    with pytest.raises(ShardError, match=r"train-000002\.tar: shard missing or of the wrong size"):
        stages.poison_finish(params, plan, results)
    assert not Path(params.paths.poisoned).exists()
    assert not Path(plan["staging"]).exists()


def test_poison_job_refuses_a_checkpoint_changed_after_the_plan(session_params, generator_checkpoint, tmp_path):
    import shutil

    from poison.errors import CheckpointError

    ckpt = tmp_path / "generator.pt"
    shutil.copy(generator_checkpoint, ckpt)
    params = _params(session_params, tmp_path)
    params = dataclasses.replace(params, paths=dataclasses.replace(params.paths, generator=str(ckpt)))
    plan = stages.poison_plan(params)
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="changed while the poison stage ran"):
        stages.poison_shard(params, plan, plan["jobs"][0])
    stages.abandon(plan)
    assert not Path(plan["staging"]).exists()


def test_evaluate_cells_in_any_order_give_the_sequential_metrics(session_params, sequential, tmp_path):
    params = _params(session_params, tmp_path)
    stages.poison(params)
    plan = stages.evaluate_plan(params)
    assert [(c["dataset"], c["seed"]) for c in plan["cells"]] == [("clean", 0), ("clean", 1), ("poisoned", 0), ("poisoned", 1)]
    json.dumps(plan)
    runs = {i: stages.evaluate_cell(params, plan, c) for i, c in reversed(list(enumerate(plan["cells"])))}
    json.dumps(runs)  # results are small JSON-ready records
    with pytest.raises(ShardError, match="do not match the plan's cells"):
        stages.evaluate_finish(params, plan, [runs[i] for i in (1, 0, 2, 3)])
    stages.evaluate_finish(params, plan, [runs[i] for i in range(4)])
    assert _reports(params) == sequential["reports"]
    assert sequential["reports"]["metrics"]["threads"] == 1


def test_torch_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_torch_threads_nested_and_overlapping_blocks_restore_the_count():
    outside = torch.get_num_threads()
    torch.set_num_threads(2)  # a count that differs from the blocks' own, whatever the environment set
    try:
        _nested_and_overlapping_blocks()
    finally:
        torch.set_num_threads(outside)


def _nested_and_overlapping_blocks():
    import threading

    before = torch.get_num_threads()
    with torch_threads(3):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3   # the outer block's count again
    assert torch.get_num_threads() == before
    # two threads whose blocks overlap (a thread task runner): the first to enter leaves first
    entered, second_in, first_left = threading.Event(), threading.Event(), threading.Event()

    def first():
        with torch_threads(1):
            entered.set()
            second_in.wait(5)
        first_left.set()

    def second():
        entered.wait(5)
        with torch_threads(1):
            second_in.set()
            first_left.wait(5)

    workers = [threading.Thread(target=f) for f in (first, second)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    assert all(not w.is_alive() for w in workers) and second_in.is_set() and first_left.is_set()
    # torch keeps a count per thread and a process-wide one that new threads start from: both restored
    fresh: list[int] = []
    late = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    late.start()
    late.join(10)
    assert torch.get_num_threads() == before and fresh == [before]


def test_code_fingerprint_is_stable_and_covers_the_package(tmp_path, monkeypatch):
    import shutil

    import poison.utils

    original = code_fingerprint()
    assert code_fingerprint() == original and len(original) == 64
    copy = tmp_path / "poison"
    shutil.copytree(Path(poison.utils.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(poison.utils, "__file__", str(copy / "utils.py"))
    assert code_fingerprint() == original  # a copy of the package hashes like the package
    (copy / "notes.txt").write_text("not code")
    assert code_fingerprint() == original  # only .py files count
    nested = copy / "attacks" / "deepconfuse.py"
    nested.write_text(nested.read_text() + "\n# a change deep in the package\n")
    assert code_fingerprint() != original


# --------------------------------------------------------------------- config
@pytest.mark.parametrize("section, message", [
    ({"workers": 0}, "orchestration.workers: expected an integer >= 1, got 0"),
    ({"task_runner": "ray"}, "orchestration.task_runner: expected one of ['thread', 'process', 'dask'], got 'ray'"),
    ({"address": "tcp://127.0.0.1:8786"}, "address: a scheduler address needs task_runner dask"),
    ({"task_runner": "dask", "address": "127.0.0.1:8786"}, "expected a Dask scheduler URL like tcp://host:8786"),
])
def test_orchestration_section_is_validated(section, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Params, tiny_params_dict(orchestration=section))


@pytest.mark.parametrize("key", ["poison", "evaluate"])
def test_threads_must_be_positive_or_null(key):
    with pytest.raises(ConfigError, match=f"{key}.threads: expected null"):
        from_dict(Params, tiny_params_dict(**{key: {"threads": 0}}))
    assert getattr(from_dict(Params, tiny_params_dict(**{key: {"threads": None}})), key).threads is None


def test_repeated_seeds_are_refused():
    with pytest.raises(ConfigError, match="evaluate.archs/seeds: expected no repeats"):
        from_dict(Params, tiny_params_dict(evaluate={"seeds": [0, 0]}))


def test_task_runner_follows_the_config(prefect_env, monkeypatch):
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    from flows.common import task_runner

    assert isinstance(task_runner(OrchestrationConfig("thread", 3)), ThreadPoolTaskRunner)
    assert isinstance(task_runner(OrchestrationConfig("process", 2)), ProcessPoolTaskRunner)
    dask = task_runner(OrchestrationConfig("dask", 2))
    assert type(dask).__name__ == "DaskTaskRunner" and dask.cluster_kwargs["n_workers"] == 2
    assert task_runner(OrchestrationConfig("dask", 2, "tcp://127.0.0.1:8786")).address == "tcp://127.0.0.1:8786"
    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    with pytest.raises(ConfigError, match=r"needs prefect-dask.*pip install -e \"\.\[dask\]\""):
        task_runner(OrchestrationConfig("dask", 2))


# ------------------------------------------------------------------------ flows
@pytest.mark.slow
@pytest.mark.parametrize("runner", ["thread", "process", "dask"])
def test_flows_on_each_runner_give_the_sequential_bytes(prefect_harness, session_params, sequential, tmp_path, runner):
    """Materialization (5 shards) and the evaluation matrix (4 cells) on 2 workers: threads,
    a process pool, and a 2-worker Dask LocalCluster through prefect-dask."""
    from flows.evaluate import evaluate
    from flows.poison import poison

    params = _params(session_params, tmp_path, task_runner=runner, workers=2, cache=False)
    path = _params_file(params, tmp_path / "params.yaml")
    assert poison(params_path=path)["shards"] == 5
    assert _tree(params.paths.poisoned) == sequential["poisoned"]
    evaluate(params_path=path)
    assert _reports(params) == sequential["reports"]


@pytest.mark.slow
def test_failed_shard_fails_the_flow_and_leaves_nothing(prefect_harness, session_params, generator_checkpoint,
                                                        tmp_path, monkeypatch):
    from flows.poison import poison

    real = stages.poison_shard

    def failing(params, plan, job):
        if job["index"] == 3:
            raise OSError("disk full (injected)")
        return real(params, plan, job)

    monkeypatch.setattr(stages, "poison_shard", failing)
    params = _params(session_params, tmp_path, task_runner="thread", workers=2)
    with pytest.raises(OSError, match="disk full"):
        poison(params_path=_params_file(params, tmp_path / "params.yaml"))
    out = Path(params.paths.poisoned)
    assert not out.exists() and not list(out.parent.glob(".*"))


@pytest.mark.slow
def test_evaluation_cells_are_cached_on_their_inputs_and_code(prefect_harness, session_params, sequential, tmp_path,
                                                             monkeypatch):
    """A rerun trains nothing and writes the same bytes; a new seed trains only its cells;
    a different recipe trains everything again."""
    from flows.evaluate import evaluate

    trained: list[tuple] = []
    real = stages.evaluate_cell

    def counting(params, plan, cell):
        trained.append((cell["dataset"], cell["seed"], params.evaluate.recipe.lr))
        return real(params, plan, cell)

    monkeypatch.setattr(stages, "evaluate_cell", counting)
    params = _params(session_params, tmp_path, task_runner="thread", workers=2)
    stages.poison(params)
    path = tmp_path / "params.yaml"
    evaluate(params_path=_params_file(params, path))
    assert len(trained) == 4
    metrics = Path(params.paths.reports) / "evaluate" / "metrics.json"
    first = metrics.read_bytes()
    assert _reports(params) == sequential["reports"]
    metrics.unlink()
    evaluate(params_path=str(path))
    assert len(trained) == 4 and metrics.read_bytes() == first  # all four from the cache

    more = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, seeds=(0, 1, 2)))
    evaluate(params_path=_params_file(more, path))
    assert sorted(trained[4:]) == [("clean", 2, 0.01), ("poisoned", 2, 0.01)]

    recipe = dataclasses.replace(params.evaluate.recipe, lr=0.02)
    other = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, recipe=recipe))
    evaluate(params_path=_params_file(other, path))
    assert len(trained) == 10 and all(t[2] == 0.02 for t in trained[6:])

    import flows.evaluate

    monkeypatch.setattr(flows.evaluate, "code_fingerprint", lambda: "another revision of poison/")
    evaluate(params_path=_params_file(params, path))
    assert len(trained) == 14 and all(t[2] == 0.01 for t in trained[10:])  # a code change trains every cell again

    off = dataclasses.replace(params, orchestration=OrchestrationConfig("thread", 2, cache=False))
    evaluate(params_path=_params_file(off, path))
    assert len(trained) == 18


def test_committed_params_fan_out_on_threads_by_default():
    from conftest import REPO

    params = load_params(REPO / "params.yaml")
    assert params.orchestration == OrchestrationConfig("thread", 2, None, True)
    assert params.poison.threads == 1 and params.evaluate.threads == 1
