"""What a region boundary costs: an identity Python operator in onnxruntime, per tensor size,
with onnxruntime-extensions' stock invocation hook and with onnxsparse's array hook.

    .venv/bin/python benchmarks/hosting_overhead.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime_extensions import PyCustomOpDef, onnx_op

from onnxsparse.runtime import hosting

CASES = [("3.2 MB in, 3.2 MB out (1x256x56x56)", (1, 256, 56, 56), "same"),
         ("600 KB in, 600 KB out (1x3x224x224)", (1, 3, 224, 224), "same"),
         ("600 KB in, 4 KB out", (1, 3, 224, 224), "small"),
         ("8 KB in, 8 KB out (1x2048)", (1, 2048), "same")]


@onnx_op(op_type="OnnxsparseBoundaryProbe", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float],
         attrs={"mode": PyCustomOpDef.dt_string})
def probe(x, mode):
    return x if mode == "same" else np.zeros((1, 1000), np.float32)


def session(shape, mode):
    node = helper.make_node("OnnxsparseBoundaryProbe", ["x"], ["y"], domain=hosting.DOMAIN, mode=mode)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(hosting.DOMAIN, 1)], ir_version=8)
    options = ort.SessionOptions()
    options.register_custom_ops_library(hosting.library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(run, rounds: int = 20) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    sessions = [(label, session(shape, mode), np.random.default_rng(0).standard_normal(shape).astype(np.float32))
                for label, shape, mode in CASES]
    stock = {label: median_ms(lambda s=s, x=x: s.run(None, {"x": x})) for label, s, x in sessions}
    hosting.operator_type([np.float32], [np.float32])  # installs onnxsparse's hook
    ours = {label: median_ms(lambda s=s, x=x: s.run(None, {"x": x})) for label, s, x in sessions}
    print(f"{'crossing':40} {'stock hook ms':>14} {'onnxsparse hook ms':>19}")
    for label, *_ in sessions:
        print(f"{label:40} {stock[label]:>14.3f} {ours[label]:>19.3f}")


if __name__ == "__main__":
    main()
