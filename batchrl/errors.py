"""The one exception type for a mistake of the user's (a busy run folder or port, a missing GPU):
the `batchrl` command reports it in one line. Any other RuntimeError is a bug and keeps its traceback."""


class UserError(RuntimeError):
    pass
