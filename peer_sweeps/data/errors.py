"""The one exception type of the data layer."""


class DataError(ValueError):
    """A user-facing data problem (unknown name, missing package, checksum mismatch, empty corpus).

    The message is one line that says what is wrong and, where there is one, what to do about it.
    """
