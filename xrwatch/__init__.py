"""xrwatch: chest X-ray classification, from the study's recipe to a folder-watching daemon.

The serving path (this package) never imports torch; ``training`` and ``export`` do.
"""

from __future__ import annotations

__version__ = "0.1.0"
