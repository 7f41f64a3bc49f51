"""Checks shared by the headless pytest suite (Testing/test_slicer_logic.py) and the module's self-test inside
Slicer (MedDiffusionTest), so both exercise exactly the same behaviour. Each raises AssertionError on failure.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import SimpleITK as sitk
from MedDiffusionLib.results import GenerationResult

from . import mrml_volumes
from .logic import DONE, MedDiffusionLogic, generation_node_name
from .parameters import MedDiffusionParameterNode, MedDiffusionParameters

__all__ = [
    "oblique_direction",
    "make_test_image",
    "assert_same_image",
    "check_volume_round_trip",
    "check_transformed_volume",
    "check_parameter_round_trip",
    "non_default_parameters",
    "check_generate",
    "check_demo_generate_and_reconstruct",
]


def oblique_direction() -> np.ndarray:
    """A proper rotation about an oblique axis (no two axes aligned with the world): catches any transpose
    or sign error in the LPS<->RAS and array-order handling."""
    axis = np.array([1.0, 2.0, 3.0]) / math.sqrt(14.0)
    angle = math.radians(33.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def make_test_image(size_xyz: tuple[int, int, int] = (11, 9, 7), dtype: Any = np.float32) -> sitk.Image:
    """A small volume with anisotropic spacing, non-zero origin, oblique direction and position-coded values."""
    x, y, z = size_xyz
    kk, jj, ii = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    arr = (ii + 100 * jj + 10000 * kk).astype(np.float64)  # each voxel's value encodes its (i, j, k)
    if np.issubdtype(np.dtype(dtype), np.floating):
        arr = arr * 0.25 - 1000.0
    image = sitk.GetImageFromArray(arr.astype(dtype))
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((-12.5, 30.25, 7.0))
    image.SetDirection(tuple(oblique_direction().ravel()))
    return image


def assert_same_image(actual: sitk.Image, expected: sitk.Image, tol: float = 1e-6, what: str = "image") -> None:
    """Equal size, voxel values, spacing, origin and direction (geometry within `tol`)."""
    assert actual.GetSize() == expected.GetSize(), f"{what}: size {actual.GetSize()} != {expected.GetSize()}"
    for name in ("Spacing", "Origin", "Direction"):
        got = np.asarray(getattr(actual, f"Get{name}")())
        want = np.asarray(getattr(expected, f"Get{name}")())
        assert np.allclose(got, want, atol=tol, rtol=0), f"{what}: {name.lower()} {got.tolist()} != {want.tolist()}"
    a, e = sitk.GetArrayViewFromImage(actual), sitk.GetArrayViewFromImage(expected)
    assert np.array_equal(a, e.astype(a.dtype)), f"{what}: voxel values differ (max |diff| " \
                                                 f"{float(np.abs(a.astype(float) - e.astype(float)).max())})"


def _write_with_storage_node(scene: Any, node: Any, path: str) -> None:
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(path)
    assert storage.WriteData(node), f"the storage node could not write {path}"


def check_volume_round_trip(scene: Any, folder: str) -> Any:
    """SimpleITK image -> volume node (RAS geometry checked) -> .nrrd/.nii.gz via the node's storage node ->
    read back with SimpleITK; and node -> SimpleITK image. Float and integer voxel types. Returns the node."""
    import slicer

    node = None
    for dtype in (np.float32, np.int16):
        image = make_test_image(dtype=dtype)
        node = mrml_volumes.image_to_volume_node(image, scene, f"MedDiffusion round trip {np.dtype(dtype).name}")
        flip = np.diag([-1.0, -1.0, 1.0])
        assert np.allclose(node.GetSpacing(), image.GetSpacing()), "node spacing"
        assert np.allclose(node.GetOrigin(), flip @ np.asarray(image.GetOrigin())), "node origin is not RAS"
        directions = np.zeros((3, 3))
        node.GetIJKToRASDirections(directions)
        assert np.allclose(directions, flip @ oblique_direction()), "node direction is not RAS"
        assert np.array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayViewFromImage(image)), "voxels"
        assert_same_image(mrml_volumes.volume_node_to_image(node), image, what="node -> SimpleITK")
        for suffix, tol in ((".nrrd", 1e-9), (".nii.gz", 1e-4)):  # NIfTI stores geometry as float32
            path = os.path.join(folder, f"round_trip_{np.dtype(dtype).name}{suffix}")
            _write_with_storage_node(scene, node, path)
            assert_same_image(sitk.ReadImage(path), image, tol=tol, what=f"written {suffix}")
    return node


def check_transformed_volume(scene: Any) -> None:
    """A volume under a linear transform is exported with the transform applied (what the user sees)."""
    import vtk

    image = make_test_image(dtype=np.int16)
    node = mrml_volumes.image_to_volume_node(image, scene, "MedDiffusion transformed")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MedDiffusion shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # +10 mm along R, i.e. -10 mm along L in LPS
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    exported = mrml_volumes.volume_node_to_image(node)
    expected_origin = np.asarray(image.GetOrigin()) + np.array([-10.0, 0.0, 0.0])
    assert np.allclose(exported.GetOrigin(), expected_origin), f"origin {exported.GetOrigin()} != {expected_origin}"
    assert np.allclose(exported.GetDirection(), image.GetDirection()), "direction changed by a translation"
    scene.RemoveNode(node)
    scene.RemoveNode(transform)


def non_default_parameters(input_volume_id: str = "") -> MedDiffusionParameters:
    """A value different from the default in every field."""
    return MedDiffusionParameters(
        backend="remote", device="cuda", server_url="https://gpu.example.org:8443/md",
        use_demo_model=False, bundle_dir="models/my bundle", autoencoder_path="ckpt/ae.safetensors",
        denoiser_path="ckpt/denoiser.safetensors", modality="MR", anatomy="mr-t1-brain", size="96x96x64",
        sampler="dpmpp", steps=25, seed=17, random_seed=False, input_volume_id=input_volume_id, task="mri",
        views=60, acceleration=4, mask="poisson", method="tv", simulate=False, data_consistency=False)


def _reload(scene: Any) -> Any:
    """Serialise `scene` to MRML XML and load it into a new scene."""
    import slicer

    was_string = scene.GetSaveToXMLString()
    scene.SetSaveToXMLString(1)
    try:
        scene.Commit()
        xml = scene.GetSceneXMLString()
    finally:
        scene.SetSaveToXMLString(was_string)
    assert xml, "empty scene XML"
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetLoadFromXMLString(1)
    reloaded.SetSceneXMLString(xml)
    reloaded.Import()
    return reloaded


def check_parameter_round_trip(scene: Any = None) -> None:
    """Defaults are filled in; every field survives saving the scene and loading it again. By default a private
    scene is used, so the user's scene in Slicer is neither serialised nor changed."""
    if scene is None:
        import slicer

        scene = slicer.vtkMRMLScene()
    defaults = MedDiffusionParameterNode.get_or_create(scene).read()
    assert defaults == MedDiffusionParameters(), f"fresh parameter node is not all defaults: {defaults}"
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedDiffusion parameter input")
    wrapper = MedDiffusionParameterNode.get_or_create(scene)
    params = non_default_parameters(volume.GetID())
    wrapper.write(params)
    assert wrapper.read() == params, "read after write differs"
    assert wrapper.input_volume is volume or wrapper.input_volume.GetID() == volume.GetID(), "input reference"

    reloaded = _reload(scene)
    back = MedDiffusionParameterNode.get_or_create(reloaded)
    assert back.read() == params, f"after reload: {back.read()} != {params}"
    assert back.input_volume is not None and back.input_volume.GetName() == volume.GetName(), "input after reload"
    assert reloaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1, "parameter node duplicated"
    wrapper.write(MedDiffusionParameters())  # leave the scene as found
    scene.RemoveNode(volume)


def check_generate(logic: MedDiffusionLogic, params: MedDiffusionParameters, token: str = "",
                   timeout_s: float = 600.0) -> Any:
    """Generate synchronously through the logic; the node must carry the result's voxels and geometry, the
    requested size and the expected name. Returns the node."""
    seed = logic.start_generate(params, token)
    state = logic.wait(timeout_s)
    assert state.state == DONE, f"generation ended as {state.state}: {state.error}"
    nodes = logic.finish()
    assert len(nodes) == 1, f"expected one volume node, got {len(nodes)}"
    node, result = nodes[0], logic.last_result
    assert isinstance(result, GenerationResult) and result.seed == seed, "seed not reported back"
    assert node.GetName().startswith(generation_node_name(result)), f"node name {node.GetName()!r}"
    assert_same_image(mrml_volumes.volume_node_to_image(node), result.image.to_sitk(), tol=1e-5,
                      what="generated node")
    if params.size_xyz is not None:
        assert tuple(node.GetImageData().GetDimensions()) == params.size_xyz, "generated size"
    assert node.GetDisplayNode() is not None, "no display node"
    assert logic.poll().state == "idle", "logic not idle after finish"
    return node


def check_demo_generate_and_reconstruct(logic: MedDiffusionLogic, scene: Any, timeout_s: float = 600.0) -> list[Any]:
    """The self-test's end-to-end check with the bundled demo model on the local backend: a CT generation comes
    back in HU with the model's geometry; a sparse-view CT reconstruction of a phantom keeps the phantom's
    geometry and is closer to it than its sparse-view FBP. Returns the created nodes."""
    from MedDiffusionLib.data.phantoms import make_phantom

    params = MedDiffusionParameters(use_demo_model=True, device="auto", sampler="ddim", steps=10,
                                    random_seed=False, seed=17, anatomy="ct-head-neck", modality="CT")
    summary = logic.model_summary(params)
    entry = summary.anatomy("ct-head-neck")
    assert entry is not None and entry.sizes_xyz, "the demo model has no ct-head-neck"
    assert summary.hu_range is not None, "the demo model declares no HU range"
    node = check_generate(logic, params, timeout_s=timeout_s)
    arr = np.asarray(slicer_array(node))
    low, high = summary.hu_range
    assert arr.min() >= low - 1e-3 and arr.max() <= high + 1e-3, f"generated CT outside {summary.hu_range} HU"
    assert arr.min() < -500.0, "generated CT holds no air: not in HU"
    assert np.allclose(node.GetSpacing(), entry.spacing_xyz, atol=1e-4), "generated spacing"
    assert tuple(node.GetImageData().GetDimensions()) == entry.sizes_xyz[0], "generated size"
    window, level = node.GetDisplayNode().GetWindow(), node.GetDisplayNode().GetLevel()
    assert (window, level) == (400.0, 40.0), f"CT window/level {window}/{level}"

    phantom = make_phantom("ct-head-neck", entry.sizes_xyz[0], entry.spacing_xyz, seed=5)
    source = mrml_volumes.image_to_volume_node(phantom, scene, "MedDiffusion self-test phantom")
    logic.start_reconstruct(params.replace(task="sparse-ct", views=12, steps=10, input_volume_id=source.GetID()),
                            input_node=source)
    state = logic.wait(timeout_s)
    assert state.state == DONE, f"reconstruction ended as {state.state}: {state.error}"
    recon, degraded = logic.finish(scene)
    truth = sitk.GetArrayViewFromImage(phantom).astype(np.float64)
    errors = {}
    for name, out in (("recon", recon), ("degraded", degraded)):
        image = mrml_volumes.volume_node_to_image(out)
        for what in ("Size", "Spacing", "Origin", "Direction"):
            assert np.allclose(getattr(image, f"Get{what}")(), getattr(phantom, f"Get{what}")(), atol=1e-4), \
                f"{name}: {what.lower()} differs from the input"
        errors[name] = float(np.sqrt(np.mean((sitk.GetArrayViewFromImage(image) - truth) ** 2)))
    assert errors["recon"] < errors["degraded"], f"reconstruction RMSE {errors['recon']:.1f} HU is not below the " \
                                                 f"sparse-view FBP's {errors['degraded']:.1f} HU"
    return [node, recon, degraded]


def slicer_array(node: Any) -> Any:
    import slicer

    return slicer.util.arrayFromVolume(node)
