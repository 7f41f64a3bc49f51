"""The panel's combo boxes whose entries depend on the model or the task: what each offers and which is selected.

Each function refills one combo box from the parameters (the widget calls them while it mirrors the parameter node,
with its change signals ignored). Choices come from the library (methods: options.METHODS for the task) or the
selected model's anatomy list; a value from a saved scene that the current model lacks stays visible.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from MedDiffusionLogic.backends import AnatomyChoice
from MedDiffusionLogic.logic import suggest_anatomy
from MedDiffusionLogic.parameters import TASK_MODALITY, MedDiffusionParameters, format_size, methods_for_task

from . import tr as _

__all__ = ["fill_anatomies", "fill_sizes", "fill_methods", "fill_recon_anatomies"]


def _fill(combo: Any, entries: Sequence[tuple[str, Any]], current: int) -> None:
    combo.clear()
    for text, data in entries:
        combo.addItem(text, data)
    combo.currentIndex = current


def fill_anatomies(combo: Any, anatomies: Sequence[AnatomyChoice], p: MedDiffusionParameters) -> None:
    """Generate: the model's anatomies of the selected modality."""
    names = [a.name for a in anatomies if a.modality == p.modality]
    if p.anatomy and p.anatomy not in names:
        names.append(p.anatomy)  # keep a value from a saved scene visible even if this model lacks it
    _fill(combo, [(n, n) for n in names], names.index(p.anatomy) if p.anatomy in names else (0 if names else -1))


def fill_sizes(combo: Any, anatomies: Sequence[AnatomyChoice], p: MedDiffusionParameters) -> None:
    """Generate: 'Default', then the sizes the selected anatomy was trained at."""
    anatomy = next((a for a in anatomies if a.name == p.anatomy), None)
    sizes = [format_size(s) for s in anatomy.sizes_xyz] if anatomy else []
    if p.size and p.size not in sizes:
        sizes.append(p.size)
    _fill(combo, [(_("Default"), "")] + [(s, s) for s in sizes], sizes.index(p.size) + 1 if p.size in sizes else 0)


def fill_methods(combo: Any, p: MedDiffusionParameters) -> None:
    """Reconstruct: the library's methods that apply to the task (options.METHODS, in its order)."""
    methods = methods_for_task(p.task)
    _fill(combo, [(m, m) for m in methods], methods.index(p.method) if p.method in methods else 0)


def fill_recon_anatomies(combo: Any, anatomies: Sequence[AnatomyChoice], p: MedDiffusionParameters,
                         input_node: Optional[Any]) -> None:
    """Reconstruct: 'Suggested: <anatomy for the input volume>', then the task's anatomies."""
    names = [a.name for a in anatomies if a.modality == TASK_MODALITY[p.task]]
    suggested = suggest_anatomy(input_node.GetName() if input_node else "",
                                (input_node.GetAttribute("MedDiffusion.anatomy") or "") if input_node else "",
                                p.task, list(anatomies))
    first = _("Suggested: {name}").format(name=suggested) if suggested else _("Model default")
    _fill(combo, [(first, "")] + [(n, n) for n in names],
          names.index(p.recon_anatomy) + 1 if p.recon_anatomy in names else 0)
