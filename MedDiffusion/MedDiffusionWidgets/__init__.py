"""Qt parts of the MedDiffusion panel that are cohesive enough to live outside MedDiffusion.py (which keeps the
module, the widget that wires the panel together, and the self-test): the model list and downloads
(model_chooser), the model-dependent lists (choice_lists) and the running job (job_runner). They need Slicer's
Qt; the Qt-free logic is in MedDiffusionLogic."""
from __future__ import annotations

try:
    from slicer.i18n import tr
except ImportError:  # Slicer < 5.4
    def tr(text: str) -> str:
        """The text untranslated (Slicer before 5.4 has no translations)."""
        return text

__all__ = ["tr"]
