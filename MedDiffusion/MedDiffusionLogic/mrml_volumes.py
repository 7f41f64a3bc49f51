"""SimpleITK image <-> vtkMRMLScalarVolumeNode, keeping voxel values and geometry.

Slicer stores geometry on the node in RAS; SimpleITK (and NRRD/NIfTI on disk) use LPS. The two differ by a sign
flip of the first two axes: origin_LPS = F @ origin_RAS, direction_LPS = F @ direction_RAS with F = diag(-1,-1,1).
Array axis order is the same on both sides: a SimpleITK array is (Z, Y, X) and so is a Slicer volume array
(K, J, I), so voxels are copied without any transpose.

No Qt here: these functions take a scene and nodes, so they run headless with slicer-core and inside Slicer.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
from MedDiffusionLib.errors import InputError

__all__ = [
    "LPS_TO_RAS",
    "image_to_volume_node",
    "volume_node_to_image",
    "update_volume_node_from_image",
    "ras_geometry_from_image",
    "volume_node_to_array",
    "array_to_volume_node",
    "display_sample",
    "set_grey_window_level",
]

# Its own inverse: the same matrix maps RAS -> LPS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Slicer does not re-orthonormalise a direction matrix; a small error would leak into spacing, a large one
# (shear) cannot be represented at all.
_ORTHO_TOL = 1e-3


def _orthonormalize(direction: np.ndarray) -> np.ndarray:
    """Nearest orthonormal matrix (polar decomposition) if `direction` is nearly orthonormal, else an error."""
    if np.abs(direction @ direction.T - np.eye(3)).max() > _ORTHO_TOL:
        raise InputError(f"the volume's direction matrix is not orthonormal (sheared): {direction.tolist()}")
    u, _, vt = np.linalg.svd(direction)
    return u @ vt


def _slicer_compatible_array(arr: np.ndarray) -> np.ndarray:
    """Voxel types Slicer can hold: it refuses 64-bit integers and has no bool/float16 volumes."""
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    if arr.dtype in (np.int64, np.uint64):
        info = np.iinfo(np.int32)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(np.int32)
        return arr.astype(np.float64)
    return arr


def ras_geometry_from_image(image: sitk.Image) -> tuple[tuple[float, ...], np.ndarray, np.ndarray]:
    """(spacing_xyz, origin_RAS (3,), direction_RAS (3,3) with unit columns) of a 3D SimpleITK image."""
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3D image, got {image.GetDimension()}D")
    direction_lps = _orthonormalize(np.asarray(image.GetDirection(), dtype=float).reshape(3, 3))
    origin_ras = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    direction_ras = LPS_TO_RAS @ direction_lps
    return tuple(float(s) for s in image.GetSpacing()), origin_ras, direction_ras


def update_volume_node_from_image(node: Any, image: sitk.Image) -> Any:
    """Replace the voxels and geometry of an existing scalar volume node with those of `image`."""
    import slicer

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components")
    spacing, origin_ras, direction_ras = ras_geometry_from_image(image)
    arr = _slicer_compatible_array(sitk.GetArrayFromImage(image))  # (Z, Y, X) == Slicer's (K, J, I)
    matrix = _vtk_direction(direction_ras)
    # Geometry first, voxels last: updateVolumeFromArray sends the "image data modified" events that views
    # react to, and they should see the final geometry.
    was_modifying = node.StartModify()
    try:
        node.SetSpacing(*spacing)
        node.SetOrigin(*(float(v) for v in origin_ras))
        node.SetIJKToRASDirectionMatrix(matrix)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(arr))
    finally:
        node.EndModify(was_modifying)
    return node


def _vtk_direction(direction_ras: np.ndarray) -> Any:
    """The 3x3 IJK-to-RAS direction as the vtkMatrix4x4 a volume node takes."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(direction_ras[r, c]))
    return matrix


def set_grey_window_level(display: Any, window_level: tuple[float, float]) -> None:
    """A fixed (window, level) and the grey colormap on a scalar volume display node."""
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(float(window_level[0]), float(window_level[1]))
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")


def image_to_volume_node(image: sitk.Image, scene: Any, name: str = "Volume", node: Any = None) -> Any:
    """Add `image` to `scene` as a new vtkMRMLScalarVolumeNode (or update `node`), with its geometry.

    `name` is made unique in the scene. Returns the node.
    """
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    return update_volume_node_from_image(node, image)


def _ijk_to_world_matrix(node: Any) -> np.ndarray:
    """The node's IJK->RAS 4x4, including a linear parent transform (hardened), as numpy."""
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"volume '{node.GetName()}' is under a non-linear transform: harden the transform "
                               "(Transforms module) before using it")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        vtk.vtkMatrix4x4.Multiply4x4(to_world, ijk_to_ras, ijk_to_ras)
    return np.array([[ijk_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])


def _checked_scalar_volume(node: Any) -> None:
    if node is None:
        raise InputError("no input volume selected")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{node.GetName()}' is a {node.GetClassName()}, not a scalar volume")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise InputError(f"volume '{node.GetName()}' has no voxels")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(f"volume '{node.GetName()}' has {image_data.GetNumberOfScalarComponents()} components; "
                           "a scalar (grey-level) volume is needed")


def _lps_geometry(node: Any) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """(spacing, origin_LPS, direction_LPS) of the node as the user sees it (parent linear transform applied)."""
    matrix = _ijk_to_world_matrix(node)
    columns = matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"volume '{node.GetName()}' has a degenerate geometry (zero spacing)")
    direction_ras = _orthonormalize(columns / spacing)
    return (tuple(float(s) for s in spacing), tuple(float(v) for v in LPS_TO_RAS @ matrix[:3, 3]),
            LPS_TO_RAS @ direction_ras)


def volume_node_to_array(node: Any) -> Any:
    """The node's voxels (a view, not a copy: VTK keeps the buffer alive) with LPS geometry, as a
    MedDiffusionLib.transfers.VolumeArray: what an upload streams without a whole-volume copy."""
    import slicer
    from MedDiffusionLib.transfers import VolumeArray

    _checked_scalar_volume(node)
    spacing, origin, direction = _lps_geometry(node)
    return VolumeArray(slicer.util.arrayFromVolume(node), spacing, origin, direction)


def volume_node_to_image(node: Any) -> sitk.Image:
    """Copy a scalar volume node (voxels + geometry, parent linear transform applied) into a SimpleITK image."""
    import slicer

    _checked_scalar_volume(node)
    arr = np.array(slicer.util.arrayFromVolume(node), copy=True)  # a copy: VTK owns the original buffer
    spacing, origin, direction = _lps_geometry(node)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def array_to_volume_node(volume: Any, scene: Any, name: str = "Volume",
                         window_level: tuple[float, float] | None = None) -> Any:
    """A new scalar volume node holding a VolumeArray's voxels (LPS geometry converted to RAS).

    Fast for big volumes: the array is handed to VTK without another copy, and the grey display node is made
    first with `window_level` (else the volume's own range) and automatic window/level off, because automatic
    window/level would compute a histogram of every voxel (seconds for 512^3) on the main thread.
    """
    import vtk
    from vtk.util import numpy_support

    arr = _slicer_compatible_array(np.ascontiguousarray(volume.array))
    direction_ras = LPS_TO_RAS @ _orthonormalize(np.asarray(volume.direction_lps, dtype=float).reshape(3, 3))
    origin_ras = LPS_TO_RAS @ np.asarray(volume.origin_lps, dtype=float)
    if window_level is None:
        sample = display_sample(arr)
        lo, hi = (float(sample.min()), float(sample.max())) if sample.size else (0.0, 1.0)
        window_level = (max(hi - lo, 1e-6), (hi + lo) / 2.0)
    display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    set_grey_window_level(display, window_level)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.SetAndObserveDisplayNodeID(display.GetID())
    matrix = _vtk_direction(direction_ras)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    # deep=False: VTK borrows the numpy buffer; numpy_support keeps a reference to the array on the VTK array.
    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.ravel(), deep=False))
    was_modifying = node.StartModify()
    try:
        node.SetSpacing(*(float(v) for v in volume.spacing))
        node.SetOrigin(*(float(v) for v in origin_ras))
        node.SetIJKToRASDirectionMatrix(matrix)
        node.SetAndObserveImageData(image_data)
    finally:
        node.EndModify(was_modifying)
    return node


def display_sample(arr: np.ndarray, max_voxels: int = 1 << 21) -> np.ndarray:
    """Every n-th voxel along each axis, at most about `max_voxels` of them: window/level statistics of a
    512^3 volume from a sample take milliseconds instead of seconds, with the same percentiles to a few HU."""
    stride = max(1, int(np.ceil((arr.size / max_voxels) ** (1.0 / 3.0))))
    return arr[::stride, ::stride, ::stride]
