"""Scheduled Prefect deployments against a real Prefect server (`prefect server start`).

One server per module, on a free loopback port, with its own PREFECT_HOME and a fast
scheduler loop. In a tiny committed copy of the repository (as in test_dvc_repro):
`prefect deploy` of prefect.yaml's `nightly` onto the process work pool, the server's
scheduler creates its cron runs, a run triggered now is executed by
`prefect worker start --run-once` and really regenerates: dvc pull -> dvc repro -> dvc
push to the copy's local-folder remote (build/dvc-remote). Then `python -m flows.serve`
registers its own scheduled deployment. Every process started here is killed with its
process group at the end, failed or not.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml

from conftest import REPO
from test_dvc_repro import BIN, _copy_repository, _run, _tiny_repo_params, dvc_env  # noqa: F401  (fixture)

CRON = "0 3 * * *"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (killed whole by ``_stop``), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it if still there after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; children of the group may linger: make sure of them too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break
    proc.wait()


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return f"--- last lines of {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def _wait_for(check: Callable[[], Any], timeout: float, what: str, logs: list[Path], every: float = 0.5) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with the logs' tails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n" + "\n".join(_tail(p) for p in logs))
        time.sleep(every)


class _Retry503(httpx.HTTPTransport):
    """Resend a request the server answers 503, as Prefect's own client does.

    `prefect server start` on SQLite answers 503 Service Unavailable while its database is
    locked by a background service (PrefectHQ/prefect#18934, #10188); it happened once to the
    served deployment's create_flow_run in CI."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(6):
            response = super().handle_request(request)
            if response.status_code != 503 or attempt == 5:
                return response
            response.close()
            time.sleep(0.25 * 2 ** attempt)
        raise AssertionError("unreachable")


class Server:
    """A running `prefect server start`: its API URL, a REST client, its log and env for clients."""

    def __init__(self, url: str, log: Path, env: dict[str, str]) -> None:
        self.url, self.log, self.env = url, log, env
        self.http = httpx.Client(base_url=url, timeout=30, transport=_Retry503())

    def deployment(self, name: str) -> dict[str, Any] | None:
        resp = self.http.get(f"/deployments/name/regenerate/{name}")
        return resp.json() if resp.status_code == 200 else None

    def flow_runs(self, deployment_id: str, state: str | None = None) -> list[dict[str, Any]]:
        runs: dict[str, Any] = {"deployment_id": {"any_": [deployment_id]}}
        if state is not None:
            runs["state"] = {"type": {"any_": [state]}}
        resp = self.http.post("/flow_runs/filter", json={"flow_runs": runs, "sort": "EXPECTED_START_TIME_ASC"})
        resp.raise_for_status()
        return resp.json()

    def run_logs(self, flow_run_id: str) -> str:
        resp = self.http.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                    "sort": "TIMESTAMP_ASC", "limit": 200})
        return "\n".join(f"{r['level']:>2} {r['message']}" for r in resp.json()) if resp.status_code == 200 else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory, dvc_env) -> Iterator[Server]:
    """`prefect server start` on a free port, its own PREFECT_HOME, a scheduler that loops every second."""
    home = tmp_path_factory.mktemp("prefect-server")
    env = {**dvc_env, "PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false",
           # the scheduler services (defaults 60 s and 5 s) create a new deployment's runs at once
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
           "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1"}
    for attempt in range(3):  # another process may take the free port before the server binds it
        log = home / f"server-{attempt}.log"
        url = f"http://127.0.0.1:{_free_port()}/api"
        port = url.rsplit(":", 1)[1].split("/")[0]
        proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                      home, env, log)
        try:
            def healthy() -> bool:
                if proc.poll() is not None:
                    return True
                try:
                    return httpx.get(f"{url}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            _wait_for(healthy, 120, "the Prefect server's /api/health", [log])
            if proc.poll() is not None:
                if "address already in use" in log.read_text(errors="replace") and attempt < 2:
                    continue
                pytest.fail(f"prefect server start exited with {proc.returncode}\n{_tail(log)}")
            client_env = {k: v for k, v in env.items() if not k.startswith("PREFECT_SERVER_SERVICES_")}
            client_env["PREFECT_API_URL"] = url
            srv = Server(url, log, client_env)
            yield srv
            srv.http.close()
            return
        finally:
            _stop(proc)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, dvc_env) -> Path:
    """A tiny copy of this project (prefect.yaml included), committed to git; nothing built yet."""
    repo = tmp_path_factory.mktemp("deploy-project") / "repo"
    repo.mkdir()
    _copy_repository(repo)
    assert (repo / "prefect.yaml").is_file() and (repo / "flows" / "serve.py").is_file()
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_repo_params(), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny"]):
        proc = _run(cmd, repo, dvc_env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return repo


def test_retry503_resends_until_the_server_answers(monkeypatch):
    answers = iter([503, 503, 201])
    sent = []

    def answer(self, request):
        sent.append(request.read())
        return httpx.Response(next(answers))

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", answer)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    resp = httpx.Client(transport=_Retry503()).post("http://127.0.0.1:9/api", json={"a": 1})
    assert resp.status_code == 201 and sent == [b'{"a":1}'] * 3


def test_prefect_yaml_schedules_run_level_parameters_only():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (nightly,) = [d for d in spec["deployments"] if d["name"] == "nightly"]
    assert nightly["entrypoint"] == "flows.regenerate.regenerate"
    assert nightly["work_pool"]["name"] == "poison-process"
    assert nightly["schedules"] == [{"cron": CRON, "timezone": "UTC", "active": True}]
    assert set(nightly["parameters"]) <= {"repo", "pull_first", "push_after", "git_commit", "tag"}
    # no pull step: `prefect deploy` records the directory it runs in (never a path of this machine)
    assert "pull" not in spec and "pull" not in nightly
    assert str(REPO) not in (REPO / "prefect.yaml").read_text()


def test_serve_without_a_server_says_how_to_start_one(dvc_env, tmp_path):
    env = {k: v for k, v in dvc_env.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # an empty profile: no API URL configured anywhere
    proc = _run([sys.executable, "-m", "flows.serve"], REPO, env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "prefect server start" in proc.stderr
    assert "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api" in proc.stderr


def test_serve_with_an_unreachable_server_or_a_wrong_repo_says_what_to_fix(dvc_env, tmp_path):
    env = dict(dvc_env, PREFECT_API_URL="http://127.0.0.1:9/api", PREFECT_HOME=str(tmp_path / "prefect"))
    proc = _run([sys.executable, "-m", "flows.serve"], REPO, env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "http://127.0.0.1:9/api (PREFECT_API_URL) does not answer" in proc.stderr
    assert "prefect server start" in proc.stderr and "Traceback" not in proc.stderr
    typo = tmp_path / "typo"
    proc = _run([sys.executable, "-m", "flows.serve", "--repo", str(typo)], REPO, env, timeout=120)
    assert proc.returncode == 1 and "not a checkout of this project" in proc.stderr, proc.stderr
    assert not typo.exists()


@pytest.mark.slow
def test_nightly_deployment_is_scheduled_and_a_worker_run_regenerates_and_pushes(server, tiny_repo, tmp_path):
    repo, env = tiny_repo, server.env
    prefect = str(BIN / "prefect")
    logs = [server.log]

    pool = _run([prefect, "work-pool", "create", "poison-process", "--type", "process"], repo, env, timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = _run([prefect, "--no-prompt", "deploy", "-n", "nightly"], repo, env, timeout=180)
    assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-4000:]

    dep = server.deployment("nightly")
    assert dep is not None, deploy.stdout
    assert dep["work_pool_name"] == "poison-process" and dep["entrypoint"] == "flows.regenerate.regenerate"
    assert dep["parameters"] == {"pull_first": True, "push_after": True, "git_commit": False, "tag": None}
    # without a pull section, the directory `prefect deploy` ran in is the run's working directory
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo.resolve())}}]
    (schedule,) = dep["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == CRON and schedule["schedule"]["timezone"] == "UTC"

    # the server's scheduler service (not `prefect deploy`) creates the nightly runs ahead of time
    scheduled = _wait_for(lambda: server.flow_runs(dep["id"], "SCHEDULED"), 60, "scheduled runs of nightly", logs)
    assert len(scheduled) >= 3
    for run in scheduled:
        assert run["auto_scheduled"] and run["expected_start_time"][11:19] == "03:00:00"

    # trigger one run now; a worker polling once picks it up, runs it to the end, then exits
    resp = server.http.post(f"/deployments/{dep['id']}/create_flow_run", json={})
    assert resp.status_code == 201, resp.text
    run_id = resp.json()["id"]
    worker_log = tmp_path / "worker.log"
    worker = _start([prefect, "worker", "start", "--pool", "poison-process", "--run-once"], repo, env, worker_log)
    try:
        worker.wait(timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not finish the run\n{_tail(worker_log)}\n{server.run_logs(run_id)}")
    finally:
        _stop(worker)

    run = server.http.get(f"/flow_runs/{run_id}").json()
    assert run["state"]["type"] == "COMPLETED", (
        f"{run['state']}\n{_tail(worker_log)}\n--- flow run logs ---\n{server.run_logs(run_id)[-6000:]}")
    artifacts = server.http.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    (report,) = [a for a in artifacts if a["key"] == "regenerate"]
    assert "- pushed: True" in report["data"] and "Running stage 'evaluate'" in report["data"]
    assert "Running stage 'variants/dvc.yaml:multilabel'" in report["data"]  # every pipeline

    # real work in the copy: dvc.lock records the tiny params, the local-folder remote got the outputs
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["data"]["per_class"] == 30
    remote = repo / "build" / "dvc-remote"
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= 4, "dvc push sent nothing to build/dvc-remote"
    status = _run([str(BIN / "dvc"), "status"], repo, env)
    assert "Data and pipelines are up to date" in status.stdout + status.stderr


@pytest.mark.slow
def test_serve_registers_a_scheduled_deployment(server, tiny_repo, tmp_path):
    log = tmp_path / "serve.log"
    proc = _start([sys.executable, "-m", "flows.serve", "--cron", "30 4 * * *", "--name", "nightly-serve",
                   "--no-push"], tiny_repo, server.env, log)
    try:
        def registered() -> dict[str, Any] | None:
            if proc.poll() is not None:
                pytest.fail(f"python -m flows.serve exited with {proc.returncode}\n{_tail(log)}")
            return server.deployment("nightly-serve")

        dep = _wait_for(registered, 120, "the served deployment", [log, server.log])
        (schedule,) = dep["schedules"]
        assert schedule["active"] and schedule["schedule"]["cron"] == "30 4 * * *"
        assert dep["parameters"] == {"repo": str(tiny_repo.resolve()), "pull_first": True, "push_after": False,
                                     "git_commit": False}
        runs = _wait_for(lambda: server.flow_runs(dep["id"], "SCHEDULED"), 60, "scheduled runs of nightly-serve",
                         [log, server.log])
        assert all(r["expected_start_time"][11:19] == "04:30:00" for r in runs)
        assert dep["entrypoint"] == "flows.regenerate.regenerate" and dep["work_pool_name"] is None

        # the serving process itself runs a run triggered now (dvc repro: up to date or rebuilt)
        resp = server.http.post(f"/deployments/{dep['id']}/create_flow_run", json={})
        assert resp.status_code == 201, resp.text
        run_id = resp.json()["id"]

        def finished() -> dict[str, Any] | None:
            run = server.http.get(f"/flow_runs/{run_id}").json()
            return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        run = _wait_for(finished, 300, "the served run", [log, server.log], every=1)
        assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{_tail(log)}\n{server.run_logs(run_id)[-6000:]}"
        assert proc.poll() is None, _tail(log)
    finally:
        _stop(proc, grace=20)
