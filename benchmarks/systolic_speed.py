"""How long the systolic executor takes on all of materialized ResNet-50 (batch 1, with values).

    .venv/bin/python benchmarks/systolic_speed.py [--array 32x32] [--dataflow ws] [--repeats 3]

Times SystolicExecutor.run (every layer's output values, bit-exact, and its costs) on a
quantized ResNet-50 (W8A8, calibrated on 2 seeded random inputs), and the construction once.
Acceptance (issue 6): under 60 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import onnxsparse
from onnxsparse.quant.quantize import quantize_model
from onnxsparse.systolic.array import array_config
from onnxsparse.systolic.executor import SystolicExecutor
from onnxsparse.zoo import zoo_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--array", default="32x32")
    parser.add_argument("--dataflow", default="ws")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = onnxsparse.load_model(zoo_model_path(args.model))
    input_name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    calibration = [{input_name: rng.standard_normal((3, 224, 224)).astype(np.float32)} for _ in range(2)]
    quantized = quantize_model(model, calibration).model
    feeds = {input_name: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
    started = time.perf_counter()
    executor = SystolicExecutor(quantized, array_config(args.array, args.dataflow), args.model)
    build = time.perf_counter() - started
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        report = executor.run(feeds)
        times.append(time.perf_counter() - started)
    totals = report.totals
    print(f"{args.model} on {args.array} {args.dataflow}: build {build:.1f} s, run median {statistics.median(times):.1f} s "
          f"(runs {', '.join(f'{t:.1f}' for t in times)}); {len(report.layers)} layers, "
          f"{totals.macs / 1e9:.2f} GMACs, {totals.compute_cycles} compute + {totals.stall_cycles} stall cycles")


if __name__ == "__main__":
    main()
