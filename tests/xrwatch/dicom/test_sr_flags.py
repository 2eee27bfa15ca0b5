"""DX *for processing* (raw detector data) is out-of-scope evidence for the flag."""

from __future__ import annotations

from types import SimpleNamespace

from xrwatch.flags import OUT_OF_SCOPE, decide, header_evidence


def test_dx_for_processing_is_flagged_out_of_scope() -> None:
    raw = SimpleNamespace(modality="DX", presentation_intent="FOR PROCESSING")
    assert header_evidence(raw) == [
        "DICOM Presentation Intent Type FOR PROCESSING (FOR PRESENTATION expected)"
    ]
    assert decide(0.99, image_meta=raw)[0] == OUT_OF_SCOPE
    shown = SimpleNamespace(modality="DX", presentation_intent="FOR PRESENTATION")
    assert header_evidence(shown) == [] and decide(0.99, image_meta=shown) == ("", "")
