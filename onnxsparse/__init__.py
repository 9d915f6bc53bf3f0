"""onnxsparse: prune, quantize, pack and run sparse ONNX CNNs.

The Python API mirrors the command line:

    import onnxsparse
    model = onnxsparse.load_model("in.onnx")
    pruned = onnxsparse.prune(model, pattern="1x16", sparsity=0.75)
    onnxsparse.save_model(pruned, "out.onnx")
    print(onnxsparse.model_stats(pruned).sparsity)
"""

from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.model import WeightLayout, WeightRef, find_weights, load_model, read_matrix, save_model, write_matrix
from onnxsparse.report.stats import LayerStats, ModelStats, model_stats
from onnxsparse.sparsity.patterns import MatrixShape, Pattern, detect_pattern, parse_pattern
from onnxsparse.sparsity.prune import LayerResult, PruneResult, prune, prune_model

__version__ = "0.1.0"

__all__ = [
    "LayerResult", "LayerStats", "MatrixShape", "ModelStats", "OnnxSparseError", "Pattern", "PruneResult",
    "UsageError", "WeightLayout", "WeightRef", "detect_pattern", "find_weights", "load_model", "model_stats",
    "parse_pattern", "prune", "prune_model", "read_matrix", "save_model", "write_matrix",
]
