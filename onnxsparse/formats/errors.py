"""Errors for packed tensors that do not follow docs/FORMAT.md."""

import onnxsparse.errors


class FormatError(onnxsparse.errors.OnnxSparseError):
    """A packed tensor that does not follow docs/FORMAT.md."""
