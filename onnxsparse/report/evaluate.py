"""Accuracy of a classifier model on labelled data, run in stock onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxsparse.errors import UsageError
from onnxsparse.model import onnxruntime_session


@dataclass(frozen=True)
class LabelledSplits:
    """The digits sample's fixed split: train (for calibration/training) and held-out test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_splits(path: str | Path) -> LabelledSplits:
    path = Path(path)
    try:
        with np.load(path) as data:
            return LabelledSplits(*(data[key] for key in ("x_train", "y_train", "x_test", "y_test")))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the data ({exc})") from exc
    except KeyError as exc:
        raise UsageError(f"{path}: needs arrays x_train, y_train, x_test, y_test; {exc} is missing") from exc


def top1_accuracy(model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Fraction of samples whose highest output is the label (the model's first input and output)."""
    session = onnxruntime_session(model)
    input_name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(inputs), batch_size):
        logits = session.run(None, {input_name: inputs[start:start + batch_size]})[0]
        correct += int((logits.reshape(len(logits), -1).argmax(axis=1) == labels[start:start + batch_size]).sum())
    return correct / len(inputs)
