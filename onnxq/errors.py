"""The one exception type users see: a one-line message naming the problem."""


class OnnxqError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
