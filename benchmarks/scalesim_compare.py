"""SCALE-Sim 3.0.0 side by side with onnxsparse's systolic cycle model on ResNet-50's conv layers.

    .venv/bin/python benchmarks/scalesim_compare.py [--arrays 16x16,32x32] [--dataflows ws,os]
        [--layers N|NAME,...] [--json OUT] [--with-values] [--no-traces] [--keep DIR]

The layers are the real shapes of the materialized zoo ResNet-50 (onnx shape inference): every
Conv, and the final Gemm as a 1x1 convolution of a 1x1 map; identical shapes are run once and
reported with their multiplicity. scalesim runs in its own virtualenv (benchmarks/.scalesim-venv,
created on first use with `pip install scalesim==3.0.0 'numpy<2.4'`, since scalesim breaks on the
numpy 2.4 of the project venv), one scalesim process at a time, through a small driver generated
into a temporary folder; it runs stall-free (InterfaceBandwidth CALC, SRAMs large enough that the
OFMAP buffer never drains mid-layer) and, like its CLI, writes its cycle traces unless --no-traces.
For each layer, its COMPUTE_REPORT.csv (total cycles, stall cycles, utilization, mapping efficiency)
is compared with onnxsparse.systolic.cycles.dense_compute_cycles / mapping_efficiency.

scalesim has no padding parameter and computes the output size as ceil((H - k + s) / s)
(scalesim/topology_utils.py, topo_calc_hyperparams), where ONNX floors (H + pads - k) / s + 1. So
each layer is given the pre-padded input cut to the rows and columns some window reaches,
(Ho - 1)·s + k: that is H + pads whenever the stride divides evenly, and one less for the stride-2
layers where it does not (with H + pads those would come out one output row and column larger).

--with-values also times `onnxsparse simulate` (values and cycles of the whole quantized network,
per configuration) on a ResNet-50 quantized with 2 random calibration inputs, and checks its
per-node compute cycles against scalesim's; it is skipped, with a message, when the installed
onnxsparse has no `simulate` command.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCALESIM_VENV = REPO / "benchmarks" / ".scalesim-venv"
SCALESIM_REQUIREMENTS = ("scalesim==3.0.0", "numpy<2.4")
SCALESIM_VERSION = "3.0.0"
# Words (1 byte each) per SRAM. The largest ResNet-50 output tensor has 802,816 elements, so a
# 2 MiB OFMAP buffer (half active) never starts draining mid-layer and cannot stall; in CALC mode
# the IFMAP/filter read buffers answer every request at hit latency whatever their size. Much
# larger buffers only slow scalesim down (its prefetch model pads every set to size/100 words).
SRAM_KB = 2048
MARK = "@@scalesim@@ "


# --------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class ConvShape:
    """One convolution as scalesim sees it (per group, stride equal in both directions)."""

    ifmap_h: int  # pre-padded input height cut to what the windows reach
    ifmap_w: int
    kernel_h: int
    kernel_w: int
    channels: int  # input channels per group
    filters: int  # output channels per group
    stride: int
    out_h: int
    out_w: int
    padded_h: int  # H + pad_top + pad_bottom (what --uncut-padding passes instead of ifmap_h)
    padded_w: int

    @property
    def output_pixels(self) -> int:
        return self.out_h * self.out_w

    @property
    def reduction_length(self) -> int:
        return self.kernel_h * self.kernel_w * self.channels


@dataclass
class Layer:
    shape: ConvShape
    names: list[str] = field(default_factory=list)
    multiplicity: int = 0  # conv nodes with this shape, times their groups

    @property
    def name(self) -> str:
        return self.names[0]


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def resnet50_layers() -> tuple[list[Layer], list[str], Path]:
    """Unique conv shapes of the zoo ResNet-50 in graph order, and the nodes that were skipped."""
    import onnx

    from onnxsparse import model as model_io
    from onnxsparse.zoo import zoo_model_path

    path = zoo_model_path("resnet50")
    model = onnx.load(str(path))
    shapes = model_io.infer_shapes(model)
    inits = {init.name: tuple(init.dims) for init in model.graph.initializer}
    unique: dict[ConvShape, Layer] = {}
    skipped: list[str] = []

    def add(name: str, shape: ConvShape, count: int) -> None:
        layer = unique.setdefault(shape, Layer(shape))
        layer.names.append(name)
        layer.multiplicity += count

    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.op_type == "Conv":
            x = shapes.get(node.input[0])
            w = inits.get(node.input[1]) or shapes.get(node.input[1])
            y = shapes.get(node.output[0])
            if not x or not w or not y or len(x) != 4 or len(y) != 4:
                skipped.append(f"{name}: not a 2-D convolution with known shapes")
                continue
            attrs = _attrs(node)
            groups = int(attrs.get("group", 1))
            kernel_h, kernel_w = int(w[2]), int(w[3])
            sh, sw = (int(s) for s in attrs.get("strides", (1, 1)))
            dil = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
            pads = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))]
            if dil != (1, 1) or sh != sw:
                skipped.append(f"{name}: dilation {dil} / strides ({sh},{sw}) not expressible in scalesim")
                continue
            if x[0] != 1:
                skipped.append(f"{name}: batch {x[0]} (scalesim models batch 1)")
                continue
            out_h, out_w = int(y[2]), int(y[3])
            if attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
                expect = ((x[2] + pads[0] + pads[2] - kernel_h) // sh + 1,
                          (x[3] + pads[1] + pads[3] - kernel_w) // sw + 1)
                assert expect == (out_h, out_w), f"{name}: inferred output {(out_h, out_w)} != {expect}"
            shape = ConvShape(
                ifmap_h=(out_h - 1) * sh + kernel_h, ifmap_w=(out_w - 1) * sw + kernel_w,
                kernel_h=kernel_h, kernel_w=kernel_w, channels=int(w[1]), filters=int(w[0]) // groups,
                stride=sh, out_h=out_h, out_w=out_w, padded_h=int(x[2]) + pads[0] + pads[2],
                padded_w=int(x[3]) + pads[1] + pads[3])
            add(name, shape, groups)
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            w = inits.get(node.input[1])
            if not a or not w or len(a) != 2 or len(w) != 2:
                skipped.append(f"{node.op_type} {name}: not a fully connected layer with a constant weight")
                continue
            attrs = _attrs(node)
            if node.op_type == "Gemm" and attrs.get("transA", 0):
                skipped.append(f"{name}: transA")
                continue
            filters = w[0] if node.op_type == "Gemm" and attrs.get("transB", 0) else w[1]
            # A fully connected layer: a 1x1 convolution of a 1x1 map with a[1] channels.
            shape = ConvShape(1, 1, 1, 1, int(a[1]), int(filters), 1, 1, 1, 1, 1)
            add(name, shape, int(a[0]))
    return list(unique.values()), skipped, path


def scalesim_output_size(size: int, kernel: int, stride: int) -> int:
    """scalesim/topology_utils.py topo_calc_hyperparams: ofmap = ceil((ifmap - filt + stride) / stride)."""
    return int(math.ceil((size - kernel + stride) / stride))


# --------------------------------------------------------------------------------------------
# scalesim in its own venv


def ensure_scalesim_venv(venv: Path = SCALESIM_VENV) -> Path:
    """The venv's python with scalesim 3.0.0 and numpy < 2.4, creating or repairing it."""
    python = venv / "bin" / "python"
    probe = ("import importlib.metadata as m, numpy; "
             "v = tuple(int(p) for p in numpy.__version__.split('.')[:2]); "
             f"assert m.version('scalesim') == '{SCALESIM_VERSION}' and v < (2, 4), v; "
             "import scalesim.scale_sim")
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    print(f"creating {venv.relative_to(REPO)} with {' '.join(SCALESIM_REQUIREMENTS)} ...", file=sys.stderr)
    if not python.exists():
        subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *SCALESIM_REQUIREMENTS], check=True)
    subprocess.run([str(python), "-c", probe], check=True)
    return python


CONFIG_TEMPLATE = """\
[general]
run_name = {run_name}

[run_presets]
InterfaceBandwidth = CALC
UseRamulatorTrace = False

[architecture_presets]
ArrayHeight = {rows}
ArrayWidth = {cols}
IfmapSramSzkB = {sram}
FilterSramSzkB = {sram}
OfmapSramSzkB = {sram}
IfmapOffset = 0
FilterOffset = 10000000
OfmapOffset = 20000000
Dataflow = {dataflow}
ReadRequestBuffer = 512
WriteRequestBuffer = 512

[layout]
IfmapCustomLayout = False
FilterCustomLayout = False
IfmapSRAMBankBandwidth = 10
IfmapSRAMBankNum = 10
IfmapSRAMBankPort = 2
FilterSRAMBankBandwidth = 10
FilterSRAMBankNum = 10
FilterSRAMBankPort = 2

[sparsity]
SparsitySupport = false
"""

# Runs inside the scalesim venv: one scalesim object per layer (its own topology CSV and output
# folder), timed around construction + run_scale (which parses the files, simulates, writes the
# reports and, unless save_disk_space, the six SRAM/DRAM cycle traces).
DRIVER = r'''
import json, os, shutil, sys, time
from scalesim.scale_sim import scalesim

job = json.load(open(sys.argv[1]))
layout = os.path.join(job["dir"], "layout.csv")
with open(layout, "w") as f:
    f.write("Layer name,\n")  # header only: custom layouts are off
for layer in job["layers"]:
    d = os.path.join(job["dir"], layer["id"])
    os.makedirs(d, exist_ok=True)
    topology = os.path.join(d, "topology.csv")
    with open(topology, "w") as f:
        f.write("Layer name,IFMAP Height,IFMAP Width,Filter Height,Filter Width,Channels,Num Filter,Strides,\n")
        f.write(",".join(str(v) for v in layer["row"]) + ",\n")
    start, cpu_start = time.perf_counter(), time.process_time()
    sim = scalesim(save_disk_space=not job["save_traces"], verbose=False, config=job["config"],
                   topology=topology, layout=layout)
    sim.run_scale(top_path=os.path.join(d, "out"))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    run_dir = os.path.join(d, "out", job["run_name"])
    traces = os.path.join(run_dir, "layer0")
    trace_bytes = sum(os.path.getsize(os.path.join(traces, n)) for n in os.listdir(traces)) \
        if os.path.isdir(traces) else 0
    if not job["keep_traces"]:
        shutil.rmtree(traces, ignore_errors=True)
    print("@@scalesim@@ " + json.dumps({"id": layer["id"], "seconds": seconds, "cpu_seconds": cpu_seconds,
                                          "trace_bytes": trace_bytes,
                                          "report": os.path.join(run_dir, "COMPUTE_REPORT.csv")}), flush=True)
'''


def read_compute_report(path: str) -> dict:
    """The one row of a single-layer COMPUTE_REPORT.csv (scalesim/simulator.py generate_reports)."""
    with open(path, newline="") as f:
        rows = [[c.strip() for c in row] for row in csv.reader(f) if any(c.strip() for c in row)]
    header, values = rows[0], rows[1]
    row = dict(zip(header, values))
    return {
        "total_cycles_incl_prefetch": int(float(row["Total Cycles (incl. prefetch)"])),
        "total_cycles": int(float(row["Total Cycles"])),
        "stall_cycles": int(float(row["Stall Cycles"])),
        "overall_util_pct": float(row["Overall Util %"]),
        "mapping_efficiency_pct": float(row["Mapping Efficiency %"]),
        "compute_util_pct": float(row["Compute Util %"]),
    }


def run_scalesim(python: Path, layers: list[Layer], dataflow: str, rows: int, cols: int, workdir: Path,
                 save_traces: bool, keep_traces: bool, uncut_padding: bool = False) -> list[dict]:
    """scalesim's report and wall time for every layer, one subprocess for the configuration."""
    run_name = f"{dataflow}_{rows}x{cols}"
    cfg_dir = workdir / run_name
    cfg_dir.mkdir(parents=True, exist_ok=True)
    config = cfg_dir / "scale.cfg"
    config.write_text(CONFIG_TEMPLATE.format(run_name=run_name, rows=rows, cols=cols, sram=SRAM_KB, dataflow=dataflow))
    driver = workdir / "driver.py"
    driver.write_text(DRIVER)
    job_layers = []
    for i, layer in enumerate(layers):
        s = layer.shape
        height, width = (s.padded_h, s.padded_w) if uncut_padding else (s.ifmap_h, s.ifmap_w)
        if not uncut_padding:
            assert scalesim_output_size(height, s.kernel_h, s.stride) == s.out_h
            assert scalesim_output_size(width, s.kernel_w, s.stride) == s.out_w
        job_layers.append({"id": f"L{i:02d}", "row": [f"L{i:02d}", height, width, s.kernel_h, s.kernel_w,
                                                       s.channels, s.filters, s.stride],
                           "scalesim_output": [scalesim_output_size(height, s.kernel_h, s.stride),
                                               scalesim_output_size(width, s.kernel_w, s.stride)]})
    job = cfg_dir / "job.json"
    job.write_text(json.dumps({"dir": str(cfg_dir), "config": str(config), "run_name": run_name,
                               "save_traces": save_traces, "keep_traces": keep_traces, "layers": job_layers}))
    results: list[dict] = []
    proc = subprocess.Popen([str(python), str(driver), str(job)], stdout=subprocess.PIPE, text=True, cwd=cfg_dir)
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith(MARK):
            continue
        done = json.loads(line[len(MARK):])
        done.update(read_compute_report(done.pop("report")))
        done["ifmap"] = job_layers[len(results)]["row"][1:3]
        done["output"] = job_layers[len(results)]["scalesim_output"]
        results.append(done)
        layer = layers[len(results) - 1]
        print(f"  scalesim {run_name} {len(results)}/{len(layers)} {layer.name}: {done['total_cycles']} cycles, "
              f"{done['seconds']:.1f} s ({done['cpu_seconds']:.1f} s CPU)", file=sys.stderr, flush=True)
    if proc.wait() != 0 or len(results) != len(layers):
        raise SystemExit(f"scalesim driver failed for {run_name} (exit {proc.returncode}) after "
                         f"{len(results)}/{len(layers)} layers; its files are in {cfg_dir}")
    return results


# --------------------------------------------------------------------------------------------
# onnxsparse


def onnxsparse_model(layers: list[Layer], dataflow: str, rows: int, cols: int) -> tuple[list[dict], float]:
    from onnxsparse.systolic.cycles import dense_compute_cycles, mapping_efficiency

    start = time.perf_counter()
    out = []
    for layer in layers:
        args = (dataflow, rows, cols, layer.shape.output_pixels, layer.shape.reduction_length, layer.shape.filters)
        out.append({"cycles": dense_compute_cycles(*args), "mapping_efficiency": mapping_efficiency(*args)})
    return out, time.perf_counter() - start


def simulate_layer_cycles(report: dict) -> tuple[int | None, dict[str, dict]]:
    """Total and per-layer (by node name) compute cycles of `onnxsparse simulate --json`
    (schemas/simulate-report.schema.json), or (None, {}) when the report has another form."""
    if not isinstance(report, dict):
        return None, {}
    total = (report.get("totals") or {}).get("compute_cycles")
    layers = {}
    for layer in report.get("layers") or []:
        if isinstance(layer, dict) and layer.get("kind") == "mac" and "compute_cycles" in layer:
            layers[layer.get("name")] = layer
    return total, layers


def run_simulate(model: Path, configs: list[tuple[str, int, int]], workdir: Path) -> dict:
    """Time `onnxsparse simulate` on the quantized ResNet-50, or say why it was skipped."""
    import numpy as np
    import onnx

    exe = Path(sys.executable).with_name("onnxsparse")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "onnxsparse.cli"]
    probe = subprocess.run([*cli, "simulate", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {"skipped": "this onnxsparse has no `simulate` command: "
                           + (probe.stderr.strip().splitlines() or ["(no message)"])[-1]}
    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    rng = np.random.default_rng(0)
    calib = {}
    for value in inputs:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
        calib[value.name] = rng.standard_normal((2, *dims[1:])).astype(np.float32)
    calib_path = workdir / "calib.npz"
    np.savez(calib_path, **calib)
    quantized = workdir / "resnet50_int8.onnx"
    start = time.perf_counter()
    q = subprocess.run([*cli, "quantize", str(model), str(quantized), "--calib", str(calib_path)],
                       capture_output=True, text=True)
    quantize_seconds = time.perf_counter() - start
    if q.returncode != 0:
        return {"skipped": "quantize failed: " + (q.stderr.strip().splitlines() or ["?"])[-1]}
    runs = []
    for dataflow, rows, cols in configs:
        command = [*cli, "simulate", str(quantized), "--array", f"{rows}x{cols}", "--dataflow", dataflow,
                   "--random", "--json"]
        start = time.perf_counter()
        r = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        entry = {"dataflow": dataflow, "array": f"{rows}x{cols}", "seconds": seconds, "returncode": r.returncode,
                 "command": " ".join(["onnxsparse", *command[len(cli):]])}
        if r.returncode != 0:
            entry["error"] = (r.stderr.strip().splitlines() or ["?"])[-1]
        else:
            try:
                total, per_layer = simulate_layer_cycles(json.loads(r.stdout))
            except json.JSONDecodeError:
                total, per_layer = None, {}
            entry["total_compute_cycles"] = total
            entry["layers"] = {name: {k: layer.get(k) for k in ("output_pixels", "reduction_length", "filters",
                                                                "compute_cycles", "mapping_efficiency")}
                               for name, layer in per_layer.items()}
        print(f"  onnxsparse simulate {dataflow} {rows}x{cols}: {seconds:.1f} s (exit {r.returncode})",
              file=sys.stderr, flush=True)
        runs.append(entry)
    return {"quantize_seconds": quantize_seconds, "runs": runs}


# --------------------------------------------------------------------------------------------
# Report


def _table(headers: list[str], rows: list[list], align: str) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare(layers: list[Layer], theirs: list[dict], ours: list[dict]) -> tuple[list[dict], dict]:
    rows, equal, eff_equal = [], 0, 0
    totals = {"scalesim": 0, "onnxsparse": 0, "scalesim_network": 0, "onnxsparse_network": 0}
    for layer, t, o in zip(layers, theirs, ours):
        s = layer.shape
        diff = o["cycles"] - t["total_cycles"]
        same_eff = abs(o["mapping_efficiency"] * 100 - t["mapping_efficiency_pct"]) < 1e-6
        equal += diff == 0 and t["stall_cycles"] == 0
        eff_equal += same_eff
        totals["scalesim"] += t["total_cycles"]
        totals["onnxsparse"] += o["cycles"]
        totals["scalesim_network"] += t["total_cycles"] * layer.multiplicity
        totals["onnxsparse_network"] += o["cycles"] * layer.multiplicity
        rows.append({"layer": layer.name, "nodes": layer.names, "multiplicity": layer.multiplicity,
                     "shape": asdict(s), "P": s.output_pixels, "Wn": s.reduction_length, "K": s.filters,
                     "scalesim": t, "onnxsparse": o, "difference": diff, "mapping_efficiency_equal": same_eff})
    summary = {"layers": len(layers), "equal": equal, "mapping_efficiency_equal": eff_equal, **totals,
               "scalesim_seconds": sum(t["seconds"] for t in theirs),
               "scalesim_cpu_seconds": sum(t["cpu_seconds"] for t in theirs),
               "scalesim_network_seconds": sum(t["seconds"] * layer.multiplicity for t, layer in zip(theirs, layers)),
               "trace_bytes": sum(t["trace_bytes"] for t in theirs)}
    return rows, summary


def print_configuration(name: str, rows: list[dict], summary: dict, our_seconds: float) -> None:
    print(f"\n== {name} ==")
    table = [[r["layer"], r["multiplicity"], r["P"], r["Wn"], r["K"], r["scalesim"]["total_cycles"],
              r["onnxsparse"]["cycles"], f"{r['difference']:+d}", r["scalesim"]["stall_cycles"],
              f"{r['scalesim']['mapping_efficiency_pct']:.2f}", f"{r['onnxsparse']['mapping_efficiency'] * 100:.2f}",
              f"{r['scalesim']['seconds']:.1f}"] for r in rows]
    headers = ["layer", "x", "P", "Wn", "K", "scalesim", "onnxsparse", "diff", "stall", "map% sim", "map% ours",
               "sim s"]
    if any(r["scalesim"]["output"] != [r["shape"]["out_h"], r["shape"]["out_w"]] for r in rows):
        # --uncut-padding: scalesim's own output size next to ONNX's
        headers.insert(3, "scalesim P")
        for r, line in zip(rows, table):
            line.insert(3, r["scalesim"]["output"][0] * r["scalesim"]["output"][1])
    print(_table(headers, table, "l" + "r" * (len(headers) - 1)))
    print(f"{name}: cycles equal {summary['equal']}/{summary['layers']}, mapping efficiency equal "
          f"{summary['mapping_efficiency_equal']}/{summary['layers']}; unique layers total scalesim "
          f"{summary['scalesim']:,} vs onnxsparse {summary['onnxsparse']:,}; network (x multiplicity) "
          f"{summary['scalesim_network']:,} vs {summary['onnxsparse_network']:,}; scalesim "
          f"{summary['scalesim_seconds']:.1f} s vs onnxsparse model {our_seconds * 1e3:.3f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arrays", default="16x16,32x32", help="comma-separated ROWSxCOLS (default 16x16,32x32)")
    parser.add_argument("--dataflows", default="ws,os", help="comma-separated, of ws, os, is (default ws,os)")
    parser.add_argument("--layers", default=None,
                        help="only the first N unique layers, or a comma-separated list of layer names")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this file")
    parser.add_argument("--with-values", action="store_true",
                        help="also time `onnxsparse simulate` on a quantized ResNet-50 (skipped if absent)")
    parser.add_argument("--no-traces", action="store_true",
                        help="scalesim save_disk_space: no cycle traces (its CLI always writes them)")
    parser.add_argument("--uncut-padding", action="store_true",
                        help="give scalesim H + pads as the input size (shows its ceil output size on "
                             "stride-2 layers) instead of the (Ho - 1)*s + k that matches ONNX")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep scalesim's files (reports and traces) in this folder")
    args = parser.parse_args(argv)

    configs = []
    for dataflow in args.dataflows.split(","):
        for array in args.arrays.split(","):
            rows, cols = (int(v) for v in array.lower().split("x"))
            configs.append((dataflow.strip(), rows, cols))

    layers, skipped, model_path = resnet50_layers()
    total_nodes = sum(layer.multiplicity for layer in layers)
    if args.layers is not None and args.layers.strip().isdigit():
        layers = layers[: int(args.layers)]
    elif args.layers is not None:
        wanted = [n.strip() for n in args.layers.split(",") if n.strip()]
        by_name = {name: layer for layer in layers for name in layer.names}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            parser.error(f"unknown layer {', '.join(unknown)}; names: {', '.join(layer.name for layer in layers)}")
        layers = list({id(by_name[n]): by_name[n] for n in wanted}.values())
    print(f"ResNet-50 ({model_path}): {total_nodes} conv/fc layers, {len(layers)} unique shapes compared"
          + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))
    python = ensure_scalesim_venv()

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scalesim-compare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": str(model_path), "scalesim": SCALESIM_VERSION, "sram_kb": SRAM_KB,
                    "traces": not args.no_traces, "uncut_padding": args.uncut_padding, "skipped_nodes": skipped,
                    "configurations": []}
    try:
        for dataflow, rows, cols in configs:
            name = f"{dataflow} {rows}x{cols}"
            theirs = run_scalesim(python, layers, dataflow, rows, cols, workdir, save_traces=not args.no_traces,
                                  keep_traces=args.keep is not None, uncut_padding=args.uncut_padding)
            ours, our_seconds = onnxsparse_model(layers, dataflow, rows, cols)
            table, summary = compare(layers, theirs, ours)
            summary["onnxsparse_seconds"] = our_seconds
            print_configuration(name, table, summary, our_seconds)
            report["configurations"].append({"dataflow": dataflow, "array": f"{rows}x{cols}", "layers": table,
                                             "summary": summary})
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
        if args.with_values:
            report["simulate"] = run_simulate(model_path, configs, workdir)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\n== timing ==")
    sim_total = sum(c["summary"]["scalesim_seconds"] for c in report["configurations"])
    ours_total = sum(c["summary"]["onnxsparse_seconds"] for c in report["configurations"])
    for c in report["configurations"]:
        s = c["summary"]
        print(f"{c['dataflow']} {c['array']}: scalesim {s['scalesim_seconds']:.1f} s wall "
              f"({s['scalesim_cpu_seconds']:.1f} s CPU) for {s['layers']} unique layers "
              f"({s['scalesim_network_seconds']:.1f} s for the network x multiplicity; traces "
              f"{s['trace_bytes'] / 2**20:.0f} MiB), onnxsparse cycle model {s['onnxsparse_seconds'] * 1e3:.3f} ms")
    sim_cpu = sum(c["summary"]["scalesim_cpu_seconds"] for c in report["configurations"])
    print(f"all: scalesim {sim_total:.1f} s wall ({sim_cpu:.1f} s CPU) vs onnxsparse cycle model "
          f"{ours_total * 1e3:.3f} ms (ratio {sim_total / max(ours_total, 1e-9):,.0f}x)")
    simulate = report.get("simulate")
    if simulate is None and args.with_values is False:
        print("onnxsparse simulate (values): not run (--with-values)")
    elif simulate is not None and "skipped" in simulate:
        print(f"onnxsparse simulate (values): skipped: {simulate['skipped']}")
    elif simulate is not None:
        print(f"onnxsparse quantize (random calibration, 2 samples): {simulate['quantize_seconds']:.1f} s")
        by_config = {(c["dataflow"], c["array"]): c["summary"] for c in report["configurations"]}
        for run in simulate["runs"]:
            s = by_config[(run["dataflow"], run["array"])]
            line = f"{run['command']}: {run['seconds']:.1f} s"
            if run["returncode"] != 0:
                line += f" FAILED: {run.get('error')}"
            else:
                network = s["scalesim_network_seconds"]
                scope = "the network" if args.layers is None else f"only the {s['layers']} compared shapes"
                line += (f" for the whole network with values vs scalesim {network:.1f} s ({scope} x multiplicity, "
                         f"ratio {network / run['seconds']:.1f}x)")
                if run["layers"] and args.layers is None:
                    mac_cycles = sum(layer["compute_cycles"] for layer in run["layers"].values())
                    line += (f"; its conv/fc compute cycles {mac_cycles:,} vs scalesim network total "
                             f"{s['scalesim_network']:,} (with its vector ops: {run['total_compute_cycles']:,})")
                # Per conv/fc node: simulate's compute cycles against scalesim's for that node's shape.
                config = next(c for c in report["configurations"]
                              if (c["dataflow"], c["array"]) == (run["dataflow"], run["array"]))
                scalesim_by_node = {n: r["scalesim"]["total_cycles"] for r in config["layers"] for n in r["nodes"]}
                matched = [(n, entry["compute_cycles"], scalesim_by_node[n]) for n, entry in run["layers"].items()
                           if n in scalesim_by_node]
                same = sum(ours == theirs for _, ours, theirs in matched)
                line += f"; per node equal to scalesim {same}/{len(matched)}"
                mismatched = [f"{n} {ours} vs {theirs}" for n, ours, theirs in matched if ours != theirs]
                if mismatched:
                    line += " (" + ", ".join(mismatched[:5]) + ")"
            print(line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
