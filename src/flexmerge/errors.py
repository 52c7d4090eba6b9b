"""The one exception type users see: a one-line message naming the thing and the fix.

The CLI turns every :class:`FlexMergeError` into ``error: <message>`` on stderr and exit code 2,
without a traceback. Library callers can catch it (it is a ``ValueError``).
"""


class FlexMergeError(ValueError):
    """Bad input or an impossible request; the message says what and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM or SIGHUP, so that every
    ``finally`` (temporary outputs) runs before the exit code 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
