"""The server's worker pool: one worker per device (`serve --devices cpu,cpu`), all fed by the one queue."""
from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import pytest

from MedDiffusionLib.server.jobs import JobManager, QueueFull, RunOutput, Worker
from MedDiffusionLib.server.store import JobStore

from server_fixture import ServerProcess, volume


def _wait(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_two_workers_run_two_jobs_at_once(tmp_path):
    both_running = threading.Barrier(2, timeout=10)  # broken (the job fails) unless two runners overlap
    ran_on: dict[str, str] = {}

    def make_runner(device: str):
        def runner(rec, _input, _progress, _cancel):
            ran_on[rec.id] = device
            if rec.params.get("pair"):
                both_running.wait()
            return RunOutput({"result": volume(size=(4, 4, 4))}, {"device": device})
        return runner

    released = []
    workers = [Worker({"generate": make_runner(d)}, after_job=lambda d=d: released.append(d), name=d)
               for d in ("dev0", "dev1")]
    store = JobStore(tmp_path, ttl_s=3600)
    mgr = JobManager(store, workers, max_queue=2)
    mgr.start()
    try:
        a, b = mgr.submit("generate", {"pair": True}), mgr.submit("generate", {"pair": True})
        _wait(lambda: store.get(a.id).state == "done" and store.get(b.id).state == "done")
        assert {ran_on[a.id], ran_on[b.id]} == {"dev0", "dev1"}
        _wait(lambda: len(released) == 2)  # the hook runs after the job is recorded
        assert sorted(released) == ["dev0", "dev1"] and mgr.running_ids == []
        # The queue bound still counts waiting jobs only, across all workers.
        more = [mgr.submit("generate", {}) for _ in range(2)]
        _wait(lambda: all(store.get(j.id).state == "done" for j in more))
    finally:
        mgr.shutdown(timeout=10)
    with pytest.raises(ValueError):
        JobManager(store, [Worker({"generate": make_runner("x")}), Worker({"reconstruct": make_runner("y")})])
    with pytest.raises(QueueFull):
        mgr.submit("generate", {})  # shut down


def test_server_with_two_cpu_workers_runs_two_jobs_concurrently(tmp_path: Path):
    from helpers import make_tiny_bundle

    token = secrets.token_urlsafe(32)
    srv = ServerProcess(make_tiny_bundle(tmp_path / "model"), tmp_path / "store", tmp_path / "server.log",
                        "--devices", "cpu,cpu", "--max-queue", "2", token=token)
    try:
        client = srv.client()
        assert client.models()["device"] == "cpu,cpu"
        slow = dict(anatomy="ct-head-neck", sampler="ddpm", steps=1000)  # ~a minute each: cancelled below
        jobs = [client.generate(**slow), client.generate(**slow)]
        third = client.generate("ct-legs", steps=2)
        _wait(lambda: all(client.status(j).state == "running" and client.status(j).step for j in jobs), 60)
        assert client.status(third).queue_position == 1  # both workers busy: the third one waits
        for j in jobs:
            client.cancel(j)
        _wait(lambda: client.status(third).state == "done", 60)
        assert client.status(third).info["device"] == "cpu"
        assert {client.status(j).state for j in jobs} == {"cancelled"}
    finally:
        srv.stop()
    assert "Traceback" not in srv.log_tail()
