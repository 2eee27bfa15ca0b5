"""xrwatch: chest X-ray classification, from the study's recipe to a folder-watching daemon.

The serving path (this package) never imports torch; ``training`` and ``export`` do.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# ONNX Runtime (>= 1.29 on Linux) sends usage telemetry and keeps a device id and a
# database under $HOME/.cache/Microsoft; where $HOME is not writable (a service user) it
# prints a coloured warning on stderr at import, before logging can catch it, which breaks
# ``--log-format json``. Its documented switch (docs/Privacy.md in onnxruntime) must be set
# before it initialises, so it is set here, before anything in xrwatch imports it. An
# explicit ORT_DISABLE_TELEMETRY in the environment is left as it is.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
