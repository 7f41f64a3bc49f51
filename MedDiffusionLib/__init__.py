"""MedDiffusionLib: 3D MedDiffusion models, samplers, physics, pipelines, server and CLI (no Slicer imports)."""

__version__ = "0.1.0"
