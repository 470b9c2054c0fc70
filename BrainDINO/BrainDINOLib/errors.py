"""The one exception type for problems a user can fix (bad file, bad option, bad bundle)."""


class BrainDINOError(ValueError):
    """Raised with a one-line message that names the file or option and the problem.

    The command line prints the message alone (no traceback) and exits non-zero.
    """


def describe(error: BaseException) -> str:
    """First line of a library's exception message (its type name when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines and lines[0] else type(error).__name__
