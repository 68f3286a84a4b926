"""Errors a user can act on. Their messages are one line naming the cause and the fix, so the
workflow's scripts print them as such; any other exception keeps its traceback in the log."""

import errno


class ScnbviError(Exception):
    """Base of the errors whose message alone tells the user what to do."""


class InputError(ScnbviError, ValueError):
    """Bad user input: the message names the file, the field and the fix, on one line."""

    def __init__(self, source, field, problem, fix):
        self.source, self.field, self.problem, self.fix = str(source), field, problem, fix
        super().__init__(f"{source}: {field}: {problem}; fix: {fix}")


class DivergenceError(ScnbviError, FloatingPointError):
    """The fit's loss stopped being finite."""


class InsufficientMemoryError(ScnbviError, MemoryError):
    """A fit was refused before it started because its memory estimate exceeds what is available."""


class BackendUnavailableError(ScnbviError, RuntimeError):
    """The configured compute backend cannot run on this machine (missing compiler or package)."""


class DiskFullError(ScnbviError, OSError):
    """A result could not be written because its disk is full; the partial file is already removed."""

    def __init__(self, message):
        super().__init__(message)
        self.errno = errno.ENOSPC
