"""The Slicer module's Qt-free logic against the real MRML library (PyPI slicer-core), headless.

Covers: SimpleITK <-> volume node with oblique geometry, files written through the node's storage node, the
parameter node surviving a scene save/load, and the background job logic (progress, cancel, errors, result
nodes) with a fake backend, with the real local pipeline on the tiny test bundle, and with the remote backend
against a real `python -m MedDiffusionLib serve` subprocess on 127.0.0.1 (Testing/server_fixture.py).
"""
from __future__ import annotations

import importlib
import inspect
import logging
import re
import secrets
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "MedDiffusion"):  # the module folder holds the MedDiffusionLogic package
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from MedDiffusionLib.errors import Cancelled, InputError, MedDiffusionError  # noqa: E402
from MedDiffusionLogic import dependencies, mrml_volumes, selfchecks  # noqa: E402
from MedDiffusionLogic.backends import AnatomyChoice, Outcome, ProgressUpdate, RemoteBackend  # noqa: E402
from MedDiffusionLogic.logic import BusyError, JobState, MedDiffusionLogic  # noqa: E402
from MedDiffusionLogic.parameters import (  # noqa: E402
    MedDiffusionParameterNode, MedDiffusionParameters, parse_size)


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


# ----------------------------------------------------------------------------- volumes


def test_volume_round_trip_through_node_and_files(scene, tmp_path):
    selfchecks.check_volume_round_trip(scene, str(tmp_path))


def test_linear_parent_transform_is_applied_on_export(scene):
    selfchecks.check_transformed_volume(scene)


def test_volume_types_slicer_refuses_are_converted(scene):
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.int64).reshape(2, 3, 4))
    node = mrml_volumes.image_to_volume_node(image, scene, "int64")
    assert slicer.util.arrayFromVolume(node).dtype == np.int32
    assert np.array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayViewFromImage(image))


def test_bad_volumes_give_clear_errors(scene):
    with pytest.raises(InputError, match="no input volume"):
        mrml_volumes.volume_node_to_image(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        mrml_volumes.volume_node_to_image(empty)
    sheared = sitk.Image(4, 4, 4, sitk.sitkFloat32)
    sheared.SetDirection((1, 0.5, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InputError, match="orthonormal"):
        mrml_volumes.image_to_volume_node(sheared, scene, "sheared")
    rgb = sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3)
    with pytest.raises(InputError, match="scalar"):
        mrml_volumes.image_to_volume_node(rgb, scene, "rgb")


# ----------------------------------------------------------------------------- parameters


def test_parameter_node_round_trip_through_saved_scene(scene):
    selfchecks.check_parameter_round_trip(scene)


def test_parameter_node_validates_and_tolerates_bad_stored_values(scene):
    wrapper = MedDiffusionParameterNode.get_or_create(scene)
    assert MedDiffusionParameterNode.get_or_create(scene).node is wrapper.node  # a singleton
    with pytest.raises(ValueError, match="sampler"):
        wrapper.update(sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        wrapper.update(steps=0)
    with pytest.raises(ValueError, match="size"):
        wrapper.update(size="64x64")
    with pytest.raises(ValueError, match="unknown"):
        wrapper.update(token="secret")  # the token is never stored in the scene
    assert wrapper.update(size="64x48x32").size_xyz == (64, 48, 32)
    wrapper.node.SetParameter("steps", "many")  # e.g. a hand-edited or older scene
    wrapper.node.SetParameter("views", "-3")
    wrapper.node.SetParameter("simulate", "maybe")
    params = wrapper.read()
    assert (params.steps, params.views, params.simulate) == (50, 30, True)
    assert parse_size("128 x 128 x 64") == (128, 128, 64)
    assert "token" not in wrapper.node.GetParameterNames()


# ----------------------------------------------------------------------------- logic with a fake backend


class FakeBackend:
    """Returns volumes with oblique geometry after a few reported steps; optionally blocks until cancelled."""

    def __init__(self, steps: int = 4, block: bool = False, error: Exception | None = None) -> None:
        self.steps, self.block, self.error = steps, block, error
        self.received: sitk.Image | None = None
        self.started = threading.Event()

    def _steps(self, progress, cancel) -> None:
        self.started.set()
        for i in range(1, self.steps + 1):
            if cancel.is_set():
                raise Cancelled("cancelled")
            progress(ProgressUpdate(i, self.steps, 0.01 * i, 0.01 * (self.steps - i), "sampling"))
        while self.block and not cancel.wait(0.01):
            pass
        if cancel.is_set():
            raise Cancelled("cancelled")
        if self.error is not None:
            raise self.error

    def generate(self, params, seed, progress, cancel) -> Outcome:
        self._steps(progress, cancel)
        image = selfchecks.make_test_image((8, 6, 5))
        return Outcome(image=image, seed=seed, modality="CT", anatomy=params.anatomy, info={"backend": "fake"})

    def reconstruct(self, params, image, seed, progress, cancel) -> Outcome:
        self.received = image
        self._steps(progress, cancel)
        recon = sitk.Cast(image, sitk.sitkFloat32) + 1.0
        recon.CopyInformation(image)
        return Outcome(image=recon, degraded=sitk.Cast(image, sitk.sitkFloat32), seed=seed,
                       modality="CT" if params.task == "sparse-ct" else "MR")


def _logic(scene, backend) -> MedDiffusionLogic:
    return MedDiffusionLogic(scene, backend_factory=lambda params, token: backend)


def test_generate_with_fake_backend_creates_named_node_with_geometry(scene):
    logic = _logic(scene, FakeBackend())
    params = MedDiffusionParameters(anatomy="ct-chest-abdomen", random_seed=False, seed=17)
    node = selfchecks.check_generate(logic, params)
    assert node.GetName() == "MedDiffusion CT chest-abdomen seed 17"
    selfchecks.assert_same_image(mrml_volumes.volume_node_to_image(node), selfchecks.make_test_image((8, 6, 5)))
    display = node.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (400.0, 40.0)  # HU: CT soft-tissue preset
    assert node.GetAttribute("MedDiffusion.seed") == "17"
    assert MedDiffusionParameterNode.get_or_create(scene).output("Output") is node


def test_reconstruct_with_fake_backend_keeps_input_geometry(scene):
    backend = FakeBackend()
    logic = _logic(scene, backend)
    image = selfchecks.make_test_image(dtype=np.int16)
    source = mrml_volumes.image_to_volume_node(image, scene, "input CT")
    params = MedDiffusionParameters(task="sparse-ct", views=30, input_volume_id=source.GetID())
    logic.start_reconstruct(params)
    assert logic.wait(30).state == "done"
    recon, degraded = logic.finish()
    selfchecks.assert_same_image(backend.received, image, what="image sent to the backend")
    assert recon.GetName() == "MedDiffusion sparse-CT 30 views recon"
    assert degraded.GetName() == "MedDiffusion sparse-CT 30 views FBP"
    for node in (recon, degraded):
        out = mrml_volumes.volume_node_to_image(node)
        assert np.allclose(out.GetOrigin(), image.GetOrigin()) and np.allclose(out.GetSpacing(), image.GetSpacing())
        assert np.allclose(out.GetDirection(), image.GetDirection())
    assert recon.GetAttribute("MedDiffusion.input") == source.GetID()


def test_progress_is_reported_while_running(scene):
    backend = FakeBackend(steps=3, block=True)
    logic = _logic(scene, backend)
    logic.start_generate(MedDiffusionParameters())
    deadline = time.monotonic() + 10
    while logic.poll().step < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    state = logic.poll()
    assert state.running and (state.step, state.total, state.stage) == (3, 3, "sampling")
    assert "step 3/3" in state.describe() and state.percent == 100
    with pytest.raises(BusyError):
        logic.start_generate(MedDiffusionParameters())
    logic.cancel(wait_s=10)
    assert logic.poll().state == "cancelled"
    assert logic.finish() == [] and logic.poll().state == "idle"


def test_backend_errors_become_user_messages(scene):
    logic = _logic(scene, FakeBackend(error=InputError("size 7x7x7 is not a multiple of 8")))
    logic.start_generate(MedDiffusionParameters())
    state = logic.wait(30)
    assert state.state == "failed" and state.message == "size 7x7x7 is not a multiple of 8"
    assert state.describe().startswith("Failed: size")
    assert logic.finish() == []
    assert JobState().describe() == "Ready."


def test_reconstruct_without_input_is_refused_before_starting(scene):
    logic = _logic(scene, FakeBackend())
    with pytest.raises(InputError, match="no input volume"):
        logic.start_reconstruct(MedDiffusionParameters())
    assert not logic.is_running


# ----------------------------------------------------------------------------- remote backend polling


class FakeClient:
    """Stands in for MedDiffusionLib.client.RemoteClient: a job that runs for a few status calls. Every call is
    bound to the real client's signature and answers with the server's status keys, so a drift fails here."""

    def __init__(self, finish_after: int = 3, status_errors: list | None = None) -> None:
        self.calls = 0
        self.finish_after = finish_after
        self.status_errors = list(status_errors or [])  # raised by the first status calls, in order
        self.cancelled: list[str] = []
        self.token = "token"

    @staticmethod
    def _bind(name: str, *args, **kwargs) -> dict:
        from MedDiffusionLib.client import RemoteClient

        bound = inspect.signature(getattr(RemoteClient, name)).bind(None, *args, **kwargs)
        return {k: v for k, v in bound.arguments.items() if k != "self"}

    def generate(self, *args, **kwargs) -> str:
        self.kwargs = self._bind("generate", *args, **kwargs)
        return "job-1"

    def status(self, *args, **kwargs) -> dict:
        self._bind("status", *args, **kwargs)
        if self.status_errors:
            raise self.status_errors.pop(0)
        self.calls += 1
        done = self.calls >= self.finish_after
        return {"id": "job-1", "kind": "generate", "state": "done" if done else "running",
                "progress": min(1.0, self.calls / self.finish_after), "stage": None if done else "sampling",
                "step": None if done else self.calls, "total": None if done else self.finish_after,
                "eta_s": None if done else 1.0, "queue_position": None, "error": None, "params": {},
                "outputs": ["result"] if done else [], "info": {"anatomy": "ct-chest-abdomen", "seed": 5,
                                                                  "sampler": "ddim", "steps": 10} if done else {}}

    def cancel(self, *args, **kwargs) -> dict:
        self.cancelled.append(self._bind("cancel", *args, **kwargs)["job_id"])
        return {"state": "cancelled"}

    def result(self, *args, **kwargs) -> sitk.Image:
        self._bind("result", *args, **kwargs)
        return selfchecks.make_test_image((4, 4, 4))

    def models(self) -> dict:
        return {"anatomies": [{"name": "ct-chest-abdomen", "modality": "CT", "sizes_xyz": [[64, 64, 32]],
                               "spacing_xyz": [1.25, 1.25, 1.25]}]}


def test_remote_backend_polls_and_cancels(monkeypatch):
    from MedDiffusionLib.client import ServerUnreachable

    client = FakeClient(status_errors=[ServerUnreachable("http://server.invalid", "timed out")])
    backend = RemoteBackend("http://server.invalid", "token", poll_interval_s=0.001)
    monkeypatch.setattr(backend, "client", lambda: client)
    params = MedDiffusionParameters(backend="remote", size="64x64x32", steps=10)
    updates: list[ProgressUpdate] = []
    outcome = backend.generate(params, 5, updates.append, threading.Event())  # one missed poll is tolerated
    assert client.kwargs == {"anatomy": "ct-chest-abdomen", "size_xyz": (64, 64, 32), "sampler": "ddim",
                             "steps": 10, "seed": 5}
    assert [(u.step, u.total, u.stage) for u in updates if u.total] == [(1, 3, "sampling"), (2, 3, "sampling")]
    assert outcome.image.GetSize() == (4, 4, 4) and (outcome.modality, outcome.seed) == ("CT", 5)
    assert outcome.info["job"] == "job-1" and backend.job_id == "job-1"
    monkeypatch.setattr(backend, "models", client.models)
    assert backend.anatomies()[0] == AnatomyChoice("ct-chest-abdomen", "CT", ((64, 64, 32),), (1.25, 1.25, 1.25))

    client = FakeClient(finish_after=10**6)
    monkeypatch.setattr(backend, "client", lambda: client)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        backend.generate(params, 5, updates.append, cancel)
    assert client.cancelled == ["job-1"]


def test_remote_backend_errors_become_user_messages(monkeypatch):
    from MedDiffusionLib.client import (AuthenticationError, JobFailed, QueueFullError, RemoteError,
                                        ServerUnreachable)

    backend = RemoteBackend("http://server.invalid", "token", poll_interval_s=0.001, max_missed_polls=1)
    params = MedDiffusionParameters(backend="remote")
    cases = [(AuthenticationError("401"), "rejected the access token"),
             (QueueFullError(429, "the job queue is full (1 waiting); try again later"), "busy: the job queue"),
             (RemoteError(400, "unknown anatomy 'x'"), "refused the job: unknown anatomy"),
             (RemoteError(501, "no ControlNets"), "cannot run this job: no ControlNets")]
    for error, message in cases:
        client = FakeClient()

        def refuse(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(client, "generate", refuse)
        monkeypatch.setattr(backend, "client", lambda client=client: client)
        with pytest.raises(MedDiffusionError, match=message) as info:
            backend.generate(params, 1, lambda u: None, threading.Event())
        assert info.value.__cause__ is error
    client = FakeClient(status_errors=[ServerUnreachable("http://server.invalid", "timed out")] * 2)
    monkeypatch.setattr(backend, "client", lambda: client)
    with pytest.raises(ServerUnreachable, match="cannot reach"):  # too many missed polls: the client's message
        backend.generate(params, 1, lambda u: None, threading.Event())
    client = FakeClient()
    monkeypatch.setattr(client, "status", lambda job_id: {"state": "failed", "error": "out of memory"})
    monkeypatch.setattr(backend, "client", lambda: client)
    with pytest.raises(JobFailed, match="failed on the server: out of memory"):
        backend.generate(params, 1, lambda u: None, threading.Event())
    with pytest.raises(InputError, match="server URL"):
        RemoteBackend("ftp://example.org").client()


# ----------------------------------------------------------------------------- remote backend, real server

REMOTE_TOKEN = secrets.token_urlsafe(24)
SLOW_REMOTE = dict(anatomy="ct-head-neck", sampler="ddpm", steps=1000)  # ~a minute on a CPU: always cancelled


@pytest.fixture(scope="module")
def remote_server(tmp_path_factory):
    """`python -m MedDiffusionLib serve` on 127.0.0.1 with a tiny bundle (ControlNets included)."""
    for module in ("fastapi", "uvicorn"):
        pytest.importorskip(module, reason="the server extra is not installed (pip install 'meddiffusion[server]')")
    from server_fixture import ServerProcess

    model = _tiny_bundle_dir(tmp_path_factory.mktemp("remote-model"), controlnets=True)
    folder = tmp_path_factory.mktemp("remote-server")
    server = ServerProcess(model, folder / "store", folder / "server.log", token=REMOTE_TOKEN)
    try:
        yield server
    finally:
        server.stop()


def _remote_params(server, **changes) -> MedDiffusionParameters:
    base = MedDiffusionParameters(backend="remote", server_url=server.url, random_seed=False, seed=17)
    return base.replace(**changes)


def _poll_until_finished(logic: MedDiffusionLogic, timeout_s: float = 60) -> list[JobState]:
    """Poll like the panel's QTimer does; returns every snapshot seen (the last one finished)."""
    states = [logic.poll()]
    deadline = time.monotonic() + timeout_s
    while not states[-1].finished and time.monotonic() < deadline:
        time.sleep(0.05)
        states.append(logic.poll())
    assert states[-1].finished, f"no result within {timeout_s} s: {states[-1]}"
    return states


def test_remote_generate_against_real_server(scene, remote_server):
    from MedDiffusionLib.pipelines.generate import GENERATED_DIRECTION

    logic = MedDiffusionLogic(scene)  # the default factory: params.backend == "remote" -> RemoteBackend
    params = _remote_params(remote_server, anatomy="ct-chest-abdomen", modality="CT", size="16x16x16",
                            sampler="dpmpp", steps=3)
    chest = next(a for a in logic.anatomies(params, REMOTE_TOKEN) if a.name == "ct-chest-abdomen")
    assert chest.modality == "CT" and (32, 32, 16) in chest.sizes_xyz and chest.spacing_xyz == (1.25, 1.25, 1.25)
    assert logic.start_generate(params, REMOTE_TOKEN) == 17
    states = _poll_until_finished(logic)
    assert states[-1].state == "done", states[-1].message
    assert any(s.running for s in states)
    nodes = logic.finish(scene)
    assert len(nodes) == 1 and logic.poll().state == "idle"
    node = nodes[0]
    assert node.GetName() == "MedDiffusion CT chest-abdomen seed 17"
    image = mrml_volumes.volume_node_to_image(node)
    assert image.GetSize() == (16, 16, 16)
    assert np.allclose(image.GetSpacing(), (1.25, 1.25, 1.25))
    assert np.allclose(image.GetDirection(), GENERATED_DIRECTION) and np.allclose(image.GetOrigin(), 0.0)
    assert np.isfinite(slicer.util.arrayFromVolume(node)).all()
    attrs = {k: node.GetAttribute(f"MedDiffusion.{k}") for k in ("backend", "server", "seed", "steps", "anatomy")}
    assert attrs == {"backend": "remote", "server": remote_server.url, "seed": "17", "steps": "3",
                     "anatomy": "ct-chest-abdomen"}
    job = node.GetAttribute("MedDiffusion.job")
    assert remote_server.client().status(job)["state"] == "done"
    assert MedDiffusionParameterNode.get_or_create(scene).output("Output") is node


def test_remote_reconstruct_against_real_server(scene, remote_server):
    models = remote_server.client().models()
    if not models["reconstruct_available"] or "sparse-ct" not in models["tasks"]:
        pytest.skip("this server offers no sparse-CT reconstruction")
    logic = MedDiffusionLogic(scene)
    image = selfchecks.make_test_image((16, 16, 16), dtype=np.int16)  # oblique geometry must come back unchanged
    source = mrml_volumes.image_to_volume_node(image, scene, "input CT")
    params = _remote_params(remote_server, task="sparse-ct", views=8, sampler="ddim", steps=2, seed=3,
                            input_volume_id=source.GetID())
    logic.start_reconstruct(params, REMOTE_TOKEN)
    state = _poll_until_finished(logic)[-1]
    assert state.state == "done", state.message
    nodes = logic.finish()
    assert [n.GetName() for n in nodes] == ["MedDiffusion sparse-CT 8 views recon",
                                            "MedDiffusion sparse-CT 8 views FBP"]
    for node in nodes:
        out = mrml_volumes.volume_node_to_image(node)
        assert out.GetSize() == image.GetSize()
        for name in ("Spacing", "Origin", "Direction"):
            assert np.allclose(getattr(out, f"Get{name}")(), getattr(image, f"Get{name}")(), atol=1e-5), name
    recon, degraded = nodes
    assert recon.GetAttribute("MedDiffusion.input") == source.GetID()
    assert recon.GetAttribute("MedDiffusion.backend") == "remote" and recon.GetAttribute("MedDiffusion.seed") == "3"
    outputs = MedDiffusionParameterNode.get_or_create(scene)
    assert outputs.output("Output") is recon and outputs.output("Degraded") is degraded


def test_remote_errors_are_clear_failed_states(scene, remote_server, caplog, monkeypatch):
    from server_fixture import free_port

    monkeypatch.delenv("MEDDIFFUSION_TOKEN", raising=False)  # an empty token falls back to the environment
    logic = MedDiffusionLogic(scene)
    params = _remote_params(remote_server, anatomy="ct-legs", steps=2)
    volumes_before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    cases = [(params, "wrong-" + REMOTE_TOKEN, f"server at {remote_server.url} rejected the access token"),
             (params, "", "needs an access token"),
             (params.replace(server_url=f"http://127.0.0.1:{free_port()}"), REMOTE_TOKEN, "cannot reach"),
             (params.replace(anatomy="ct-brain"), REMOTE_TOKEN, "refused the job: .*ct-brain")]
    with caplog.at_level(logging.WARNING):
        for case_params, token, message in cases:
            logic.start_generate(case_params, token)
            state = logic.wait(30)
            assert state.state == "failed" and re.search(message, state.message), state.message
            assert state.describe().startswith("Failed: ") and "Traceback" not in state.message
            assert logic.finish() == [] and logic.poll().state == "idle"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a traceback was logged"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before
    with pytest.raises(MedDiffusionError, match="rejected the access token"):
        logic.anatomies(params, "wrong-" + REMOTE_TOKEN)


def test_remote_cancel_stops_the_server_job(scene, remote_server):
    backends: list[RemoteBackend] = []

    def factory(params, token):
        backends.append(RemoteBackend(params.server_url, token, poll_interval_s=0.05))
        return backends[-1]

    logic = MedDiffusionLogic(scene, backend_factory=factory)
    logic.start_generate(_remote_params(remote_server, **SLOW_REMOTE), REMOTE_TOKEN)
    deadline = time.monotonic() + 30
    while logic.poll().step < 1 and logic.poll().running and time.monotonic() < deadline:
        time.sleep(0.05)
    state = logic.poll()
    assert state.running and state.stage == "sampling" and state.total == 1000 and state.step >= 1, state
    assert "step" in state.describe()
    logic.cancel(wait_s=10)
    assert logic.poll().state == "cancelled" and not logic.is_running
    assert logic.finish() == []
    client = remote_server.client()
    deadline = time.monotonic() + 30
    while (status := client.status(backends[0].job_id))["state"] not in ("cancelled", "done", "failed") \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status["state"] == "cancelled", status


# ----------------------------------------------------------------------------- dependencies


def test_missing_dependencies_are_named():
    fake = (("numpy", "numpy"), ("meddiffusion_no_such_pkg", "meddiffusion-no-such-pkg>=1"))
    assert dependencies.missing_packages(fake) == [fake[1]]
    with pytest.raises(dependencies.MissingDependencies, match="meddiffusion_no_such_pkg") as info:
        dependencies.ensure_dependencies(requirements=fake)  # headless: never installs
    assert "pip install" in str(info.value)
    dependencies.check_dependencies("remote")  # numpy + SimpleITK are here


# ----------------------------------------------------------------------------- real local pipeline


def _tiny_bundle_dir(tmp_path: Path, controlnets: bool = False) -> Path:
    try:
        helpers = importlib.import_module("helpers")
    except ImportError:
        pytest.skip("Testing/helpers.py (make_tiny_bundle) is not available yet")
    if not hasattr(helpers, "make_tiny_bundle"):
        pytest.skip("Testing/helpers.py has no make_tiny_bundle yet")
    for module in ("MedDiffusionLib.checkpoints.bundle", "MedDiffusionLib.pipelines.generate"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            pytest.skip(f"{module} is not importable yet ({exc})")
    made = helpers.make_tiny_bundle(tmp_path / "bundle", controlnets=controlnets)
    return Path(made) if made is not None else tmp_path / "bundle"


@pytest.mark.slow
def test_generate_with_tiny_bundle_local_backend(scene, tmp_path):
    bundle_dir = _tiny_bundle_dir(tmp_path)
    logic = MedDiffusionLogic(scene)
    base = MedDiffusionParameters(use_demo_model=False, bundle_dir=str(bundle_dir), device="cpu")
    choices = logic.anatomies(base)
    assert choices, "the tiny bundle's catalog is empty"
    anatomy = choices[0]
    size = min(anatomy.sizes_xyz, key=lambda s: s[0] * s[1] * s[2]) if anatomy.sizes_xyz else None
    params = base.replace(anatomy=anatomy.name, modality=anatomy.modality, sampler="ddim", steps=2,
                          random_seed=False, seed=17, size="x".join(map(str, size)) if size else "")
    node = selfchecks.check_generate(logic, params, timeout_s=300)
    assert node.GetName().startswith(f"MedDiffusion {anatomy.modality} ") and node.GetName().endswith(" seed 17")
    if anatomy.spacing_xyz is not None:
        assert np.allclose(node.GetSpacing(), anatomy.spacing_xyz, atol=1e-4)
    directions = np.zeros((3, 3))
    node.GetIJKToRASDirections(directions)
    assert np.allclose(directions @ directions.T, np.eye(3), atol=1e-6)


@pytest.mark.slow
def test_reconstruct_with_tiny_bundle_local_backend(scene, tmp_path):
    try:
        importlib.import_module("MedDiffusionLib.pipelines.reconstruct")
    except ImportError as exc:
        pytest.skip(f"MedDiffusionLib.pipelines.reconstruct is not importable yet ({exc})")
    bundle_dir = _tiny_bundle_dir(tmp_path, controlnets=True)
    logic = MedDiffusionLogic(scene)
    base = MedDiffusionParameters(use_demo_model=False, bundle_dir=str(bundle_dir), device="cpu")
    ct = next(a for a in logic.anatomies(base) if a.modality == "CT" and a.sizes_xyz)
    size = min(ct.sizes_xyz, key=lambda s: s[0] * s[1] * s[2])
    image = selfchecks.make_test_image(size, dtype=np.int16)  # oblique geometry must come back unchanged
    source = mrml_volumes.image_to_volume_node(image, scene, "input CT")
    params = base.replace(task="sparse-ct", views=8, sampler="ddim", steps=2, random_seed=False, seed=3,
                          input_volume_id=source.GetID())
    logic.start_reconstruct(params)
    state = logic.wait(300)
    assert state.state == "done", state.message
    nodes = logic.finish()
    assert [n.GetName() for n in nodes] == ["MedDiffusion sparse-CT 8 views recon", "MedDiffusion sparse-CT 8 views FBP"]
    for node in nodes:
        out = mrml_volumes.volume_node_to_image(node)
        assert out.GetSize() == image.GetSize()
        for name in ("Spacing", "Origin", "Direction"):
            assert np.allclose(getattr(out, f"Get{name}")(), getattr(image, f"Get{name}")(), atol=1e-5), name
