"""Errors meant for users: one line saying what was wrong, where, and what to do.

The CLI catches these once and maps them to exit statuses; anything else is a bug and shows a
traceback only with --debug.
"""


class OnnxSparseError(Exception):
    """A failure the user can act on (bad model file, corrupt data). Exit status 1."""

    exit_code = 1


class UsageError(OnnxSparseError):
    """The request itself is wrong (unknown pattern, bad option value, clashing paths). Exit status 2."""

    exit_code = 2
