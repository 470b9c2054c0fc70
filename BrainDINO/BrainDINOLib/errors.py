"""The one exception type for problems a user can fix (bad file, bad option, bad bundle)."""


class BrainDINOError(ValueError):
    """Raised with a one-line message that names the file or option and the problem.

    The command line prints the message alone (no traceback) and exits non-zero.
    """
