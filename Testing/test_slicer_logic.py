"""The Slicer module's Qt-free logic against the real MRML library (PyPI slicer-core), headless.

Covers: SimpleITK <-> volume node with oblique geometry, files written through the node's storage node, the
parameter node surviving a scene save/load, and jobs (progress, cancel, errors, result nodes, HU) through the
local backend (its own `meddiffusion serve` child, started by the logic) and the remote backend (a real server
subprocess, Testing/server_fixture.py), both on 127.0.0.1 with the tiny test bundle.
"""
from __future__ import annotations

import importlib
import logging
import re
import secrets
import sys
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
from MedDiffusionLogic.backends import LocalBackend  # noqa: E402
from MedDiffusionLib.progress import JobStatus  # noqa: E402
from MedDiffusionLogic.logic import BusyError, MedDiffusionLogic, suggest_anatomy  # noqa: E402
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
    with pytest.raises(ValueError, match="method"):
        wrapper.update(method="euler")
    with pytest.raises(ValueError, match="does not apply"):
        wrapper.update(task="sparse-ct", method="zero-filled")
    # A new task keeps the method when it applies there, else takes the default one.
    assert wrapper.update(task="sparse-ct", method="tv").method == "tv"
    assert wrapper.update(task="mri").method == "tv"
    assert wrapper.update(task="sparse-ct", method="fbp").method == "fbp"
    assert wrapper.update(task="mri").method == "diffusion"
    wrapper.update(task="sparse-ct", method="fbp")
    wrapper.node.SetParameter("task", "mri")  # a hand-edited scene: fbp does not apply to MRI
    assert (wrapper.read().task, wrapper.read().method) == ("mri", "diffusion")
    wrapper.node.SetParameter("steps", "many")  # e.g. a hand-edited or older scene
    wrapper.node.SetParameter("views", "-3")
    wrapper.node.SetParameter("simulate", "maybe")
    params = wrapper.read()
    assert (params.steps, params.views, params.simulate) == (50, 30, True)
    assert parse_size("128 x 128 x 64") == (128, 128, 64)
    assert "token" not in wrapper.node.GetParameterNames()


# ----------------------------------------------------------------------------- jobs on real servers

TOKEN = secrets.token_urlsafe(32)
SLOW = dict(anatomy="ct-head-neck", sampler="ddpm", steps=1000)  # ~a minute on a CPU: always cancelled


def _tiny_bundle_dir(tmp_path: Path, controlnets: bool = False) -> Path:
    for module in ("fastapi", "uvicorn", "torch"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install 'meddiffusion[server]')")
    helpers = importlib.import_module("helpers")
    made = helpers.make_tiny_bundle(tmp_path / "bundle", controlnets=controlnets)
    return Path(made) if made is not None else tmp_path / "bundle"


TINY_HU = (-1024.0, 3071.0)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    folder = _tiny_bundle_dir(tmp_path_factory.mktemp("tiny-model"), controlnets=True)
    with open(folder / "model.yaml", "a", encoding="utf-8") as fh:  # the model declares its CT range
        fh.write(f"hu_range: [{TINY_HU[0]:g}, {TINY_HU[1]:g}]\n")
    return folder


@pytest.fixture(scope="module")
def local_backend():
    """The local backend as the panel uses it: its job server is started by the first job and kept."""
    backend = LocalBackend()
    backend.server.extra_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # leave a core to the test
    try:
        yield backend
    finally:
        backend.stop()


@pytest.fixture(scope="module")
def remote_server(tiny_bundle, tmp_path_factory):
    """`python -m MedDiffusionLib serve` on 127.0.0.1 with the tiny bundle (ControlNets included)."""
    from server_fixture import ServerProcess

    folder = tmp_path_factory.mktemp("remote-server")
    server = ServerProcess(tiny_bundle, folder / "store", folder / "server.log", token=TOKEN)
    try:
        yield server
    finally:
        server.stop()


def _local_params(bundle: Path, **changes) -> MedDiffusionParameters:
    base = MedDiffusionParameters(use_demo_model=False, bundle_dir=str(bundle), device="cpu", random_seed=False,
                                  seed=17)
    return base.replace(**changes)


def _remote_params(server, **changes) -> MedDiffusionParameters:
    base = MedDiffusionParameters(backend="remote", server_url=server.url, random_seed=False, seed=17)
    return base.replace(**changes)


def _poll_until_finished(logic: MedDiffusionLogic, timeout_s: float = 120) -> list[JobStatus]:
    """Poll like the panel's QTimer does; returns every snapshot seen (the last one finished)."""
    states = [logic.poll()]
    deadline = time.monotonic() + timeout_s
    while not states[-1].ended and time.monotonic() < deadline:
        time.sleep(0.05)
        states.append(logic.poll())
    assert states[-1].ended, f"no result within {timeout_s} s: {states[-1]}"
    return states


def test_model_lists_come_from_model_yaml_without_torch(tiny_bundle):
    """The panel's anatomy/size lists and HU range are read from model.yaml; torch is never imported."""
    import subprocess

    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/MedDiffusion']\n"
            "from MedDiffusionLogic.backends import LocalBackend\n"
            "from MedDiffusionLogic.parameters import MedDiffusionParameters as P\n"
            "s = LocalBackend().model_summary(P())\n"
            "print(s.hu_range, [(a.name, a.sizes_xyz[0]) for a in s.anatomies][:2], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # The demo model: 8^3 latents with a 4x autoencoder -> 32^3 volumes (not the official 256^3 table).
    assert out.stdout.strip() == "(-1024.0, 700.0) [('ct-head-neck', (32, 32, 32)), ('ct-chest-abdomen', " \
                                 "(32, 32, 32))] False", out.stdout
    summary = LocalBackend().model_summary(_local_params(tiny_bundle))
    assert summary.anatomies and all(a.sizes_xyz for a in summary.anatomies)


def test_local_generate_in_hu_with_named_node_and_geometry(scene, local_backend, tiny_bundle):
    from MedDiffusionLib.pipelines.generate import GENERATED_DIRECTION

    logic = MedDiffusionLogic(scene, local_backend)
    params = _local_params(tiny_bundle, ct_hu_range="-1000,1000")
    chest = next(a for a in logic.anatomies(params) if a.modality == "CT")
    size = min(chest.sizes_xyz, key=lambda s: s[0] * s[1] * s[2])
    params = params.replace(anatomy=chest.name, size="x".join(map(str, size)), sampler="ddim", steps=2)
    node = selfchecks.check_generate(logic, params, timeout_s=300)
    short = chest.name.split("-", 1)[1]
    assert node.GetName() == f"MedDiffusion CT {short} seed 17 ddim"
    arr = slicer.util.arrayFromVolume(node)
    assert arr.min() >= -1000.0 - 1e-3 and arr.max() <= 1000.0 + 1e-3 and arr.min() < -100.0, (arr.min(), arr.max())
    display = node.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) in ((400.0, 40.0), (1800.0, 400.0))  # a CT preset
    assert node.GetAttribute("MedDiffusion.hu_range") == "-1000,1000"
    assert np.allclose(node.GetSpacing(), chest.spacing_xyz, atol=1e-4)
    assert np.allclose(mrml_volumes.volume_node_to_image(node).GetDirection(), GENERATED_DIRECTION)
    # 'off' keeps the model's [0, 1] intensities.
    node01 = selfchecks.check_generate(logic, params.replace(ct_hu_range="off"), timeout_s=300)
    arr01 = slicer.util.arrayFromVolume(node01)
    assert arr01.min() >= -1e-3 and arr01.max() <= 1.0 + 1e-3
    assert np.allclose(arr, arr01 * 2000.0 - 1000.0, atol=1e-2)  # same seed: the same volume, mapped
    assert logic.local.server.state == "ready"  # kept for the next job: the model stays loaded


def test_local_reconstruct_keeps_geometry_and_honours_anatomy(scene, local_backend, tiny_bundle):
    logic = MedDiffusionLogic(scene, local_backend)
    base = _local_params(tiny_bundle)
    cts = [a for a in logic.anatomies(base) if a.modality == "CT"]
    anatomy = cts[-1]  # not the first one: proves the choice reaches the server
    size = min(anatomy.sizes_xyz, key=lambda s: s[0] * s[1] * s[2])
    image = selfchecks.make_test_image(size, dtype=np.int16)  # oblique geometry must come back unchanged
    source = mrml_volumes.image_to_volume_node(image, scene, "input CT")
    params = base.replace(task="sparse-ct", views=8, sampler="ddim", steps=2, seed=3, recon_anatomy=anatomy.name,
                          input_volume_id=source.GetID())
    logic.start_reconstruct(params)
    states = _poll_until_finished(logic, 300)
    assert states[-1].state == "done", states[-1].error
    assert any(s.stage.startswith("uploading") for s in states) or states[0].stage
    nodes = logic.finish()
    short = anatomy.name.split("-", 1)[1]
    assert [n.GetName() for n in nodes] == [f"MedDiffusion sparse-CT 8 views {short} seed 3 ddim recon",
                                            "MedDiffusion sparse-CT 8 views FBP"]
    for node in nodes:
        out = mrml_volumes.volume_node_to_image(node)
        assert out.GetSize() == image.GetSize()
        for name in ("Spacing", "Origin", "Direction"):
            assert np.allclose(getattr(out, f"Get{name}")(), getattr(image, f"Get{name}")(), atol=1e-5), name
    recon = nodes[0]
    assert recon.GetAttribute("MedDiffusion.anatomy") == anatomy.name
    assert recon.GetAttribute("MedDiffusion.input") == source.GetID()
    job = recon.GetAttribute("MedDiffusion.job")
    assert logic.local.client().status(job).params["anatomy"] == anatomy.name


def test_reconstruct_refuses_what_the_library_refuses_before_reading_the_volume(scene, tiny_bundle):
    """The panel applies the library's reconstruction rules when the user clicks, not after the upload: an
    already-degraded MRI (simulate off) has no measurements for tv."""
    logic = MedDiffusionLogic(scene)
    image = selfchecks.make_test_image((16, 16, 8), dtype=np.float32)
    source = mrml_volumes.image_to_volume_node(image, scene, "input MR")
    params = _local_params(tiny_bundle, task="mri", method="tv", simulate=False, input_volume_id=source.GetID())
    with pytest.raises(InputError, match="'tv' needs measurements"):
        logic.start_reconstruct(params)
    assert not logic.is_running and logic.job is None
    logic.start_reconstruct(params.replace(simulate=True))  # the same with measurements starts
    assert logic.is_running
    logic.cancel()
    assert logic.poll().state == "cancelled"


def test_anatomy_is_suggested_from_the_input_volume():
    from MedDiffusionLogic.backends import AnatomyChoice

    choices = [AnatomyChoice(n, n[:2].upper()) for n in ("ct-head-neck", "ct-chest-abdomen", "ct-legs",
                                                          "mr-t1-brain", "mr-knee")]
    assert suggest_anatomy("Patient 3 LEGS CT", "", "sparse-ct", choices) == "ct-legs"
    assert suggest_anatomy("knee MRI", "", "mri", choices) == "mr-knee"
    assert suggest_anatomy("series 4", "", "sparse-ct", choices) == "ct-head-neck"  # the task's first anatomy
    # A MedDiffusion volume knows its anatomy (its MedDiffusion.anatomy attribute).
    assert suggest_anatomy("series 4", "ct-chest-abdomen", "sparse-ct", choices) == "ct-chest-abdomen"
    assert suggest_anatomy("series 4", "ct-chest-abdomen", "mri", choices) == "mr-t1-brain"


def test_local_errors_busy_and_cancel(scene, local_backend, tiny_bundle):
    logic = MedDiffusionLogic(scene, local_backend)
    logic.start_generate(_local_params(tiny_bundle, anatomy="ct-brain"))
    state = _poll_until_finished(logic)[-1]
    assert state.state == "failed" and "refused the job" in state.error and "ct-brain" in state.error
    assert logic.finish() == [] and logic.poll().state == "idle"
    with pytest.raises(InputError, match="no input volume"):
        logic.start_reconstruct(_local_params(tiny_bundle))
    logic.start_generate(_local_params(tiny_bundle, **SLOW))
    with pytest.raises(BusyError):
        logic.start_generate(_local_params(tiny_bundle))
    deadline = time.monotonic() + 60
    while logic.poll().step < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    state = logic.poll()
    assert state.running and state.stage == "sampling" and state.total == 1000 and state.step >= 1, state
    assert "step" in state.describe()
    job_id = logic.job.job_id
    began = time.monotonic()
    logic.cancel()
    state = _poll_until_finished(logic, 10)[-1]
    assert state.state == "cancelled" and time.monotonic() - began < 2.0
    assert logic.finish() == []
    client = logic.local.client()
    deadline = time.monotonic() + 30
    while (status := client.status(job_id)).state not in ("cancelled", "done", "failed") \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status.state == "cancelled", status


def test_remote_generate_against_real_server(scene, remote_server):
    logic = MedDiffusionLogic(scene)
    params = _remote_params(remote_server, anatomy="ct-chest-abdomen", modality="CT", sampler="dpmpp", steps=3)
    chest = next(a for a in logic.anatomies(params, TOKEN) if a.name == "ct-chest-abdomen")
    size = min(chest.sizes_xyz, key=lambda s: s[0] * s[1] * s[2])
    params = params.replace(size="x".join(map(str, size)))
    assert logic.model_summary(params, TOKEN).hu_range == TINY_HU  # the server reports the model's range
    assert logic.start_generate(params, TOKEN) == 17
    states = _poll_until_finished(logic)
    assert states[-1].state == "done", states[-1].error
    node = logic.finish(scene)[0]
    assert node.GetName() == "MedDiffusion CT chest-abdomen seed 17 dpmpp"
    arr = slicer.util.arrayFromVolume(node)  # CT in HU by default: the model's declared range
    assert arr.min() >= TINY_HU[0] - 1e-2 and arr.max() <= TINY_HU[1] + 1e-2 and arr.max() - arr.min() > 10.0
    assert node.GetAttribute("MedDiffusion.hu_range") == "-1024,3071"
    assert mrml_volumes.volume_node_to_image(node).GetSize() == size
    attrs = {k: node.GetAttribute(f"MedDiffusion.{k}") for k in ("backend", "server", "seed", "steps", "anatomy")}
    assert attrs == {"backend": "remote", "server": remote_server.url, "seed": "17", "steps": "3",
                     "anatomy": "ct-chest-abdomen"}
    assert MedDiffusionParameterNode.get_or_create(scene).output("Output") is node


def test_remote_reconstruct_against_real_server(scene, remote_server):
    logic = MedDiffusionLogic(scene)
    image = selfchecks.make_test_image((16, 16, 16), dtype=np.float32)
    source = mrml_volumes.image_to_volume_node(image, scene, "input CT")
    params = _remote_params(remote_server, task="sparse-ct", views=8, sampler="ddim", steps=2, seed=3,
                            input_volume_id=source.GetID(), recon_anatomy="ct-legs")
    logic.start_reconstruct(params, TOKEN)
    state = _poll_until_finished(logic)[-1]
    assert state.state == "done", state.error
    recon, degraded = logic.finish()
    for node in (recon, degraded):
        out = mrml_volumes.volume_node_to_image(node)
        for name in ("Size", "Spacing", "Origin", "Direction"):
            assert np.allclose(getattr(out, f"Get{name}")(), getattr(image, f"Get{name}")(), atol=1e-5), name
    assert recon.GetAttribute("MedDiffusion.anatomy") == "ct-legs"
    assert remote_server.client().status(recon.GetAttribute("MedDiffusion.job")).params["anatomy"] == "ct-legs"


def test_method_reaches_both_backends_and_changes_the_result(scene, remote_server, local_backend, tiny_bundle):
    """The panel's method goes into the server's request (remote and local backends) and decides the result."""
    image = selfchecks.make_test_image((16, 16, 16), dtype=np.float32)
    source = mrml_volumes.image_to_volume_node(image, scene, "input CT")
    common = dict(task="sparse-ct", views=8, sampler="ddim", steps=2, seed=3, input_volume_id=source.GetID(),
                  recon_anatomy="ct-legs")
    runs = [(MedDiffusionLogic(scene), _remote_params(remote_server, **common), TOKEN, remote_server.client())]
    local = MedDiffusionLogic(scene, local_backend)
    runs.append((local, _local_params(tiny_bundle, **common), "", None))
    arrays = {}
    for logic, params, token, client in runs:
        methods = ("fbp", "sart", "tv", "diffusion") if client is not None else ("sart",)
        for method in methods:
            logic.start_reconstruct(params.replace(method=method), token)
            state = _poll_until_finished(logic, 300)[-1]
            assert state.state == "done", (method, state.error)
            recon = logic.finish()[0]
            job = recon.GetAttribute("MedDiffusion.job")
            status = (client or logic.local.client()).status(job)
            assert status.params["method"] == method and status.info["method"] == method
            assert recon.GetAttribute("MedDiffusion.method") == method
            if method != "diffusion":
                assert recon.GetName().startswith(f"MedDiffusion sparse-CT 8 views {method} recon")
            arrays[(client is None, method)] = slicer.util.arrayFromVolume(recon).copy()
    remote = {m: a for (is_local, m), a in arrays.items() if not is_local}
    for a, b in ((a, b) for a in remote for b in remote if a < b):
        assert np.abs(remote[a] - remote[b]).max() > 1e-3, f"{a} and {b} gave the same volume"
    # The local server ran the same method on the same input: the same result.
    assert np.allclose(arrays[(True, "sart")], remote["sart"], atol=1e-4)


def test_remote_errors_are_clear_failed_states(scene, remote_server, caplog):
    from server_fixture import free_port

    logic = MedDiffusionLogic(scene)
    params = _remote_params(remote_server, anatomy="ct-legs", steps=2)
    volumes_before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    cases = [(params, "wrong-" + TOKEN, f"server at {remote_server.url} rejected the access token"),
             (params, "", "needs an access token"),
             (params.replace(server_url=f"http://127.0.0.1:{free_port()}"), TOKEN, "cannot reach"),
             (params.replace(anatomy="ct-brain"), TOKEN, "refused the job: .*ct-brain")]
    with caplog.at_level(logging.WARNING):
        for case_params, token, message in cases:
            logic.start_generate(case_params.replace(ct_hu_range="off"), token)
            state = logic.wait(30)
            assert state.state == "failed" and re.search(message, state.error), state.error
            assert state.describe().startswith("Failed: ") and "Traceback" not in state.error
            assert logic.finish() == [] and logic.poll().state == "idle"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a traceback was logged"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before
    with pytest.raises(MedDiffusionError, match="rejected the access token"):
        logic.anatomies(params, "wrong-" + TOKEN)


# ----------------------------------------------------------------------------- dependencies


def test_missing_dependencies_are_named():
    fake = (("numpy", "numpy"), ("meddiffusion_no_such_pkg", "meddiffusion-no-such-pkg>=1"))
    assert dependencies.missing_packages(fake) == [fake[1]]
    with pytest.raises(dependencies.MissingDependencies, match="meddiffusion_no_such_pkg") as info:
        dependencies.ensure_dependencies(requirements=fake)  # headless: never installs
    assert "pip install" in str(info.value)
    dependencies.check_dependencies("remote")  # numpy + SimpleITK are here


def test_self_test_demo_generation_and_reconstruction(scene, local_backend):
    """MedDiffusionTest's end-to-end check (selfchecks), headless: demo model, HU, geometry, recon < FBP."""
    logic = MedDiffusionLogic(scene, local_backend)
    nodes = selfchecks.check_demo_generate_and_reconstruct(logic, scene, timeout_s=300)
    assert [n.GetName().split(" seed")[0] for n in nodes] == [
        "MedDiffusion CT head-neck", "MedDiffusion sparse-CT 12 views head-neck", "MedDiffusion sparse-CT 12 views FBP"]


def test_dependencies_checks_versions_and_asks_once():
    reqs = (("numpy", "numpy>=1.0"), ("SimpleITK", "SimpleITK>=999"), ("torch", "torch>=999"),
            ("meddiffusion_no_such_pkg", "meddiffusion-no-such-pkg>=1"))
    missing = dependencies.missing_packages(reqs)
    assert missing == list(reqs[1:])  # present but too old counts as missing
    asked, installed = [], []
    with pytest.raises(dependencies.MissingDependencies, match="did not succeed"):
        dependencies.ensure_dependencies(requirements=reqs, confirm=lambda text: asked.append(text) or True,
                                         install_torch=lambda r: installed.append(("torch", r)),
                                         pip_install=lambda r: installed.append(("pip", r)))
    assert len(asked) == 1  # one consent dialog listing everything, with versions and how
    for text in ("SimpleITK>=999", "torch>=999", "meddiffusion-no-such-pkg>=1", "PyTorch extension",
                 f"installed: {dependencies.installed_version('SimpleITK>=1')}"):
        assert text in asked[0], text
    assert installed == [("torch", "torch>=999"), ("pip", '"SimpleITK>=999" "meddiffusion-no-such-pkg>=1"')]
    with pytest.raises(dependencies.MissingDependencies, match="declined"):
        dependencies.ensure_dependencies(requirements=reqs, confirm=lambda text: False)
    assert dependencies._version_tuple("2.13.0+cpu") == (2, 13, 0) >= dependencies._version_tuple("2.2")


def test_scene_import_restores_the_saved_input_volume_at_end_import():
    """Loading a saved scene into an open one (panel open, its own parameter node and input): at EndImportEvent,
    when the panel re-reads its parameter node, the saved settings and input volume reference are there."""
    saved = slicer.vtkMRMLScene()
    volume = saved.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "saved input")
    wrapper = MedDiffusionParameterNode.get_or_create(saved)
    wrapper.write(MedDiffusionParameters(views=77, recon_anatomy="ct-legs", ct_hu_range="-1024,3071"))
    wrapper.input_volume = volume
    saved.SetSaveToXMLString(1)
    saved.Commit()
    xml = saved.GetSceneXMLString()

    open_scene = slicer.vtkMRMLScene()
    MedDiffusionParameterNode.get_or_create(open_scene).input_volume = \
        open_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other")
    seen = []
    open_scene.AddObserver(open_scene.EndImportEvent, lambda caller, event: seen.append(
        MedDiffusionParameterNode.get_or_create(open_scene)))
    open_scene.SetLoadFromXMLString(1)
    open_scene.SetSceneXMLString(xml)
    open_scene.Import()
    assert len(seen) == 1 and seen[0].input_volume is not None and seen[0].input_volume.GetName() == "saved input"
    params = seen[0].read()
    assert (params.views, params.recon_anatomy, params.ct_hu_range) == (77, "ct-legs", "-1024,3071")
    assert open_scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


def test_sliced_upload_gzip_and_raw_reach_the_server_identically(remote_server):
    """The chunked, gzip-on-the-fly upload (used for non-loopback servers) and the raw one give the same job
    result for the same seed: the server decoded the same volume."""
    client = remote_server.client()
    volume = selfchecks.make_test_image((16, 16, 16), dtype=np.float32)
    results = []
    for compress in (False, True):
        upload = client.start_reconstruct_upload(volume, compress=compress, task="sparse-ct",
                                                 views=8, sampler="ddim", steps=2, seed=5, anatomy="ct-legs")
        deadline = time.monotonic() + 60
        while not upload.step(0.05):  # a timer would call it every 100 ms
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert (upload.length is None) == compress  # chunked when compressed
        job = upload.result["id"]
        client.wait(job, 0.1, timeout=120)
        download = client.start_download(job, "result", max_voxels=16**3)
        while not download.step(0.05):
            time.sleep(0.01)
        results.append(download.volume.array)
    assert np.array_equal(results[0], results[1]) and volume.GetSize() == (16, 16, 16)
