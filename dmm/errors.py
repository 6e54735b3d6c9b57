"""The one exception type that reaches a user as a plain message."""


class DmmError(Exception):
    """A problem with the user's input or files; the message says what to do about it.

    The CLI prints it as one line on stderr and exits with status 2, without a traceback.
    """
