"""DICOM networking."""
