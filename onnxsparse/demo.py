"""The demo: the whole pipeline on the bundled digits sample, printing a report.

It grows with the pipeline: today stats -> prune -> stats, with held-out accuracy before and
after, and a sweep of every pattern without fine-tuning.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import onnxsparse
from onnxsparse import model as model_io
from onnxsparse.errors import UsageError
from onnxsparse.report.evaluate import load_labelled, top1_accuracy

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "samples" / "digits"
SWEEP_PATTERNS = ("unstructured", "2:4", "1x16", "bank:16", "mcbbs:c2r4", "kernel", "filter", "channel")
SWEEP_SPARSITIES = (0.5, 0.75)


def run_demo(model_path: str | None, train_path: str | None, test_path: str | None, out_dir: Path, pattern: str,
             sparsity: float, console: Console) -> None:
    from onnxsparse.cli import print_prune_summary, print_stats

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

    console.rule("[bold]report")
    console.print(f"float model        held-out top-1 {100 * float_accuracy:.1f}%")
    console.print(f"pruned {pattern:<11s} held-out top-1 {100 * pruned_accuracy:.1f}% "
                  f"(weights sparsity {100 * result.sparsity:.1f}%, no fine-tuning)")
    console.print(f"outputs in {out_dir}/")
