"""MCBBS speed-up on the modelled systolic array, VGG-19 and ResNet-50, next to the FPL 2021 paper.

    .venv/bin/python benchmarks/systolic_mcbbs.py [--models vgg19,resnet50] [--json OUT.json]

The paper's flow: prune mcbbs:c2r4 (first conv dense, layers whose in and out channel counts
differ capped at 50%: --cap-mismatched 0.5), quantize with power-of-two scales (--fixed-point;
calibrated on 2 seeded random inputs: zoo models have random weights), then compare the sparse
PE with the same array's dense build (every cluster processed). Arrays: the FPL design's 24×7
output-stationary array of 16-MAC PEs (mcbbs:c2r4p8: one 2-channel cluster from each of 8 ranges
per cycle), and a 32×32 weight-stationary one. One batch-1 run with output values per case. The
paper reports 2.86× (VGG-16) and 1.75× (ResNet-50) on CONV+FC over its dense build.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import onnxsparse
from onnxsparse.quant.quantize import QuantizeOptions, quantize_model
from onnxsparse.systolic.array import array_config
from onnxsparse.systolic.executor import SystolicExecutor
from onnxsparse.zoo import zoo_model_path

SPARSITIES = (0.25, 0.5, 0.75)
ARRAYS = (("24x7", "os"), ("32x32", "ws"))
PE = "mcbbs:c2r4p8"
PAPER = {"vgg19": ("VGG-16", 2.86), "resnet50": ("ResNet-50", 1.75)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg19,resnet50")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        model = onnxsparse.load_model(zoo_model_path(name))
        input_name = model.graph.input[0].name
        rng = np.random.default_rng(0)
        calibration = [{input_name: rng.standard_normal((3, 224, 224)).astype(np.float32)} for _ in range(2)]
        feeds = {input_name: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
        for sparsity in SPARSITIES:
            pruned = onnxsparse.prune_model(model, "mcbbs:c2r4", sparsity, cap_mismatched=0.5)
            quantized = quantize_model(pruned.model, calibration, QuantizeOptions(fixed_point=True)).model
            for array, dataflow in ARRAYS:
                started = time.perf_counter()
                report = SystolicExecutor(quantized, array_config(array, dataflow, PE), name).run(feeds)
                macs = [layer for layer in report.layers if layer.kind == "mac"]
                dense = sum(layer.dense_cycles for layer in macs)
                sparse = sum(layer.compute_cycles for layer in macs)
                per_layer = [round(layer.dense_cycles / max(layer.compute_cycles, 1), 3) for layer in macs]
                row = {"model": name, "sparsity": sparsity, "weight_sparsity": round(pruned.sparsity, 4),
                       "array": array, "dataflow": dataflow, "pe": PE, "dense_cycles": dense, "mcbbs_cycles": sparse,
                       "speedup": round(dense / sparse, 3),
                       "with_stalls": round(sum(layer.dense_cycles + layer.stall_cycles for layer in macs) /
                                            sum(layer.total_cycles for layer in macs), 3),
                       "sparse_layers": sum(layer.sparse for layer in macs), "mac_layers": len(macs),
                       "per_layer_speedup": per_layer, "seconds": round(time.perf_counter() - started, 1)}
                rows.append(row)
                print(f"{name:9s} s={sparsity:.2f} (weights {100 * pruned.sparsity:.1f}%) {array:5s} {dataflow}: "
                      f"{row['speedup']:.2f}x CONV+FC ({row['sparse_layers']}/{row['mac_layers']} layers sparse; "
                      f"per layer {min(per_layer):.2f}-{max(per_layer):.2f}x; {row['with_stalls']:.2f}x with stalls), "
                      f"simulated in {row['seconds']} s", flush=True)
    print("\n| model | array | 25% | 50% | 75% | paper (its flow, gradual 25→50→75%) |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for array, dataflow in ARRAYS:
            cells = [f"{row['speedup']:.2f}×" for row in rows if row["model"] == name and row["array"] == array]
            paper_model, paper_speedup = PAPER.get(name, ("-", float("nan")))
            print(f"| {name} | {array} {dataflow} | " + " | ".join(cells) + f" | {paper_speedup}× ({paper_model}) |")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
