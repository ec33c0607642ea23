"""flows/: thin Prefect flows over poison.stages, one per dvc.yaml stage."""

from __future__ import annotations

import importlib
from pathlib import Path

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


def test_report_stage_declares_every_file_it_reads():
    from poison.report import INPUTS

    deps = set(STAGES["report"]["deps"])
    assert {f"${{paths.reports}}/{rel}" for _, rel in INPUTS.values()} <= deps
    assert {"${paths.reports}/evaluate/confusion", "${paths.clean}", "${paths.poisoned}", "${paths.augmented}"} <= deps
    # and reads nothing it does not declare: every declared report file is one of its inputs
    declared = {d for d in deps if d.startswith("${paths.reports}/")}
    assert declared == {f"${{paths.reports}}/{rel}" for _, rel in INPUTS.values()} | {"${paths.reports}/evaluate/confusion"}


def test_variants_report_stage_declares_every_file_it_reads():
    from poison.report import VARIANT_INPUTS

    deps = set(STAGES["variants_report"]["deps"])
    datasets = {"${paths.clean}", "${paths.topk_poisoned}", "${paths.multilabel_clean}", "${paths.multilabel_poisoned}"}
    assert datasets <= deps
    declared = {d for d in deps if d.startswith("${paths.reports}/")}
    assert declared == {f"${{paths.reports}}/{rel}" for _, rel in VARIANT_INPUTS.values()}
    # the stages it reads from are in its own pipeline file and declare what it reads as outputs
    for stage, rel in VARIANT_INPUTS.values():
        spec = STAGES[stage]
        assert spec["pipeline"] == STAGES["variants_report"]["pipeline"] == "variants/dvc.yaml"
        declared = [next(iter(o)) if isinstance(o, dict) else o
                    for key in ("outs", "metrics", "plots") for o in spec.get(key, [])]
        assert f"${{paths.reports}}/{rel}" in declared, (stage, rel)


@pytest.mark.parametrize("stage", ["prepare", "train_generator", "poison", "augment", "evaluate", "report", "topk",
                                   "compose", "multilabel", "variants_report", "pipeline"])
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


def test_flow_entry_point_prints_the_notes_of_the_error(capsys):
    # regenerate notes what a failed push kept and what a rollback could not restore
    from flows.common import main
    from poison.errors import PoisonError

    def failing():
        exc = PoisonError("push failed")
        exc.add_note("the regenerated outputs are kept")
        raise exc

    assert main(failing, [], flow_kwargs=lambda args: {}, params=False) == 1
    assert capsys.readouterr().err == "error: push failed\nthe regenerated outputs are kept\n"


def test_evaluate_cache_key_holds_the_thread_count_that_null_means_here(prefect_env, tmp_path):
    # `threads: null` is torch's default, the host's core count: a cell cached on an 8-core
    # host is not the bytes a 2-core host trains, so the key holds the count, not null
    import torch

    from conftest import tiny_params
    from flows.evaluate import cell_key

    params = tiny_params(tmp_path, evaluate={"threads": None})
    parameters = {"params": params, "cell": {"dataset": "clean", "arch": "mlp", "seed": 0},
                  "plan": {"manifest_sha256": {"clean": "a", "poisoned": "b"}}}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cell_key(None, parameters)
        torch.set_num_threads(2)
        assert cell_key(None, parameters) != one
        fixed = {**parameters, "params": tiny_params(tmp_path, evaluate={"threads": 1})}
        assert cell_key(None, fixed) == one
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_prepare_flow_runs_in_process(prefect_harness, tmp_path):
    from flows.prepare import prepare

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(tmp_path)))
    result = prepare(params_path=str(params))
    clean = tmp_path / "data" / "shards" / "mnist5k"
    assert result == {"path": str(clean), "splits": {"train": 210, "val": 30, "test": 60}}
    assert read_manifest(clean)["kind"] == "clean" and verify_dataset(clean) == []


@pytest.mark.slow
def test_publish_flow_refuses_a_read_only_prefix_before_verifying(prefect_harness, tmp_path, monkeypatch):
    import flows.publish as flow
    from poison.publish import PublishError

    verified = []
    monkeypatch.setattr(flow, "verify_all", lambda *a, **k: verified.append(a) or {})
    params = tiny_params_dict(tmp_path)
    params["publish"] = {**params.get("publish", {}), "prefix": "https://example.org/data", "dvc_push": True}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PublishError, match="read-only"):
        flow.publish(params_path=str(path))
    assert verified == []


# ------------------------------------------------------------- regenerate's rollback of reports/
def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _reports_pair(tmp_path: Path) -> tuple[Path, Path]:
    saved, reports = tmp_path / "backup" / "reports", tmp_path / "repo" / "reports"
    (saved / "evaluate").mkdir(parents=True)
    (saved / "evaluate" / "metrics.json").write_text('{"before": 1}')
    (reports / "evaluate").mkdir(parents=True)
    (reports / "evaluate" / "metrics.json").write_text('{"failed run": 1}')
    (reports / "topk").mkdir()
    (reports / "topk" / "metrics.json").write_text("{}")
    return saved, reports


def test_regenerate_restores_reports_by_renames(tmp_path):
    from flows.rollback import restore_reports as _restore_reports

    saved, reports = _reports_pair(tmp_path)
    _restore_reports(saved, reports)
    assert _tree(reports) == _tree(saved) == {"evaluate/metrics.json": b'{"before": 1}'}
    assert [p.name for p in reports.parent.iterdir()] == ["reports"]  # no hidden leftovers
    _restore_reports(tmp_path / "none", reports)  # there were no reports before the run: none after
    assert not reports.exists() and list(reports.parent.iterdir()) == []


def test_regenerate_keeps_the_failed_runs_reports_when_the_copy_fails(tmp_path, monkeypatch):
    import shutil

    from flows.rollback import restore_reports as _restore_reports

    saved, reports = _reports_pair(tmp_path)
    before, backup = _tree(reports), _tree(saved)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", disk_full)
    with pytest.raises(OSError, match="disk full"):
        _restore_reports(saved, reports)
    assert _tree(reports) == before and _tree(saved) == backup  # nothing half-copied under the name
    assert [p.name for p in reports.parent.iterdir()] == ["reports"]


def test_regenerate_commits_the_reports_folder_params_names(tmp_path, monkeypatch):
    # paths.reports need not be "reports": the commit adds the folder the run wrote
    import subprocess

    from flows.regenerate import commit

    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(var, "test@example.invalid" if var.endswith("EMAIL") else "test")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "init"], cwd=repo, check=True)
    (repo / "out" / "reports" / "evaluate").mkdir(parents=True)
    (repo / "out" / "reports" / "evaluate" / "metrics.json").write_text("{}")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    subprocess.run(["git", "add", "dvc.yaml"], cwd=repo, check=True)
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    head = commit.fn(repo, None, repo / "out" / "reports")
    files = subprocess.run(["git", "show", "--name-only", "--format=", head], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.split()
    assert sorted(files) == ["dvc.lock", "out/reports/evaluate/metrics.json"]


# ------------------------------------------------------------- regenerate: one run at a time, no orphans
def _git_repo(path: Path, monkeypatch) -> Path:
    import subprocess

    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(var, "test@example.invalid" if var.endswith("EMAIL") else "test")
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / ".dvc").mkdir()
    (path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (path / "dvc.yaml").write_text("stages: {}\n")
    (path / "dvc.lock").write_text("schema: '2.0'\nbefore: 1\n")
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "init"], cwd=path, check=True)
    return path


def test_regenerate_refuses_a_repo_that_is_not_a_checkout_and_writes_nothing_there(tmp_path, monkeypatch):
    from poison.publish import PublishError

    regen = _fake_flow(monkeypatch, tmp_path)
    typo = tmp_path / "typo"
    with pytest.raises(PublishError, match=r"--repo .*typo: not a checkout of this project \(no .dvc or params.yaml\)"):
        regen.regenerate.fn(repo=str(typo), pull_first=False, push_after=False)
    assert not typo.exists()


def test_commit_needs_a_git_work_tree_and_an_identity_before_anything_runs(tmp_path, monkeypatch):
    import subprocess

    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    ran = []
    regen = _fake_flow(monkeypatch, repo, repro=lambda root: ran.append(root) or "")
    # no identity: git refuses to make one up (user.useConfigOnly), checked before the run
    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-global-config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    subprocess.run(["git", "config", "user.useConfigOnly", "true"], cwd=repo, check=True)
    with pytest.raises(PublishError, match="no identity to commit with; set one"):
        regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False, git_commit=True)
    # not a git work tree: `git status` there exits 128 with no output, which is not "clean"
    plain = tmp_path / "plain"
    (plain / ".dvc").mkdir(parents=True)
    (plain / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    with pytest.raises(PublishError, match=r"`git rev-parse --is-inside-work-tree` failed \(exit 128\)"):
        regen.regenerate.fn(repo=str(plain), pull_first=False, push_after=False, tag="v1")
    assert ran == []


def test_regenerate_names_a_repository_held_by_another_dvc_process(tmp_path):
    import sys

    from flows.regenerate import RepoBusy, _run

    script = "import sys; print('ERROR: Unable to acquire lock. Most likely another DVC process is running'); sys.exit(1)"
    with pytest.raises(RepoBusy, match="another DVC process holds the repository; nothing was changed"):
        _run([sys.executable, "-c", script], tmp_path)


def test_regenerate_runs_one_at_a_time_per_repository(tmp_path):
    from flows.regenerate import RepoBusy, _exclusive

    with _exclusive(tmp_path):
        with pytest.raises(RepoBusy, match="another regenerate run holds .*regenerate.lock"):
            with _exclusive(tmp_path):
                pass
    with _exclusive(tmp_path):  # released
        pass


def _fake_flow(monkeypatch, repo: Path, pull=None, repro=None, push=None):
    import logging

    import flows.regenerate as regen

    def _repro(root):
        (root / "dvc.lock").write_text("schema: '2.0'\nafter: 1\n")
        (root / "reports" / "evaluate").mkdir(parents=True, exist_ok=True)
        (root / "reports" / "evaluate" / "metrics.json").write_text('{"new": 1}')
        return "Running stage 'prepare':\n"

    monkeypatch.setattr(regen, "get_run_logger", lambda: logging.getLogger("regenerate-test"))
    monkeypatch.setattr(regen, "pull", pull or (lambda root: ""))
    monkeypatch.setattr(regen, "repro", repro or _repro)
    monkeypatch.setattr(regen, "push", push or (lambda root: ""))
    monkeypatch.setattr(regen, "create_markdown_artifact", lambda **kw: None)
    monkeypatch.setattr(regen, "commit", getattr(regen.commit, "fn", regen.commit))  # the task's body, without a Prefect server
    return regen


def test_a_failed_push_keeps_the_regenerated_outputs(tmp_path, monkeypatch):
    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)

    def push(root):
        raise PublishError("remote unreachable")

    regen = _fake_flow(monkeypatch, repo, push=push)
    with pytest.raises(PublishError, match="remote unreachable") as info:
        regen.regenerate.fn(repo=str(repo), pull_first=False)
    assert "outputs are kept" in "\n".join(getattr(info.value, "__notes__", []))
    assert "after: 1" in (repo / "dvc.lock").read_text()  # not rolled back: complete and recorded
    assert (repo / "reports" / "evaluate" / "metrics.json").read_text() == '{"new": 1}'


def test_a_busy_repository_is_not_rolled_back(tmp_path, monkeypatch):
    from flows.regenerate import RepoBusy

    repo = _git_repo(tmp_path / "repo", monkeypatch)

    def pull(root):
        (root / "dvc.lock").write_text("schema: '2.0'\nthe other run: 1\n")  # what the other DVC process wrote
        raise RepoBusy("busy")

    regen = _fake_flow(monkeypatch, repo, pull=pull)
    with pytest.raises(RepoBusy):
        regen.regenerate.fn(repo=str(repo))
    assert "the other run: 1" in (repo / "dvc.lock").read_text()  # the other run's lock file left alone


def test_a_failed_first_run_removes_the_lock_file_it_started_and_the_outputs_recorded_there(tmp_path, monkeypatch):
    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    (repo / "variants").mkdir()
    (repo / "variants" / "dvc.yaml").write_text("stages:\n  topk:\n    wdir: ..\n    cmd: run\n")
    (repo / "data").mkdir()
    (repo / "data" / "mine.txt").write_text("the user's file")

    def repro(root):  # the variants pipeline had never run: its first stage completes, the next fails
        (root / "data" / "shards" / "topk").mkdir(parents=True)
        (root / "data" / "shards" / "topk" / "manifest.json").write_text("{}")
        (root / "variants" / "dvc.lock").write_text(
            "schema: '2.0'\nstages:\n  topk:\n    cmd: run\n    outs:\n    - path: data/shards/topk\n"
            "    - path: ../../outside\n")
        (root / "dvc.lock").write_text("schema: '2.0'\nafter: 1\n")
        raise PublishError("stage compose failed")

    (tmp_path / "outside").write_text("not the repository's")
    regen = _fake_flow(monkeypatch, repo, repro=repro)
    monkeypatch.setattr(regen.subprocess, "run", _no_dvc_checkout(regen.subprocess.run))
    with pytest.raises(PublishError, match="stage compose failed"):
        regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False)
    assert not (repo / "variants" / "dvc.lock").exists() and not (repo / "data" / "shards" / "topk").exists()
    assert (repo / "dvc.lock").read_text() == "schema: '2.0'\nbefore: 1\n"  # the existing one put back
    assert (repo / "data" / "mine.txt").is_file() and (tmp_path / "outside").is_file()


def test_a_failed_first_run_removes_a_symlinked_output_not_the_cache_file(tmp_path, monkeypatch):
    # `dvc config cache.type symlink`: the workspace output is a link into .dvc/cache
    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    (repo / "variants").mkdir()
    (repo / "variants" / "dvc.yaml").write_text("stages:\n  topk:\n    wdir: ..\n    cmd: run\n")
    cached = repo / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef"
    cached.parent.mkdir(parents=True)

    def repro(root):
        cached.write_bytes(b"generator")
        (root / "models").mkdir()
        (root / "models" / "generator-topk.pt").symlink_to(cached)
        (root / "variants" / "dvc.lock").write_text(
            "schema: '2.0'\nstages:\n  topk:\n    cmd: run\n    outs:\n    - path: models/generator-topk.pt\n")
        raise PublishError("stage multilabel failed")

    regen = _fake_flow(monkeypatch, repo, repro=repro)
    monkeypatch.setattr(regen.subprocess, "run", _no_dvc_checkout(regen.subprocess.run))
    with pytest.raises(PublishError, match="stage multilabel failed"):
        regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False)
    assert not (repo / "models" / "generator-topk.pt").is_symlink() and cached.read_bytes() == b"generator"


@pytest.mark.parametrize("tag, message", [("bad..name", "not a valid git tag name"), ("-f", "not a valid git tag name"),
                                          ("v1", "the tag exists")])
def test_regenerate_refuses_a_tag_git_would_refuse_before_running(tmp_path, monkeypatch, tag, message):
    import subprocess

    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    subprocess.run(["git", "tag", "v1"], cwd=repo, check=True)
    ran = []
    regen = _fake_flow(monkeypatch, repo, repro=lambda root: ran.append(root) or "")
    with pytest.raises(PublishError, match=message):
        regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False, tag=tag)
    assert ran == []


def test_regenerate_commit_refuses_a_gitignore_with_changes_of_the_users(tmp_path, monkeypatch):
    # the commit adds the .gitignore entries DVC wrote: a user's own edits there would go in too
    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    (repo / "data").mkdir()
    (repo / "data" / ".gitignore").write_text("/scratch\n")
    regen = _fake_flow(monkeypatch, repo)
    with pytest.raises(PublishError, match="uncommitted changes:\n.*data/.gitignore"):
        regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False, git_commit=True)


def test_regenerate_commit_leaves_out_the_lock_file_of_a_pipeline_git_ignores(tmp_path, monkeypatch):
    import subprocess

    from flows.regenerate import commit

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    (repo / ".gitignore").write_text("/scratch/\n")
    subprocess.run(["git", "add", ".gitignore"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "ignore scratch"], cwd=repo, check=True)
    (repo / "scratch").mkdir()
    (repo / "scratch" / "dvc.yaml").write_text("stages: {}\n")
    (repo / "scratch" / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\nafter: 1\n")
    head = commit.fn(repo, None, repo / "reports")
    files = subprocess.run(["git", "show", "--name-only", "--format=", head], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.split()
    assert files == ["dvc.lock"]


def test_regenerate_reports_a_timed_out_command_as_an_error(tmp_path):
    import sys

    from flows.regenerate import _run
    from poison.publish import PublishError

    with pytest.raises(PublishError, match="took longer than 1 s and was stopped"):
        _run([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, timeout=1)


def _no_dvc_checkout(run):
    import subprocess

    def fake(cmd, *args, **kwargs):
        if cmd[1:4] == ["-m", "dvc", "checkout"]:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return run(cmd, *args, **kwargs)
    return fake


def test_regenerate_finds_every_pipeline_of_the_repository(tmp_path):
    from flows.regenerate import lock_files, pipelines

    (tmp_path / "build" / "clone" / ".dvc").mkdir(parents=True)  # a nested DVC repository: DVC skips it too
    for rel in ("dvc.yaml", "variants/dvc.yaml", "extra/deep/dvc.yaml", ".venv/lib/dvc.yaml", ".dvc/dvc.yaml",
                "build/clone/dvc.yaml", "build/clone/variants/dvc.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("stages: {}\n")
    assert pipelines(tmp_path) == ["dvc.yaml", "extra/deep/dvc.yaml", "variants/dvc.yaml"]
    assert lock_files(tmp_path) == ["dvc.lock", "extra/deep/dvc.lock", "variants/dvc.lock"]


def test_regenerate_commit_refuses_uncommitted_sources_and_commits_only_its_paths(tmp_path, monkeypatch):
    import subprocess

    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n# edited\n")
    regen = _fake_flow(monkeypatch, repo)
    with pytest.raises(PublishError, match="uncommitted changes:\n.*params.yaml"):
        regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False, git_commit=True)
    assert "before: 1" in (repo / "dvc.lock").read_text()  # refused before anything ran
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=repo, check=True)
    (repo / "notes.txt").write_text("the user's own work")
    subprocess.run(["git", "add", "notes.txt"], cwd=repo, check=True)  # staged by the user, not ours to commit

    def repro(root):
        (root / "dvc.lock").write_text("schema: '2.0'\nafter: 1\n")
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / ".gitignore").write_text("/shards\n")  # as DVC adds its outputs
        return ""

    regen = _fake_flow(monkeypatch, repo, repro=repro)
    out = regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False, git_commit=True)
    files = subprocess.run(["git", "show", "--name-only", "--format=", out["commit"]], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.split()
    assert sorted(files) == ["data/.gitignore", "dvc.lock"]
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout.split()
    assert staged == ["notes.txt"]


# ------------------------------------------------------------- regenerate: a run killed before it could roll back
def _killed_run_state(repo: Path) -> None:
    """What a run killed mid-`dvc repro` leaves: a new lock file of the core pipeline, a first lock
    file of the variants pipeline with the output it records, reports/ half rewritten."""
    (repo / "dvc.lock").write_text("schema: '2.0'\nafter: 1\n")
    (repo / "data" / "shards" / "topk").mkdir(parents=True)
    (repo / "data" / "shards" / "topk" / "manifest.json").write_text("{}")
    (repo / "variants" / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  topk:\n    cmd: run\n    outs:\n    - path: data/shards/topk\n")
    (repo / "reports" / "evaluate" / "metrics.json").write_text('{"killed run": 1}')


def _before_state(repo: Path) -> dict[str, bytes]:
    (repo / "variants").mkdir()
    (repo / "variants" / "dvc.yaml").write_text("stages:\n  topk:\n    wdir: ..\n    cmd: run\n")
    (repo / "reports" / "evaluate").mkdir(parents=True)
    (repo / "reports" / "evaluate" / "metrics.json").write_text('{"before": 1}')
    return _tree_of(repo)


def _tree_of(repo: Path) -> dict[str, bytes]:
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and not p.relative_to(repo).as_posix().startswith((".git/", ".dvc/"))}


def test_the_next_run_finishes_the_rollback_a_killed_run_owed_before_it_runs(tmp_path, monkeypatch):
    from flows.regenerate import JOURNAL, lock_files, write_record

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    before = _before_state(repo)
    write_record(repo, lock_files(repo), repo / "reports")  # as the killed run did before pulling
    _killed_run_state(repo)
    seen = []

    def repro(root):  # what the new run starts from
        seen.append(_tree_of(root))
        return ""

    regen = _fake_flow(monkeypatch, repo, repro=repro)
    monkeypatch.setattr(regen.subprocess, "run", _no_dvc_checkout(regen.subprocess.run))
    regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False)
    assert seen == [before]  # the killed run's lock files, its new pipeline's outputs and reports are gone
    assert not (repo / JOURNAL).exists() and list((repo / JOURNAL).parent.glob(".regenerate-rollback*")) == []


def test_recover_only_restores_and_runs_nothing(tmp_path, monkeypatch):
    from flows.regenerate import JOURNAL, lock_files, write_record

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    before = _before_state(repo)
    write_record(repo, lock_files(repo), repo / "reports")
    _killed_run_state(repo)
    ran = []
    regen = _fake_flow(monkeypatch, repo, pull=ran.append, repro=ran.append)
    checkouts, real_run = [], regen.subprocess.run

    def run(cmd, *args, **kwargs):
        if cmd[0] == "git":
            return real_run(cmd, *args, **kwargs)
        checkouts.append(cmd[1:4])
        return regen.subprocess.CompletedProcess(cmd, 1, "", "ERROR: missing cache")  # the cache lacks an output

    monkeypatch.setattr(regen.subprocess, "run", run)
    out = regen.regenerate.fn(repo=str(repo), recover_only=True)
    assert ran == [] and _tree_of(repo) == before and not (repo / JOURNAL).exists()
    assert checkouts == [["-m", "dvc", "checkout"]]
    assert out["recovered"] and "`dvc checkout --force` failed (exit 1)" in out["notes"][0]
    assert regen.regenerate.fn(repo=str(repo), recover_only=True) == {"repo": str(repo.resolve()),
                                                                       "recovered": False, "notes": []}


def test_a_rollback_cut_short_keeps_its_record_and_the_next_call_finishes_it(tmp_path, monkeypatch):
    import flows.regenerate as regen
    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    before = _before_state(repo)
    regen.write_record(repo, regen.lock_files(repo), repo / "reports")
    _killed_run_state(repo)
    monkeypatch.setattr(regen.subprocess, "run", _no_dvc_checkout(regen.subprocess.run))
    import flows.rollback as rb

    restore = rb.restore_reports

    def disk_full(saved, reports):
        raise OSError("disk full")

    monkeypatch.setattr(rb, "restore_reports", disk_full)
    with pytest.raises(PublishError, match=r"regenerate-rollback failed \(disk full\); the record is kept.*--recover"):
        regen.rollback(repo)
    assert (repo / regen.JOURNAL / "reports" / "evaluate" / "metrics.json").read_text() == '{"before": 1}'
    monkeypatch.setattr(rb, "restore_reports", restore)
    assert regen.rollback(repo) == [] and _tree_of(repo) == before
    assert regen.rollback(repo) is None  # nothing owed any more


def test_no_rollback_record_outlives_a_run(tmp_path, monkeypatch):
    import contextlib
    import shutil

    from flows.regenerate import JOURNAL, RepoBusy
    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    before = _before_state(repo)
    records = []

    def repro(root, fail=None):
        records.append((root / JOURNAL / "journal.json").is_file())  # written before anything runs
        _killed_run_state(root)
        if fail:
            raise fail
        return ""

    for fail in (PublishError("stage failed"), RepoBusy("busy"), KeyboardInterrupt(), None):
        regen = _fake_flow(monkeypatch, repo, repro=lambda root: repro(root, fail))
        monkeypatch.setattr(regen.subprocess, "run", _no_dvc_checkout(regen.subprocess.run))
        with pytest.raises(type(fail)) if fail else contextlib.nullcontext():
            regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False)
        assert not (repo / JOURNAL).exists()
        if type(fail) in (PublishError, KeyboardInterrupt):  # RepoBusy is a PublishError too
            assert _tree_of(repo) == before, fail  # rolled back
        else:  # the busy repository is another process's doing; a finished run keeps its outputs
            assert (repo / "dvc.lock").read_text() == "schema: '2.0'\nafter: 1\n"
            shutil.rmtree(repo / "data")
            (repo / "variants" / "dvc.lock").unlink()
            (repo / "dvc.lock").write_text("schema: '2.0'\nbefore: 1\n")
            (repo / "reports" / "evaluate" / "metrics.json").write_text('{"before": 1}')
    assert records == [True] * 4


def test_a_rollback_record_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import flows.regenerate as regen

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    _before_state(repo)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    import flows.rollback as rb

    monkeypatch.setattr(rb.shutil, "copytree", disk_full)
    ran = []
    regen = _fake_flow(monkeypatch, repo, repro=ran.append)
    with pytest.raises(OSError, match="disk full"):
        regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False)
    assert ran == [] and list((repo / regen.JOURNAL).parent.iterdir()) == [repo / ".dvc" / "tmp" / "regenerate.lock"]


def test_a_run_killed_by_sigkill_is_rolled_back_by_recover(tmp_path, monkeypatch):
    # the real thing: a process killed mid-repro (a Prefect worker's SIGKILL, 30 s after a cancellation's SIGTERM)
    import signal
    import subprocess
    import sys
    import time

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    before = _before_state(repo)
    script = f"""
import logging, sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
import flows.regenerate as regen
from test_flows import _killed_run_state
def repro(root):
    _killed_run_state(root)
    (root.parent / "started").write_text("")
    time.sleep(120)
regen.get_run_logger = lambda: logging.getLogger("killed")
regen.repro = repro
regen.regenerate.fn(repo=sys.argv[1], pull_first=False, push_after=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script, str(repo)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "started").exists(), "the run never reached repro"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _tree_of(repo) != before
    regen = _fake_flow(monkeypatch, repo)
    monkeypatch.setattr(regen.subprocess, "run", _no_dvc_checkout(regen.subprocess.run))
    assert regen.regenerate.fn(repo=str(repo), recover_only=True)["recovered"]
    assert _tree_of(repo) == before


def test_a_rollback_waits_for_a_repository_another_dvc_process_holds(tmp_path, monkeypatch):
    import zc.lockfile

    import flows.regenerate as regen

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    _before_state(repo)
    regen.write_record(repo, regen.lock_files(repo), repo / "reports")
    _killed_run_state(repo)
    killed = _tree_of(repo)
    (repo / ".dvc" / "tmp").mkdir(exist_ok=True)
    held = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))  # a hand-run `dvc repro`, as DVC takes it
    try:
        with pytest.raises(regen.RepoBusy, match="another DVC process holds the repository .*it is kept in"):
            regen.rollback(repo)
    finally:
        held.close()
    assert _tree_of(repo) == killed and (repo / regen.JOURNAL / "journal.json").is_file()  # nothing touched

    def busy_checkout(cmd, *args, **kwargs):  # DVC taken between the restore and the checkout
        if cmd[1:4] == ["-m", "dvc", "checkout"]:
            return regen.subprocess.CompletedProcess(cmd, 1, "", "ERROR: Unable to acquire lock. Most likely ...")
        return run(cmd, *args, **kwargs)

    run = regen.subprocess.run
    monkeypatch.setattr(regen.subprocess, "run", busy_checkout)
    with pytest.raises(regen.RepoBusy, match="the rollback is kept in"):
        regen.rollback(repo)
    assert (repo / regen.JOURNAL / "journal.json").is_file()


def test_a_record_from_before_another_commit_is_not_applied_without_recover(tmp_path, monkeypatch):
    import subprocess

    from poison.publish import PublishError

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    before = _before_state(repo)
    regen = _fake_flow(monkeypatch, repo, repro=lambda root: "")
    regen.write_record(repo, regen.lock_files(repo), repo / "reports")
    _killed_run_state(repo)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "the user moved on"], cwd=repo, check=True)
    moved_on = _tree_of(repo)
    monkeypatch.setattr(regen.subprocess, "run", _no_dvc_checkout(regen.subprocess.run))
    with pytest.raises(PublishError, match=r"is checked out now, so its record may be stale.*--recover.*delete"):
        regen.regenerate.fn(repo=str(repo), pull_first=False, push_after=False)
    assert _tree_of(repo) == moved_on
    regen.regenerate.fn(repo=str(repo), recover_only=True)  # asked for: put back the state from before that run
    assert _tree_of(repo) == before


def test_a_rollback_keeps_symlinks_in_reports_and_clears_what_a_cut_short_one_left(tmp_path, monkeypatch):
    import flows.regenerate as regen

    repo = _git_repo(tmp_path / "repo", monkeypatch)
    _before_state(repo)
    (repo / "reports" / "latest").symlink_to("evaluate")
    (repo / "reports" / "gone").symlink_to("no-such-file")  # dangling: copied as a link, not followed
    regen.write_record(repo, regen.lock_files(repo), repo / "reports")
    _killed_run_state(repo)
    (repo / "reports" / "latest").unlink()
    leftovers = [repo / ".dvc" / "tmp" / ".regenerate-rollback-abc", repo / ".reports.old-abc",
                 repo / ".reports.restore-abc"]
    for folder in leftovers:
        (folder / "x").mkdir(parents=True)
    monkeypatch.setattr(regen.subprocess, "run", _no_dvc_checkout(regen.subprocess.run))
    assert regen.rollback(repo) == []
    assert (repo / "reports" / "latest").is_symlink() and str((repo / "reports" / "latest").readlink()) == "evaluate"
    assert (repo / "reports" / "gone").is_symlink()
    assert not any(folder.exists() for folder in leftovers)
