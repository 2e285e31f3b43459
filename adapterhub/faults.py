"""Named fault points for crash-consistency tests.

``fault_point("register.after-blob")`` does nothing unless the environment variable
``ADAPTERHUB_FAULT`` names that point (comma-separated names allowed); then the process kills
itself with SIGKILL right there, as a power cut or OOM kill would. Only the test suite sets it.
"""
from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    """Die with SIGKILL here if ``ADAPTERHUB_FAULT`` names this point."""
    spec = os.environ.get("ADAPTERHUB_FAULT")
    if spec and name in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
