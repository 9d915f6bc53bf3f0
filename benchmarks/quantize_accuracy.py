"""Quantization against onnxruntime's quantize_static, side by side in one script.

    .venv/bin/python benchmarks/quantize_accuracy.py [--part digits|zoo|speed|all] [--zoo resnet50,...]

digits: held-out top-1 of the digits CNN (calibrated on the training split only) for onnxsparse's
        schemes and onnxruntime's quantize_static (QDQ, per channel, same images), each run three
        ways: the onnxsparse integer reference (exact integer arithmetic), onnxruntime with QDQ
        left unfused (float arithmetic on the quantized grid), and onnxruntime's fused int8 kernels.
zoo:    materialized zoo models, 16 seeded calibration inputs, 32 other seeded inputs: top-1
        agreement and output cosine similarity with the float model, onnxsparse vs onnxruntime.
speed:  quantizing materialized ResNet-50 with 32 calibration images, both tools, median of runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

import onnxsparse
from onnxsparse.quant.lower import lower_to_integer
from onnxsparse.quant.quantize import QuantizeOptions, quantize_model
from onnxsparse.quant.reference import ReferenceExecutor
from onnxsparse.report.evaluate import load_labelled
from onnxsparse.zoo import zoo_model_path

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "digits"
ZOO = ("resnet50", "vgg19", "densenet121", "inception_v1", "shufflenet", "squeezenet", "alexnet")


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]):
        self.items = iter([{name: batch} for batch in batches])

    def get_next(self):
        return next(self.items, None)


def ort_quantize(model: onnx.ModelProto, name: str, batches: list[np.ndarray], folder: Path, **options) -> onnx.ModelProto:
    source, target = folder / "float.onnx", folder / "ort_quantized.onnx"
    onnx.save(model, str(source))
    # onnxruntime's symbolic shape inference saves sym_shape_infer_temp.onnx into the working
    # directory when it gives up: keep that file in the scratch folder.
    here = os.getcwd()
    os.chdir(folder)
    try:
        quantize_static(str(source), str(target), _Reader(name, batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, **options)
    finally:
        os.chdir(here)
    return onnx.load(str(target))


def session(model: onnx.ModelProto, fused: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((outputs.argmax(axis=1) == labels).mean())


def digits() -> None:
    model = onnxsparse.load_model(SAMPLES / "digits_cnn.onnx")
    train, test = load_labelled(SAMPLES / "digits_train.npz"), load_labelled(SAMPLES / "digits_test.npz")
    feeds = {"input": test.inputs}
    float_top1 = top1(session(model).run(None, feeds)[0], test.labels)
    print(f"digits CNN: float held-out top-1 {float_top1:.2f}% ({len(test.labels)} images; calibration: "
          f"{len(train.labels)} training images)")
    print(f"{'quantizer':44s} {'reference':>9s} {'ort unfused':>11s} {'ort int8':>9s}")
    schemes = [("W8A8 percentile", {}), ("W8A8 minmax", dict(method="minmax")), ("W8A8 entropy", dict(method="entropy")),
               ("W8A8 mse", dict(method="mse")), ("W7A8 (ort-x86-safe)", dict(weight_bits=7)),
               ("W4A8", dict(weight_bits=4)), ("W4A4", dict(weight_bits=4, activation_bits=4)),
               ("W2A8", dict(weight_bits=2)), ("W8A4", dict(activation_bits=4)),
               ("W8A8 --fixed-point", dict(fixed_point=True))]
    for label, options in schemes:
        qdq = quantize_model(model, SAMPLES / "digits_train.npz", QuantizeOptions(**options)).model
        reference = top1(ReferenceExecutor(lower_to_integer(qdq)).run(feeds)[0], test.labels)
        print(f"onnxsparse {label:33s} {reference:9.2f} {top1(session(qdq, False).run(None, feeds)[0], test.labels):11.2f} "
              f"{top1(session(qdq).run(None, feeds)[0], test.labels):9.2f}")
    batches = [train.inputs[i:i + 63] for i in range(0, len(train.inputs), 63)]  # 1197 = 19 x 63
    with tempfile.TemporaryDirectory() as folder:
        for label, options in [("minmax", {}), ("minmax reduce_range", dict(reduce_range=True)),
                               ("percentile", dict(calibrate_method=CalibrationMethod.Percentile)),
                               ("entropy", dict(calibrate_method=CalibrationMethod.Entropy))]:
            try:
                qdq = ort_quantize(model, "input", batches, Path(folder), **options)
            except Exception as exc:  # onnxruntime's histogram calibrators fail on some inputs
                print(f"onnxruntime quantize_static {label:17s} failed: {str(exc).splitlines()[0][:60]}")
                continue
            print(f"onnxruntime quantize_static {label:16s} {'-':>9s} "
                  f"{top1(session(qdq, False).run(None, feeds)[0], test.labels):11.2f} "
                  f"{top1(session(qdq).run(None, feeds)[0], test.labels):9.2f}")


def seeded_inputs(model: onnx.ModelProto, count: int, seed: int) -> tuple[str, list[np.ndarray]]:
    value = model.graph.input[0]
    shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return value.name, [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[float, float]:
    ref, cand = np.concatenate(reference).reshape(len(reference), -1), np.concatenate(candidate).reshape(len(candidate), -1)
    same = 100.0 * float((ref.argmax(1) == cand.argmax(1)).mean())
    cosine = float(np.mean((ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-30)))
    return same, cosine


def zoo(names: list[str]) -> None:
    print("zoo models: 16 seeded calibration inputs; 32 other seeded inputs; top-1 agreement % / cosine with float")
    print(f"{'model':14s} {'onnxsparse W8A8':>22s} {'onnxsparse W7A8':>22s} {'onnxruntime minmax':>22s}")
    for name in names:
        model = onnxsparse.load_model(zoo_model_path(name))
        input_name, calibration = seeded_inputs(model, 16, seed=1)
        _, evaluation = seeded_inputs(model, 32, seed=2)
        dense = session(model)
        reference = [dense.run(None, {input_name: x})[0] for x in evaluation]
        cells = []
        for options in (dict(), dict(weight_bits=7)):
            qdq = quantize_model(model, [{input_name: x[0]} for x in calibration], QuantizeOptions(**options)).model
            quantized_session = session(qdq)
            cells.append(agreement(reference, [quantized_session.run(None, {input_name: x})[0] for x in evaluation]))
        with tempfile.TemporaryDirectory() as folder:
            qdq = ort_quantize(model, input_name, calibration, Path(folder))
        quantized_session = session(qdq)
        cells.append(agreement(reference, [quantized_session.run(None, {input_name: x})[0] for x in evaluation]))
        print(f"{name:14s} " + " ".join(f"{same:12.1f}% / {cosine:.4f}" for same, cosine in cells))


def speed(repeats: int = 3) -> None:
    model = onnxsparse.load_model(zoo_model_path("resnet50"))
    input_name, calibration = seeded_inputs(model, 32, seed=1)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):  # interleaved, so both see the same machine load
            started = time.perf_counter()
            quantize_model(model, [{input_name: x[0]} for x in calibration])
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            ort_quantize(model, input_name, calibration, Path(folder))
            theirs.append(time.perf_counter() - started)
    mine, other = statistics.median(ours), statistics.median(theirs)
    print(f"quantize ResNet-50, 32 calibration images, median of {repeats}: onnxsparse {mine:.1f} s, "
          f"onnxruntime quantize_static {other:.1f} s, ratio {mine / other:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["digits", "zoo", "speed", "all"], default="all")
    parser.add_argument("--zoo", default=",".join(ZOO))
    args = parser.parse_args()
    if args.part in ("digits", "all"):
        digits()
    if args.part in ("zoo", "all"):
        zoo(args.zoo.split(","))
    if args.part in ("speed", "all"):
        speed()


if __name__ == "__main__":
    main()
