"""3D Slicer module: generate synthetic 3D CT/MR volumes and reconstruct sparse-view CT / undersampled MRI with
3D MedDiffusion.

Only the Qt layer lives here (module description, panel, self-test). Everything else is in the Qt-free
MedDiffusionLogic package next to this file, tested headlessly against slicer-core.
"""
from __future__ import annotations

import os
import sys
import tempfile


def _add_import_paths() -> None:
    """Make MedDiffusionLogic and MedDiffusionLib importable. Installed as an extension both are copied next to
    this file; run from a source checkout (module path <repo>/MedDiffusion) the library is in the parent folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import MedDiffusionLib  # noqa: F401
    except ImportError:
        repo = os.path.dirname(here)
        if os.path.isdir(os.path.join(repo, "MedDiffusionLib")) and repo not in sys.path:
            sys.path.insert(0, repo)


_add_import_paths()

import ctk  # noqa: E402,F401  (registers the ctk widgets used by the .ui file)
import qt  # noqa: E402
import slicer  # noqa: E402
import vtk  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin  # noqa: E402

from MedDiffusionLib.errors import InputError  # noqa: E402
from MedDiffusionLogic import dependencies, selfchecks  # noqa: E402
from MedDiffusionLogic.backends import AnatomyChoice  # noqa: E402
from MedDiffusionLogic.logic import MedDiffusionLogic  # noqa: E402
from MedDiffusionLogic.parameters import (  # noqa: E402
    DEVICES, MASKS, MODALITIES, SAMPLERS, TASKS, MedDiffusionParameterNode, MedDiffusionParameters,
    format_size)
from MedDiffusionLogic.tokens import ServerTrust, TokenStore  # noqa: E402
from MedDiffusionWidgets import tr as _  # noqa: E402
from MedDiffusionWidgets.choice_lists import (  # noqa: E402
    fill_anatomies, fill_methods, fill_recon_anatomies, fill_sizes)
from MedDiffusionWidgets.job_runner import JobRunner  # noqa: E402
from MedDiffusionWidgets.model_chooser import CUSTOM_MODEL, ModelChooser  # noqa: E402



class MedDiffusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDiffusion")
        self.parent.categories = [_("Reconstruction")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDiffusion Slicer extension developers (MedDiffusion project)"]
        self.parent.helpText = _(
            "Generate synthetic 3D CT and MR volumes with the 3D MedDiffusion latent diffusion model, and "
            "reconstruct sparse-view CT or undersampled MRI with the model as a prior. Jobs run in a MedDiffusion "
            "server process on this computer (PyTorch, GPU recommended) or on a remote MedDiffusion server. See "
            "docs/SLICER.md of the project for the controls. Generated images are synthetic and not for "
            "diagnostic use.")
        self.parent.acknowledgementText = _(
            "Based on 3D MedDiffusion (Wang et al., 'A 3D Latent Diffusion Model for Controllable and "
            "High-quality Medical Image Generation'). The module follows the 3D Slicer scripted module template.")


class MedDiffusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: copies controls into the parameter node, starts jobs in the logic, drives them with a timer."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedDiffusionLogic | None = None
        self._parameterNode: MedDiffusionParameterNode | None = None
        self._updatingGUI = False
        self._importing = False
        self._anatomies: list[AnatomyChoice] = []
        self._jobs: JobRunner | None = None
        self._tokens: TokenStore | None = None
        self._trust: ServerTrust | None = None
        self._models: ModelChooser | None = None

    # ------------------------------------------------------------------ setup and lifetime

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDiffusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDiffusionLogic(slicer.mrmlScene)
        # Tokens live in application settings, per server origin; never in the scene (tokens.py).
        self._tokens = TokenStore(qt.QSettings())
        self._trust = ServerTrust(qt.QSettings())

        self._jobs = JobRunner(self.ui, self.logic, self._updateServerStatus, lambda: self._updateEnabledState(
            self._parameterNode.read() if self._parameterNode else MedDiffusionParameters()))
        self._models = ModelChooser(self.ui, lambda: self._parameterNode,
                                    lambda: self._updateEnabledState(self._parameterNode.read()),
                                    self._onDownloadFinished)
        # The local server stops with Slicer (its child also exits by itself when Slicer's end of its stdin pipe
        # closes, e.g. after a crash).
        slicer.app.connect("aboutToQuit()", self.logic.stop_server)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartImportEvent, self.onSceneStartImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        ui = self.ui
        for radio in (ui.localRadioButton, ui.remoteRadioButton, ui.randomSeedCheckBox,
                      ui.simulateRadioButton, ui.degradedRadioButton, ui.dataConsistencyCheckBox):
            radio.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        for combo in (ui.deviceComboBox, ui.samplerComboBox, ui.maskComboBox, ui.sizeComboBox,
                      ui.reconAnatomyComboBox, ui.methodComboBox):
            combo.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskChanged)
        ui.modalityComboBox.connect("currentIndexChanged(int)", self.onModalityChanged)
        ui.anatomyComboBox.connect("currentIndexChanged(int)", self.onAnatomyChanged)
        for spin in (ui.stepsSpinBox, ui.seedSpinBox, ui.viewsSpinBox, ui.accelerationSpinBox):
            spin.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        ui.serverUrlLineEdit.connect("editingFinished()", self.onServerUrlEdited)
        ui.huRangeLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        for path in (ui.bundlePathLineEdit, ui.autoencoderPathLineEdit, ui.denoiserPathLineEdit):
            path.connect("currentPathChanged(QString)", self.onModelChanged)
        ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChoiceChanged)
        ui.downloadModelButton.connect("clicked(bool)", self._models.on_download)
        ui.remoteRadioButton.connect("toggled(bool)", self.onModelChanged)
        ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        ui.tokenLineEdit.connect("editingFinished()", self.onTokenEdited)

        ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        ui.generateButton.connect("clicked(bool)", self.onGenerateButton)
        ui.reconstructButton.connect("clicked(bool)", self.onReconstructButton)
        ui.stopServerButton.connect("clicked(bool)", self.onStopServer)
        ui.showServerLogButton.connect("clicked(bool)", self.onShowServerLog)

        self._models.fill()
        self.initializeParameterNode()
        self._models.apply_remembered()
        self._refreshModelLists(quiet=True)

    def cleanup(self) -> None:
        self.removeObservers()
        if self._jobs is not None:
            self._jobs.stop()
        if self._models is not None:
            self._models.stop()
        if self.logic is not None:
            self.logic.stop_server()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        # Results of a running job would land in the next scene: stop it.
        if self.logic is not None and self.logic.is_running:
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneStartImport(self, caller, event) -> None:
        # While a scene loads, node selectors fire with transient values: never write them back.
        self._importing = True

    def onSceneEndImport(self, caller, event) -> None:
        """After loading a scene: its parameter node (and its node references) replace ours, and a server URL
        that came with it is only contacted after the user agreed (tokens.ServerTrust)."""
        self._importing = False
        self.setParameterNode(self.logic.parameter_node(slicer.mrmlScene))
        self._refreshModelLists(quiet=True)

    def onReload(self) -> None:
        """Developer 'Reload': also reload the logic and widget packages, not just this file."""
        if self.logic is not None:
            self.logic.stop_server()
        packages = ("MedDiffusionLogic", "MedDiffusionWidgets")
        for name in [n for n in sys.modules if n.split(".")[0] in packages]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # ------------------------------------------------------------------ parameter node <-> GUI

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.parameter_node(slicer.mrmlScene))
        if self._parameterNode.input_volume is None and not self._importing:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None:
                self._parameterNode.input_volume = first

    def setParameterNode(self, wrapper: MedDiffusionParameterNode | None) -> None:
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode.node, vtk.vtkCommand.ModifiedEvent,
                                self.updateGUIFromParameterNode)
        self._parameterNode = wrapper
        if wrapper is not None:
            self.addObserver(wrapper.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._parameterNode.read()
            ui = self.ui
            ui.localRadioButton.checked = p.backend == "local"
            ui.remoteRadioButton.checked = p.backend == "remote"
            ui.deviceComboBox.currentIndex = DEVICES.index(p.device)
            ui.serverUrlLineEdit.text = p.server_url
            ui.tokenLineEdit.text = self._tokens.get(p.server_url) if self._tokens else ""
            self._models.select(p)
            ui.bundlePathLineEdit.currentPath = p.bundle_dir
            ui.autoencoderPathLineEdit.currentPath = p.autoencoder_path
            ui.denoiserPathLineEdit.currentPath = p.denoiser_path
            ui.modalityComboBox.currentIndex = MODALITIES.index(p.modality)
            fill_anatomies(ui.anatomyComboBox, self._anatomies, p)
            fill_sizes(ui.sizeComboBox, self._anatomies, p)
            ui.samplerComboBox.currentIndex = SAMPLERS.index(p.sampler)
            ui.stepsSpinBox.value = p.steps
            ui.seedSpinBox.value = p.seed
            ui.randomSeedCheckBox.checked = p.random_seed
            ui.huRangeLineEdit.text = p.ct_hu_range
            ui.inputVolumeSelector.setCurrentNode(self._parameterNode.input_volume)
            ui.taskComboBox.currentIndex = TASKS.index(p.task)
            fill_methods(ui.methodComboBox, p)
            fill_recon_anatomies(ui.reconAnatomyComboBox, self._anatomies, p, self._parameterNode.input_volume)
            ui.viewsSpinBox.value = p.views
            ui.accelerationSpinBox.value = p.acceleration
            ui.maskComboBox.currentIndex = MASKS.index(p.mask)
            ui.simulateRadioButton.checked = p.simulate
            ui.degradedRadioButton.checked = not p.simulate
            ui.dataConsistencyCheckBox.checked = p.data_consistency
            self._updateEnabledState(p)
        finally:
            self._updatingGUI = False

    def _updateEnabledState(self, p: MedDiffusionParameters) -> None:
        ui = self.ui
        remote = p.backend == "remote"
        ui.deviceComboBox.enabled = not remote
        ui.serverUrlLineEdit.enabled = ui.tokenLineEdit.enabled = remote
        custom = not p.use_demo_model and not p.model_name
        for widget in (ui.bundlePathLineEdit, ui.autoencoderPathLineEdit, ui.denoiserPathLineEdit):
            widget.enabled = not remote and custom
        self._models.update_state(remote)
        ui.seedSpinBox.enabled = not p.random_seed
        ui.huRangeLineEdit.enabled = p.modality == "CT"
        sparse_ct = p.task == "sparse-ct"
        ui.viewsSpinBox.enabled = sparse_ct
        ui.accelerationSpinBox.enabled = ui.maskComboBox.enabled = not sparse_ct
        # Only the diffusion method uses the model: the prior's anatomy and the data-consistency switch.
        ui.reconAnatomyComboBox.enabled = ui.dataConsistencyCheckBox.enabled = p.method == "diffusion"
        running = self.logic is not None and self.logic.is_running
        ui.generateButton.enabled = not running or self._jobs.button is ui.generateButton
        ui.loadModelButton.enabled = not running
        has_input = self._parameterNode is not None and self._parameterNode.input_volume is not None
        ui.reconstructButton.enabled = self._jobs.button is ui.reconstructButton if running else has_input
        if not running:
            ui.reconstructButton.toolTip = (_("Reconstruct the input volume. While running, the button cancels.")
                                            if ui.reconstructButton.enabled else _("Select an input volume first."))
        self._updateServerStatus()

    def _updateServerStatus(self) -> None:
        server = self.logic.local.server if self.logic is not None else None
        state = server.state if server is not None else "stopped"
        self.ui.localServerStatusLabel.text = {"ready": _("running"), "starting": _("starting..."),
                                               "failed": _("failed (see log)")}.get(state, _("not running"))
        self.ui.stopServerButton.enabled = state in ("ready", "starting")
        self.ui.showServerLogButton.enabled = bool(self.logic is not None and self.logic.server_log_path)

    def updateParameterNodeFromGUI(self, *args) -> None:
        if self._parameterNode is None or self._updatingGUI or self._importing:
            return
        ui = self.ui
        sizeData = ui.sizeComboBox.itemData(ui.sizeComboBox.currentIndex)
        reconAnatomy = ui.reconAnatomyComboBox.itemData(ui.reconAnatomyComboBox.currentIndex)
        method = ui.methodComboBox.itemData(ui.methodComboBox.currentIndex)
        models = self._models.name()
        changes = dict(
            backend="remote" if ui.remoteRadioButton.checked else "local",
            device=DEVICES[max(ui.deviceComboBox.currentIndex, 0)],
            server_url=ui.serverUrlLineEdit.text.strip(),
            use_demo_model=models == "demo",
            model_name="" if models in ("demo", CUSTOM_MODEL) else models,
            bundle_dir=ui.bundlePathLineEdit.currentPath,
            autoencoder_path=ui.autoencoderPathLineEdit.currentPath,
            denoiser_path=ui.denoiserPathLineEdit.currentPath,
            modality=MODALITIES[max(ui.modalityComboBox.currentIndex, 0)],
            size=str(sizeData) if sizeData else "",
            sampler=SAMPLERS[max(ui.samplerComboBox.currentIndex, 0)],
            steps=int(ui.stepsSpinBox.value), seed=int(ui.seedSpinBox.value),
            random_seed=ui.randomSeedCheckBox.checked,
            ct_hu_range=ui.huRangeLineEdit.text.strip(),
            task=TASKS[max(ui.taskComboBox.currentIndex, 0)],
            recon_anatomy=str(reconAnatomy) if reconAnatomy else "",
            method=str(method) if method else self._parameterNode.read().method,
            views=int(ui.viewsSpinBox.value), acceleration=int(ui.accelerationSpinBox.value),
            mask=MASKS[max(ui.maskComboBox.currentIndex, 0)],
            simulate=ui.simulateRadioButton.checked, data_consistency=ui.dataConsistencyCheckBox.checked)
        try:
            self._parameterNode.update(**changes)
        except ValueError as exc:  # e.g. a malformed HU range: say so, keep the old value
            self.ui.statusLabel.text = str(exc)
        node = ui.inputVolumeSelector.currentNode()
        if node is not self._parameterNode.input_volume:
            self._parameterNode.input_volume = node

    def onModalityChanged(self, index: int) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        modality = MODALITIES[max(index, 0)]
        first = next((a.name for a in self._anatomies if a.modality == modality), "")
        # Switching modality picks that modality's first anatomy and its default size.
        self._parameterNode.update(modality=modality, anatomy=first or self._parameterNode.read().anatomy, size="")

    def onAnatomyChanged(self, index: int) -> None:
        if self._parameterNode is None or self._updatingGUI or index < 0:
            return
        # Sizes differ per anatomy: fall back to the new anatomy's default size.
        self._parameterNode.update(anatomy=self.ui.anatomyComboBox.currentText, size="")

    def onTaskChanged(self, index: int) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        self._parameterNode.update(task=TASKS[max(index, 0)], recon_anatomy="")  # a new suggestion

    def onInputVolumeChanged(self, node) -> None:
        if self._parameterNode is None or self._updatingGUI or self._importing:
            return
        self._parameterNode.input_volume = node
        self._parameterNode.update(recon_anatomy="")  # suggested again from the new volume

    def onServerUrlEdited(self) -> None:
        url = self.ui.serverUrlLineEdit.text.strip()
        if self._parameterNode is not None and url and url != self._parameterNode.read().server_url:
            try:
                self._trust.trust(url)  # typed by the user: agreed
            except InputError as exc:  # not a server URL: say so (Generate refuses it too)
                self.ui.statusLabel.text = str(exc)
        self.updateParameterNodeFromGUI()
        self.ui.tokenLineEdit.text = self._tokens.get(url)  # the token entered for this server, if any

    def onTokenEdited(self) -> None:
        url = self.ui.serverUrlLineEdit.text.strip()
        try:
            self._tokens.set(url, self.ui.tokenLineEdit.text)
        except InputError as exc:  # no server URL to keep the token for
            self.ui.statusLabel.text = str(exc)

    def onModelChanged(self, *args) -> None:
        if self._updatingGUI:
            return
        self.updateParameterNodeFromGUI()
        self._refreshModelLists(quiet=True)

    # ------------------------------------------------------------------ model list and downloads (model_chooser.py)

    def onModelChoiceChanged(self, index: int) -> None:
        if self._updatingGUI:
            return
        self._models.remember()
        self.onModelChanged()

    def _onDownloadFinished(self, text: str) -> None:
        self.updateGUIFromParameterNode()
        self._refreshModelLists(quiet=True)
        self.ui.statusLabel.text = text

    # ------------------------------------------------------------------ anatomy and size lists

    def _refreshModelLists(self, quiet: bool = False) -> None:
        """Lists from the selected model: its model.yaml (local, instant) or the server's model list (remote,
        one short request, only for a server the user agreed to contact)."""
        if self._parameterNode is None:
            return
        params = self._parameterNode.read()
        if params.backend == "remote" and (quiet or not self._serverAllowed(params)):
            self.updateGUIFromParameterNode()
            return
        try:
            summary = self.logic.model_summary(params, self._token(params))
        except Exception as exc:
            if not quiet:
                slicer.util.errorDisplay(str(exc), windowTitle=_("MedDiffusion"))
            self.ui.statusLabel.text = _("Model lists unavailable: {reason}").format(reason=exc)
            return
        self._anatomies = list(summary.anatomies)
        current = summary.anatomy(params.anatomy) or next(
            (a for a in self._anatomies if a.modality == params.modality), None)
        if current is not None:
            sizes = [format_size(s) for s in current.sizes_xyz]
            self._parameterNode.update(anatomy=current.name, modality=current.modality,
                                       size=params.size if params.size in sizes else "")
        hu = summary.hu_range
        self.ui.huRangeLineEdit.placeholderText = (_("model default ({low:g},{high:g})").format(low=hu[0], high=hu[1])
                                                   if hu else _("model default (0..1, none declared)"))
        if not quiet:
            self.ui.statusLabel.text = _("Model {name}: {count} anatomies.").format(
                name=summary.name or "-", count=len(self._anatomies))
        self.updateGUIFromParameterNode()

    def onLoadModel(self) -> None:
        self.updateParameterNodeFromGUI()
        self._refreshModelLists(quiet=False)

    # ------------------------------------------------------------------ servers

    def _token(self, params: MedDiffusionParameters) -> str:
        return self._tokens.get(params.server_url) if params.backend == "remote" else ""

    def _serverAllowed(self, params: MedDiffusionParameters) -> bool:
        """A remote server is contacted only if the user typed or approved its address (a scene may carry any
        URL); tokens.check_transport then refuses plain http to another machine when a token is set."""
        if params.backend != "remote" or params.server_url == MedDiffusionParameters().server_url:
            return True  # the local default (an SSH tunnel's usual end) is not something a scene chose
        return self._trust.allow(params.server_url, lambda text: slicer.util.confirmYesNoDisplay(
            text, windowTitle=_("MedDiffusion: unknown server")))

    def onStopServer(self) -> None:
        if self.logic.is_running and self.logic.job.backend is self.logic.local:
            self._jobs.cancel()
        self.logic.stop_server()
        self._updateServerStatus()

    def onShowServerLog(self) -> None:
        path = self.logic.server_log_path
        if path and os.path.exists(path):
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(path))
        else:
            slicer.util.infoDisplay(_("The local server has not been started in this session."),
                                    windowTitle=_("MedDiffusion"))

    # ------------------------------------------------------------------ running jobs (job_runner.py)

    def _start(self, button, start) -> None:
        if self.logic.is_running:
            self._jobs.cancel()
            return
        self.updateParameterNodeFromGUI()
        params = self._parameterNode.read()
        with slicer.util.tryWithErrorDisplay(_("Could not start the job."), waitCursor=True):
            if not self._serverAllowed(params):
                return
            dependencies.ensure_dependencies(params.backend)
            if not self._anatomies:  # the lists need PyYAML, which the first run may just have installed
                self._refreshModelLists(quiet=True)
            start(params)
            self._jobs.started(button)
            self._updateEnabledState(self._parameterNode.read())

    def onGenerateButton(self) -> None:
        self._start(self.ui.generateButton, lambda p: self.logic.start_generate(p, self._token(p)))

    def onReconstructButton(self) -> None:
        self._start(self.ui.reconstructButton, lambda p: self.logic.start_reconstruct(
            p, self._token(p), self._parameterNode.input_volume))


class MedDiffusionTest(ScriptedLoadableModuleTest):
    """The same checks as Testing/test_slicer_logic.py (MedDiffusionLogic.selfchecks), inside Slicer."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_volume_round_trip()
        self.setUp()
        self.test_parameter_round_trip()
        self.setUp()
        self.test_generate_and_reconstruct_demo_model()

    def test_volume_round_trip(self) -> None:
        self.delayDisplay("Volume round trip (SimpleITK <-> node <-> NRRD/NIfTI, oblique geometry)")
        with tempfile.TemporaryDirectory() as folder:
            selfchecks.check_volume_round_trip(slicer.mrmlScene, folder)
        selfchecks.check_transformed_volume(slicer.mrmlScene)
        self.delayDisplay("Volume round trip passed")

    def test_parameter_round_trip(self) -> None:
        self.delayDisplay("Parameter node round trip through a saved scene")
        selfchecks.check_parameter_round_trip()
        self.delayDisplay("Parameter node round trip passed")

    def test_generate_and_reconstruct_demo_model(self) -> None:
        """Skipped (reported as skipped, not passed) when the job server's packages are missing."""
        missing = dependencies.missing_packages(dependencies.LOCAL_REQUIREMENTS)
        if missing:
            self.skipTest("missing Python packages: " + ", ".join(m for m, _r in missing))
        self.delayDisplay("Generating and reconstructing with the bundled demo model (local server)")
        logic = MedDiffusionLogic(slicer.mrmlScene)
        try:
            nodes = selfchecks.check_demo_generate_and_reconstruct(logic, slicer.mrmlScene)
        finally:
            logic.stop_server()
        self.delayDisplay("Demo model passed: " + ", ".join(n.GetName() for n in nodes))
