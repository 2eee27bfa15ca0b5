"""Importing this module registers every command on :data:`xrwatch.cli._app.app`.

Each command module must import without torch; commands that need it import it lazily.
"""

from __future__ import annotations

from xrwatch.cli import (  # noqa: F401
    classify_cmd,
    demo_cmd,
    dicom_cmd,
    doctor_cmd,
    evaluate_cmd,
    export_cmd,
    inspect_cmd,
    serve_cmd,
    status_cmd,
    train_cmd,
)
