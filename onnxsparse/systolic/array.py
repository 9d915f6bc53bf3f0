"""The modelled accelerator: array size, dataflow, PE option, SRAM sizes and DRAM bandwidth.

Parsing of the command-line forms ("32x32", "256,256,128", "mcbbs:c2r4p8") lives here so that
the CLI and the Python API reject the same bad values with the same one-line UsageError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from onnxsparse.errors import UsageError
from onnxsparse.sparsity.patterns import MCBBS, NM, Block, Pattern
from onnxsparse.systolic.cycles import DATAFLOWS

MAX_ARRAY_SIDE = 4096
MAX_SRAM_KB = 1 << 20  # 1 GiB per buffer
DEFAULT_SRAM_KB = (1024, 1024, 1024)
DEFAULT_DRAM_BYTES_PER_CYCLE = 32.0
PE_SYNTAX = "dense, mcbbs:cCrRpP (e.g. mcbbs:c2r4p8; p defaults to 1), nm:N:M (e.g. nm:2:4) or block:N (e.g. block:16)"


@dataclass(frozen=True)
class PEOption:
    """What one processing element does per cycle and which zeros it skips.

    dense: one MAC per cycle. mcbbs: one cluster of C channels from each of P ranges per cycle
    (P·C MACs), a window of P ranges taking NZ cycles instead of R. nm (N:M) and block (1×N):
    one MAC per cycle over the kept weights only.
    """

    kind: str  # "dense" | "mcbbs" | "nm" | "block"
    cluster_size: int = 1  # mcbbs C
    prune_range: int = 1  # mcbbs R (clusters per range)
    simd_ranges: int = 1  # mcbbs P (ranges per window, processed in parallel)
    keep: int = 0  # nm N
    group: int = 0  # nm M
    block_rows: int = 0  # block N (output channels per block)

    @property
    def spec(self) -> str:
        if self.kind == "mcbbs":
            return f"mcbbs:c{self.cluster_size}r{self.prune_range}p{self.simd_ranges}"
        if self.kind == "nm":
            return f"nm:{self.keep}:{self.group}"
        if self.kind == "block":
            return f"block:{self.block_rows}"
        return "dense"

    @property
    def pattern_spec(self) -> str | None:
        """The sparsity pattern (onnxsparse.sparsity.patterns syntax) this PE skips, None for dense."""
        return {"mcbbs": f"mcbbs:c{self.cluster_size}r{self.prune_range}", "nm": f"{self.keep}:{self.group}",
                "block": f"1x{self.block_rows}"}.get(self.kind)

    @property
    def macs_per_cycle(self) -> int:
        return self.cluster_size * self.simd_ranges if self.kind == "mcbbs" else 1


def parse_pe(text: str) -> PEOption:
    """A PE option from its spec: 'dense', 'mcbbs:c2r4p8', 'nm:2:4', 'block:16'."""
    spec = text.strip().lower()
    if spec == "dense":
        return PEOption("dense")
    if match := re.fullmatch(r"mcbbs:c(\d+)r(\d+)(?:p(\d+))?", spec):
        cluster, prune_range, simd = int(match[1]), int(match[2]), int(match[3] or 1)
        if not (1 <= cluster <= 64 and 2 <= prune_range <= 64 and 1 <= simd <= 64):
            raise UsageError(f"--pe {text!r}: mcbbs needs 1 <= C <= 64, 2 <= R <= 64 and 1 <= P <= 64")
        return PEOption("mcbbs", cluster_size=cluster, prune_range=prune_range, simd_ranges=simd)
    if match := re.fullmatch(r"nm:(\d+):(\d+)", spec):
        keep, group = int(match[1]), int(match[2])
        if not 1 <= keep < group <= 64:
            raise UsageError(f"--pe {text!r}: nm:N:M needs 1 <= N < M <= 64")
        return PEOption("nm", keep=keep, group=group)
    if match := re.fullmatch(r"block:(\d+)", spec):
        rows = int(match[1])
        if not 1 <= rows <= MAX_ARRAY_SIDE:
            raise UsageError(f"--pe {text!r}: block:N needs 1 <= N <= {MAX_ARRAY_SIDE} output channels per block")
        return PEOption("block", block_rows=rows)
    raise UsageError(f"unknown PE option {text!r}; use one of: {PE_SYNTAX}")


def pe_for_pattern(pattern: Pattern) -> str:
    """The PE option that skips a pruning pattern's zeros ('dense' when none does); mcbbs with a
    window of P=4 ranges."""
    if isinstance(pattern, MCBBS):
        return f"mcbbs:c{pattern.cluster_size}r{pattern.prune_range}p4"
    if isinstance(pattern, NM):
        return f"nm:{pattern.keep}:{pattern.group}"
    if isinstance(pattern, Block):
        return f"block:{pattern.block_rows}"
    return "dense"


@dataclass(frozen=True)
class ArrayConfig:
    """A systolic array of rows × cols PEs with its buffers and DRAM link."""

    rows: int = 32
    cols: int = 32
    dataflow: str = "ws"
    pe: PEOption = PEOption("dense")
    ifmap_sram_bytes: int = DEFAULT_SRAM_KB[0] * 1024
    filter_sram_bytes: int = DEFAULT_SRAM_KB[1] * 1024
    ofmap_sram_bytes: int = DEFAULT_SRAM_KB[2] * 1024
    dram_bytes_per_cycle: float = DEFAULT_DRAM_BYTES_PER_CYCLE

    def __post_init__(self):
        for what, side in (("rows", self.rows), ("columns", self.cols)):
            if not isinstance(side, int) or not 1 <= side <= MAX_ARRAY_SIDE:
                raise UsageError(f"array {what} must be an integer in [1, {MAX_ARRAY_SIDE}], got {side!r}")
        if self.dataflow not in DATAFLOWS:
            raise UsageError(f"unknown dataflow {self.dataflow!r}; use one of: {', '.join(DATAFLOWS)}")
        for what, size in (("ifmap", self.ifmap_sram_bytes), ("filter", self.filter_sram_bytes),
                           ("ofmap", self.ofmap_sram_bytes)):
            if not 0 < size <= MAX_SRAM_KB * 1024:
                raise UsageError(f"{what} SRAM must be in (0, {MAX_SRAM_KB}] KB, got {size / 1024:g} KB")
        if not 0 < self.dram_bytes_per_cycle < float("inf"):
            raise UsageError(f"DRAM bandwidth must be a positive number of bytes per cycle, got "
                             f"{self.dram_bytes_per_cycle!r}")

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.cols} {self.dataflow}, PE {self.pe.spec}"


def parse_array(text: str) -> tuple[int, int]:
    """'32x32' -> (32, 32)."""
    match = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", text.lower())
    if not match:
        raise UsageError(f"--array {text!r}: give ROWSxCOLUMNS, e.g. 32x32")
    rows, cols = int(match[1]), int(match[2])
    if not (1 <= rows <= MAX_ARRAY_SIDE and 1 <= cols <= MAX_ARRAY_SIDE):
        raise UsageError(f"--array {text!r}: rows and columns must be in [1, {MAX_ARRAY_SIDE}]")
    return rows, cols


def parse_sram(text: str) -> tuple[float, float, float]:
    """'256,256,128' -> ifmap, filter, ofmap sizes in KB."""
    parts = text.split(",")
    try:
        sizes = tuple(float(part) for part in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or not all(0 < size <= MAX_SRAM_KB for size in sizes):
        raise UsageError(f"--sram {text!r}: give three sizes in KB (ifmap,filter,ofmap), each in (0, {MAX_SRAM_KB}], "
                         "e.g. 256,256,128")
    return sizes


def array_config(array: str = "32x32", dataflow: str = "ws", pe: str = "dense",
                 sram: str = ",".join(map(str, DEFAULT_SRAM_KB)),
                 dram_bytes_per_cycle: float = DEFAULT_DRAM_BYTES_PER_CYCLE) -> ArrayConfig:
    """An ArrayConfig from the command-line forms of its options."""
    rows, cols = parse_array(array)
    ifmap_kb, filter_kb, ofmap_kb = parse_sram(sram)
    return ArrayConfig(rows, cols, dataflow.lower(), parse_pe(pe), int(ifmap_kb * 1024), int(filter_kb * 1024),
                       int(ofmap_kb * 1024), float(dram_bytes_per_cycle))
