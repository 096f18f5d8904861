"""The one exception type users see: a one-line message naming the problem."""


class OnnxqError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name where it has none): what a one-line
    OnnxqError quotes of a library's error."""
    return (str(err).strip() or type(err).__name__).splitlines()[0]
