"""Pipelines: bundle networks + samplers + physics into generation and reconstruction on real volumes."""

