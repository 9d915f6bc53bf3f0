"""The demo: the whole pipeline on the bundled digits sample, printing a report.

It grows with the pipeline: today stats -> prune -> stats with held-out accuracy before and after,
a sweep of every pattern without fine-tuning, W8A8 quantization of the float and the pruned model
to the integer-only form run by the exact integer reference executor, and packing (W5, Huffman)
with an exact unpack, and a run of the integer models on a modelled systolic array.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from onnx import numpy_helper
from rich.console import Console
from rich.table import Table

import onnxsparse
from onnxsparse import model as model_io
from onnxsparse.errors import UsageError
from onnxsparse.quant.quantize import QuantizeOptions, quantize_model
from onnxsparse.quant.reference import ReferenceExecutor
from onnxsparse.report.evaluate import load_labelled, top1_accuracy

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "samples" / "digits"
SWEEP_PATTERNS = ("unstructured", "2:4", "1x16", "bank:16", "mcbbs:c2r4", "kernel", "filter", "channel")
SWEEP_SPARSITIES = (0.5, 0.75)


def run_demo(model_path: str | None, train_path: str | None, test_path: str | None, out_dir: Path, pattern: str,
             sparsity: float, console: Console) -> None:
    from onnxsparse.cli import print_packed, print_prune_summary, print_stats
    from onnxsparse.formats.pack import pack_model, unpack_model

    model_path = Path(model_path) if model_path else SAMPLE_DIR / "digits_cnn.onnx"
    train_path = Path(train_path) if train_path else SAMPLE_DIR / "digits_train.npz"
    test_path = Path(test_path) if test_path else SAMPLE_DIR / "digits_test.npz"
    for path in (model_path, train_path, test_path):
        if not path.is_file():
            raise UsageError(f"{path}: not found; run the demo from a checkout of the repository or pass "
                             "--model, --train and --test")
    out_dir.mkdir(parents=True, exist_ok=True)
    heldout = load_labelled(test_path)
    console.rule("[bold]onnxsparse demo: digits CNN (scikit-learn 8x8 digits)")
    console.print(f"model {model_path}; accuracy on the held-out split {test_path} ({len(heldout.labels)} images); "
                  f"calibration uses only {train_path}")

    model = model_io.load_model(model_path)
    print_stats(onnxsparse.model_stats(model), title="1. stats of the float model")
    float_accuracy = top1_accuracy(model, heldout.inputs, heldout.labels)

    started = time.perf_counter()
    fixed = onnxsparse.parse_pattern(pattern).fixed_sparsity  # N:M sets its own sparsity
    result = onnxsparse.prune_model(model, pattern, sparsity if fixed is None else None)
    pruned_path = out_dir / "digits_pruned.onnx"
    model_io.save_model(result.model, pruned_path)
    options = f"--pattern {pattern}" + (f" --sparsity {sparsity:g}" if fixed is None else "")
    print_prune_summary(result, f"2. prune {options} -> {pruned_path} ({time.perf_counter() - started:.2f} s)")
    pruned = model_io.load_model(pruned_path)
    print_stats(onnxsparse.model_stats(pruned), title=f"3. stats of {pruned_path}")
    pruned_accuracy = top1_accuracy(pruned, heldout.inputs, heldout.labels)

    sweep = Table(title="4. held-out top-1 by pattern, no fine-tuning (first conv kept dense)", title_justify="left")
    sweep.add_column("pattern")
    for level in SWEEP_SPARSITIES:
        sweep.add_column(f"{level:.0%}", justify="right")
    for spec in SWEEP_PATTERNS:
        row = []
        for level in SWEEP_SPARSITIES:
            fixed = onnxsparse.parse_pattern(spec).fixed_sparsity
            if fixed is not None and abs(fixed - level) > 1e-9:
                row.append("-")
                continue
            swept = onnxsparse.prune(model, spec, level)
            row.append(f"{100 * top1_accuracy(swept, heldout.inputs, heldout.labels):.1f}%")
        sweep.add_row(spec, *row)
    console.print(sweep)

    quantized_rows = []
    for label, source in (("float", model), (f"pruned {pattern}", pruned)):
        started = time.perf_counter()
        quantized = quantize_model(source, train_path, QuantizeOptions(integer=True))
        path = out_dir / f"digits_{'float' if source is model else 'pruned'}_int8.onnx"
        model_io.save_model(quantized.model, path)
        logits = ReferenceExecutor(quantized.model).run({"input": heldout.inputs})[0]
        stats = onnxsparse.model_stats(quantized.model)
        quantized_rows.append((label, path, float((logits.argmax(1) == heldout.labels).mean()), stats.sparsity,
                               time.perf_counter() - started))
    table = Table(title="5. quantize W8A8 (calibration: training split) -> integer-only model, run by the exact "
                        "integer reference", title_justify="left")
    for header in ("model", "file", "held-out top-1", "weight sparsity", "seconds"):
        table.add_column(header, justify="left" if header in ("model", "file") else "right")
    for label, path, accuracy, sparsity, seconds in quantized_rows:
        table.add_row(label, str(path), f"{100 * accuracy:.1f}%", f"{100 * sparsity:.1f}%", f"{seconds:.1f}")
    console.print(table)

    packed_path = out_dir / "digits_pruned_packed.onnx"
    quantized_pruned = quantize_model(pruned, train_path, QuantizeOptions(weight_bits=5)).model
    packed = pack_model(quantized_pruned)
    model_io.save_model(packed.model, packed_path)
    restored_exactly = all(
        np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
        for a, b in zip(sorted(unpack_model(packed.model).graph.initializer, key=lambda i: i.name),
                        sorted(quantized_pruned.graph.initializer, key=lambda i: i.name)))
    print_packed(packed.tensors, f"6. pack the pruned model quantized to W5A8 -> {packed_path}")
    float_bytes = model_path.stat().st_size
    runtime_accuracy, runtime_exact = _runtime_step(packed.model, quantized_pruned, heldout.inputs, heldout.labels,
                                                    console)

    simulations = _simulate_step(quantized_rows, pattern, heldout.inputs[:1], console)

    console.rule("[bold]report")
    console.print(f"float model              held-out top-1 {100 * float_accuracy:.1f}%")
    console.print(f"pruned {pattern:<17s} held-out top-1 {100 * pruned_accuracy:.1f}% "
                  f"(weights sparsity {100 * result.sparsity:.1f}%, no fine-tuning)")
    for (label, _, accuracy, sparsity, _), source in zip(quantized_rows, (model, pruned)):
        kept = " kept exactly" if onnxsparse.model_stats(source).sparsity > 0 else ""
        console.print(f"{label + ', W8A8':<24s} held-out top-1 {100 * accuracy:.1f}% "
                      f"(weight sparsity {100 * sparsity:.1f}%{kept})")
    console.print(f"packed (W5, Huffman)      {packed_path.stat().st_size} bytes, {float_bytes / packed_path.stat().st_size:.1f}x "
                  f"smaller than the float file; unpack restores every weight bit for bit: {restored_exactly}")
    console.print(f"packed, onnxsparse runtime held-out top-1 {100 * runtime_accuracy:.1f}% (native int8 kernels in "
                  f"onnxruntime); outputs equal the integer reference's: {runtime_exact}")
    for label, report, exact in simulations:
        totals = report.totals
        console.print(f"{label + ', W8A8 on ' + report.config.label:<46s} {totals.total_cycles} cycles, "
                      f"{totals.speedup:.2f}x over the dense PE; outputs equal the integer reference's: {exact}")
    console.print(f"outputs in {out_dir}/")


def _runtime_step(packed_model, quantized, inputs: np.ndarray, labels: np.ndarray, console: Console):
    """6b. The packed model run by onnxsparse's runtime: its sparse layers in the native int8
    kernels hosted in onnxruntime (docs/RUNTIME.md), on the held-out split."""
    from onnxsparse.quant.lower import lower_to_integer
    from onnxsparse.runner import runtime_session

    session = runtime_session(packed_model)
    logits = session.run(None, {"input": inputs})[0]
    exact = np.array_equal(logits, ReferenceExecutor(lower_to_integer(quantized)).run({"input": inputs})[0])
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    console.print(f"6b. run the packed model in onnxsparse's runtime: {len(session.plan.sparse_layers)} layers in "
                  f"native kernels ({len(session.plan.partition.regions)} regions), held-out top-1 "
                  f"{100 * accuracy:.1f}%")
    return accuracy, exact


def _simulate_step(quantized_rows, pattern: str, image: np.ndarray, console: Console):
    """7. The integer models on a 16x16 weight-stationary array: dense PE, and the PE that skips
    the pruned model's pattern when there is one (docs/SYSTOLIC.md)."""
    from onnxsparse.cli import print_simulation

    from onnxsparse.systolic.array import array_config, pe_for_pattern
    from onnxsparse.systolic.executor import simulate

    simulations = []
    for (label, path, *_), pe in zip(quantized_rows, ("dense", pe_for_pattern(onnxsparse.parse_pattern(pattern)))):
        model = model_io.load_model(path)
        report = simulate(model, array_config("16x16", "ws", pe), {"input": image}, str(path))
        exact = np.array_equal(report.outputs["logits"], ReferenceExecutor(model).run({"input": image})[0])
        print_simulation(report, f"7. simulate {label} ({path.name}) on a {report.config.label} array, one image",
                         limit=4)
        simulations.append((label, report, exact))
    return simulations
