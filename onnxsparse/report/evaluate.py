"""Accuracy of a classifier model on labelled data, run in stock onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxsparse.errors import UsageError
from onnxsparse.model import onnxruntime_session


@dataclass(frozen=True)
class LabelledData:
    """Samples of a single-input classifier and their labels (an .npz with the input and `labels`)."""

    inputs: np.ndarray
    labels: np.ndarray


def load_labelled(path: str | Path) -> LabelledData:
    path = Path(path)
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the data ({exc})") from exc
    inputs = [key for key in arrays if key != "labels"]
    if "labels" not in arrays or len(inputs) != 1:
        raise UsageError(f"{path}: needs one input array and a `labels` array; it has {', '.join(arrays) or 'none'}")
    return LabelledData(arrays[inputs[0]], arrays["labels"])


def top1_accuracy(model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Fraction of samples whose highest output is the label (the model's first input and output)."""
    session = onnxruntime_session(model)
    input_name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(inputs), batch_size):
        logits = session.run(None, {input_name: inputs[start:start + batch_size]})[0]
        correct += int((logits.reshape(len(logits), -1).argmax(axis=1) == labels[start:start + batch_size]).sum())
    return correct / len(inputs)
