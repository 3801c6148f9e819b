"""The exception types for a mistake of the user's (a busy run folder or port, a missing GPU, a server
that does not answer): the `batchrl` command reports them in one line. Any other RuntimeError is a bug
and keeps its traceback."""


class UserError(RuntimeError):
    exit_code = 1


class Interrupted(UserError):
    """A run stopped by a signal after saving its work; the exit status is 128 + the signal number."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
