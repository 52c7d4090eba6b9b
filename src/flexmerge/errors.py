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


def first_validation_error(exc) -> str:
    """One line from a pydantic ``ValidationError`` of a file's schema (a bundle manifest, a plan):
    the first failing field, what is wrong with it and the value given, and how many more failed."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "missing"
    elif err["type"] == "extra_forbidden":
        msg = "is not a field of this format"
    elif err["type"] != "value_error":
        got = repr(err.get("input"))
        msg = f"{msg} (got {got[:60]}{'...' if len(got) > 60 else ''})"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return (f"'{loc}': " if loc else "") + msg + more
