"""`onnxsparse.runtime.InferenceSession`: onnxruntime's session, with packed layers run natively.

At creation the packed weights are read once through the format reader (every check of
docs/FORMAT.md), a QDQ model is lowered to its integer form, batch norms are folded, and each sparse layer with what follows it becomes a
native kernel holding its weights; chains that feed one another share one custom operator
(docs/RUNTIME.md). Everything else — and every layer pack's cost model kept dense — runs in
onnxruntime as usual. A model without packed layers runs in plain onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxsparse import model as model_io
from onnxsparse.errors import OnnxSparseError
from onnxsparse.formats.container import read_info
from onnxsparse.formats.pack import DOMAIN, EXECUTION_ATTRIBUTE, packed_tensors, unpack_model
from onnxsparse.quant.fold import fold_batch_norms
from onnxsparse.quant.lower import lower_to_integer
from onnxsparse.runtime import hosting
from onnxsparse.runtime.regions import Partition, partition


SPIN_OFF_SHARE = 0.5


def native_kernels():
    """The compiled kernel module (built by the package's install)."""
    try:
        from onnxsparse import _native
    except ImportError as exc:
        raise OnnxSparseError(f"the native kernels are not built ({exc}); reinstall onnxsparse "
                              "(`make test` or `pip install -e .` builds them)") from exc
    return _native


@dataclass(frozen=True)
class RuntimePlan:
    """What runs where: the model onnxruntime gets, the regions, and layers left dense (with why)."""

    partition: Partition
    sparse_layers: tuple[str, ...]
    dense_layers: tuple[tuple[str, str], ...]
    sparse_mac_share: float = 0.0  # the share of the weight layers' dense MACs that runs natively

    @property
    def model(self) -> onnx.ModelProto:
        return self.partition.model


def _load(source) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray)):
        return onnx.load_from_string(bytes(source))
    return model_io.load_model(Path(source))


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every node has a unique name (chains are chosen by node name)."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    taken = {node.name for node in named.graph.node if node.name}
    for index, node in enumerate(named.graph.node):
        if not node.name:
            node.name = next(name for name in (f"{node.op_type}_{index}", *(f"{node.op_type}_{index}_{k}"
                             for k in range(1, 1000))) if name not in taken)
            taken.add(node.name)
    return named


def execution_choice(node: onnx.NodeProto, packed: bytes) -> tuple[str, str]:
    """('sparse' | 'dense', why) for one packed node: pack's recorded cost-model choice, else the
    encoding (a tensor packed dense runs dense)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if EXECUTION_ATTRIBUTE in attrs:
        try:
            record = json.loads(attrs[EXECUTION_ATTRIBUTE])
            return record["kernel"], record.get("reason", "")
        except (ValueError, KeyError, TypeError) as exc:
            raise OnnxSparseError(f"node {model_io.display_name(node)}: unreadable {EXECUTION_ATTRIBUTE}") from exc
    encoding = read_info(packed).encoding
    return ("dense", "packed with the dense encoding") if encoding == "dense" else ("sparse", encoding)


def plan_model(model: onnx.ModelProto) -> RuntimePlan:
    """Unpack, fold and partition a packed model (a plain model passes through unchanged)."""
    native = native_kernels()
    if not any(node.domain == DOMAIN for node in model.graph.node):
        return RuntimePlan(partition(model, set(), native), (), ())
    model = _named(model)
    sparse, dense = [], []
    for node, _, data in packed_tensors(model):
        choice, reason = execution_choice(node, data)
        (sparse.append(node.name) if choice == "sparse" else dense.append((node.name, reason)))
    plain = unpack_model(model)
    if any(node.op_type == "QuantizeLinear" for node in plain.graph.node):
        plain = lower_to_integer(plain)  # QDQ runs as the integer model it describes, in int8 kernels
    plain, _ = fold_batch_norms(plain)
    shapes = model_io.infer_shapes(plain)
    result = partition(plain, set(sparse), native, shapes)
    dense.extend(result.skipped)
    running = tuple(name for name in sparse if name not in dict(result.skipped))
    return RuntimePlan(result, running, tuple(dense), _mac_share(plain, set(running), shapes))


def _mac_share(model: onnx.ModelProto, names: set[str], shapes: dict) -> float:
    """The share of the weight layers' dense MACs (batch 1) in the named layers."""
    total = chosen = 0
    for ref in model_io.find_weights(model):
        node = model.graph.node[ref.node_index]
        output = shapes.get(node.output[0])
        weight = shapes.get(node.input[ref.input_index])
        if not output or not weight:
            continue
        macs = int(np.prod(weight)) * int(np.prod(output[2:]) if len(output) > 2 else 1)
        total += macs
        chosen += macs if node.name in names else 0
    return chosen / total if total else 0.0


class InferenceSession:
    """Drop-in for onnxruntime.InferenceSession that runs packed models' sparse layers natively.

    `threads` sets both onnxruntime's intra-op threads and the native kernels' OpenMP threads.
    """

    def __init__(self, path_or_bytes, sess_options=None, providers=None, *, threads: int | None = None):
        import onnxruntime as ort

        self.plan = plan_model(_load(path_or_bytes))
        options = sess_options if sess_options is not None else ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            native_kernels().set_num_threads(threads)
        if self.plan.partition.regions:
            options.register_custom_ops_library(hosting.library_path())
        if self.plan.sparse_mac_share >= SPIN_OFF_SHARE:
            # onnxruntime's idle workers spin after each op and would steal the cores the kernels run
            # on; not spinning slows onnxruntime's own parallel ops (~35% on dense ResNet-50 here), so
            # only when the native kernels do most of the work (docs/RUNTIME.md)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(self.plan.model.SerializeToString(), options,
                                                 providers=providers or ["CPUExecutionProvider"])
        except Exception:
            self.close()
            raise

    def run(self, output_names, input_feed, run_options=None):
        region_ids = self.plan.partition.region_ids
        hosting.take_error(region_ids)  # nothing left over from an interrupted run
        try:
            outputs = self._session.run(output_names, input_feed, run_options)
        except Exception as exc:
            error = hosting.take_error(region_ids)
            if error is not None:  # a region failed first; onnxruntime then failed on its empty outputs
                raise error from exc
            raise
        error = hosting.take_error(region_ids)
        if error is not None:
            raise error
        return outputs

    def get_inputs(self):
        return self._session.get_inputs()

    def get_outputs(self):
        return self._session.get_outputs()

    def __getattr__(self, name):  # everything else onnxruntime's session offers
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._session, name)

    def close(self) -> None:
        """Release onnxruntime's session and the native regions."""
        self.__dict__.pop("_session", None)
        hosting.release_regions(self.plan.partition.region_ids)

    def __del__(self):
        plan = self.__dict__.get("plan")
        if plan is not None:
            hosting.release_regions(plan.partition.region_ids)
