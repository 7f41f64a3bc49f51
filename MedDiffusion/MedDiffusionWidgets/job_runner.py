"""The panel while a job runs: the timer that drives it, the progress bar and status line, and the button that
started it (which cancels it until it ends).

Each timer tick is one short step of the logic (`MedDiffusionLogic.poll`: a status request, or ~0.1 s of
transfer), so Slicer stays responsive; when the job has ended the result nodes are created on this (the main)
thread by `MedDiffusionLogic.finish`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import qt
import slicer

from MedDiffusionLib.progress import DONE, FAILED
from MedDiffusionLogic.logic import MedDiffusionLogic

from . import tr as _

__all__ = ["JobRunner", "POLL_INTERVAL_MS"]

# The timer drives jobs: each tick is one short step (a status request, or ~0.1 s of transfer).
POLL_INTERVAL_MS = 100


class JobRunner:
    """Drives the logic's job from a QTimer and mirrors it in ``ui`` (progress bar, status line, buttons).

    ``on_tick`` is called on every tick while the job runs (the server status may change), ``on_ended`` once
    it has ended and its nodes were created (the panel re-enables its controls)."""

    def __init__(self, ui: Any, logic: MedDiffusionLogic, on_tick: Callable[[], None],
                 on_ended: Callable[[], None]) -> None:
        self.ui = ui
        self.logic = logic
        self.button: Optional[Any] = None  # the button that started the running job
        self._on_tick = on_tick
        self._on_ended = on_ended
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.poll)

    def started(self, button: Any) -> None:
        """The logic has started a job from ``button``: it becomes the Cancel button; ticks begin."""
        self.button = button
        button.text = _("Cancel")
        self.ui.progressCollapsibleButton.collapsed = False
        self.ui.progressBar.setRange(0, 0)  # busy indicator until the first step is reported
        self.ui.statusLabel.text = _("Starting...")
        self.timer.start()

    def cancel(self) -> None:
        """Ask the job to stop; the button stays disabled until it has."""
        self.logic.cancel()
        self.ui.statusLabel.text = _("Cancelling...")
        if self.button is not None:
            self.button.enabled = False  # one click is enough; re-enabled when the job has stopped

    def stop(self) -> None:
        """The panel goes away: no more ticks."""
        self.timer.stop()

    def poll(self) -> None:
        """Every POLL_INTERVAL_MS on the GUI thread: one short job step; mirror progress; collect the result."""
        state = self.logic.poll()
        bar = self.ui.progressBar
        if state.running:
            if state.total > 0:
                bar.setRange(0, state.total)
                bar.setValue(state.step)
            else:
                bar.setRange(0, 0)
            self.ui.statusLabel.text = state.describe()
            self._on_tick()
            return
        self.timer.stop()
        nodes = self.logic.finish()
        bar.setRange(0, max(state.total, 1))
        bar.setValue(state.total if state.state == DONE else 0)
        text = state.describe()
        if nodes:
            text += " " + _("Created: {names}").format(names=", ".join(n.GetName() for n in nodes))
        self.ui.statusLabel.text = text
        self.ui.generateButton.text = _("Generate")
        self.ui.reconstructButton.text = _("Reconstruct")
        self.button = None
        self._on_ended()
        if state.state == FAILED:
            slicer.util.errorDisplay(state.error or "", windowTitle=_("MedDiffusion"))
