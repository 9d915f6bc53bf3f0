"""Packed models in onnxsparse's runtime against dense onnxruntime, side by side in one process.

    .venv/bin/python benchmarks/runtime_speed.py                 # ResNet-50: every case below
    .venv/bin/python benchmarks/runtime_speed.py --part resnet50 --cases 1x16:0.8
    .venv/bin/python benchmarks/runtime_speed.py --part zoo      # every zoo model, never slower?

Each case: the materialized model (seeded random weights) pruned to the pattern, packed with the
measured kernel choice (`pack --kernels auto`), then `onnxsparse.runtime.bench.bench`: the packed
model, onnxruntime fp32 on the dense model and onnxruntime int8 on a QDQ quantization of the
dense model, interleaved rounds, medians. The int8 cases quantize the pruned model, lower it to
integer form and pack that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import onnx

import onnxsparse
from onnxsparse.formats.pack import pack_model
from onnxsparse.quant.lower import lower_to_integer
from onnxsparse.quant.quantize import quantize
from onnxsparse.runner import random_inputs
from onnxsparse.runtime.bench import bench
from onnxsparse.runtime.costmodel import KernelChooser, ModelChoice, choose_for_model
from onnxsparse.zoo import ZOO_MODELS, zoo_model_path

RESNET_CASES = ["1x16:0.5", "1x16:0.75", "1x16:0.8", "1x16:0.9", "bank:16:0.75", "mcbbs:c2r4:0.75"]


def packed_auto(model: onnx.ModelProto, threads: int) -> ModelChoice:
    """What `onnxsparse pack` does by default: measured per layer, then settled on the whole model."""
    chooser = KernelChooser(model, threads)
    packed = pack_model(model, choose_kernel=lambda node: chooser.choose(node).record()).model
    return choose_for_model(packed, threads)


def calibration(model: onnx.ModelProto) -> list[dict]:
    return [{name: value[0] for name, value in random_inputs(model, seed).items()} for seed in range(4)]


def split_case(case: str) -> tuple[str, float]:
    pattern, _, sparsity = case.rpartition(":")
    return pattern, float(sparsity)


def run_case(dense: onnx.ModelProto, case: str, precision: str, batch: int, threads: int, rounds: int,
             int8_baseline: bool = True) -> dict:
    pattern, sparsity = split_case(case)
    pruned = onnxsparse.prune(dense, pattern, sparsity) if sparsity > 0 else dense
    if precision == "int8":
        pruned = lower_to_integer(quantize(pruned, calibration(dense), weight_bits=7))
    started = time.perf_counter()
    choice = packed_auto(pruned, threads)
    packed = choice.model
    pack_seconds = time.perf_counter() - started
    result = bench(packed, dense, threads=threads, batch=batch, rounds=rounds, int8_baseline=int8_baseline)
    times = {t.name: t.median_ms for t in result.timings}
    return {"case": case, "precision": precision, "batch": batch, "threads": threads,
            "packed_ms": times["packed"], "ort_fp32_ms": times["onnxruntime fp32"],
            "ort_int8_ms": times.get("onnxruntime int8"),
            "vs_fp32": result.ratio("onnxruntime fp32"), "vs_int8": result.ratio("onnxruntime int8"),
            "sparse_layers": result.sparse_layers, "dense_layers": result.dense_layers, "regions": result.regions,
            "max_output_difference": result.max_output_difference, "pack_seconds": pack_seconds,
            "variant": choice.chosen, "variant_ms": choice.times_ms}


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'model':12} {'case':16} {'prec':5} {'batch':>5} {'packed ms':>10} {'ORT fp32':>9} {'ORT int8':>9} "
          f"{'vs fp32':>8} {'vs int8':>8} {'sparse/dense layers':>20}  pack chose")
    for row in rows:
        print(f"{row.get('model', 'resnet50'):12} {row['case']:16} {row['precision']:5} {row['batch']:>5} "
              f"{row['packed_ms']:>10.2f} {row['ort_fp32_ms']:>9.2f} {row['ort_int8_ms'] or float('nan'):>9.2f} "
              f"{row['vs_fp32']:>7.2f}x {row['vs_int8'] or float('nan'):>7.2f}x "
              f"{row['sparse_layers']:>10}/{row['dense_layers']:<9}  {row.get('variant', '')}")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["resnet50", "zoo", "all"], default="resnet50")
    parser.add_argument("--cases", default=",".join(RESNET_CASES), help="pattern:sparsity list for ResNet-50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--zoo-sparsities", default="0.0,0.5,0.8,0.9")
    parser.add_argument("--zoo-models", default=",".join(ZOO_MODELS))
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rows: list[dict] = []
    if args.part in ("resnet50", "all"):
        dense = onnxsparse.load_model(zoo_model_path("resnet50"))
        resnet_rows = []
        for case in args.cases.split(","):
            for precision in ("fp32", "int8"):
                resnet_rows.append(run_case(dense, case, precision, 1, args.threads, args.rounds))
                print_rows("ResNet-50, batch 1", resnet_rows[-1:])
        for precision in ("fp32", "int8"):
            resnet_rows.append(run_case(dense, "1x16:0.8", precision, 8, args.threads, max(5, args.rounds // 4)))
            print_rows("ResNet-50, batch 8", resnet_rows[-1:])
        print_rows("ResNet-50 summary", resnet_rows)
        rows += resnet_rows
    if args.part in ("zoo", "all"):
        zoo_rows = []
        for name in args.zoo_models.split(","):
            dense = onnxsparse.load_model(zoo_model_path(name))
            for sparsity in args.zoo_sparsities.split(","):
                row = run_case(dense, f"1x16:{sparsity}", "fp32", 1, args.threads, max(5, args.rounds // 2),
                               int8_baseline=False)
                row["model"] = name
                zoo_rows.append(row)
                print_rows(f"{name}", [row])
        print_rows("zoo summary (fp32, batch 1, 1x16; vs fp32 >= 1 means never slower)", zoo_rows)
        rows += zoo_rows
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
