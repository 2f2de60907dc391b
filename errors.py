"""Errors a user can fix. The CLI prints them as one line and exits non-zero instead of showing a traceback."""


class VlmcError(Exception):
    """Bad input, a bad config or a bad artifact: the message says what and where."""
