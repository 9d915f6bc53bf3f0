"""Each native chain's time inside the packed model against the same chain run alone.

A layer inside a model can be slower than the same layer timed alone in a loop: its input, its
output memory and its weights are not in cache the way a loop leaves them. This script runs the
packed model (every packed layer sparse) several times with `steps.Chain.run` timed, keeps the
input each chain saw, then runs each chain alone on it, and prints both medians per chain and the
totals. Batch 1, medians over --runs.

    .venv/bin/python benchmarks/chain_times.py                     # ResNet-50, 1x16 at 80%, fp32
    .venv/bin/python benchmarks/chain_times.py --precision int8 --sparsity 0.9
    .venv/bin/python benchmarks/chain_times.py --model packed.onnx  # any packed model
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import onnx

import onnxsparse
from onnxsparse.formats.pack import pack_model
from onnxsparse.quant.lower import lower_to_integer
from onnxsparse.quant.quantize import quantize
from onnxsparse.runner import random_inputs
from onnxsparse.runtime import InferenceSession, regions, steps
from onnxsparse.zoo import zoo_model_path
from runtime_speed import calibration  # benchmarks/: the same calibration records as the speed runs


def resnet50_packed(sparsity: float, precision: str) -> onnx.ModelProto:
    dense = onnxsparse.load_model(zoo_model_path("resnet50"))
    model = onnxsparse.prune(dense, "1x16", sparsity)
    if precision == "int8":
        model = lower_to_integer(quantize(model, calibration(dense), weight_bits=7))
    return pack_model(model, choose_kernel=lambda node: {"kernel": "sparse", "reason": "chain_times"}).model


def chain_times(model: onnx.ModelProto, runs: int, threads: int) -> list[tuple[str, float, float]]:
    """(chain, median ms inside the model, median ms alone) in run order."""
    inside: dict[str, list[float]] = defaultdict(list)
    seen: dict[str, tuple] = {}
    chains: dict[str, steps.Chain] = {}
    original = steps.Chain.run

    def timed(chain, x, residual, out=None):
        if chain.label not in seen:  # before the run: an in-place residual is overwritten by it
            seen[chain.label] = (x.copy(), None if residual is None else residual.copy())
            chains[chain.label] = chain
        started = time.perf_counter()
        y = original(chain, x, residual, out)
        inside[chain.label].append(time.perf_counter() - started)
        return y

    session = InferenceSession(model, threads=threads)
    feeds = random_inputs(model, 0)
    # a replaying region calls the kernels directly: plan every run so that each chain is timed
    steps.Chain.run, regions.Region.replay = timed, False
    try:
        for _ in range(runs + 3):
            session.run(None, feeds)
    finally:
        steps.Chain.run, regions.Region.replay = original, True
    rows = []
    for label, chain in chains.items():
        x, residual = seen[label]
        alone = []
        for _ in range(runs + 3):
            started = time.perf_counter()
            chain.run(x, residual)
            alone.append(time.perf_counter() - started)
        rows.append((label, statistics.median(inside[label][3:]) * 1e3, statistics.median(alone[3:]) * 1e3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", help="a packed model (default: ResNet-50 pruned 1x16 and packed all sparse)")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = onnx.load(args.model) if args.model else resnet50_packed(args.sparsity, args.precision)
    rows = chain_times(model, args.runs, args.threads)
    print(f"{'chain':<40}{'in model':>10}{'alone':>10}{'ratio':>8}   (median ms, {args.threads} threads)")
    for label, inside, alone in rows:
        print(f"{label:<40}{inside:>10.3f}{alone:>10.3f}{inside / alone:>8.2f}")
    total_inside, total_alone = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'total (' + str(len(rows)) + ' chains)':<40}{total_inside:>10.2f}{total_alone:>10.2f}"
          f"{total_inside / total_alone:>8.2f}")


if __name__ == "__main__":
    main()
