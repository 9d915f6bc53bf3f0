"""Run a model on inputs from files or seeded random data: onnxruntime (packed models through
onnxsparse's runtime) or the integer reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxsparse.errors import UsageError
from onnxsparse.model import onnxruntime_session

RUNTIMES = ("ort", "reference")


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    """Static dims as they are; symbolic or unknown dims (the batch) as 1."""
    return [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1
            for dim in value.type.tensor_type.shape.dim]


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float inputs (uniform integers for integer inputs) at batch 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in _graph_inputs(model):
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = _shape(value)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            feeds[value.name] = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    return feeds


def load_inputs(model: onnx.ModelProto, path: str | Path) -> dict[str, np.ndarray]:
    """Inputs from an .npy (single-input models) or an .npz keyed by input name."""
    path = Path(path)
    names = [value.name for value in _graph_inputs(model)]
    try:
        if path.suffix == ".npy":
            if len(names) != 1:
                raise UsageError(f"{path}: the model has {len(names)} inputs ({', '.join(names)}); give an .npz "
                                 "keyed by input name")
            return {names[0]: np.load(path)}
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read inputs ({exc})") from exc
    missing = [name for name in names if name not in arrays]
    if missing:
        raise UsageError(f"{path}: no array for input(s) {', '.join(missing)}; it has {', '.join(arrays)}")
    return {name: arrays[name] for name in names}


def runtime_session(model: onnx.ModelProto, threads: int = 2):
    """onnxsparse's runtime session (native sparse kernels in onnxruntime) on an in-memory model."""
    import onnxruntime as ort

    from onnxsparse.runtime import InferenceSession

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    return InferenceSession(model, options, threads=threads)


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runtime: str = "ort") -> dict[str, np.ndarray]:
    """Outputs by name, in graph order."""
    names = [out.name for out in model.graph.output]
    packed = any(node.domain == "ai.onnxsparse" for node in model.graph.node)
    if runtime == "ort":
        session = runtime_session(model, threads=2) if packed else onnxruntime_session(model, threads=2)
        try:
            values = session.run(names, feeds)
        except Exception as exc:  # onnxruntime's own message names the input and what it expected
            raise UsageError(f"onnxruntime rejected the inputs: {str(exc).splitlines()[-1]}") from exc
    elif runtime == "reference":
        from onnxsparse.formats.pack import unpack_model
        from onnxsparse.quant.lower import lower_to_integer
        from onnxsparse.quant.reference import ReferenceExecutor

        plain = unpack_model(model) if packed else model
        if any(node.op_type == "QuantizeLinear" for node in plain.graph.node):
            plain = lower_to_integer(plain)  # a QDQ model runs as the integer model it describes
        values = ReferenceExecutor(plain).run(feeds)
    else:
        raise UsageError(f"unknown runtime {runtime!r}; use one of: {', '.join(RUNTIMES)}")
    return dict(zip(names, values))
