"""Reproduction of the study's six experiments (needs the ``train`` extra: torch, torchvision).

Modules that need torch import it at module level; the torch-free parts (dataset indexing,
labels, splits, experiment presets) must stay importable without torch so that
``xrwatch dataset`` and ``xrwatch synth`` work on a serving-only install.
"""
