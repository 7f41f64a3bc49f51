"""Qt parts of the MedDiffusion panel that are cohesive enough to live outside MedDiffusion.py (which keeps the
module, the widget that wires the panel together, and the self-test). They need Slicer's Qt; the Qt-free logic is
in MedDiffusionLogic."""
