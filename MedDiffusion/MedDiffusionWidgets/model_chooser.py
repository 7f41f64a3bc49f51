"""The panel's model list and model downloads: which model the local backend loads, and fetching one.

The list comes from the library's registry (one list for the CLI, the server and this panel), with a last entry
'Custom' for a folder or checkpoint files. A download runs as a child process (MedDiffusionLogic.model_downloads);
a timer reads its progress a few times a second, so the panel never blocks.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import qt
import slicer

from MedDiffusionLogic import dependencies
from MedDiffusionLogic.model_downloads import DownloadFlow, ModelChoice, launcher, model_choices
from MedDiffusionLogic.parameters import MedDiffusionParameterNode, MedDiffusionParameters

from . import tr as _

__all__ = ["ModelChooser", "CUSTOM_MODEL", "LAST_MODEL_SETTING"]

DOWNLOAD_POLL_MS = 250          # a model download reports through a file; four reads a second are plenty
CUSTOM_MODEL = ""               # the model list's last entry: the folder or files below it
LAST_MODEL_SETTING = "MedDiffusion/lastModel"   # the model chosen last, for new scenes


class ModelChooser:
    """Drives the panel's model combo box, download button, progress bar and model info label.

    ``parameter_node`` returns the panel's current parameter node (or None); ``on_state`` is called when the
    enabled state of the panel may have changed; ``on_finished(text)`` after a download ended (the widget refreshes
    its lists and shows ``text``)."""

    def __init__(self, ui: Any, parameter_node: Callable[[], Optional[MedDiffusionParameterNode]],
                 on_state: Callable[[], None], on_finished: Callable[[str], None]) -> None:
        self.ui = ui
        self._parameter_node = parameter_node
        self._on_state = on_state
        self._on_finished = on_finished
        self.choices: list[ModelChoice] = []
        self.download: Optional[DownloadFlow] = None
        self._timer = qt.QTimer()
        self._timer.setInterval(DOWNLOAD_POLL_MS)
        self._timer.connect("timeout()", self._poll)

    # ------------------------------------------------------------------ the list
    def fill(self) -> None:
        """The registry's models, then 'Custom'."""
        try:
            self.choices = model_choices()
        except Exception as exc:  # an unreadable registry file: say so, keep the panel usable
            self.choices = []
            self.ui.statusLabel.text = _("Model list unavailable: {reason}").format(reason=exc)
        combo = self.ui.modelComboBox
        was = combo.blockSignals(True)
        combo.clear()
        for choice in self.choices:
            combo.addItem(choice.label, choice.name)
        combo.addItem(_("Custom: the folder or files below"), CUSTOM_MODEL)
        combo.blockSignals(was)

    def name(self) -> str:
        """The selected entry's model name ('demo', a registered name, or CUSTOM_MODEL)."""
        combo = self.ui.modelComboBox
        data = combo.itemData(combo.currentIndex) if combo.currentIndex >= 0 else "demo"
        return str(data) if data is not None else CUSTOM_MODEL

    def current(self) -> Optional[ModelChoice]:
        """The selected registry entry (None for 'Custom' or a name this computer does not know)."""
        name = self.name()
        return next((c for c in self.choices if c.name == name), None)

    def select(self, p: MedDiffusionParameters) -> None:
        """Show the parameters' model, without signalling a change."""
        name = "demo" if p.use_demo_model else (p.model_name or CUSTOM_MODEL)
        combo = self.ui.modelComboBox
        index = combo.findData(name)
        if index < 0:  # a name saved in a scene that this computer does not know: show it, marked
            combo.insertItem(combo.count - 1, _("{name} (not on this computer)").format(name=name), name)
            index = combo.findData(name)
        was = combo.blockSignals(True)
        combo.currentIndex = index
        combo.blockSignals(was)

    def apply_remembered(self) -> None:
        """A new scene starts with the model chosen last (if it is still here); a saved scene keeps its own."""
        node = self._parameter_node()
        remembered = str(qt.QSettings().value(LAST_MODEL_SETTING, "") or "")
        p = node.read() if node is not None else None
        fresh = p is not None and p.use_demo_model and not p.model_name
        if fresh and remembered and remembered != "demo" and any(
                c.name == remembered and c.available for c in self.choices):
            node.update(use_demo_model=False, model_name=remembered)

    def remember(self) -> None:
        """The user picked an entry: new scenes start with it."""
        name = self.name()
        if name != CUSTOM_MODEL:
            qt.QSettings().setValue(LAST_MODEL_SETTING, name)

    def update_state(self, remote: bool) -> None:
        """Enable the list and the Download button, and describe the selected model (``remote``: not used)."""
        self.ui.modelComboBox.enabled = not remote and self.download is None
        choice = self.current()
        self.ui.downloadModelButton.enabled = self.download is not None or (
            not remote and choice is not None and choice.downloadable)
        self.ui.modelInfoLabel.text = (_("The remote server uses its own model.") if remote else
                                       choice.info if choice is not None else "")

    # ------------------------------------------------------------------ downloads
    def on_download(self) -> None:
        """The Download button: start a download of the selected model, or cancel the running one."""
        if self.download is not None:
            self.download.cancel()
            self._finish(_("Download cancelled."))
            return
        choice = self.current()
        if choice is None or not choice.downloadable:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the download."), waitCursor=True):
            dependencies.ensure_dependencies("local")  # huggingface_hub and the converter's packages
            self.download = DownloadFlow(choice.name, launcher())
            self.ui.downloadModelButton.text = _("Cancel download")
            self.ui.downloadProgressBar.visible = True
            self.ui.downloadProgressBar.setRange(0, 0)
            self._on_state()
            self._timer.start()

    def stop(self) -> None:
        """The panel goes away: end a running download."""
        self._timer.stop()
        if self.download is not None:
            self.download.cancel()
            self.download = None

    def _poll(self) -> None:
        flow = self.download
        if flow is None:
            self._timer.stop()
            return
        event = flow.step()
        bar = self.ui.downloadProgressBar
        if event.kind == "working":
            if event.fraction is None:
                bar.setRange(0, 0)
            else:
                bar.setRange(0, 1000)
                bar.setValue(int(event.fraction * 1000))
            self.ui.modelInfoLabel.text = event.text
        elif event.kind == "confirm":
            self._timer.stop()  # no ticks while the question is open
            flow.consent(slicer.util.confirmOkCancelDisplay(event.text, windowTitle=_("Download a model")))
            if flow.active:
                self._timer.start()
            else:
                self._finish(_("Nothing was downloaded."))
        elif event.kind == "done":
            self._finish(event.text, select=flow.name)
        elif event.kind == "error":
            self._finish(_("Download failed."))
            slicer.util.errorDisplay(event.text, windowTitle=_("MedDiffusion"))
        else:
            self._finish(event.text)

    def _finish(self, text: str, select: str = "") -> None:
        self._timer.stop()
        self.download = None
        self.ui.downloadModelButton.text = _("Download")
        self.ui.downloadProgressBar.visible = False
        self.fill()
        node = self._parameter_node()
        if select and node is not None:
            qt.QSettings().setValue(LAST_MODEL_SETTING, select)
            node.update(use_demo_model=False, model_name=select)
        self._on_finished(text)
