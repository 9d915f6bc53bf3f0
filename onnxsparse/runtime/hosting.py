"""Host onnxsparse regions in onnxruntime as Python custom operators (onnxruntime-extensions).

A region is one custom node whose Python body calls the native kernels. onnxruntime-extensions
declares a Python operator by its input and output element types, so one operator type is
registered per type signature (`OnnxsparseRegion_f_f`: one float input, one float output), all of
them at once on first use; the node's `region` attribute names the region object it runs, held
in this process's registry.

Measured (docs/RUNTIME.md): the stock invocation hook of onnxruntime-extensions 0.15 returns each
output as `.flatten().tolist()`, a Python list of floats, which costs 12 ms for a 600 KB output
(50 MB/s). onnxruntime-extensions' C++ side accepts any array there (`cast<py::array>`), so this
module installs a hook that returns the arrays themselves: a 3.2 MB activation then crosses in and
out in 0.3 ms. Operators registered by others keep working through the same hook unchanged.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence

import numpy as np

from onnxsparse.errors import OnnxSparseError

DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' domain for Python operators
OP_PREFIX = "OnnxsparseRegion"
REGION_ATTRIBUTE = "region"
MAX_PORTS = 8  # inputs and outputs a region may have (a larger one is split into its chains)

_TYPE_CODES = {np.dtype(np.float32): "f", np.dtype(np.uint8): "u8", np.dtype(np.int8): "s8"}
_LOCK = threading.Lock()
_REGISTERED_OPS: set[str] = set()
_REGIONS: dict[str, Callable] = {}
# An exception that escapes an operator's body ends the process (onnxruntime-extensions lets it
# reach std::terminate), so the body records it here, returns empty outputs, and the session's
# run raises it once onnxruntime returns (or fails on those outputs).
_ERRORS: dict[str, BaseException] = {}
_NEXT_ID = itertools.count()
_HOOK_INSTALLED = False


def _extensions():
    try:
        import onnxruntime_extensions
        from onnxruntime_extensions import _ocos
    except ImportError as exc:  # a declared dependency; only a broken install lands here
        raise OnnxSparseError("onnxruntime-extensions is not installed; reinstall onnxsparse") from exc
    return onnxruntime_extensions, _ocos


def _install_hook() -> None:
    """Replace the list-returning invocation hook by one that returns arrays (same protocol)."""
    global _HOOK_INSTALLED
    if _HOOK_INSTALLED:
        return
    _, ocos = _extensions()
    operators = ocos.Opdef._odlist

    def invoke(operator_id, feed, attributes):
        operator = operators[operator_id]
        returned = operator.body(*feed, **operator.cast_attributes(attributes))
        values = returned if isinstance(returned, tuple) else (returned,)
        fetched = []
        for value in values:
            value = np.asarray(value)
            fetched.extend((value.shape, np.ascontiguousarray(value).reshape(-1)))
        return (operator_id, *fetched)

    ocos.PyCustomOpDef.install_hooker(invoke)
    _HOOK_INSTALLED = True


def _type_code(dtype: np.dtype) -> str:
    try:
        return _TYPE_CODES[np.dtype(dtype)]
    except KeyError:
        raise OnnxSparseError(f"region tensors of type {np.dtype(dtype)} are not supported") from None


def _signature_name(input_types: Sequence[np.dtype], output_types: Sequence[np.dtype]) -> str:
    return "_".join((OP_PREFIX, "".join(_type_code(t) for t in input_types),
                     "".join(_type_code(t) for t in output_types)))


def _all_signatures() -> list[tuple[tuple[np.dtype, ...], tuple[np.dtype, ...]]]:
    """Every signature a region may have: up to MAX_PORTS inputs and outputs of one element type,
    and a single integer chain that changes type (x of one type, [residual and] y of the other)."""
    signatures = []
    for dtype in _TYPE_CODES:
        for inputs in range(1, MAX_PORTS + 1):
            for outputs in range(1, MAX_PORTS + 1):
                signatures.append(((dtype,) * inputs, (dtype,) * outputs))
    for x_type, y_type in ((np.dtype(np.uint8), np.dtype(np.int8)), (np.dtype(np.int8), np.dtype(np.uint8))):
        signatures += [((x_type,), (y_type,)), ((x_type, y_type), (y_type,))]
    return signatures


def _register_all() -> None:
    """Register every signature at once, before any session loads the library: onnxruntime-
    extensions rebuilds its operator table when one is added later, and sessions made before
    that then crash when they are destroyed (measured with 0.15.2)."""
    extensions, ocos = _extensions()
    element = {np.dtype(np.float32): ocos.PyCustomOpDef.dt_float, np.dtype(np.uint8): ocos.PyCustomOpDef.dt_uint8,
               np.dtype(np.int8): ocos.PyCustomOpDef.dt_int8}

    def make_body(output_types):
        def body(*arrays, **attributes):
            region_id = attributes[REGION_ATTRIBUTE]
            try:
                return _REGIONS[region_id](*arrays)
            except BaseException as exc:  # noqa: BLE001 - raising here would abort the process
                with _LOCK:
                    _ERRORS.setdefault(region_id, exc)
                return tuple(np.empty(0, dtype) for dtype in output_types)
        return body

    for input_types, output_types in _all_signatures():
        name = _signature_name(input_types, output_types)
        extensions.onnx_op(op_type=name, inputs=[element[t] for t in input_types],
                           outputs=[element[t] for t in output_types],
                           attrs={REGION_ATTRIBUTE: ocos.PyCustomOpDef.dt_string})(make_body(output_types))
        _REGISTERED_OPS.add(name)


def operator_type(input_types: Sequence[np.dtype], output_types: Sequence[np.dtype]) -> str | None:
    """The registered custom operator type for this signature, or None when there is none (the
    region must then be split)."""
    name = _signature_name(input_types, output_types)
    with _LOCK:
        _install_hook()
        if not _REGISTERED_OPS:
            _register_all()
    return name if name in _REGISTERED_OPS else None


def register_region(region: Callable) -> str:
    """Put a region in the registry; returns the id its node's `region` attribute carries."""
    region_id = f"r{next(_NEXT_ID)}"
    with _LOCK:
        _REGIONS[region_id] = region
    return region_id


def release_regions(region_ids: Sequence[str]) -> None:
    with _LOCK:
        for region_id in region_ids:
            _REGIONS.pop(region_id, None)
            _ERRORS.pop(region_id, None)


def take_error(region_ids: Sequence[str]) -> BaseException | None:
    """The first error a run recorded in these regions (cleared); None when they all ran.
    Concurrent runs of one session share the record: a failing run may report in a parallel one."""
    with _LOCK:
        errors = [_ERRORS.pop(region_id) for region_id in region_ids if region_id in _ERRORS]
    return errors[0] if errors else None


def library_path() -> str:
    extensions, _ = _extensions()
    return extensions.get_library_path()
