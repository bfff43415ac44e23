"""The one error type a user can cause: the CLI prints its message as one sentence and exits 1."""


class UsageError(ValueError):
    """Bad input, a missing file, a refused checkpoint: anything the user can fix."""
