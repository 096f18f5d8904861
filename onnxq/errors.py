"""The one exception type users see: a one-line message naming the problem."""


class OnnxqError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name where it has none): what a one-line
    OnnxqError quotes of a library's error."""
    return (str(err).strip() or type(err).__name__).splitlines()[0]


def runtime_detail(err: BaseException, lines: int = 4) -> str:
    """onnxruntime's message on one line: its first line and the detail lines under it (which
    index of which input has which size), without its closing advice to fix the inputs."""
    text = (str(err).strip() or type(err).__name__).splitlines()
    detail = [line.strip() for line in text[1:] if line.strip() and not line.strip().startswith("Please fix")]
    return "; ".join([text[0].strip(), *detail[: lines - 1]])
