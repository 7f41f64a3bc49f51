"""Run the module's real panel code (MedDiffusion/MedDiffusion.py, MedDiffusionWidgets/) headlessly.

Slicer's application cannot run here, but its MRML can (PyPI slicer-core): this harness puts a stand-in for the
Qt layer under the widget -- `qt`, `ctk`, `slicer.ScriptedLoadableModule`, `slicer.util.loadUI` /
`childWidgetVariables` and the message boxes -- and keeps the real `slicer` package, scene and VTK observers.
The stand-in widgets are created from the real .ui file: each name and class there becomes one widget with the
PythonQt-style properties the panel uses (``combo.currentIndex = 2``, ``button.enabled``), so a widget name that
the .ui file lacks, or a property its class does not have, fails as it would in Slicer. Signals are recorded by
``connect`` and fired by the test (`emit`) or by the property setters (a changed ``currentIndex`` emits
``currentIndexChanged(int)``, like Qt).

    harness = WidgetHarness(scene)          # installs the stand-ins, imports MedDiffusion.py, runs setup()
    harness.ui.taskComboBox.currentIndex = 1
    harness.click(harness.ui.generateButton)
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MedDiffusion"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedDiffusion.ui"


class FakeWidget:
    """One widget of the .ui file: the properties the panel sets and reads, and recorded signal connections."""

    _PROPERTIES = {"enabled": True, "visible": True, "toolTip": "", "text": "", "checked": False, "collapsed": True,
                   "placeholderText": "", "value": 0, "currentPath": ""}

    def __init__(self, name: str, cls: str, items: Optional[list[str]] = None) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_slots", {})
        object.__setattr__(self, "_props", dict(self._PROPERTIES))
        object.__setattr__(self, "_items", [(text, None) for text in (items or [])])
        object.__setattr__(self, "_index", 0 if items else -1)
        object.__setattr__(self, "_range", (0, 100))
        object.__setattr__(self, "_node", None)
        object.__setattr__(self, "blocked", False)

    def __repr__(self) -> str:
        return f"<{self._cls} {self._name}>"

    # ---- properties (PythonQt exposes Qt properties as attributes) ---------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name == "currentIndex" and self._is_combo:
            return self._index
        if name == "currentText" and self._is_combo:
            return self._items[self._index][0] if 0 <= self._index < len(self._items) else ""
        if name == "count" and self._is_combo:
            return len(self._items)
        if name in self._props:
            return self._props[name]
        raise AttributeError(f"{self._cls} '{self._name}' has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "blocked":
            object.__setattr__(self, name, value)
        elif name == "currentIndex" and self._is_combo:
            self._set_index(int(value))
        elif name in self._props:
            old = self._props[name]
            self._props[name] = value
            if old != value and name == "checked":
                self.emit("toggled(bool)", value)
            elif old != value and name == "value":
                self.emit("valueChanged(int)", value)
            elif old != value and name == "currentPath":
                self.emit("currentPathChanged(QString)", value)
        else:
            raise AttributeError(f"{self._cls} '{self._name}' has no property {name!r}")

    @property
    def _is_combo(self) -> bool:
        return self._cls == "QComboBox"

    # ---- signals -----------------------------------------------------------------------------------------
    def connect(self, signal: str, slot: Callable[..., Any]) -> None:
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str, *args: Any) -> None:
        if self.blocked:
            return
        for slot in list(self._slots.get(signal, [])):
            slot(*args[:_accepted_args(slot, len(args))])

    def blockSignals(self, block: bool) -> bool:  # noqa: N802 - Qt's name
        was = self.blocked
        self.blocked = bool(block)
        return was

    # ---- QComboBox -----------------------------------------------------------------------------------------
    def _set_index(self, index: int) -> None:
        if index != self._index:
            object.__setattr__(self, "_index", index)
            self.emit("currentIndexChanged(int)", index)

    def addItem(self, text: str, data: Any = None) -> None:  # noqa: N802
        self._items.append((text, data))
        if self._index < 0:
            self._set_index(0)

    def insertItem(self, index: int, text: str, data: Any = None) -> None:  # noqa: N802
        self._items.insert(index, (text, data))
        if self._index >= index:
            object.__setattr__(self, "_index", self._index + 1)

    def clear(self) -> None:
        self._items.clear()
        self._set_index(-1)

    def itemData(self, index: int) -> Any:  # noqa: N802
        return self._items[index][1] if 0 <= index < len(self._items) else None

    def itemText(self, index: int) -> str:  # noqa: N802
        return self._items[index][0] if 0 <= index < len(self._items) else ""

    def findData(self, data: Any) -> int:  # noqa: N802
        return next((i for i, (_t, d) in enumerate(self._items) if d == data), -1)

    # ---- QProgressBar, node selector, ui root --------------------------------------------------------------
    def setRange(self, low: int, high: int) -> None:  # noqa: N802
        object.__setattr__(self, "_range", (low, high))

    def setValue(self, value: int) -> None:  # noqa: N802
        self._props["value"] = value

    def setCurrentNode(self, node: Any) -> None:  # noqa: N802
        if node is not self._node:
            object.__setattr__(self, "_node", node)
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def currentNode(self) -> Any:  # noqa: N802
        return self._node

    def setMRMLScene(self, scene: Any) -> None:  # noqa: N802
        pass

    def addWidget(self, widget: Any) -> None:  # noqa: N802
        pass

    def click(self) -> None:
        self.emit("clicked(bool)", False)


def _accepted_args(slot: Callable[..., Any], given: int) -> int:
    """How many of a signal's arguments PythonQt passes to ``slot``: as many as it takes (clicked(bool) reaches a
    slot without parameters with none)."""
    params = inspect.signature(slot).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return given
    return min(given, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params))


def ui_widgets() -> dict[str, FakeWidget]:
    """One FakeWidget per named widget of the .ui file, combo boxes with the .ui's items."""
    widgets = {}
    for w in ET.parse(UI_FILE).getroot().iter("widget"):
        name, cls = w.get("name"), w.get("class")
        if not name or not cls:
            continue
        items = [i.findtext("property/string") or "" for i in w.findall("item")] if cls == "QComboBox" else None
        widgets[name] = FakeWidget(name, cls, items)
    return widgets


class _Timer:
    """qt.QTimer: the test calls the panel's timer slots itself; `active` tells whether the panel started it."""

    def __init__(self) -> None:
        self.active = False
        self.slots: list[Callable[[], None]] = []

    def setInterval(self, ms: int) -> None:  # noqa: N802
        pass

    def connect(self, signal: str, slot: Callable[[], None]) -> None:
        self.slots.append(slot)

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class _Settings:
    store: dict[str, Any] = {}

    def value(self, key: str, default: Any = None) -> Any:
        return self.store.get(key, default)

    def setValue(self, key: str, value: Any) -> None:  # noqa: N802
        self.store[key] = value


class WidgetHarness:
    """The panel (MedDiffusionWidget) set up on ``scene`` with stand-in Qt; messages shown are recorded."""

    def __init__(self, scene: Any) -> None:
        import slicer
        import slicer.util

        self.scene = scene
        self.errors: list[str] = []      # errorDisplay texts and exceptions tryWithErrorDisplay caught
        self.widgets = ui_widgets()
        self._saved: dict[str, Any] = {}
        self._patch(slicer, "mrmlScene", scene)
        self._patch(slicer, "app", types.SimpleNamespace(connect=lambda *a: None))
        self._patch(slicer.util, "loadUI", lambda path: FakeWidget("uiWidget", "QWidget"))
        self._patch(slicer.util, "childWidgetVariables", lambda w: types.SimpleNamespace(**self.widgets))
        self._patch(slicer.util, "errorDisplay", lambda text, **kw: self.errors.append(str(text)))
        self._patch(slicer.util, "infoDisplay", lambda text, **kw: None)
        self._patch(slicer.util, "confirmYesNoDisplay", lambda text, **kw: True)
        self._patch(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: True)
        self._patch(slicer.util, "tryWithErrorDisplay", self._try_with_error_display)
        self._patch(slicer.util, "setSliceViewerLayers", lambda **kw: None)
        self._install_modules(slicer)
        for path in (str(REPO), str(MODULE_DIR)):
            if path not in sys.path:
                sys.path.insert(0, path)
        sys.modules.pop("MedDiffusion", None)
        for name in [n for n in sys.modules if n.split(".")[0] == "MedDiffusionWidgets"]:
            sys.modules.pop(name)  # they import qt: again, with the stand-in
        self.module = importlib.import_module("MedDiffusion")
        parent = types.SimpleNamespace(isEntered=True)
        self.widget = self.module.MedDiffusionWidget(parent)
        self.widget.setup()
        self.ui = self.widget.ui

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._saved[f"{id(owner)}.{name}"] = (owner, name, getattr(owner, name, _MISSING))
        setattr(owner, name, value)

    def _install_modules(self, slicer: Any) -> None:
        qt = types.ModuleType("qt")
        qt.QTimer = _Timer
        qt.QSettings = _Settings
        qt.QDesktopServices = types.SimpleNamespace(openUrl=lambda url: None)
        qt.QUrl = types.SimpleNamespace(fromLocalFile=lambda path: path)
        ctk = types.ModuleType("ctk")
        slm = types.ModuleType("slicer.ScriptedLoadableModule")

        class ScriptedLoadableModule:
            def __init__(self, parent: Any) -> None:
                self.parent = parent

        class ScriptedLoadableModuleWidget:
            def __init__(self, parent: Any = None) -> None:
                self.parent = parent
                self.layout = FakeWidget("layout", "QVBoxLayout")

            def setup(self) -> None:
                pass

            def resourcePath(self, name: str) -> str:  # noqa: N802
                return str(MODULE_DIR / "Resources" / name)

            def onReload(self) -> None:  # noqa: N802
                pass

        class ScriptedLoadableModuleTest:
            pass

        slm.ScriptedLoadableModule = ScriptedLoadableModule
        slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
        slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
        for name, module in (("qt", qt), ("ctk", ctk), ("slicer.ScriptedLoadableModule", slm)):
            self._saved[f"sys.modules.{name}"] = (sys.modules, name, sys.modules.get(name, _MISSING))
            sys.modules[name] = module
        self._patch(slicer, "ScriptedLoadableModule", slm)

    @contextlib.contextmanager
    def _try_with_error_display(self, message: str = "", show: bool = True, waitCursor: bool = False  # noqa: N803
                                ) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # Slicer shows the message and the exception, and carries on
            self.errors.append(f"{message} {exc}")

    # ---- driving -------------------------------------------------------------------------------------------
    def run_job(self, timeout_s: float = 300) -> None:
        """Tick the panel's job timer until the panel stops it (the job ended and its result was collected)."""
        import time

        timer = self.widget._jobs.timer
        deadline = time.monotonic() + timeout_s
        while timer.active:
            assert time.monotonic() < deadline, f"the job did not end: {self.ui.statusLabel.text}"
            for slot in timer.slots:
                slot()
            time.sleep(0.02)

    def close(self) -> None:
        """cleanup() the panel (stops its local server) and remove the stand-ins."""
        try:
            self.widget.cleanup()
        finally:
            for owner, name, value in reversed(list(self._saved.values())):
                if owner is sys.modules:
                    if value is _MISSING:
                        sys.modules.pop(name, None)
                    else:
                        sys.modules[name] = value
                elif value is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)


_MISSING = object()
