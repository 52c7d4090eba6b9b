"""The ``flexmerge`` console script: signal handlers first, then the (heavy) command imports.

Importing the command loads torch, which takes seconds; a Ctrl-C or SIGTERM in that time must
give the same one line and exit code as one during the command (130, 143), not a traceback.
An exception raised inside a library's import can be swallowed by that library and leave it half
initialised, so during the imports a signal ends the process at once (nothing has been written
yet); :func:`flexmerge.cli.main` then installs handlers that unwind through every ``finally``.
"""

from __future__ import annotations

import os
import signal
import sys


def _exit_now(signum, frame):
    what = "interrupted" if signum == signal.SIGINT else f"terminated by signal {signum}"
    os.write(2, f"error: {what}; nothing was written\n".encode())
    os._exit(128 + signum)


def run() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_now)
    from .cli import main

    sys.exit(main())
