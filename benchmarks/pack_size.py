"""Packed sizes against the float32 ONNX file, Huffman against the entropy bound, pack/unpack time.

    .venv/bin/python benchmarks/pack_size.py [--model resnet50] [--calibration 8]

For the materialized model: prune 1x16 (80% and 90%), quantize (W8 and W5; seeded random
calibration inputs), pack with Huffman auto, and report the packed file against the float32
file, every Huffman-coded section against its order-0 entropy bound plus table, and the time of
pack and unpack (median of 3). The digits sample is reported the same way.
Acceptance (issue 4): ResNet-50 80% 1x16 W8 >= 18x smaller, 90% W5 >= 50x; Huffman sections within
2% of entropy + table; pack < 10 s, unpack < 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import onnxsparse
from onnxsparse.formats.container import read_info
from onnxsparse.formats.pack import pack_model, packed_tensors, unpack_model
from onnxsparse.quant.quantize import QuantizeOptions, quantize_model
from onnxsparse.zoo import zoo_model_path

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "digits"


def timed(function, repeats: int = 3):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times)


def report(label: str, float_file_bytes: int, quantized, folder: Path) -> None:
    packed, pack_s = timed(lambda: pack_model(quantized))
    _, unpack_s = timed(lambda: unpack_model(packed.model))
    path = folder / "packed.onnx"
    onnxsparse.save_model(packed.model, path)
    size = path.stat().st_size
    worst, coded = 0.0, 0
    for _, _, data in packed_tensors(packed.model):
        for section in read_info(data, entropy=True).sections:
            if section.coding == "huffman":
                coded += 1
                worst = max(worst, section.stored_bytes / (section.entropy_bound_bytes + section.table_bytes) - 1)
    encodings = sorted({t.info.encoding.name for t in packed.tensors})
    print(f"{label:34s} {size / 1e6:8.2f} MB {float_file_bytes / size:7.1f}x   pack {pack_s:5.2f} s  unpack "
          f"{unpack_s:5.2f} s   Huffman sections {coded:3d}, worst {100 * worst:+.2f}% vs entropy+table   "
          f"encodings {','.join(encodings)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--calibration", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        digits = onnxsparse.load_model(SAMPLES / "digits_cnn.onnx")
        print(f"{'model':34s} {'packed':>11s} {'vs fp32':>8s}")
        digits_bytes = (SAMPLES / "digits_cnn.onnx").stat().st_size
        for spec, sparsity, bits in (("1x16", 0.75, 8), ("mcbbs:c2r4", 0.5, 5)):
            pruned = onnxsparse.prune(digits, spec, sparsity)
            quantized = quantize_model(pruned, SAMPLES / "digits_train.npz", QuantizeOptions(weight_bits=bits)).model
            report(f"digits {spec} {sparsity:.0%} W{bits}", digits_bytes, quantized, folder)

        path = zoo_model_path(args.model)
        model = onnxsparse.load_model(path)
        name = model.graph.input[0].name
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
        rng = np.random.default_rng(0)
        calibration = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(args.calibration)]
        for sparsity, bits in ((0.8, 8), (0.9, 5)):
            pruned = onnxsparse.prune(model, "1x16", sparsity)
            quantized = quantize_model(pruned, calibration, QuantizeOptions(weight_bits=bits)).model
            report(f"{args.model} 1x16 {sparsity:.0%} W{bits}", path.stat().st_size, quantized, folder)


if __name__ == "__main__":
    main()
