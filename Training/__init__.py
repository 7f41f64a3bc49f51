"""Headless training for every stage of 3D MedDiffusion (entry point: ``python Training/train.py``)."""
