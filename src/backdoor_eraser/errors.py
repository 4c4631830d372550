"""The one exception type that the CLI turns into a single error line."""


class UserError(Exception):
    """A problem with the user's input (paths, names, values, files).

    The CLI prints ``error: <message>`` and exits with status 2 instead of a
    traceback; library callers can catch it like any exception.
    """


class NonFiniteModel(UserError):
    """A model whose weights or outputs hold NaN or infinity: any metric of it would be meaningless."""
