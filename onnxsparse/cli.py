"""The `onnxsparse` command: parse, call the API, print. No logic of its own."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import onnxsparse
from onnxsparse import model as model_io
from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.quant.observers import METHODS
from onnxsparse.sparsity.criteria import CRITERIA

# Piped output gets a wide fixed width so tables are not squeezed into 80 columns.
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def _human(value: float | None, unit: str = "") -> str:
    if value is None:
        return "?"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}{unit}"
    return f"{value:g}{unit}"


def _bytes(size: int) -> str:
    for factor, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= factor:
            return f"{size / factor:.1f} {suffix}"
    return f"{size} B"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(onnxsparse.__version__, prog_name="onnxsparse")
def cli(debug: bool) -> None:
    """Prune, quantize, pack and run sparse ONNX CNNs.

    \b
    Examples:
      onnxsparse stats model.onnx
      onnxsparse prune model.onnx pruned.onnx --pattern 1x16 --sparsity 0.75
      onnxsparse quantize pruned.onnx int8.onnx --calib calibration.npz
      onnxsparse pack int8.onnx packed.onnx && onnxsparse inspect packed.onnx
      onnxsparse demo
    """


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schemas/stats.schema.json) instead of a table.")
def stats(model_path: str, as_json: bool) -> None:
    """Per-layer weights, sparsity, detected pattern and MACs (batch 1) of MODEL.

    \b
    Example:
      onnxsparse stats samples/digits/digits_cnn.onnx
      onnxsparse stats pruned.onnx --json > stats.json
    """
    model = model_io.load_model(model_path)
    result = onnxsparse.model_stats(model)
    if as_json:
        document = result.to_json()
        click.echo(json.dumps({"model": model_path, **document}, indent=2))
        return
    print_stats(result, title=model_path)


def print_stats(result: onnxsparse.ModelStats, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for header in ("layer", "op", "weight shape", "params", "nonzeros", "sparsity", "pattern",
                   "MACs", "effective MACs", "size"):
        table.add_column(header, justify="left" if header in ("layer", "op", "pattern", "weight shape") else "right")
    for layer in result.layers:
        table.add_row(layer.name, layer.op_type, "x".join(map(str, layer.weight_shape)), _human(layer.params),
                      _human(layer.nonzeros), _percent(layer.sparsity), layer.pattern,
                      _human(layer.dense_macs), _human(layer.effective_macs), _bytes(layer.size_bytes))
    table.add_section()
    table.add_row(f"total ({len(result.layers)} layers)", "", "", _human(result.params), _human(result.nonzeros),
                  _percent(result.sparsity), "", _human(result.dense_macs), _human(result.effective_macs),
                  _bytes(result.size_bytes))
    stdout.print(table)
    stdout.print(f"model parameters (all constant tensors): {_human(result.model_params)}")


# ---------------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------------


@cli.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("-p", "--pattern", help="unstructured, N:M (2:4), 1xN (1x16), bank:B (bank:16), "
              "mcbbs:cCrR (mcbbs:c2r4), kernel, filter or channel.")
@click.option("-s", "--sparsity", type=float, help="Fraction of weights set to zero, in [0, 1). N:M sets its own.")
@click.option("--criterion", type=click.Choice(CRITERIA), default="l1", show_default=True,
              help="How units are ranked: L1 or L2 norm, or random (a baseline).")
@click.option("--scope", type=click.Choice(["local", "global"]), default="local", show_default=True,
              help="local: every layer at --sparsity; global: rank all layers together so the whole "
              "model reaches --sparsity.")
@click.option("--exclude", metavar="REGEX", help="Leave layers whose node or weight name matches dense.")
@click.option("--include", metavar="REGEX", help="Prune matching layers even if kept dense by default "
              "(the first conv, depthwise convs).")
@click.option("--recipe", type=click.Path(dir_okay=False), help="Per-layer YAML recipe (schemas/recipe.schema.json).")
@click.option("--cap-mismatched", type=float, metavar="SPARSITY",
              help="Cap layers whose input and output channel counts differ (the MCBBS flow uses 0.5).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random criterion.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer summary as JSON.")
def prune(input_path, output_path, pattern, sparsity, criterion, scope, exclude, include, recipe,
          cap_mismatched, seed, as_json) -> None:
    """Prune the weights of IN into a sparsity pattern and write OUT.

    The first conv and depthwise convs stay dense unless named (--include or a recipe rule);
    layers too small for the pattern are left dense with a note in the summary.

    \b
    Examples:
      onnxsparse prune model.onnx pruned.onnx --pattern 2:4
      onnxsparse prune model.onnx pruned.onnx -p 1x16 -s 0.8 --scope global
      onnxsparse prune model.onnx pruned.onnx -p mcbbs:c2r4 -s 0.75 --cap-mismatched 0.5
      onnxsparse prune model.onnx pruned.onnx --recipe recipe.yaml
    """
    if model_io.same_file(input_path, output_path):
        raise UsageError(f"{output_path}: output is the input file; write the pruned model to another path")
    model = model_io.load_model(input_path)
    layer_count = len(model_io.find_weights(model))
    started = time.perf_counter()
    with _progress("pruning", layer_count, enabled=not as_json) as advance:
        result = onnxsparse.prune_model(
            model, pattern, sparsity, criterion=criterion, scope=scope, exclude=exclude, include=include,
            recipe=recipe, cap_mismatched=cap_mismatched, seed=seed, on_layer=advance)
    model_io.save_model(result.model, output_path)
    elapsed = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps({"input": input_path, "output": output_path, "sparsity": result.sparsity,
                               "layers": [layer.__dict__ for layer in result.layers]}, indent=2))
        return
    print_prune_summary(result, f"{input_path} -> {output_path}")
    stdout.print(f"weights sparsity {_percent(result.sparsity)}; wrote {output_path} in {elapsed:.1f} s")


def print_prune_summary(result: onnxsparse.PruneResult, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for header in ("layer", "op", "weight shape", "pattern", "target", "sparsity", "note"):
        table.add_column(header, justify="right" if header in ("target", "sparsity") else "left")
    for layer in result.layers:
        table.add_row(layer.node_name, layer.op_type, "x".join(map(str, layer.weight_shape)), layer.pattern,
                      _percent(layer.target_sparsity), _percent(layer.sparsity), layer.note)
    stdout.print(table)


class _progress:
    """A transient progress bar on stderr: per layer (called with its name) or per sample count."""

    def __init__(self, what: str, total: int, enabled: bool = True, unit: str = "layers"):
        self.unit = unit
        self.bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), console=stderr, transient=True,
                            disable=not enabled or not stderr.is_terminal)
        self.task = self.bar.add_task("", total=total)

    def __enter__(self):
        self.bar.start()
        if self.unit == "layers":
            return lambda name: self.bar.update(self.task, advance=1, description=name)
        return lambda done: self.bar.update(self.task, completed=done)

    def __exit__(self, *exc_info):
        self.bar.stop()


# ---------------------------------------------------------------------------------------------
# quantize and run
# ---------------------------------------------------------------------------------------------


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{text!r}: give comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise UsageError(f"--resize {text!r}: give HEIGHTxWIDTH, e.g. 224x224")
    return int(parts[0]), int(parts[1])


@cli.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--calib", "calibration", required=True, metavar="DATA",
              help="Calibration samples: an .npz (arrays keyed by input name, samples first; `labels` "
              "allowed) or a folder of images (see --resize, --mean, --std, --layout).")
@click.option("--weight-bits", type=int, default=8, show_default=True, help="2 to 8.")
@click.option("--act-bits", type=int, default=8, show_default=True, help="8 or 4.")
@click.option("--method", type=click.Choice(METHODS), default="percentile", show_default=True,
              help="How activation ranges are chosen from the calibration data.")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option("--symmetric-activations", is_flag=True, help="int8 activations with zero point 0 (default: uint8 asymmetric).")
@click.option("--fixed-point", is_flag=True, help="Power-of-two scales, per tensor, symmetric (the MCBBS accelerator's scheme).")
@click.option("--integer", is_flag=True, help="Write the integer-only form (QLinearConv, ...; docs/ARITHMETIC.md) "
              "instead of QDQ.")
@click.option("--bias-correction/--no-bias-correction", default=None,
              help="Correct each layer's bias for the mean error of its quantized weights "
              "(default: on below 8-bit weights).")
@click.option("--exclude", metavar="REGEX", help="Keep layers whose node or weight name matches in float.")
@click.option("--keep-first-float", is_flag=True, help="Keep the first weight-bearing layer in float.")
@click.option("--keep-last-float", is_flag=True, help="Keep the last weight-bearing layer in float.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Calibration batch size.")
@click.option("--resize", metavar="HxW", help="Images: resize to this size (default: the model's input size).")
@click.option("--mean", metavar="M[,M,M]", help="Images: per-channel mean subtracted after scaling to [0, 1].")
@click.option("--std", metavar="S[,S,S]", help="Images: per-channel standard deviation divided by.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Images: the model's input layout (default NCHW).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer summary as JSON.")
def quantize(input_path, output_path, calibration, weight_bits, act_bits, method, per_tensor, symmetric_activations,
             fixed_point, integer, bias_correction, exclude, keep_first_float, keep_last_float, batch_size, resize,
             mean, std, layout, as_json) -> None:
    """Quantize IN to integers with calibration data and write OUT (QDQ by default).

    Weights are symmetric (zero stays zero, so pruned patterns survive), per output channel,
    2-8 bits; activations 8 or 4 bits. The QDQ model runs in stock onnxruntime.

    \b
    Examples:
      onnxsparse quantize model.onnx model_int8.onnx --calib samples/digits/digits_train.npz
      onnxsparse quantize model.onnx w4.onnx --calib train.npz --weight-bits 4 --method mse
      onnxsparse quantize model.onnx int.onnx --calib images/ --resize 224x224 \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --integer
    """
    from onnxsparse.quant.calibration import model_input_specs, open_calibration
    from onnxsparse.quant.quantize import QuantizeOptions, quantize_model

    if model_io.same_file(input_path, output_path):
        raise UsageError(f"{output_path}: output is the input file; write the quantized model to another path")
    options = QuantizeOptions(weight_bits=weight_bits, activation_bits=act_bits, method=method,
                              per_channel=not per_tensor, symmetric_activations=symmetric_activations,
                              fixed_point=fixed_point, bias_correction=bias_correction, exclude=exclude,
                              keep_first_float=keep_first_float, keep_last_float=keep_last_float,
                              batch_size=batch_size, integer=integer).checked()
    model = model_io.load_model(input_path)
    image_options = {key: value for key, value in (("resize", _size(resize)), ("mean", _floats(mean)),
                                                    ("std", _floats(std)), ("layout", layout)) if value is not None}
    data = open_calibration(calibration, model_input_specs(model), **image_options)
    started = time.perf_counter()
    with _progress("calibrating", data.sample_count, enabled=not as_json, unit="samples") as advance:
        result = quantize_model(model, data, options, on_progress=advance)
    model_io.save_model(result.model, output_path)
    elapsed = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps({"input": input_path, "output": output_path, "tensors": result.tensors,
                               "folded_batch_norms": result.folded_batch_norms,
                               "calibration_samples": result.calibration_samples, "notes": list(result.notes),
                               "layers": [layer.__dict__ for layer in result.layers]}, indent=2, default=float))
        return
    table = Table(title=f"{input_path} -> {output_path}", title_justify="left")
    for header in ("layer", "op", "weight bits", "per channel", "sparsity before", "after"):
        table.add_column(header, justify="left" if header in ("layer", "op") else "right")
    for layer in result.layers:
        table.add_row(layer.node_name, layer.op_type, str(layer.weight_bits), "yes" if layer.per_channel else "no",
                      _percent(layer.sparsity_before), _percent(layer.sparsity_after))
    stdout.print(table)
    for note in result.notes:
        stdout.print(f"note: {note}")
    form = "integer-only" if integer else "QDQ"
    stdout.print(f"{form} model: {len(result.layers)} layers, {result.tensors} activation tensors quantized, "
                 f"{result.folded_batch_norms} batch norms folded, {result.calibration_samples} calibration "
                 f"samples ({method}); wrote {output_path} in {elapsed:.1f} s")


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help=".npy (single-input models) or .npz keyed by input name.")
@click.option("--random", "random_input", is_flag=True, help="Seeded random inputs of the model's input shapes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", "output_path", type=click.Path(dir_okay=False), help="Write the outputs to this .npz.")
@click.option("--runtime", type=click.Choice(["ort", "reference"]), default="ort", show_default=True,
              help="ort: onnxruntime (a packed model's sparse layers run in onnxsparse's native kernels "
              "inside it); reference: the exact integer executor (integer-form models, packed or not).")
def run(model_path, input_path, random_input, seed, output_path, runtime) -> None:
    """Run MODEL on inputs and print (or save) its outputs.

    MODEL may be packed (`onnxsparse pack`): its sparse layers then run in native kernels hosted
    in onnxruntime (docs/RUNTIME.md).

    \b
    Examples:
      onnxsparse run packed.onnx --random
      onnxsparse run model.onnx --input x.npy --output y.npz
      onnxsparse run int.onnx --input x.npz --runtime reference --output y.npz
    """
    from onnxsparse.runner import load_inputs, random_inputs, run_model

    if (input_path is None) == (not random_input):
        raise UsageError("give exactly one of --input FILE and --random")
    model = model_io.load_model(model_path)
    feeds = random_inputs(model, seed) if random_input else load_inputs(model, input_path)
    outputs = run_model(model, feeds, runtime)
    if output_path:
        staging = Path(output_path).with_name(Path(output_path).name + ".tmp.npz")
        np.savez(staging, **outputs)
        staging.replace(output_path)
    table = Table(title=f"{model_path} ({runtime})", title_justify="left")
    for header in ("output", "shape", "dtype", "min", "max", "argmax (first sample)"):
        table.add_column(header)
    for name, value in outputs.items():
        flat = value.reshape(len(value), -1) if value.ndim > 1 else value.reshape(1, -1)
        table.add_row(name, "x".join(map(str, value.shape)), str(value.dtype), f"{value.min():.6g}",
                      f"{value.max():.6g}", str(int(flat[0].argmax())) if flat.size else "-")
    stdout.print(table)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--against", "against_path", type=click.Path(dir_okay=False),
              help="The dense fp32 model to compare with (default: MODEL unpacked, when it is float).")
@click.option("--threads", type=int, default=2, show_default=True, help="Threads for every engine.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size of the random input.")
@click.option("--rounds", type=int, default=30, show_default=True, help="Timed rounds (each runs every engine once).")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench(model_path, against_path, threads, batch, rounds, warmup, as_json) -> None:
    """Time a packed MODEL against dense onnxruntime fp32 and int8, interleaved, medians.

    The int8 baseline is MODEL unpacked when MODEL is quantized, else onnxruntime running a QDQ
    int8 quantization of the dense model (7-bit weights, see docs/QUANTIZATION.md).

    \b
    Examples:
      onnxsparse bench packed.onnx
      onnxsparse bench packed_int8.onnx --against resnet50.onnx --threads 2 --batch 8
    """
    from onnxsparse.runtime.bench import bench as run_bench

    packed = model_io.load_model(model_path)
    against = model_io.load_model(against_path) if against_path else None
    with _progress("benchmarking", rounds, enabled=not as_json) as advance:
        result = run_bench(packed, against, threads=threads, batch=batch, rounds=rounds, warmup=warmup,
                           on_round=lambda: advance(""))
    if as_json:
        click.echo(json.dumps({
            "model": model_path, "against": against_path, "batch": result.batch, "threads": result.threads,
            "sparse_layers": result.sparse_layers, "dense_layers": result.dense_layers, "regions": result.regions,
            "max_output_difference": result.max_output_difference,
            "timings": [vars(t) for t in result.timings],
            "speedup": {t.name: result.ratio(t.name) for t in result.timings if t.name != "packed"}}, indent=2))
        return
    table = Table(title=f"{model_path}: batch {batch}, {threads} threads, median of {rounds} interleaved rounds",
                  title_justify="left")
    for header in ("engine", "precision", "median ms", "p10 ms", "p90 ms", "packed is faster by"):
        table.add_column(header, justify="left" if header in ("engine", "precision") else "right")
    for timing in result.timings:
        ratio = result.ratio(timing.name) if timing.name != "packed" else None
        table.add_row(timing.name if timing.name != "packed" else "onnxsparse packed", timing.precision,
                      f"{timing.median_ms:.2f}", f"{timing.p10_ms:.2f}", f"{timing.p90_ms:.2f}",
                      "-" if ratio is None else f"{ratio:.2f}x")
    stdout.print(table)
    stdout.print(f"{result.sparse_layers} layers sparse in {result.regions} native regions, {result.dense_layers} "
                 f"dense in onnxruntime; largest output difference vs the unpacked model in onnxruntime: "
                 f"{result.max_output_difference:.3g}")
    stdout.print("packed is faster by: the median over rounds of that round's time ratio (one round's runs are "
                 "seconds apart, so machine noise hits both sides)")


# ---------------------------------------------------------------------------------------------
# pack, unpack, inspect
# ---------------------------------------------------------------------------------------------


@cli.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--encoding", default="auto", show_default=True,
              help="auto (the smallest valid per tensor), dense, csr, nm, block, bank or mcbbs; a family "
              "may carry parameters, e.g. nm:2:4, block:16, bank:16, mcbbs:c2r4p4 (docs/FORMAT.md).")
@click.option("--huffman", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Canonical Huffman coding per section: when it saves space, always, or never.")
@click.option("--mcbbs-window", type=int, default=4, show_default=True, help="Ranges per window (P) in mcbbs tensors.")
@click.option("--kernels", type=click.Choice(["auto", "sparse", "dense"]), default="auto", show_default=True,
              help="How `onnxsparse run` executes each layer: auto measures the native sparse kernel against "
              "dense onnxruntime on this machine and keeps the faster; sparse/dense force one.")
@click.option("--threads", type=int, default=2, show_default=True, help="Threads for the auto measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-tensor summary as JSON.")
def pack(input_path, output_path, encoding, huffman, mcbbs_window, kernels, threads, as_json) -> None:
    """Pack the weights of IN into sparse binary tensors and write OUT.

    Each weight-bearing node becomes an ai.onnxsparse.Packed<Op> node; works on float pruned
    models and on quantized ones (QDQ and integer form). `onnxsparse unpack` restores it.

    \b
    Examples:
      onnxsparse pack pruned_int8.onnx packed.onnx
      onnxsparse pack pruned.onnx packed.onnx --encoding block --huffman off
    """
    from onnxsparse.formats.pack import pack_model

    if model_io.same_file(input_path, output_path):
        raise UsageError(f"{output_path}: output is the input file; write the packed model to another path")
    model = model_io.load_model(input_path)
    started = time.perf_counter()
    if kernels == "auto":
        from onnxsparse.runtime.costmodel import KernelChooser

        chooser = KernelChooser(model, threads)
        choose = lambda node: chooser.choose(node).record()  # noqa: E731
    else:
        choose = lambda node: {"kernel": kernels, "reason": "--kernels " + kernels}  # noqa: E731
    with _progress("packing", len(model_io.find_weights(model)), enabled=not as_json) as advance:
        result = pack_model(model, encoding=encoding, huffman=huffman, mcbbs_window=mcbbs_window, on_layer=advance,
                            choose_kernel=choose)
    settled = None
    if kernels == "auto" and result.tensors:
        from dataclasses import replace

        from onnxsparse.runtime.costmodel import choose_for_model

        settled = choose_for_model(result.model, threads)
        result = replace(result, model=settled.model, tensors=tuple(
            replace(t, kernel_choice=settled.records.get(t.node_name, t.kernel_choice)) for t in result.tensors))
    model_io.save_model(result.model, output_path)
    elapsed = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps({"input": input_path, "output": output_path, "notes": list(result.notes),
                               "tensors": [_tensor_json(t) for t in result.tensors]}, indent=2))
        return
    print_packed(result.tensors, f"{input_path} -> {output_path}")
    for note in result.notes:
        stdout.print(f"note: {note}")
    if settled is not None:
        times = ", ".join(f"{name} {ms:.2f} ms" for name, ms in settled.times_ms.items())
        stdout.print(f"whole model on this machine (median ms of {settled.rounds} interleaved runs): {times}; "
                     f"kept: {settled.chosen}")
    stdout.print(f"packed {len(result.tensors)} tensors; wrote {output_path} "
                 f"({_bytes(Path(output_path).stat().st_size)}, input {_bytes(Path(input_path).stat().st_size)}) "
                 f"in {elapsed:.1f} s")


def _tensor_json(tensor) -> dict:
    return {"node": tensor.node_name, "op_type": tensor.op_type, "initializer": tensor.initializer,
            "weight": tensor.weight_name, "original_dtype": tensor.original_dtype, "header": tensor.info.to_json(),
            "kernel": tensor.kernel_choice}


def _value_type(info) -> str:
    return f"int{info.value_bits}" if info.value_type == "intN" else info.value_type


def print_packed(tensors, title: str) -> None:
    table = Table(title=title, title_justify="left")
    headers = ["layer", "encoding", "values", "shape", "sections (bytes; Huffman gain)", "bytes", "vs fp32"]
    choices = any(tensor.kernel_choice for tensor in tensors)
    for header in headers + (["runs"] if choices else []):
        table.add_column(header, justify="right" if header in ("bytes", "vs fp32") else "left")
    total_packed = total_fp32 = 0
    for tensor in tensors:
        info = tensor.info
        fp32 = 4 * int(np.prod(info.shape))
        total_packed, total_fp32 = total_packed + info.total_bytes, total_fp32 + fp32
        sections = ", ".join(f"{s.kind} {s.stored_bytes}" + (f" ({s.raw_bytes / max(s.stored_bytes, 1):.2f}x)"
                                                             if s.coding == "huffman" else "") for s in info.sections)
        row = [tensor.node_name, info.encoding.spec, _value_type(info), "x".join(map(str, info.shape)), sections,
               _bytes(info.total_bytes), f"{fp32 / max(info.total_bytes, 1):.1f}x"]
        if choices:
            choice = tensor.kernel_choice or {}
            variant = choice.get("model_variant")  # the whole-model measurement overrides the layer's own
            settled = f"; whole model: {variant}" if variant and variant != "per layer" else ""
            row.append(f"{choice.get('kernel', '?')} ({choice.get('reason', '')}{settled})")
        table.add_row(*row)
    table.add_section()
    table.add_row(f"total ({len(tensors)} tensors)", "", "", "", "", _bytes(total_packed),
                  f"{total_fp32 / max(total_packed, 1):.1f}x")
    stdout.print(table)


@cli.command()
@click.argument("input_path", metavar="PACKED", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="OUT", type=click.Path(dir_okay=False))
def unpack(input_path, output_path) -> None:
    """Turn a packed model back into a standard ONNX model (weights bit for bit).

    \b
    Example:
      onnxsparse unpack packed.onnx restored.onnx
    """
    from onnxsparse.formats.pack import unpack_model

    if model_io.same_file(input_path, output_path):
        raise UsageError(f"{output_path}: output is the input file; write the unpacked model to another path")
    model = model_io.load_model(input_path, upgrade=False)
    started = time.perf_counter()
    restored = unpack_model(model)
    model_io.save_model(restored, output_path)
    stdout.print(f"wrote {output_path} in {time.perf_counter() - started:.1f} s")


@cli.command()
@click.argument("input_path", metavar="PACKED", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (headers as schemas/packed-tensor.schema.json).")
@click.option("--tensor", "tensor_name", metavar="NAME", help="Dump this tensor's decoded values (node, weight or "
              "initializer name) to an .npy file.")
@click.option("--output", "npy_path", type=click.Path(dir_okay=False), help="Where --tensor writes (default NAME.npy).")
def inspect(input_path, as_json, tensor_name, npy_path) -> None:
    """Per packed tensor: encoding, shape, sparsity, bytes per section, Huffman gain, entropy bound, checksums.

    \b
    Examples:
      onnxsparse inspect packed.onnx
      onnxsparse inspect packed.onnx --tensor /conv2/Conv --output conv2.npy
    """
    from onnxsparse.formats.inspect import inspect_model

    model = model_io.load_model(input_path, upgrade=False)
    report = inspect_model(model)
    if tensor_name is not None:
        target = report.dump(tensor_name, npy_path)
        stdout.print(f"wrote {target}")
        return
    if as_json:
        click.echo(json.dumps({"model": input_path, **report.to_json()}, indent=2))
        return
    table = Table(title=input_path, title_justify="left")
    for header in ("layer", "encoding", "values", "shape", "sparsity", "section", "coding", "bytes", "entropy bound",
                   "crc"):
        table.add_column(header, justify="right" if header in ("sparsity", "bytes", "entropy bound") else "left")
    for entry in report.tensors:
        info = entry.info
        for position, section in enumerate(info.sections):
            first = position == 0
            table.add_row(entry.node_name if first else "", info.encoding.spec if first else "",
                          _value_type(info) if first else "",
                          "x".join(map(str, info.shape)) if first else "",
                          _percent(entry.sparsity) if first else "", section.kind,
                          section.coding + (f" {section.raw_bytes / max(section.stored_bytes, 1):.2f}x"
                                            if section.coding == "huffman" else ""),
                          str(section.stored_bytes), f"{section.entropy_bound_bytes:.0f}",
                          "ok")
        table.add_section()
    stdout.print(table)
    stdout.print(f"{len(report.tensors)} packed tensors, {_bytes(report.packed_bytes)} packed; float32 original "
                 f"{_bytes(report.float32_bytes)}: {report.float32_bytes / max(report.packed_bytes, 1):.1f}x smaller")


# ---------------------------------------------------------------------------------------------
# simulate and export-reference (the systolic-array reference executor; docs/SYSTOLIC.md)
# ---------------------------------------------------------------------------------------------


def _simulation_inputs(model, input_path: str | None, random_input: bool, seed: int) -> dict:
    from onnxsparse.runner import load_inputs, random_inputs

    if (input_path is None) == (not random_input):
        raise UsageError("give exactly one of --input FILE and --random")
    return random_inputs(model, seed) if random_input else load_inputs(model, input_path)


def _load_quantized(model_path: str):
    """A model as stored: packed models keep their custom nodes (the executor unpacks them)."""
    model = model_io.load_model(model_path, upgrade=False)
    if any(node.domain == "ai.onnxsparse" for node in model.graph.node):
        return model
    return model_io.load_model(model_path)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--array", "array", default="32x32", show_default=True, help="ROWSxCOLUMNS of PEs, each in [1, 4096].")
@click.option("--dataflow", type=click.Choice(["ws", "os", "is"]), default="ws", show_default=True,
              help="Weight, output or input stationary.")
@click.option("--pe", default="dense", show_default=True,
              help="dense, mcbbs:cCrRpP (e.g. mcbbs:c2r4p8), nm:N:M (nm:2:4) or block:N (block:16).")
@click.option("--sram", default="1024,1024,1024", show_default=True, metavar="KB,KB,KB",
              help="ifmap, filter and ofmap SRAM sizes in KB (double-buffered).")
@click.option("--dram-bw", type=float, default=32.0, show_default=True, metavar="BYTES_PER_CYCLE",
              help="DRAM bandwidth.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help=".npy (single-input models) or .npz keyed by input name.")
@click.option("--random", "random_input", is_flag=True, help="Seeded random inputs of the model's input shapes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schemas/simulate-report.schema.json).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the per-layer report as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG: per-layer cycles dense vs the configured PE, and utilization.")
def simulate(model_path, array, dataflow, pe, sram, dram_bw, input_path, random_input, seed, as_json, csv_path,
             plot_path) -> None:
    """Run a quantized MODEL (QDQ, integer form or packed) on a modelled systolic array.

    Outputs are bit-exact with the integer reference executor; per layer it reports compute and
    stall cycles, PE utilization, mapping efficiency, SRAM accesses and DRAM bytes.

    \b
    Examples:
      onnxsparse simulate int8.onnx --random
      onnxsparse simulate int8.onnx --input x.npy --array 16x16 --dataflow os --json
      onnxsparse simulate pruned_int8.onnx --random --pe mcbbs:c2r4p8 --plot cycles.png
    """
    from onnxsparse.systolic.array import array_config
    from onnxsparse.systolic.executor import SystolicExecutor

    config = array_config(array, dataflow, pe, sram, dram_bw)
    model = _load_quantized(model_path)
    feeds = _simulation_inputs(model, input_path, random_input, seed)
    executor = SystolicExecutor(model, config, model_path)
    with _progress("simulating", len(executor.mac_layers), enabled=not as_json) as advance:
        report = executor.run(feeds, on_layer=advance)
    if csv_path:
        report.write_csv(csv_path)
    if plot_path:
        report.plot(plot_path)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    print_simulation(report)
    for path in (csv_path, plot_path):
        if path:
            stdout.print(f"wrote {path}")


def print_simulation(report, title: str | None = None, limit: int | None = None) -> None:
    """The per-layer table (the first `limit` layers when given), totals and outputs."""
    totals = report.totals
    table = Table(title=title or f"{report.model} on {report.config.label}", title_justify="left")
    for header in ("layer", "op", "P x Wn x K", "sparsity", "NZ", "cycles", "dense PE", "stalls", "util",
                   "map eff", "SRAM rd/wr", "DRAM"):
        table.add_column(header, justify="left" if header in ("layer", "op", "P x Wn x K") else "right")
    shown = report.layers if limit is None else report.layers[:limit]
    for layer in shown:
        geometry = (f"{layer.output_pixels}x{layer.reduction_length}x{layer.filters}"
                    + (f" (g{layer.groups})" if layer.groups > 1 else "")) if layer.kind == "mac" else "-"
        reads = layer.sram_ifmap_reads + layer.sram_filter_reads + layer.sram_ofmap_reads
        table.add_row(layer.name, layer.op_type, geometry,
                      _percent(layer.weight_sparsity) if layer.kind == "mac" else "-",
                      str(layer.kept_per_domain) if layer.sparse else "-", _human(layer.compute_cycles),
                      _human(layer.dense_cycles), _human(layer.stall_cycles), _percent(layer.utilization),
                      _percent(layer.mapping_efficiency), f"{_human(reads)}/{_human(layer.sram_ofmap_writes)}",
                      _bytes(layer.dram_bytes))
    if len(shown) < len(report.layers):
        table.add_row(f"... {len(report.layers) - len(shown)} more layers", *[""] * 11)
    table.add_section()
    table.add_row(f"total ({totals.layers} layers, {totals.sparse_layers} sparse)", "", "", "", "",
                  _human(totals.compute_cycles), _human(totals.dense_cycles), _human(totals.stall_cycles),
                  _percent(totals.utilization), "",
                  f"{_human(totals.sram_ifmap_reads + totals.sram_filter_reads + totals.sram_ofmap_reads)}/"
                  f"{_human(totals.sram_ofmap_writes)}", _bytes(totals.dram_bytes))
    stdout.print(table)
    stdout.print(f"{_human(totals.total_cycles)} cycles ({_human(totals.compute_cycles)} compute + "
                 f"{_human(totals.stall_cycles)} stalls); {totals.speedup:.2f}x over the dense PE on compute; "
                 f"{_human(totals.macs)} MACs; simulated in {report.seconds:.1f} s")
    for name, value in report.outputs.items():
        flat = value.reshape(len(value), -1) if value.ndim > 1 else value.reshape(1, -1)
        stdout.print(f"output {name}: {'x'.join(map(str, value.shape))} {value.dtype}, argmax (first sample) "
                     f"{int(flat[0].argmax()) if flat.size else '-'}")


@cli.command("export-reference")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.argument("out_dir", metavar="OUTDIR", type=click.Path(file_okay=False))
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help=".npy (single-input models) or .npz keyed by input name.")
@click.option("--random", "random_input", is_flag=True, help="Seeded random inputs of the model's input shapes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", help="File name prefix (default: MODEL's stem).")
def export_reference(model_path, out_dir, input_path, random_input, seed, name) -> None:
    """Write the hardware reference bundle of a quantized MODEL into OUTDIR.

    <name>_trace.yaml (per-layer topology), <name>_parameters.npz (weights and biases on the
    quantization grid) and <name>_inout.yaml (reference input and output); docs/REFERENCE_EXPORT.md.

    \b
    Example:
      onnxsparse export-reference pruned_int8.onnx ref/ --input x.npy
    """
    from onnxsparse.systolic.export import export_reference as write_bundle

    model = _load_quantized(model_path)
    feeds = _simulation_inputs(model, input_path, random_input, seed)
    bundle = write_bundle(model, Path(out_dir), name or Path(model_path).stem, feeds)
    for path in bundle.paths:
        stdout.print(f"wrote {path}")
    stdout.print(f"{bundle.layers} layers ({bundle.mac_layers} with weights) exported")


# ---------------------------------------------------------------------------------------------
# zoo and demo
# ---------------------------------------------------------------------------------------------


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Where to write (default: the cache).")
def zoo(names, seed, directory) -> None:
    """Materialize the onnx package's light zoo models with seeded weights (cached).

    NAMES default to all: resnet50 vgg19 densenet121 inception_v1 inception_v2 shufflenet
    squeezenet alexnet zfnet512.

    \b
    Example:
      onnxsparse zoo resnet50 squeezenet
    """
    from onnxsparse import zoo as zoo_models

    for name in names or zoo_models.ZOO_MODELS:
        started = time.perf_counter()
        path = zoo_models.zoo_model_path(name, seed, Path(directory) if directory else None)
        stdout.print(f"{name:14s} {path}  ({time.perf_counter() - started:.1f} s)")


@cli.command()
@click.option("--model", "model_path", type=click.Path(dir_okay=False), help="Default: samples/digits/digits_cnn.onnx.")
@click.option("--train", "train_path", type=click.Path(dir_okay=False),
              help="Calibration data. Default: samples/digits/digits_train.npz.")
@click.option("--test", "test_path", type=click.Path(dir_okay=False),
              help="Held-out data for accuracy. Default: samples/digits/digits_test.npz.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="out/demo", show_default=True)
@click.option("-p", "--pattern", default="unstructured", show_default=True)
@click.option("-s", "--sparsity", type=float, default=0.5, show_default=True)
def demo(model_path, train_path, test_path, out_dir, pattern, sparsity) -> None:
    """The whole pipeline on the bundled digits sample, with a report.

    \b
    Example:
      onnxsparse demo --pattern mcbbs:c2r4 --sparsity 0.5
    """
    from onnxsparse.demo import run_demo

    run_demo(model_path, train_path, test_path, Path(out_dir), pattern, sparsity, stdout)


# ---------------------------------------------------------------------------------------------
# entry point: errors become one line and an exit status
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="onnxsparse", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:  # click's own usage errors, in the same one-line form
        command = exc.ctx.command_path if exc.ctx else "onnxsparse"
        stderr.print(f"onnxsparse: error: {exc.format_message()} (see '{command} --help')", markup=False,
                     soft_wrap=True)
        return exc.exit_code
    except click.ClickException as exc:
        stderr.print(f"onnxsparse: error: {exc.format_message()}", markup=False, soft_wrap=True)
        return exc.exit_code
    except click.exceptions.Abort:
        stderr.print("onnxsparse: aborted")
        return 1
    except OnnxSparseError as exc:
        if debug:
            raise
        stderr.print(f"onnxsparse: error: {exc}", markup=False, soft_wrap=True)
        return exc.exit_code
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            raise
        stderr.print(f"onnxsparse: internal error: {type(exc).__name__}: {exc} (run with --debug for the "
                     "traceback and report it)", markup=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
