"""Loading and saving models, and onnxruntime sessions built from bytes (no files written)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from google.protobuf.message import DecodeError

from onnxq.errors import OnnxqError, first_line, runtime_detail
from onnxq.hollow import add_float_outputs, float_weight_bytes, weights_on_disk

_PROTO_LIMIT = 2**31 - 2**20  # protobuf's 2 GB ceiling, with room for the graph itself


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file, external data included; a clear error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise OnnxqError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except onnx.checker.ValidationError as err:  # an external-data file missing or outside the folder
        raise OnnxqError(f"cannot read the weights of {path}: {first_line(err)}") from None
    except (DecodeError, ValueError, RuntimeError) as err:
        raise OnnxqError(f"{path} is not a readable ONNX model ({first_line(err)})") from None
    except OSError as err:
        raise OnnxqError(f"cannot read {path}: {first_line(err)}") from None
    if not model.graph.node:
        raise OnnxqError(f"{path} is not an ONNX model (no graph nodes)")
    return model


def to_ir(model: onnx.ModelProto) -> ir.Model:
    """The in-memory IR the passes work on."""
    return ir.from_proto(model)


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """A ModelProto, whichever form the model is in."""
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


def oldest_ir_version(model: onnx.ModelProto) -> int:
    """The oldest IR version that allows the model's opsets: onnxruntime rejects newer ones."""
    return onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)


def model_bytes(model: ir.Model | onnx.ModelProto, outputs: Sequence[str] = ()) -> bytes:
    """Serialized model for an onnxruntime session (sessions of models below FILE_SESSION_BYTES
    of float weights are built from bytes, so nothing hits disk).

    `outputs`: float tensors the serialized model also returns. They are added to the model only
    while it is serialized: a copy of the model with them would copy its weights too (on a
    226 MB Keypoint R-CNN, each check session's copy lifted the peak by as much)."""
    proto = to_proto(model)
    added = add_float_outputs(proto, outputs)
    try:
        return proto.SerializeToString()
    finally:
        if added:
            del proto.graph.output[-added:]


def check_writable(path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Refuse an output path before any work is done: a missing or read-only folder, a folder
    in place of the file, or the input model itself."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxqError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise OnnxqError(f"cannot write {path}: it is a folder")
    if not writable(folder):
        raise OnnxqError(f"cannot write {path}: folder {folder} is not writable")
    if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
        raise OnnxqError(f"the output {path} is the input model; choose another output path")
    return path


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def save_model(model: ir.Model | onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file in the target folder, renamed when complete.

    The file gets the permissions a new file gets under the umask (or keeps those of the file
    it replaces); mkstemp alone would leave it readable by its owner only. An interrupt or
    SIGTERM (the CLI turns it into an exception) removes the temporary file.
    Models past protobuf's 2 GB limit keep their weights in `<name>.data` beside the file.
    """
    path = check_writable(path)
    proto = to_proto(model)
    external = _weight_bytes(proto) > _PROTO_LIMIT
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        if external:
            onnx.save(
                proto,
                tmp_name,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{path.name}.data",
            )
        else:
            Path(tmp_name).write_bytes(proto.SerializeToString())
        os.chmod(tmp_name, _file_mode(path))
        os.replace(tmp_name, path)
    except OSError as err:
        raise OnnxqError(f"cannot write {path}: {first_line(err)}") from None
    finally:
        if tmp_name and os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def _file_mode(path: Path) -> int:
    """The replaced file's mode, or 0o666 less the umask, as open() would create it."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def session(
    model: ir.Model | onnx.ModelProto | bytes,
    *,
    outputs: Sequence[str] = (),
    optimize: bool = True,
    threads: int = 0,
    optimized_path: str | None = None,
    arena: bool = True,
    spin: bool = False,
) -> ort.InferenceSession:
    """A CPU session. optimize=False is the float-exact reference (no fusions, no int8 kernels).
    `outputs`: float tensors it returns besides the model's outputs (model_bytes).
    A model with FILE_SESSION_BYTES of float weights or more is given to onnxruntime as a file
    with its weights in an external-data file, which onnxruntime maps instead of copying twice.

    arena=False returns memory after each run: calibration holds a hundred small sessions, and
    each arena would otherwise keep its largest batch's tensors for good.
    spin=True keeps onnxruntime's busy-waiting worker threads, as a deployment gets them: for
    latency. Elsewhere they are off, since the threads spin on after each run and take the
    cores from the numpy work between runs and from the next session (on 2 cores, comparing a
    yolox output after a run took 29 ms with spinning threads and 0.9 ms without).
    """
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = arena
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # fatal only: onnxruntime logs a failed run as an error line of its own before raising, and
    # onnxq turns the exception into its one-line error (or handles it)
    options.log_severity_level = 4
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if isinstance(model, bytes):
        return _inference_session(model, options)
    proto = to_proto(model)
    if float_weight_bytes(proto) < FILE_SESSION_BYTES:
        return _inference_session(model_bytes(proto, outputs), options)
    try:
        with weights_on_disk(proto, outputs) as path:
            return _inference_session(path, options)
    except OSError:  # no room or no permission for the temporary files
        return _inference_session(model_bytes(proto, outputs), options)


FILE_SESSION_BYTES = 32 << 20  # float weights from which sessions read them from a file (onnxq.hollow)


def _inference_session(source: bytes | str, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises several private exception types
        raise OnnxqError(f"onnxruntime cannot run the model: {first_line(err)}") from None


def run(
    runner: ort.InferenceSession, feed: dict[str, np.ndarray], outputs: list[str] | None = None
) -> list[np.ndarray]:
    """session.run, with onnxruntime's errors (a shape the model refuses) as one line."""
    try:
        return runner.run(outputs, feed)
    except Exception as err:  # onnxruntime raises several private exception types
        raise OnnxqError(f"onnxruntime cannot run the model on this data: {runtime_detail(err)}") from None


def _weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)
