"""The module's panel code (MedDiffusionWidget, MedDiffusionWidgets/) run against real MRML (slicer-core) and the
real local job server with the bundled demo model; only Qt is a stand-in (Testing/slicer_widget_harness.py).

Nothing else runs the widget outside Slicer: these tests catch a panel that calls what the logic no longer has
(an attribute renamed by a refactor), a .ui widget name that does not exist, and a job state it does not show.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from slicer_widget_harness import WidgetHarness  # noqa: E402


@pytest.fixture()
def panel():
    harness = WidgetHarness(slicer.vtkMRMLScene())
    harness.widget.logic.local.server.extra_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        yield harness
    finally:
        harness.close()


def _items(combo) -> list:
    return [combo.itemData(i) for i in range(combo.count)]


def test_panel_generates_cancels_and_reconstructs_with_the_demo_model(panel):
    ui, widget = panel.ui, panel.widget
    assert panel.errors == []
    # The lists come from the library and the demo model's model.yaml.
    assert _items(ui.methodComboBox) == ["fbp", "sart", "tv", "diffusion"]
    assert ui.anatomyComboBox.count > 0 and ui.sizeComboBox.count > 1
    ui.taskComboBox.currentIndex = 1  # MRI: its methods, and the parameter node follows
    assert _items(ui.methodComboBox) == ["zero-filled", "tv", "diffusion"]
    assert widget._parameterNode.read().task == "mri"
    ui.taskComboBox.currentIndex = 0

    # Generate: the panel's controls reach the job; progress, then the node and a 'Done' line.
    ui.samplerComboBox.currentIndex = 1  # ddim
    ui.stepsSpinBox.value = 2
    ui.randomSeedCheckBox.checked = False
    ui.seedSpinBox.value = 7
    ui.generateButton.click()
    assert panel.widget._jobs.timer.active and ui.generateButton.text == "Cancel", panel.errors
    panel.run_job()
    assert panel.errors == [] and ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text
    name = f"MedDiffusion CT {ui.anatomyComboBox.currentText.split('-', 1)[1]} seed 7 ddim"
    assert f"Created: {name}" in ui.statusLabel.text
    node = panel.scene.GetFirstNodeByName(name)
    assert node is not None and node.GetAttribute("MedDiffusion.steps") == "2"
    assert ui.generateButton.text == "Generate" and ui.generateButton.enabled

    # Cancel from the button while the server samples.
    ui.samplerComboBox.currentIndex = 0  # ddpm, 1000 steps: long enough to cancel
    ui.stepsSpinBox.value = 1000
    ui.generateButton.click()
    deadline = time.monotonic() + 120
    while "sampling" not in ui.statusLabel.text and time.monotonic() < deadline:
        for slot in widget._jobs.timer.slots:
            slot()
        time.sleep(0.02)
    assert "sampling: step" in ui.statusLabel.text, ui.statusLabel.text
    ui.generateButton.click()  # the same button cancels
    panel.run_job(30)
    assert ui.statusLabel.text == "Cancelled." and panel.errors == []

    # Reconstruct the generated volume (model-free FBP): the panel names both nodes and keeps the geometry.
    ui.inputVolumeSelector.setCurrentNode(node)
    ui.methodComboBox.currentIndex = _items(ui.methodComboBox).index("fbp")
    ui.viewsSpinBox.value = 8
    assert ui.reconstructButton.enabled
    ui.reconstructButton.click()
    panel.run_job()
    assert panel.errors == [] and "Created: MedDiffusion sparse-CT 8 views fbp recon" in ui.statusLabel.text
    recon = widget.logic.last_result
    assert recon is not None and recon.method == "fbp"
    out = panel.scene.GetFirstNodeByName("MedDiffusion sparse-CT 8 views fbp recon")
    assert np.allclose(out.GetSpacing(), node.GetSpacing()) and np.allclose(out.GetOrigin(), node.GetOrigin())


def test_panel_shows_refusals_and_failed_jobs(panel, tmp_path):
    ui, widget = panel.ui, panel.widget
    # A request the library refuses is refused at the click, before anything is uploaded.
    image = slicer.vtkMRMLScalarVolumeNode()
    panel.scene.AddNode(image)
    slicer.util.updateVolumeFromArray(image, np.random.default_rng(0).random((8, 16, 16)).astype(np.float32))
    ui.inputVolumeSelector.setCurrentNode(image)
    ui.taskComboBox.currentIndex = 1
    ui.methodComboBox.currentIndex = _items(ui.methodComboBox).index("tv")
    ui.degradedRadioButton.checked = True
    ui.simulateRadioButton.checked = False
    ui.reconstructButton.click()
    assert not widget._jobs.timer.active and len(panel.errors) == 1 and "'tv' needs measurements" in panel.errors[0]

    # A job that fails (no model in the chosen folder): the status line and an error box say why.
    panel.errors.clear()
    ui.modelComboBox.currentIndex = ui.modelComboBox.findData("")  # Custom
    ui.bundlePathLineEdit.currentPath = str(tmp_path / "no-model-here")
    ui.generateButton.click()
    panel.run_job(120)
    assert ui.statusLabel.text.startswith("Failed: "), ui.statusLabel.text
    assert panel.errors and panel.errors[-1] == ui.statusLabel.text[len("Failed: "):]
    assert ui.generateButton.text == "Generate" and not widget.logic.is_running


def test_panel_runs_a_job_on_a_remote_server_with_its_token(panel, tmp_path):
    """The remote settings as a user fills them in: address and token typed (stored per server origin in the
    settings, never in the scene), the model's lists from the server, a generation with the token."""
    import secrets

    from server_fixture import REPO, ServerProcess

    token = secrets.token_urlsafe(32)
    server = ServerProcess(REPO / "models" / "demo", tmp_path / "store", tmp_path / "server.log", token=token)
    try:
        ui, widget = panel.ui, panel.widget
        ui.remoteRadioButton.checked = True
        ui.serverUrlLineEdit.text = "ftp://example.org"  # not a server URL: said at once, nothing stored for it
        ui.serverUrlLineEdit.emit("editingFinished()")
        assert "server URL must look like http://host:port" in ui.statusLabel.text, ui.statusLabel.text
        ui.serverUrlLineEdit.text = server.url
        ui.serverUrlLineEdit.emit("editingFinished()")
        ui.tokenLineEdit.text = token
        ui.tokenLineEdit.emit("editingFinished()")
        assert widget._parameterNode.read().server_url == server.url
        assert token not in "".join(widget._parameterNode.node.GetParameter(n) for n in
                                    widget._parameterNode.node.GetParameterNames())
        ui.loadModelButton.click()  # the lists now come from the server's /v1/models
        assert panel.errors == [] and ui.statusLabel.text.startswith("Model demo:"), ui.statusLabel.text
        ui.samplerComboBox.currentIndex = 1
        ui.stepsSpinBox.value = 2
        ui.generateButton.click()
        panel.run_job()
        assert panel.errors == [] and ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text
        node = widget._parameterNode.output("Output")  # the result node the panel created
        assert node.GetAttribute("MedDiffusion.backend") == "remote"
        assert node.GetAttribute("MedDiffusion.server") == server.url
        # A wrong token: the failure says so in the status line and an error box.
        ui.tokenLineEdit.text = "wrong-" + token
        ui.tokenLineEdit.emit("editingFinished()")
        ui.generateButton.click()
        panel.run_job(60)
        assert ui.statusLabel.text.startswith("Failed: ") and "rejected the access token" in ui.statusLabel.text
        assert panel.errors and "rejected the access token" in panel.errors[-1]
    finally:
        server.stop()
