"""Render the module's real panel (Resources/UI/MedDiffusion.ui) offscreen and the demo model's real outputs,
for docs/images and the Extensions Index (EXTENSION_SCREENSHOTURLS).

Slicer itself cannot run headless here, so the .ui file is loaded with PyQt5's uic, its CTK/MRML widgets
replaced by plain Qt stand-ins of the same role (collapsible group, path field, node selector); the lists are
filled from the demo model's model.yaml and the result strip holds real volumes made through the module's
logic (local job server, demo model). Needs PyQt5 (`pip install PyQt5`, not a project dependency):

    QT_QPA_PLATFORM=offscreen python scripts/make_slicer_screenshots.py docs/images
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "MedDiffusion")]

from PyQt5 import QtCore, QtGui, QtWidgets, uic  # noqa: E402


def _stand_ins() -> None:
    """Modules named like the .ui's custom-widget headers, so uic finds a class for each."""

    class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 - the .ui's class name
        def setText(self, text: str) -> None:  # noqa: N802
            self.setTitle("\u25bc " + text)

        def setCollapsed(self, collapsed: bool) -> None:  # noqa: N802
            pass

    class ctkPathLineEdit(QtWidgets.QLineEdit):  # noqa: N801
        # ctkPathLineEdit::Filter flags named in the .ui (values do not matter here)
        Dirs, Files, Drives, NoDot, NoDotDot, Readable, Writable, Executable = (1 << i for i in range(8))

        def setFilters(self, value) -> None:  # noqa: N802
            pass

        def setNameFilters(self, value) -> None:  # noqa: N802
            pass

    class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
        def __getattr__(self, name: str):
            if name.startswith("set"):
                return lambda *args: None
            raise AttributeError(name)

        def setMRMLScene(self, scene) -> None:  # noqa: N802
            pass

    class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
        mrmlSceneChanged = QtCore.pyqtSignal(object)

    for cls in (ctkCollapsibleButton, ctkPathLineEdit, qMRMLNodeComboBox, qMRMLWidget):
        module = types.ModuleType(cls.__name__)
        setattr(module, cls.__name__, cls)
        sys.modules[cls.__name__] = module


def _grey(arr: np.ndarray, window: float, level: float) -> QtGui.QImage:
    lo = level - window / 2.0
    img = np.clip((arr - lo) / window * 255.0, 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(img[::-1])  # rows from the top, as a slice view shows anterior up
    qimg = QtGui.QImage(img.data, img.shape[1], img.shape[0], img.shape[1], QtGui.QImage.Format_Grayscale8)
    return qimg.copy()


def panel(out: Path) -> None:
    from MedDiffusionLogic.backends import LocalBackend
    from MedDiffusionLogic.parameters import MedDiffusionParameters

    import io
    import re

    text = (REPO / "MedDiffusion" / "Resources" / "UI" / "MedDiffusion.ui").read_text(encoding="utf-8")
    # The scene -> node-selector connection carries a vtkMRMLScene*, which only exists inside Slicer.
    text = re.sub(r"<connections>.*</connections>", "<connections/>", text, flags=re.S)
    ui = uic.loadUi(io.StringIO(text))
    summary = LocalBackend().model_summary(MedDiffusionParameters())
    cts = [a for a in summary.anatomies if a.modality == "CT"]
    ui.anatomyComboBox.addItems([a.name for a in cts])
    ui.anatomyComboBox.setCurrentIndex(1)
    ui.sizeComboBox.addItems(["Default"] + ["x".join(map(str, s)) for s in cts[1].sizes_xyz])
    ui.huRangeLineEdit.setPlaceholderText("model default ({:g},{:g})".format(*summary.hu_range))
    ui.samplerComboBox.setCurrentIndex(1)
    ui.inputVolumeSelector.addItem("CT chest (phantom)")
    ui.reconAnatomyComboBox.addItem("Suggested: ct-chest-abdomen")
    ui.localServerStatusLabel.setText("running")
    if hasattr(ui, "modelComboBox"):  # the registry's models (docs/SLICER.md, Models)
        ui.modelComboBox.addItems(["demo", "official-8x (not downloaded)", "official-4x (not downloaded)", "Custom"])
    ui.generateButton.setText("Cancel")
    ui.progressBar.setRange(0, 50)
    ui.progressBar.setValue(31)
    ui.statusLabel.setText("sampling: step 31/50, 0:12 elapsed, about 0:07 left")
    ui.resize(420, ui.sizeHint().height())
    ui.grab().save(str(out))


def results(out: Path) -> None:
    """Axial mid-slices of real demo-model outputs made through the module's logic."""
    import slicer
    import SimpleITK as sitk

    from MedDiffusionLib.data.phantoms import make_phantom
    from MedDiffusionLogic import mrml_volumes
    from MedDiffusionLogic.logic import MedDiffusionLogic
    from MedDiffusionLogic.parameters import MedDiffusionParameters

    scene = slicer.vtkMRMLScene()
    logic = MedDiffusionLogic(scene)
    try:
        params = MedDiffusionParameters(anatomy="ct-chest-abdomen", sampler="ddim", steps=50, random_seed=False,
                                        seed=7, device="cpu")
        logic.start_generate(params)
        assert logic.wait(600).state == "done"
        generated = logic.finish()[0]
        entry = logic.model_summary(params).anatomy("ct-chest-abdomen")
        phantom = make_phantom("ct-chest-abdomen", entry.sizes_xyz[0], entry.spacing_xyz, seed=11)
        source = mrml_volumes.image_to_volume_node(phantom, scene, "phantom")
        logic.start_reconstruct(params.replace(task="sparse-ct", views=12), input_node=source)
        assert logic.wait(600).state == "done"
        recon, fbp = logic.finish()
    finally:
        logic.stop_server()
    tiles = [("generated CT (HU)", slicer.util.arrayFromVolume(generated)),
             ("phantom", sitk.GetArrayFromImage(phantom)),
             ("12-view FBP", slicer.util.arrayFromVolume(fbp)),
             ("MedDiffusion recon", slicer.util.arrayFromVolume(recon))]
    scale, pad, label_h = 6, 8, 22
    size = 32 * scale  # the demo model's volumes are 32^3
    canvas = QtGui.QImage(len(tiles) * (size + pad) + pad, size + label_h + 2 * pad, QtGui.QImage.Format_RGB32)
    canvas.fill(QtGui.QColor(32, 32, 32))
    painter = QtGui.QPainter(canvas)
    painter.setPen(QtGui.QColor(230, 230, 230))
    for i, (label, arr) in enumerate(tiles):
        img = _grey(arr[arr.shape[0] // 2], 400.0, 40.0).scaled(size, size)
        x = pad + i * (size + pad)
        painter.drawImage(x, pad + label_h, img)
        painter.drawText(QtCore.QRect(x, pad, size, label_h), QtCore.Qt.AlignCenter, label)
    painter.end()
    canvas.save(str(out))


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "docs" / "images")
    folder.mkdir(parents=True, exist_ok=True)
    _stand_ins()
    app = QtWidgets.QApplication([])  # noqa: F841 - must exist while widgets are made
    panel(folder / "MedDiffusion-panel.png")
    results(folder / "MedDiffusion-results.png")
    print(f"wrote {folder / 'MedDiffusion-panel.png'} and {folder / 'MedDiffusion-results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
