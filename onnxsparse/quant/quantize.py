"""Post-training quantization: fold, plan, calibrate, choose parameters, emit QDQ (or integer) ONNX."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxsparse import model as model_io
from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.quant import arithmetic
from onnxsparse.quant.calibration import model_input_specs, open_calibration
from onnxsparse.quant.fold import fold_batch_norms
from onnxsparse.quant.observers import METHODS, make_observer
from onnxsparse.quant.params import QParams, QuantType, check_bits, quantize_weight, range_params, weight_params
from onnxsparse.quant.plan import QuantPlan, plan_quantization

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "QGemm", "QLinearAdd", "QLinearConcat", "DynamicQuantizeLinear"}
METADATA_KEY = "onnxsparse.quantization"


@dataclass(frozen=True)
class QuantizeOptions:
    weight_bits: int = 8
    activation_bits: int = 8
    method: str = "percentile"  # activation range observer; see observers.METHODS
    per_channel: bool = True
    symmetric_activations: bool = False
    fixed_point: bool = False  # power-of-two scales, per tensor, symmetric (the MCBBS accelerator's scheme)
    bias_correction: bool | None = None  # None: on below 8-bit weights, where it helps (docs/QUANTIZATION.md)
    exclude: str | None = None
    keep_first_float: bool = False
    keep_last_float: bool = False
    batch_size: int = 16
    integer: bool = False

    @property
    def corrects_bias(self) -> bool:
        return self.weight_bits < 8 if self.bias_correction is None else self.bias_correction

    def checked(self) -> QuantizeOptions:
        check_bits(self.weight_bits, "weight")
        check_bits(self.activation_bits, "activation", (4, 8))
        if self.method not in METHODS:
            raise UsageError(f"unknown calibration method {self.method!r}; use one of: {', '.join(METHODS)}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be at least 1, not {self.batch_size}")
        return self


@dataclass(frozen=True)
class LayerQuantization:
    node_name: str
    op_type: str
    weight_bits: int
    per_channel: bool
    weight_zeros_kept: bool  # every weight that was zero is zero on the integer grid
    sparsity_before: float
    sparsity_after: float


@dataclass(frozen=True)
class QuantizeResult:
    model: onnx.ModelProto
    layers: tuple[LayerQuantization, ...]
    tensors: int  # activation tensors quantized
    folded_batch_norms: int
    calibration_samples: int
    notes: tuple[str, ...] = field(default=())


def quantize(model: onnx.ModelProto, calibration, **options) -> onnx.ModelProto:
    """Quantize `model` with calibration data (an .npz path, an image folder, or an iterable)."""
    return quantize_model(model, calibration, QuantizeOptions(**options)).model


def quantize_model(model: onnx.ModelProto, calibration, options: QuantizeOptions = QuantizeOptions(),
                   on_progress: Callable[[int], None] | None = None) -> QuantizeResult:
    """The whole pass; the input model is not modified. `on_progress(samples)` after each batch."""
    options = options.checked()
    already = sorted({node.op_type for node in model.graph.node if node.op_type in QUANTIZED_OPS})
    if already:
        raise OnnxSparseError(f"the model is already quantized (it has {', '.join(already)} nodes); "
                              "quantize the float model instead")
    specs = model_input_specs(model)
    data = open_calibration(calibration, specs)
    fixed_batch = {spec.shape[0] for spec in specs if spec.shape and spec.shape[0] is not None}
    if fixed_batch:  # a model with a static batch size only takes batches of that size
        options = replace(options, batch_size=min(fixed_batch))
    folded, folded_count = fold_batch_norms(model)
    plan = plan_quantization(folded, exclude=options.exclude, keep_first_float=options.keep_first_float,
                             keep_last_float=options.keep_last_float,
                             merge_relu=not (options.symmetric_activations or options.fixed_point))
    if not plan.weights:
        raise OnnxSparseError("the model has no weights to quantize (Conv, Gemm or MatMul with a constant weight)")
    symmetric = options.symmetric_activations or options.fixed_point
    activation_type = QuantType(options.activation_bits, symmetric)
    ranges, input_means = _calibrate(folded, plan, data, options, activation_type, on_progress)
    tensor_params = _tensor_params(plan, ranges, activation_type, options.fixed_point)
    quantized, layers, weight_tensors = _emit_qdq(folded, plan, tensor_params, input_means, options)
    metadata = {"options": asdict(options), "weight_bits": {name: options.weight_bits for name in weight_tensors}}
    helper.set_model_props(quantized, {**{p.key: p.value for p in quantized.metadata_props},
                                       METADATA_KEY: json.dumps(metadata)})
    if options.integer:
        from onnxsparse.quant.lower import lower_to_integer

        quantized = lower_to_integer(quantized)
    model_io.check_model(quantized)
    return QuantizeResult(quantized, tuple(layers), len(plan.tensors), folded_count, data.sample_count,
                          tuple(plan.notes))


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------


def _calibrate(model: onnx.ModelProto, plan: QuantPlan, data: CalibrationData, options: QuantizeOptions,
               activation_type: QuantType, on_progress) -> tuple[dict[str, tuple[float, float]], dict[str, np.ndarray]]:
    """Run the float model over the data; observe every planned tensor's range (bounded memory)
    and, for bias correction, the per-channel mean of every quantized layer's input."""
    graph_inputs = {inp.name for inp in model.graph.input}
    observed = [t for t in plan.tensors if t not in graph_inputs]
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {out.name for out in augmented.graph.output}
    augmented.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                                  for name in observed if name not in existing)
    session = model_io.onnxruntime_session(augmented, threads=2)
    fetch = [out.name for out in session.get_outputs()]
    observers = {tensor: make_observer(options.method, bits=activation_type.bits,
                                       symmetric=activation_type.symmetric) for tensor in plan.tensors}
    mean_inputs = {model.graph.node[i].input[0] for i in plan.weights} if options.corrects_bias else set()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    samples = 0
    for batch in data.batches(options.batch_size):
        values = dict(zip(fetch, session.run(fetch, batch)))
        values.update(batch)
        for tensor, observer in observers.items():
            try:
                observer.collect(values[tensor])
            except OnnxSparseError as exc:  # e.g. an activation overflowing to Inf
                raise OnnxSparseError(f"tensor {tensor}: {exc}; check the calibration data and the model") from exc
        for tensor in mean_inputs:
            array = values[tensor].astype(np.float64)
            channel_axis = 1 if array.ndim > 2 else array.ndim - 1
            moved = np.moveaxis(array, channel_axis, 0).reshape(array.shape[channel_axis], -1)
            sums[tensor] = sums.get(tensor, 0) + moved.sum(axis=1)
            counts[tensor] = counts.get(tensor, 0) + moved.shape[1]
        samples += len(next(iter(batch.values())))
        if on_progress is not None:
            on_progress(samples)
    ranges = {tensor: tuple(float(v) for v in observer.compute_range()) for tensor, observer in observers.items()}
    return ranges, {tensor: sums[tensor] / counts[tensor] for tensor in sums}


def _tensor_params(plan: QuantPlan, ranges, activation_type: QuantType, fixed_point: bool) -> dict[str, QParams]:
    """One grid per shared group: the union of its tensors' ranges."""
    group_range: dict[str, tuple[float, float]] = {}
    for tensor, group in plan.group_of.items():
        low, high = ranges[tensor]
        old = group_range.get(group, (low, high))
        group_range[group] = (min(old[0], low), max(old[1], high))
    params = {group: range_params(low, high, activation_type, power_of_two=fixed_point)
              for group, (low, high) in group_range.items()}
    return {tensor: params[group] for tensor, group in plan.group_of.items()}


# ---------------------------------------------------------------------------------------------
# QDQ emission
# ---------------------------------------------------------------------------------------------


def weight_axis(layout: model_io.WeightLayout) -> int | None:
    """The ONNX axis of the output channels, or None when one axis cannot hold them (grouped ConvTranspose)."""
    return {"conv": 0, "rows": 0, "cols": 1}.get(layout.kind)


def _emit_qdq(model: onnx.ModelProto, plan: QuantPlan, tensor_params: dict[str, QParams],
              input_means: dict[str, np.ndarray], options: QuantizeOptions):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    lookups = model_io.GraphIndex(out)
    new_initializers: list[onnx.TensorProto] = []
    head: list[onnx.NodeProto] = []  # weight and graph-input Q/DQ nodes, first in the graph
    after: dict[int, list[onnx.NodeProto]] = {}
    layers, weight_tensors = [], []
    per_channel = options.per_channel and not options.fixed_point

    def constant(name: str, value: np.ndarray) -> str:
        name = model_io.unique_name(lookups, name)
        lookups.initializers[name] = None  # reserve
        new_initializers.append(numpy_helper.from_array(value, name))
        return name

    def dequantize_node(quantized: str, scale: str, zero_point: str, output: str, axis: int | None):
        kwargs = {"axis": axis} if axis is not None else {}
        inputs = [quantized, scale] + ([zero_point] if zero_point else [])
        return helper.make_node("DequantizeLinear", inputs, [output], name=f"{output}_DequantizeLinear", **kwargs)

    # weights and biases; a pruned model (any zero weight) keeps its exact nonzero pattern
    keep_pattern = any(np.any(model_io.read_weight(out, ref) == 0) for ref in plan.weights.values())
    for index, ref in sorted(plan.weights.items()):
        node = graph.node[index]
        weight = model_io.read_weight(out, ref).astype(np.float32)
        axis = weight_axis(ref.layout) if per_channel else None
        wparams = _weight_params(weight, options, axis)
        quantized = quantize_weight(weight, wparams, keep_pattern)
        base = ref.tensor_name
        scale_name = constant(f"{base}_scale", wparams.scale.astype(np.float32))
        zero_name = constant(f"{base}_zero_point", wparams.zero_point.astype(np.int8))
        weight_q = constant(f"{base}_quantized", quantized)
        weight_tensors.append(weight_q)
        weight_dq = model_io.unique_name(lookups, f"{base}_dequantized")
        lookups.consumers[weight_dq] = []
        head.append(dequantize_node(weight_q, scale_name, zero_name, weight_dq, axis))
        node.input[ref.input_index] = weight_dq
        bias_index = 2
        if len(node.input) > bias_index and node.input[bias_index]:
            bias = lookups.constant(node.input[bias_index])
            x_params = tensor_params[node.input[0]]
            if bias is not None and bias.size == ref.layout.out_channels:
                bias = bias.reshape(-1).astype(np.float64)
                if node.input[0] in input_means:
                    bias = bias - _bias_shift(weight, quantized, wparams, ref, input_means[node.input[0]])
                bias_scale = (np.float64(x_params.scale) * wparams.scale.astype(np.float64)).astype(np.float32)
                bias_scale = np.broadcast_to(bias_scale, bias.shape).copy()
                bias_q = arithmetic.quantize_bias(bias, float(x_params.scale), wparams.scale)
                bq = constant(f"{base}_bias_quantized", bias_q.reshape(-1))
                bs = constant(f"{base}_bias_scale", bias_scale)
                bias_dq = model_io.unique_name(lookups, f"{base}_bias_dequantized")
                lookups.consumers[bias_dq] = []
                head.append(dequantize_node(bq, bs, "", bias_dq, 0))  # int32 zero point: absent means 0
                node.input[bias_index] = bias_dq
        before = 1.0 - np.count_nonzero(weight) / weight.size
        after_sparsity = 1.0 - np.count_nonzero(quantized) / quantized.size
        layers.append(LayerQuantization(ref.node_name, ref.op_type, options.weight_bits, axis is not None,
                                        bool(np.all((weight == 0) <= (quantized == 0))), before, after_sparsity))

    # merged activations: the producer writes the Relu's output directly
    removed = set()
    for index, follower in plan.merged.items():
        graph.node[index].output[0] = graph.node[follower].output[0]
        removed.add(follower)

    # activations: T is renamed T_float at its producer; Q -> DQ writes T again
    graph_inputs = {inp.name for inp in graph.input}
    producer = {out_name: i for i, node in enumerate(graph.node) if i not in removed for out_name in node.output}
    renames: dict[str, str] = {}
    for tensor in plan.tensors:
        params = tensor_params[tensor]
        scale = constant(f"{tensor}_scale", np.asarray(params.scale, np.float32))
        zero_point = constant(f"{tensor}_zero_point", np.asarray(params.zero_point, params.qtype.container))
        quantized = model_io.unique_name(lookups, f"{tensor}_quantized")
        lookups.consumers[quantized] = []
        if tensor in graph_inputs:
            source, dequantized = tensor, model_io.unique_name(lookups, f"{tensor}_dequantized")
            lookups.consumers[dequantized] = []
            renames[tensor] = dequantized
            target = head
        else:
            source = model_io.unique_name(lookups, f"{tensor}_float")
            lookups.consumers[source] = []
            dequantized = tensor
            node = graph.node[producer[tensor]]
            node.output[list(node.output).index(tensor)] = source
            target = after.setdefault(producer[tensor], [])
        target.append(helper.make_node("QuantizeLinear", [source, scale, zero_point], [quantized],
                                       name=f"{tensor}_QuantizeLinear"))
        target.append(dequantize_node(quantized, scale, zero_point, dequantized, None))

    nodes = list(head)
    for index, node in enumerate(graph.node):
        if index in removed:
            continue
        for position, name in enumerate(node.input):
            if name in renames:
                node.input[position] = renames[name]
        nodes.append(node)
        nodes.extend(after.get(index, []))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    model_io.remove_unused(out)
    return out, layers, weight_tensors


def _weight_params(weight: np.ndarray, options: QuantizeOptions, axis: int | None) -> QParams:
    """Max-|w| ranges at 8 bits; below 8 bits the MSE-optimal clipping per channel (or tensor)."""
    if options.weight_bits < 8:
        observer = make_observer("mse", bits=options.weight_bits, symmetric=True, channel_axis=axis)
        observer.collect(weight)
        low, high = observer.compute_range()
        return weight_params(weight, options.weight_bits, axis=axis, low=low, high=high,
                             power_of_two=options.fixed_point)
    return weight_params(weight, options.weight_bits, axis=axis, power_of_two=options.fixed_point)


def _bias_shift(weight: np.ndarray, quantized: np.ndarray, params: QParams, ref: model_io.WeightRef,
                input_mean: np.ndarray) -> np.ndarray:
    """Expected output error of weight quantization per output channel: sum (W_q - W) * E[x]
    (Nagel et al. 2019, bias correction with per-input-channel means from calibration data)."""
    scale = params.scale.reshape([-1 if i == params.axis else 1 for i in range(weight.ndim)]) \
        if params.axis is not None else params.scale
    error = ref.layout.to_matrix(quantized.astype(np.float64) * scale - weight.astype(np.float64))
    layout = ref.layout
    per_input = error.reshape(layout.out_channels, layout.kernel_positions, layout.strip_length).sum(axis=1)
    groups = layout.groups if layout.kind == "conv" else 1
    means = input_mean.reshape(groups, layout.strip_length)
    group_of_output = np.arange(layout.out_channels) // (layout.out_channels // groups)
    return (per_input * means[group_of_output]).sum(axis=1)
