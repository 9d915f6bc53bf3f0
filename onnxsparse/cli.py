"""The `onnxsparse` command: parse, call the API, print. No logic of its own."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import onnxsparse
from onnxsparse import model as model_io
from onnxsparse.errors import OnnxSparseError, UsageError
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
    """A transient progress bar on stderr, advanced once per layer."""

    def __init__(self, what: str, total: int, enabled: bool = True):
        self.bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), console=stderr, transient=True,
                            disable=not enabled or not stderr.is_terminal)
        self.task = self.bar.add_task("", total=total)

    def __enter__(self):
        self.bar.start()
        return lambda name: self.bar.update(self.task, advance=1, description=name)

    def __exit__(self, *exc_info):
        self.bar.stop()


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
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="Default: samples/digits/digits.npz.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="out/demo", show_default=True)
@click.option("-p", "--pattern", default="unstructured", show_default=True)
@click.option("-s", "--sparsity", type=float, default=0.5, show_default=True)
def demo(model_path, data_path, out_dir, pattern, sparsity) -> None:
    """The whole pipeline on the bundled digits sample, with a report.

    \b
    Example:
      onnxsparse demo --pattern mcbbs:c2r4 --sparsity 0.5
    """
    from onnxsparse.demo import run_demo

    run_demo(model_path, data_path, Path(out_dir), pattern, sparsity, stdout)


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
