"""Train and export the bundled "digits" sample model.

Trains a small residual CNN on scikit-learn's bundled 8x8 digits (no download),
exports it to ONNX (opset 17, BatchNormalization kept as separate nodes) and
writes the data split, the model and a README with onnxruntime-measured accuracy.
Needs torch, scikit-learn, onnx and onnxruntime; the onnxsparse package does not.

    python samples/digits/train.py
"""

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
TEST_SIZE = 600
THREADS = 2  # CPU float sums depend on the thread count: pin it to reproduce


class DigitsCNN(nn.Module):
    """conv1-conv2, a residual block (conv3, conv4), pool, conv5, GAP, fc1-fc2."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv4, self.bn4 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.relu4, self.relu5, self.relu_fc1 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv5, self.bn5 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        residual = x
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.relu4(self.bn4(self.conv4(x)) + residual)
        x = self.pool(x)  # 32 x 4 x 4
        x = self.relu5(self.bn5(self.conv5(x)))
        x = torch.flatten(self.gap(x), 1)
        return self.fc2(self.relu_fc1(self.fc1(x)))


def load_split():
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y)


def train(x_train, y_train, epochs, batch_size=64):
    torch.manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xs), generator=generator)
        total = 0.0
        for start in range(0, len(xs), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        if (epoch + 1) % 25 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:4d}  loss {total / len(xs):.4f}")
    return model.eval()


def export_onnx(model, path):
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), str(path),
        dynamo=False, opset_version=17, do_constant_folding=False,
        # Eval-mode export would fuse BN into Conv; PRESERVE keeps BN nodes
        # (in inference form, since the model itself is in eval mode).
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    if not any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        print("warning: the exporter folded BatchNormalization into Conv")
    return proto


def onnx_accuracy(path, x, y):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


README = """# digits sample

A small real CNN for the demo and tests: it classifies scikit-learn's bundled
8x8 handwritten digits (`sklearn.datasets.load_digits()`, 1797 images, ships
with scikit-learn, no download). Every channel count after the first layer is a
multiple of 16, so 2:4, 1x16 blocks, bank:16 and clustered c2r4 patterns apply
to every layer but `conv1`.

Files (all made by `train.py`; do not edit by hand):

- `digits_cnn.onnx`: opset {opset}, IR version {ir}, weights as initializers
  (no external data), BatchNormalization kept as separate nodes. Input `input`
  float32 `[batch, 1, 8, 8]` (pixels / 16, in [0, 1]); output `logits` `[batch, 10]`
  (no softmax).
- `digits_train.npz` and `digits_test.npz`: `input` float32 (1197 | 600, 1, 8, 8) and
  `labels` int64, keyed as `onnxsparse quantize --calib` expects (graph input name + labels).

## Regenerate

Needs torch, scikit-learn, onnx and onnxruntime (the onnxsparse package itself
needs neither torch nor scikit-learn). Made with torch {torch_version},
scikit-learn {sklearn_version}, onnx {onnx_version}, onnxruntime {ort_version}:

    python samples/digits/train.py --epochs {epochs}

CPU only, seeded (`torch.manual_seed(0)`), deterministic algorithms and 2 torch
threads; about 50 s on an idle 2-core machine. Reruns on the same machine give
byte-identical files; another CPU type may differ in the last float bits (and so
in the weights).

## Split

`train_test_split(x, y, test_size=600, random_state=0, stratify=y)`:
1197 train / 600 held-out test images.

## Architecture

| layer | op | output |
| --- | --- | --- |
| conv1 | Conv 1->16 3x3 pad 1, BatchNorm, ReLU | 16x8x8 |
| conv2 | Conv 16->32 3x3 pad 1, BatchNorm, ReLU | 32x8x8 |
| conv3 | Conv 32->32 3x3 pad 1, BatchNorm, ReLU | 32x8x8 |
| conv4 | Conv 32->32 3x3 pad 1, BatchNorm, + conv2 output, ReLU | 32x8x8 |
| pool | MaxPool 2x2 | 32x4x4 |
| conv5 | Conv 32->64 3x3 pad 1, BatchNorm, ReLU, global average pool | 64 |
| fc1 | Gemm 64->64, ReLU | 64 |
| fc2 | Gemm 64->10 (logits) | 10 |

Trained {epochs} epochs of Adam (lr 1e-3, weight decay 1e-4, cosine schedule,
batch 64), cross-entropy, no augmentation.

## Float accuracy (onnxruntime, on `digits_cnn.onnx`)

| split | top-1 |
| --- | --- |
| train (1197) | {train_acc:.2%} |
| held-out test (600) | {test_acc:.2%} |
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = load_split()
    # keyed by the model's input name, with labels: the calibration-data layout of `onnxsparse quantize`
    np.savez_compressed(args.out_dir / "digits_train.npz", input=x_train, labels=y_train)
    np.savez_compressed(args.out_dir / "digits_test.npz", input=x_test, labels=y_test)
    model = train(x_train, y_train, args.epochs)
    onnx_path = args.out_dir / "digits_cnn.onnx"
    proto = export_onnx(model, onnx_path)

    train_acc = onnx_accuracy(onnx_path, x_train, y_train)
    test_acc = onnx_accuracy(onnx_path, x_test, y_test)
    print(f"onnxruntime accuracy: train {train_acc:.2%}  held-out {test_acc:.2%}")
    (args.out_dir / "README.md").write_text(README.format(
        opset=proto.opset_import[0].version, ir=proto.ir_version,
        torch_version=torch.__version__, sklearn_version=sklearn.__version__,
        onnx_version=onnx.__version__, ort_version=ort.__version__,
        epochs=args.epochs, train_acc=train_acc, test_acc=test_acc))


if __name__ == "__main__":
    main()
