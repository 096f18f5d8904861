"""The one exception type users see: a one-line message naming the problem."""


class OnnxqError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def float_model_overflows(output: str) -> OnnxqError:
    """The float model's own outputs are infinite or NaN on the calibration data: nothing to
    quantize towards, and no fault of onnxq's."""
    return OnnxqError(
        f"the float model itself produces infinite or NaN values at output {output!r} on the "
        "calibration data (its activations overflow float32): check the inputs' scale and preprocessing"
    )


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name where it has none): what a one-line
    OnnxqError quotes of a library's error."""
    return _message_lines(err)[0]


def runtime_detail(err: BaseException, lines: int = 4) -> str:
    """onnxruntime's message on one line: its first line and the detail lines under it (which
    index of which input has which size), without its closing advice to fix the inputs."""
    first, *rest = _message_lines(err)
    detail = [line.strip() for line in rest if line.strip() and not line.strip().startswith("Please fix")]
    return "; ".join([first.strip(), *detail[: lines - 1]])


def _message_lines(err: BaseException) -> list[str]:
    return (str(err).strip() or type(err).__name__).splitlines()
