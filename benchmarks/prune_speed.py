"""How long `prune` takes on materialized ResNet-50, per pattern (median of repeats).

    .venv/bin/python benchmarks/prune_speed.py [--model resnet50] [--repeats 3] [--json]

Times onnxsparse.prune_model on an already loaded model (the work the pattern does: reading
every weight, masking, writing back, checking the result), and separately the whole command
(load + prune + atomic save) once per pattern. Acceptance (issue 2): under 10 s per pattern.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxsparse
from onnxsparse.zoo import zoo_model_path

CASES = [("unstructured", 0.8, "local"), ("unstructured", 0.8, "global"), ("2:4", None, "local"),
         ("1x16", 0.8, "local"), ("1x16", 0.8, "global"), ("bank:16", 0.75, "local"),
         ("mcbbs:c2r4", 0.75, "local"), ("kernel", 0.5, "local"), ("filter", 0.5, "local"),
         ("channel", 0.5, "local")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    path = zoo_model_path(args.model)
    model = onnxsparse.load_model(path)
    rows = []
    for pattern, sparsity, scope in CASES:
        timings = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = onnxsparse.prune_model(model, pattern, sparsity, scope=scope)
            timings.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "-m", "onnxsparse.cli", "prune", str(path), str(Path(folder) / "o.onnx"),
                       "-p", pattern, "--scope", scope] + (["-s", str(sparsity)] if sparsity is not None else [])
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            command_s = time.perf_counter() - started
        rows.append({"pattern": pattern, "sparsity": sparsity, "scope": scope,
                     "prune_median_s": statistics.median(timings), "command_s": command_s,
                     "achieved_sparsity": result.sparsity})
    if args.json:
        print(json.dumps({"model": args.model, "repeats": args.repeats, "rows": rows}, indent=2))
        return
    print(f"prune speed on materialized {args.model} (median of {args.repeats}; command = load+prune+save, once)")
    print(f"{'pattern':14s} {'sparsity':>8s} {'scope':6s} {'prune s':>8s} {'command s':>9s} {'achieved':>9s}")
    for row in rows:
        target = "-" if row["sparsity"] is None else f"{row['sparsity']:.2f}"
        print(f"{row['pattern']:14s} {target:>8s} {row['scope']:6s} {row['prune_median_s']:8.2f} "
              f"{row['command_s']:9.2f} {100 * row['achieved_sparsity']:8.1f}%")


if __name__ == "__main__":
    main()
