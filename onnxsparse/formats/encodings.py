"""The six encodings of docs/FORMAT.md section 4: which sections each stores and in what order.

Encoders and decoders work on *fields*: W[O, K] as unsigned integers (the raw bits of each value),
so that every round trip is bit-exact and "zero" means all bits zero (−0.0 is a value).

nm, bank, mcbbs and block keep units of a sparsity pattern's geometry: the domains and units
come from the pattern's own `units()` (onnxsparse.sparsity.patterns, the one home of that
geometry and its ragged-tail padding), computed for one *tile* — a strip for N:M, bank and MCBBS,
a block row of N output channels for 1×N — and repeated over the tiles of W[O, K] (see Geometry).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

import numpy as np

from onnxsparse.errors import UsageError
from onnxsparse.formats.bits import bits_for
from onnxsparse.formats.errors import FormatError
from onnxsparse.sparsity.patterns import MCBBS, NM, Bank, Block, MatrixShape, Pattern

ENCODINGS = ("dense", "csr", "nm", "block", "bank", "mcbbs")
MAX_GROUP = 256  # largest M (nm) and R (mcbbs)
ROW_POINTER_BITS = 32
# Rows of at most this many units are reduced column by column (numpy is slow along short axes).
_SHORT_ROWS = 32
# What each encoding's indices count, for error messages.
_UNIT_NAMES = {"nm": "M", "bank": "B", "mcbbs": "R", "block": "the input channels per group"}


def format_error(message: str) -> NoReturn:
    """Raise the one-line FormatError every reader check uses."""
    raise FormatError(f"packed tensor: {message}")


@dataclass(frozen=True)
class Encoding:
    """An encoding and its header parameters: a = param_a, b = param_b, kept = param_c, window = param_d.

    nm: a = N, b = M, kept = N; block: a = N (output channels per block row); bank: a = B;
    mcbbs: a = C, b = R, window = P. kept = 0 asks pack_tensor for the fewest units the weight needs.
    """

    name: str
    a: int = 0
    b: int = 0
    kept: int = 0
    window: int = 0

    @classmethod
    def dense(cls) -> Encoding:
        return cls("dense")

    @classmethod
    def csr(cls) -> Encoding:
        return cls("csr")

    @classmethod
    def nm(cls, keep: int, group: int) -> Encoding:
        return cls("nm", keep, group, keep)

    @classmethod
    def block(cls, block_rows: int, kept: int = 0) -> Encoding:
        return cls("block", block_rows, 0, kept)

    @classmethod
    def bank(cls, bank_size: int, kept: int = 0) -> Encoding:
        return cls("bank", bank_size, 0, kept)

    @classmethod
    def mcbbs(cls, cluster_size: int, prune_range: int, kept: int = 0, window: int = 4) -> Encoding:
        return cls("mcbbs", cluster_size, prune_range, kept, window)

    @classmethod
    def parse(cls, spec: str, *, mcbbs_window: int = 4) -> Encoding:
        """'dense', 'csr', 'nm:2:4', 'block:16', 'bank:16', 'mcbbs:c2r4' (window mcbbs_window) or 'mcbbs:c2r4p4'."""
        text = spec.strip().lower()
        if text in ("dense", "csr"):
            return cls(text)
        if match := re.fullmatch(r"nm:(\d+):(\d+)", text):
            return cls.nm(int(match[1]), int(match[2]))
        if match := re.fullmatch(r"(block|bank):(\d+)", text):
            return cls(match[1], int(match[2]))
        if match := re.fullmatch(r"mcbbs:c(\d+)r(\d+)(?:p(\d+))?", text):
            window = int(match[3]) if match[3] else mcbbs_window
            return cls.mcbbs(int(match[1]), int(match[2]), window=window)
        raise UsageError(f"unknown encoding {spec!r}; use auto, dense, csr, nm:N:M (e.g. nm:2:4), block:N "
                         "(e.g. block:16), bank:B (e.g. bank:16) or mcbbs:cCrR[pP] (e.g. mcbbs:c2r4p4)")

    @property
    def spec(self) -> str:
        """The spec string parse() reads back (kept is not part of it)."""
        if self.name == "nm":
            return f"nm:{self.a}:{self.b}"
        if self.name in ("block", "bank"):
            return f"{self.name}:{self.a}"
        if self.name == "mcbbs":
            return f"mcbbs:c{self.a}r{self.b}p{self.window}"
        return self.name

    @property
    def code(self) -> int:
        """The header's encoding byte."""
        return ENCODINGS.index(self.name)

    @property
    def pattern(self) -> Pattern | None:
        """The sparsity pattern whose units this encoding keeps (None for dense and csr)."""
        if self.name == "nm":
            return NM(self.a, self.b)
        if self.name == "bank":
            return Bank(self.a)
        if self.name == "mcbbs":
            return MCBBS(self.a, self.b)
        if self.name == "block":
            return Block(self.a)
        return None

    @property
    def section_kinds(self) -> tuple[str, ...]:
        """The sections this encoding stores, in their order."""
        if self.name == "dense":
            return ("values",)
        if self.name == "csr":
            return ("row_pointers", "indices", "values")
        return ("indices", "values")

    def with_kept(self, kept: int) -> Encoding:
        return dataclasses.replace(self, kept=kept)

    def domains(self, shape: MatrixShape) -> tuple[int, int, int]:
        """(domains, units per domain, elements per unit): the shape of pattern.units(shape).index,
        computed without building it (readers must size things before allocating)."""
        out_channels, positions, strip = shape.out_channels, shape.kernel_positions, shape.strip_length
        if self.name == "block":
            return -(-out_channels // self.a), strip, self.a * positions
        cluster = self.a if self.name == "mcbbs" else 1
        units = self.b if self.name in ("nm", "mcbbs") else self.a
        return out_channels * positions * -(-strip // (units * cluster)), units, cluster

    def problem(self, shape: MatrixShape) -> str | None:
        """Why these parameters cannot encode a W[O, K] of this shape (docs/FORMAT.md section 3), or None."""
        a, b, kept, window = self.a, self.b, self.kept, self.window
        if self.name not in ENCODINGS:
            return f"unknown encoding {self.name!r}"
        if self.name in ("dense", "csr"):
            return None if (a, b, kept, window) == (0, 0, 0, 0) else f"{self.name} takes no parameters"
        if self.name == "nm":
            if not 1 <= a < b <= MAX_GROUP or kept != a or window:
                return f"nm needs 1 <= N < M <= {MAX_GROUP}, param_c = N and param_d = 0 (N={a}, M={b}, " \
                       f"param_c={kept}, param_d={window})"
        elif self.name in ("block", "bank"):
            least = 1 if self.name == "block" else 2
            if a < least or b or window:
                return f"{self.name} needs param_a >= {least} and param_b = param_d = 0 " \
                       f"(param_a={a}, param_b={b}, param_d={window})"
        elif not (a >= 1 and 2 <= b <= MAX_GROUP and window >= 1):
            return f"mcbbs needs C >= 1, 2 <= R <= {MAX_GROUP} and P >= 1 (C={a}, R={b}, P={window})"
        too_small = self.pattern.too_small(shape)
        if too_small:
            return f"{self.spec} does not fit this weight: {too_small}"
        units = self.domains(shape)[1]
        if not 1 <= kept <= units:
            return f"{self.spec} keeps {kept} units per domain, not within 1..{units}"
        return None

    def section_layout(self, shape: MatrixShape, value_bits: int, nonzeros: int = 0) -> tuple[SectionLayout, ...]:
        """Every section's (kind, field_bits, field_count); csr needs its count of stored values."""
        if self.name == "dense":
            return (SectionLayout("values", value_bits, shape.size),)
        if self.name == "csr":
            return (SectionLayout("row_pointers", ROW_POINTER_BITS, shape.out_channels + 1),
                    SectionLayout("indices", bits_for(shape.columns), nonzeros),
                    SectionLayout("values", value_bits, nonzeros))
        domains, units, elements = self.domains(shape)
        return (SectionLayout("indices", bits_for(units), domains * self.kept),
                SectionLayout("values", value_bits, domains * self.kept * elements))


class SectionLayout(NamedTuple):
    kind: str
    field_bits: int
    field_count: int


# ---------------------------------------------------------------------------------------------
# Geometry: a pattern's domains over W[O, K], one tile's units() repeated
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The units() of a pattern over W[O, K], held as one tile's units() and the tile count.

    Tiles are the O·P strips (N:M, bank, MCBBS: domains never cross a strip) or the ⌈O/N⌉ block rows
    (1×N), laid end to end in W[O, K] flattened; the last block row may run past O (virtual rows).
    Domain d is domain d % per_tile of tile d // per_tile, exactly the order of pattern.units(shape).
    """

    template: np.ndarray  # units(tile).index: [domains per tile, units, elements], tile_size = virtual
    tile_size: int
    tiles: int
    size: int  # O·K

    @classmethod
    def of(cls, pattern: Pattern, shape: MatrixShape) -> Geometry:
        if isinstance(pattern, Block):
            tile = MatrixShape(pattern.block_rows, shape.kernel_positions, shape.strip_length)
            tiles = -(-shape.out_channels // pattern.block_rows)
        else:
            tile = MatrixShape(1, 1, shape.strip_length)
            tiles = shape.out_channels * shape.kernel_positions
        return cls(pattern.units(tile).index, tile.size, tiles, shape.size)

    @property
    def domains(self) -> int:
        return self.tiles * self.template.shape[0]

    def gather(self, flat: np.ndarray) -> np.ndarray:
        """Values of every unit, [domains, units, elements]; virtual positions read 0."""
        padded = np.zeros((self.tiles, self.tile_size + 1), dtype=flat.dtype)
        if self.tiles * self.tile_size == self.size:
            padded[:, :-1] = flat.reshape(self.tiles, self.tile_size)
        else:
            rows = np.zeros(self.tiles * self.tile_size, dtype=flat.dtype)
            rows[: self.size] = flat
            padded[:, :-1] = rows.reshape(self.tiles, self.tile_size)
        gathered = np.take(padded, self.template, axis=1)
        return gathered.reshape(self.domains, *self.template.shape[1:])

    def element_index(self, positions: np.ndarray) -> np.ndarray:
        """Flat W[O, K] index of every element of the units at `positions` [domains, kept]
        (each < units): [domains, kept, elements], `size` where the element is virtual."""
        per_tile = self.template.shape[0]
        domain = np.arange(self.domains, dtype=np.int64)[:, None]
        local = self.template[domain % per_tile, positions]
        index = (domain // per_tile)[:, :, None] * self.tile_size + local
        return np.where((local == self.tile_size) | (index >= self.size), self.size, index)


@dataclass(frozen=True)
class UnitCensus:
    """Which units of every domain hold a nonzero: what choosing and sizing a kept count needs."""

    nonzero: np.ndarray  # [domains, units] bool
    counts: np.ndarray  # [domains] units with a nonzero

    @classmethod
    def of(cls, gathered_nonzero: np.ndarray) -> UnitCensus:
        """From [domains, units, elements] element flags."""
        nonzero = _any_last_axis(gathered_nonzero)
        return cls(nonzero, _row_sums(nonzero))

    @property
    def needed(self) -> int:
        """The fewest units per domain that hold every nonzero (at least 1)."""
        return max(1, int(self.counts.max(initial=0)))

    def kept_mask(self, kept: int) -> np.ndarray:
        """The units each domain stores: its nonzero ones, then its lowest free positions up to `kept`."""
        deficit = kept - self.counts
        if not (deficit > 0).any():
            return self.nonzero
        free = ~self.nonzero
        if self.nonzero.shape[1] > _SHORT_ROWS:
            return self.nonzero | (free & (np.cumsum(free, axis=1, dtype=np.int32) <= deficit[:, None]))
        mask = self.nonzero.copy()
        free_so_far = np.zeros(mask.shape[0], dtype=np.int32)
        for position in range(mask.shape[1]):
            free_so_far += free[:, position]
            mask[:, position] |= free[:, position] & (free_so_far <= deficit)
        return mask

    def position_histogram(self, kept: int) -> np.ndarray:
        """How many stored index fields hold each position, for `kept` units per domain."""
        mask = self.kept_mask(kept)
        if mask.shape[1] > _SHORT_ROWS:
            return mask.sum(axis=0)
        return np.array([np.count_nonzero(mask[:, position]) for position in range(mask.shape[1])])


def _any_last_axis(flags: np.ndarray) -> np.ndarray:
    """flags.any(axis=-1), fast for the short last axes of N:M and MCBBS units."""
    if flags.shape[-1] == 1:
        return flags[..., 0]
    if flags.shape[-1] > 8:
        return flags.any(axis=-1)
    result = flags[..., 0].copy()
    for element in range(1, flags.shape[-1]):
        result |= flags[..., element]
    return result


def _row_sums(mask: np.ndarray) -> np.ndarray:
    """Per-row counts of a [rows, columns] bool array (column loop when rows are short)."""
    if mask.shape[1] > _SHORT_ROWS:
        return np.count_nonzero(mask, axis=1)
    total = np.zeros(mask.shape[0], dtype=np.int32)
    for column in range(mask.shape[1]):
        total += mask[:, column]
    return total


# ---------------------------------------------------------------------------------------------
# Encoding and decoding
# ---------------------------------------------------------------------------------------------


def encode(encoding: Encoding, shape: MatrixShape, fields: np.ndarray) -> tuple[Encoding, list[np.ndarray]]:
    """The section fields (in section order) storing W[O, K] `fields`; kept = 0 becomes what the
    weight needs. Raises UsageError when the weight's zeros do not fit the encoding."""
    if encoding.name == "nm" and not encoding.kept:
        encoding = encoding.with_kept(encoding.a)
    problem = (encoding if encoding.kept or not encoding.pattern else encoding.with_kept(1)).problem(shape)
    if problem:
        raise UsageError(problem)
    if encoding.name == "dense":
        return encoding, [fields.reshape(-1)]
    if encoding.name == "csr":
        nonzero = fields != 0
        row_pointers = np.zeros(fields.shape[0] + 1, dtype=np.uint32)
        np.cumsum(_row_sums(nonzero), out=row_pointers[1:])
        return encoding, [row_pointers, np.nonzero(nonzero)[1].astype(np.uint32), fields[nonzero]]
    gathered = Geometry.of(encoding.pattern, shape).gather(fields.reshape(-1))
    census = UnitCensus.of(gathered != 0)
    needed = census.needed
    encoding = encoding if encoding.kept else encoding.with_kept(needed)
    if needed > encoding.kept:
        domain = int(np.argmax(census.counts))
        raise UsageError(f"the weight does not fit {encoding.spec} keeping {encoding.kept} per domain: domain "
                         f"{domain} has {needed} units with nonzeros; keep more or use another encoding")
    keep = census.kept_mask(encoding.kept)
    positions = np.nonzero(keep)[1].astype(np.uint32)
    values = gathered[keep]
    if encoding.name == "mcbbs":
        order = _window_order(encoding, shape)
        positions = positions.reshape(-1, order.size)[:, order]
        values = values.reshape(-1, order.size, encoding.a)[:, order]
    return encoding, [positions.reshape(-1), values.reshape(-1)]


def decode(encoding: Encoding, shape: MatrixShape, sections: list[np.ndarray]) -> np.ndarray:
    """W[O, K] fields (flattened) from the section fields; FormatError for anything section 3 rejects."""
    if encoding.name == "dense":
        return sections[0]
    if encoding.name == "csr":
        return _decode_csr(shape, *sections)
    indices, values = sections
    domains, units, elements = encoding.domains(shape)
    positions = indices.reshape(domains, encoding.kept)
    values = values.reshape(domains, encoding.kept, elements)
    if encoding.name == "mcbbs":
        order = np.argsort(_window_order(encoding, shape))
        positions = positions.reshape(-1, order.size)[:, order].reshape(domains, encoding.kept)
        values = values.reshape(-1, order.size, elements)[:, order].reshape(domains, encoding.kept, elements)
    where = f"section 1 (indices): {encoding.spec}"
    if positions.size and int(positions.max()) >= units:
        domain = int(np.flatnonzero((positions >= units).any(axis=1))[0])
        format_error(f"{where}: domain {domain} has position {int(positions[domain].max())}, not below "
                     f"{_UNIT_NAMES[encoding.name]} = {units}")
    steps = positions[:, 1:].astype(np.int64) - positions[:, :-1]
    if steps.size and int(steps.min()) <= 0:
        domain = int(np.flatnonzero((steps <= 0).any(axis=1))[0])
        format_error(f"{where}: positions of domain {domain} are not strictly increasing "
                     f"({', '.join(str(int(p)) for p in positions[domain][:8])})")
    index = Geometry.of(encoding.pattern, shape).element_index(positions)
    virtual = index == shape.size
    if virtual.any() and values[virtual].any():
        domain = int(np.flatnonzero((virtual & (values != 0)).any(axis=(1, 2)))[0])
        format_error(f"section 2 (values): domain {domain} holds a nonzero value at a virtual (padding) position")
    out = np.zeros(shape.size + 1, dtype=values.dtype)
    out[index] = values
    return out[: shape.size]


def _decode_csr(shape: MatrixShape, row_pointers: np.ndarray, indices: np.ndarray,
                values: np.ndarray) -> np.ndarray:
    pointers = row_pointers.astype(np.int64)
    if pointers[0] != 0:
        format_error(f"section 1 (row_pointers): the first row pointer is {int(pointers[0])}, not 0")
    decreasing = np.flatnonzero(np.diff(pointers) < 0)
    if decreasing.size:
        row = int(decreasing[0])
        format_error(f"section 1 (row_pointers): row pointers decrease after row {row} "
                     f"({int(pointers[row])} then {int(pointers[row + 1])})")
    if pointers[-1] != indices.size:
        format_error(f"section 1 (row_pointers): the last row pointer is {int(pointers[-1])}, not the "
                     f"{indices.size} stored indices")
    columns = indices.astype(np.int64)
    outside = np.flatnonzero(columns >= shape.columns)
    if outside.size:
        format_error(f"section 2 (indices): column index {int(columns[outside[0]])} is not below K = {shape.columns}")
    rows = np.repeat(np.arange(shape.out_channels, dtype=np.int64), np.diff(pointers))
    unordered = np.flatnonzero((rows[1:] == rows[:-1]) & (columns[1:] <= columns[:-1]))
    if unordered.size:
        format_error(f"section 2 (indices): column indices of row {int(rows[unordered[0]])} are not strictly "
                     "increasing")
    out = np.zeros(shape.size, dtype=values.dtype)
    out[rows * shape.columns + columns] = values
    return out


def _window_order(encoding: Encoding, shape: MatrixShape) -> np.ndarray:
    """MCBBS storage order within a strip: natural (range, rank) slots listed by (window, rank, range)."""
    ranges = encoding.domains(shape)[0] // (shape.out_channels * shape.kernel_positions)
    slot = np.arange(ranges * encoding.kept)
    range_index, rank = slot // encoding.kept, slot % encoding.kept
    return np.lexsort((range_index, rank, range_index // encoding.window))
