"""User-facing errors. The CLI prints `error: <message>` on one line and exits with code 2."""


class MovaInputError(Exception):
    """Bad input from the user (arguments, files, checkpoints). The message names the problem and
    the fix, in one line."""
