"""What a packed model holds: per packed tensor its header, sections, sparsity and sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxsparse import model as model_io
from onnxsparse.errors import UsageError
from onnxsparse.formats.container import PackedInfo, read_info, unpack_tensor
from onnxsparse.formats.errors import FormatError
from onnxsparse.formats.pack import MAX_WEIGHT_ELEMENTS, RESTORE_ATTRIBUTE, packed_tensors
from onnxsparse.validation import validate


@dataclass(frozen=True)
class InspectedTensor:
    node_name: str
    initializer: str
    weight_name: str
    info: PackedInfo
    values: np.ndarray  # decoded, ONNX layout

    @property
    def sparsity(self) -> float:
        return 1.0 - np.count_nonzero(self.values) / max(self.values.size, 1)

    @property
    def float32_bytes(self) -> int:
        return 4 * int(self.values.size)


@dataclass(frozen=True)
class InspectReport:
    tensors: tuple[InspectedTensor, ...]

    @property
    def packed_bytes(self) -> int:
        return sum(t.info.total_bytes for t in self.tensors)

    @property
    def float32_bytes(self) -> int:
        return sum(t.float32_bytes for t in self.tensors)

    def find(self, name: str) -> InspectedTensor:
        for tensor in self.tensors:
            if name in (tensor.node_name, tensor.initializer, tensor.weight_name):
                return tensor
        names = ", ".join(t.node_name for t in self.tensors[:5])
        raise UsageError(f"no packed tensor named {name!r}; give a node, weight or initializer name, e.g. {names}")

    def dump(self, name: str, path: str | Path | None = None) -> Path:
        """Write one tensor's decoded values (ONNX layout) to .npy; returns the path."""
        tensor = self.find(name)
        target = Path(path) if path else Path(re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") + ".npy")
        staging = target.with_name(target.name + ".tmp.npy")
        np.save(staging, tensor.values)
        staging.replace(target)
        return target

    def to_json(self) -> dict:
        tensors = []
        for tensor in self.tensors:
            header = tensor.info.to_json()
            validate(header, "packed-tensor", f"packed tensor {tensor.initializer}")
            tensors.append({"node": tensor.node_name, "initializer": tensor.initializer, "weight": tensor.weight_name,
                            "sparsity": tensor.sparsity, "float32_bytes": tensor.float32_bytes,
                            "checksums": "ok", "header": header})
        return {"tensors": tensors, "totals": {"tensors": len(tensors), "packed_bytes": self.packed_bytes,
                                               "float32_bytes": self.float32_bytes,
                                               "compression": self.float32_bytes / max(self.packed_bytes, 1)}}


def inspect_model(model: onnx.ModelProto) -> InspectReport:
    """Read and fully verify (headers, checksums, decoding) every packed tensor of a packed model."""
    import json

    from onnx import helper

    tensors = []
    for node, initializer, data in packed_tensors(model):
        label = f"node {model_io.display_name(node)}: {initializer}"
        try:
            info, values = read_info(data, entropy=True), unpack_tensor(data, max_elements=MAX_WEIGHT_ELEMENTS)
        except FormatError as exc:
            raise FormatError(f"{label}: {exc}") from exc
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = json.loads(attrs.get(RESTORE_ATTRIBUTE, "{}")).get("weight", {}).get("name", initializer)
        tensors.append(InspectedTensor(model_io.display_name(node), initializer, weight, info, values))
    return InspectReport(tuple(tensors))
