"""Reusable test helpers (synthetic DICOM files ...)."""
