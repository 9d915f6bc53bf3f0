"""Calibration data: the float samples post-training quantization runs the model on.

Three sources, one interface (CalibrationData.batches): an .npz file of arrays keyed by input
name, a folder of images with declared preprocessing, or any Python iterable. All are streamed
batch by batch with bounded memory, and every batch is checked against the model's inputs
(shape, dtype, NaN/Inf) before anyone sees it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.model import _first_line

# An .npz may carry the samples' labels under this name (used by accuracy checks, ignored here).
LABELS_KEY = "labels"
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
IMAGE_LAYOUTS = ("NCHW", "NHWC")
# Pillow mode for an input's channel count.
IMAGE_MODES = {1: "L", 3: "RGB"}
# Where errors say the problem is when the data did not come from a file.
IN_MEMORY = "calibration data"


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, shape (None for dynamic or symbolic dims) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        """The shape of one sample: everything after the batch axis."""
        return self.shape[1:]


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers, in graph order."""
    initializer_names = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        if not value.type.HasField("tensor_type"):
            raise OnnxSparseError(f"model input '{value.name}' is not a tensor; onnxsparse "
                                  "quantizes models whose inputs are tensors")
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise OnnxSparseError(f"model input '{value.name}' has no declared shape; re-export the "
                                  "model with input shapes")
        shape = tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
                      for dim in tensor_type.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, shape, dtype))
    return specs


class CalibrationData(ABC):
    """A finite, re-iterable source of input samples for a model."""

    @property
    @abstractmethod
    def sample_count(self) -> int:
        """How many samples one pass over batches() yields."""

    @abstractmethod
    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """One pass over all samples: per input name, an array of up to batch_size samples in the
        input's dtype. Each call starts a fresh pass."""


class _CheckedData(CalibrationData):
    """The shared part of the built-in sources: every batch is checked against the specs."""

    def __init__(self, specs: Sequence[InputSpec], where: str):
        self.specs = tuple(specs)
        self.where = where

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UsageError(f"{self.where}: batch size must be a whole number of at least 1, got "
                             f"{batch_size!r}")
        return self._checked_batches(int(batch_size))

    def _checked_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        first_index = 0
        for raw in self._raw_batches(batch_size):
            batch = {spec.name: _conform_batch(raw[spec.name], spec, self.where, first_index)
                     for spec in self.specs}
            first_index += len(batch[self.specs[0].name])
            yield batch

    @abstractmethod
    def _raw_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Per input name, up to batch_size samples as read (any dtype, not yet checked)."""


# ---------------------------------------------------------------------------------------------
# Checks shared by every source
# ---------------------------------------------------------------------------------------------


def _conform_batch(batch: np.ndarray, spec: InputSpec, where: str, first_index: int) -> np.ndarray:
    """A batch of samples checked against the input (shape, dtype, finite) and cast to its dtype.

    first_index is the index of the batch's first sample in the whole data, for error messages.
    """
    _check_sample_shape(batch.shape[1:], spec, where)
    _check_dtype(batch.dtype, spec, where)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, reported below
        batch = batch.astype(spec.dtype, copy=False)
    if np.issubdtype(batch.dtype, np.floating) and batch.size:
        finite_samples = np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
        if not finite_samples.all():
            bad_index = first_index + int(np.argmin(finite_samples))
            raise UsageError(f"{where}: input '{spec.name}': sample {bad_index} contains NaN or Inf "
                             f"(in {spec.dtype}); fix or drop that sample")
    return batch


def _check_sample_shape(sample_shape: tuple[int, ...], spec: InputSpec, where: str) -> None:
    """One sample's shape must have the input's rank and equal its static dims."""
    expected = spec.sample_shape
    if len(sample_shape) != len(expected) or any(
            want is not None and got != want for got, want in zip(sample_shape, expected)):
        raise UsageError(f"{where}: input '{spec.name}': samples are {_dims_text(sample_shape)}, the "
                         f"model takes {_dims_text(expected)}; reshape or resize the data to match")


def _check_dtype(dtype: np.dtype, spec: InputSpec, where: str) -> None:
    """Float inputs take any float data (cast silently); other inputs only data that casts safely."""
    if np.issubdtype(spec.dtype, np.floating):
        fits = dtype.kind == "f"
        advice = "convert them to floating point (e.g. pixels / 255)"
    else:
        fits = not dtype.hasobject and np.can_cast(dtype, spec.dtype, casting="safe")
        advice = f"convert them to {spec.dtype}"
    if not fits:
        raise UsageError(f"{where}: input '{spec.name}': samples are {dtype}, the model takes "
                         f"{spec.dtype}; {advice}")


def _check_names(names: Iterable[str], specs: Sequence[InputSpec], where: str) -> None:
    """The data must have one array per model input, named after it (plus optional labels)."""
    names = set(names) - {LABELS_KEY}
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in names]
    unknown = sorted(names - set(expected))
    if not missing and not unknown:
        return
    problems = []
    if missing:
        problems.append(f"no array for input{'s' * (len(missing) > 1)} {_quoted(missing)}")
    if unknown:
        problems.append(f"arrays {_quoted(unknown)} are not model inputs" if len(unknown) > 1
                        else f"array {_quoted(unknown)} is not a model input")
    raise UsageError(f"{where}: {' and '.join(problems)}; give one array per model input, keyed by "
                     f"its name ({_quoted(expected)}), plus optionally '{LABELS_KEY}'")


def _dims_text(shape: Sequence[int | None]) -> str:
    return "x".join("?" if dim is None else str(dim) for dim in shape) if shape else "scalars"


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# ---------------------------------------------------------------------------------------------
# .npz files, streamed member by member
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype


def _read_npy_header(stream) -> _NpyHeader:
    version = np.lib.format.read_magic(stream)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    return _NpyHeader(*read_header(stream))


def npz_data(path: str | os.PathLike, specs: Sequence[InputSpec]) -> CalibrationData:
    """Arrays keyed by input name, first axis = samples (an extra 'labels' array is ignored).

    Names, dtypes, shapes and sample counts are checked on open from the array headers alone; the
    samples are then read batch by batch, never the whole array (except Fortran-ordered ones).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist()}
            _check_names(members, specs, str(path))
            headers = {}
            for spec in specs:
                with archive.open(members[spec.name]) as stream:
                    headers[spec.name] = _read_npy_header(stream)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as exc:
        raise OnnxSparseError(f"{path}: not a readable .npz file ({_first_line(exc)}); save it again "
                              "with numpy.savez") from exc
    for spec in specs:
        header = headers[spec.name]
        if not header.shape:
            raise UsageError(f"{path}: array '{spec.name}' is a single value; its first axis must "
                             "count the samples")
        _check_dtype(header.dtype, spec, str(path))
        _check_sample_shape(header.shape[1:], spec, str(path))
    counts = {name: header.shape[0] for name, header in headers.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"'{name}' {count}" for name, count in counts.items())
        raise UsageError(f"{path}: the arrays hold different numbers of samples ({listed}); give "
                         "every input the same number")
    sample_count = next(iter(counts.values()))
    if sample_count == 0:
        raise UsageError(f"{path}: the arrays hold no samples; give at least one")
    return _NpzData(path, specs, {spec.name: members[spec.name] for spec in specs}, sample_count)


class _NpzData(_CheckedData):
    def __init__(self, path: Path, specs: Sequence[InputSpec], members: dict[str, str],
                 sample_count: int):
        super().__init__(specs, str(path))
        self.path = path
        self.members = members
        self._sample_count = sample_count

    @property
    def sample_count(self) -> int:
        return self._sample_count

    def _raw_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        with zipfile.ZipFile(self.path) as archive, contextlib.ExitStack() as closing:
            streams = [closing.enter_context(contextlib.closing(
                self._member_batches(archive, name, batch_size))) for name in self.members]
            for arrays in zip(*streams):
                yield dict(zip(self.members, arrays))

    def _member_batches(self, archive: zipfile.ZipFile, name: str, batch_size: int) -> Iterator[np.ndarray]:
        try:
            with archive.open(self.members[name]) as stream:
                header = _read_npy_header(stream)
                sample_count, sample_shape = header.shape[0], header.shape[1:]
                if header.fortran_order:  # stored column-major: a sample's values are not contiguous
                    whole = _read_samples(stream, header, sample_count).reshape(header.shape, order="F")
                    yield from (np.ascontiguousarray(whole[start:start + batch_size])
                                for start in range(0, sample_count, batch_size))
                    return
                for start in range(0, sample_count, batch_size):
                    count = min(batch_size, sample_count - start)
                    yield _read_samples(stream, header, count).reshape(count, *sample_shape)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as exc:
            raise OnnxSparseError(f"{self.path}: array '{name}' is corrupt ({_first_line(exc)}); save "
                                  "the file again") from exc


def _read_samples(stream, header: _NpyHeader, count: int) -> np.ndarray:
    """The next `count` samples' values from an .npy stream, flat and writable."""
    size_bytes = count * int(np.prod(header.shape[1:], dtype=np.int64)) * header.dtype.itemsize
    data = bytearray(stream.read(size_bytes))
    if len(data) != size_bytes:
        raise EOFError("the array ends early")
    return np.frombuffer(data, header.dtype)


# ---------------------------------------------------------------------------------------------
# Folders of images
# ---------------------------------------------------------------------------------------------


def image_folder_data(path: str | os.PathLike, spec: InputSpec, *,
                      resize: tuple[int, int] | None = None, mean: Sequence[float] = (0.0,),
                      std: Sequence[float] = (1.0,), layout: str = "NCHW",
                      scale: float = 1 / 255) -> CalibrationData:
    """The images directly in a folder, sorted by file name, as samples of a one-image input.

    Each image is decoded with Pillow to L or RGB (the input's channel count), resized bilinearly
    to `resize` (H, W) or else the input's size, then (pixels * scale - mean) / std per channel.
    Images are decoded batch by batch.
    """
    path = Path(path)
    where = str(path)
    if not path.is_dir():
        raise UsageError(f"{where}: no such folder")
    if layout not in IMAGE_LAYOUTS:
        raise UsageError(f"{where}: layout must be one of {', '.join(IMAGE_LAYOUTS)}, got {layout!r}")
    if len(spec.shape) != 4:
        raise UsageError(f"{where}: input '{spec.name}' takes {_dims_text(spec.sample_shape)} samples, "
                         "not images; give the samples in a .npz file")
    channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    if channels not in IMAGE_MODES:
        raise UsageError(f"{where}: input '{spec.name}' takes {_dims_text(spec.sample_shape)} samples "
                         f"({layout}): images need 1 or 3 channels there; check the layout or "
                         "give the samples in a .npz file")
    size_hw = _image_size(spec, layout, resize, where)
    mean_values = _per_channel("mean", mean, channels, where)
    std_values = _per_channel("std", std, channels, where)
    if not np.all(std_values != 0):
        raise UsageError(f"{where}: std must not contain 0, got {list(std)}")
    files = sorted((file for file in path.iterdir()
                    if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file()),
                   key=lambda file: file.name)
    if not files:
        raise UsageError(f"{where}: no images ({' '.join(IMAGE_SUFFIXES)}) in this folder; put the "
                         "calibration images directly in it")
    return _ImageFolderData(spec, where, files, ImagePreprocessing(
        mode=IMAGE_MODES[channels], size_hw=size_hw, scale=scale, mean=mean_values,
        std=std_values, layout=layout))


def _image_size(spec: InputSpec, layout: str, resize: tuple[int, int] | None, where: str) -> tuple[int, int]:
    spatial = spec.shape[2:4] if layout == "NCHW" else spec.shape[1:3]
    if resize is None:
        if None in spatial:
            raise UsageError(f"{where}: input '{spec.name}' has no fixed image size "
                             f"({_dims_text(spatial)}); give the size to resize images to (H, W)")
        return int(spatial[0]), int(spatial[1])
    if (len(resize) != 2 or not all(isinstance(dim, (int, np.integer)) and dim > 0 for dim in resize)):
        raise UsageError(f"{where}: resize must be two positive whole numbers (H, W), got {resize!r}")
    if any(want is not None and got != want for got, want in zip(resize, spatial)):
        raise UsageError(f"{where}: input '{spec.name}': resize gives {_dims_text(resize)} images, the "
                         f"model takes {_dims_text(spatial)}; resize to {_dims_text(spatial)} or drop it")
    return int(resize[0]), int(resize[1])


def _per_channel(option: str, values: Sequence[float], channels: int, where: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if len(array) not in (1, channels):
        allowed = "1 value" if channels == 1 else f"1 or {channels} values"
        raise UsageError(f"{where}: {option} has {len(array)} values for {channels}-channel images; "
                         f"give {allowed}")
    return np.broadcast_to(array, (channels,))


@dataclass(frozen=True)
class ImagePreprocessing:
    """How decoded pixels become one sample: mode (L/RGB), size (H, W), scale, mean/std, layout."""

    mode: str
    size_hw: tuple[int, int]
    scale: float
    mean: np.ndarray
    std: np.ndarray
    layout: str

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [H, W, C] -> float32 (pixels * scale - mean) / std in the layout, without batch axis."""
        values = (pixels.astype(np.float32) * np.float32(self.scale) - self.mean) / self.std
        return np.ascontiguousarray(values.transpose(2, 0, 1) if self.layout == "NCHW" else values)


def decode_image(file: Path, mode: str, size_hw: tuple[int, int]) -> np.ndarray:
    """An image file as uint8 pixels [H, W, C] in Pillow mode L or RGB, resized bilinearly."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            converted = image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = "unknown format" if isinstance(exc, UnidentifiedImageError) else _first_line(exc)
        raise OnnxSparseError(f"{file}: not a readable image ({reason}); replace or remove the file") from exc
    height, width = size_hw
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


class _ImageFolderData(_CheckedData):
    def __init__(self, spec: InputSpec, where: str, files: list[Path], preprocessing: ImagePreprocessing):
        super().__init__([spec], where)
        self.files = files
        self.preprocessing = preprocessing

    @property
    def sample_count(self) -> int:
        return len(self.files)

    def _raw_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        preprocessing = self.preprocessing
        for chunk in _chunks(self.files, batch_size):
            samples = [preprocessing.normalize(decode_image(file, preprocessing.mode, preprocessing.size_hw))
                       for file in chunk]
            yield {self.specs[0].name: np.stack(samples)}


# ---------------------------------------------------------------------------------------------
# Python iterables
# ---------------------------------------------------------------------------------------------


def iterable_data(samples: Iterable, specs: Sequence[InputSpec]) -> CalibrationData:
    """Samples from Python: each item a dict input name -> array (one sample, no batch axis), or a
    bare array when the model has one input.

    A re-iterable (list, tuple, array, ...) is iterated afresh on every pass. A one-shot iterator
    (a generator, map, ...) is consumed lazily and its items are kept in a list as they come, so
    later passes replay them: that list holds every sample in memory.
    """
    if iter(samples) is samples:
        samples = _Replay(samples)
    elif isinstance(samples, Sized) and len(samples) == 0:
        raise UsageError(f"{IN_MEMORY}: no samples; give at least one")
    return _IterableData(samples, specs)


class _Replay:
    """Re-iterable view of a one-shot iterator: items are drawn once, kept, and replayed."""

    def __init__(self, iterator: Iterator):
        self._iterator = iterator
        self._seen: list = []
        self._exhausted = False

    def __iter__(self) -> Iterator:
        for index in itertools.count():
            if index == len(self._seen):
                if self._exhausted:
                    return
                try:
                    self._seen.append(next(self._iterator))
                except StopIteration:
                    self._exhausted = True
                    return
            yield self._seen[index]


class _IterableData(_CheckedData):
    def __init__(self, samples: Iterable, specs: Sequence[InputSpec]):
        super().__init__(specs, IN_MEMORY)
        self.samples = samples

    @property
    def sample_count(self) -> int:
        count = len(self.samples) if isinstance(self.samples, Sized) else sum(1 for _ in self.samples)
        if count == 0:
            raise UsageError(f"{self.where}: no samples; give at least one")
        return count

    def _raw_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        first_index = 0
        for chunk in _chunks(self.samples, batch_size):
            per_input = [self._sample_arrays(item, first_index + offset) for offset, item in enumerate(chunk)]
            yield {spec.name: self._stack([arrays[spec.name] for arrays in per_input], spec, first_index)
                   for spec in self.specs}
            first_index += len(chunk)
        if first_index == 0:
            raise UsageError(f"{self.where}: no samples; give at least one")

    def _sample_arrays(self, item, index: int) -> dict[str, np.ndarray]:
        where = f"{self.where} (sample {index})"
        if isinstance(item, Mapping):
            _check_names(item, self.specs, where)
            return {spec.name: self._as_array(item[spec.name], spec, where) for spec in self.specs}
        if len(self.specs) != 1:
            raise UsageError(f"{where}: the model has inputs {_quoted(spec.name for spec in self.specs)}; "
                             "give each sample as a dict input name -> array")
        return {self.specs[0].name: self._as_array(item, self.specs[0], where)}

    @staticmethod
    def _as_array(value, spec: InputSpec, where: str) -> np.ndarray:
        try:
            return np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise UsageError(f"{where}: input '{spec.name}': not an array ({_first_line(exc)}); give "
                             "numpy arrays") from exc

    def _stack(self, samples: list[np.ndarray], spec: InputSpec, first_index: int) -> np.ndarray:
        for offset, sample in enumerate(samples):
            _check_sample_shape(sample.shape, spec, f"{self.where} (sample {first_index + offset})")
            if sample.shape != samples[0].shape:  # dynamic dims may vary, but not within a batch
                raise UsageError(f"{self.where}: input '{spec.name}': sample {first_index + offset} is "
                                 f"{_dims_text(sample.shape)}, sample {first_index} is "
                                 f"{_dims_text(samples[0].shape)}; samples of one batch must have the "
                                 "same shape (use batch size 1)")
        return np.stack(samples)


# ---------------------------------------------------------------------------------------------
# One entry point for every source
# ---------------------------------------------------------------------------------------------


def open_calibration(source, specs: Sequence[InputSpec], **image_options) -> CalibrationData:
    """Calibration data from a .npz path, an image folder path (image_options go to
    image_folder_data), an existing CalibrationData, or an iterable of samples."""
    is_path = isinstance(source, (str, os.PathLike))
    if is_path:
        path = Path(source)
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")
        if path.is_dir():
            if len(specs) != 1:
                raise UsageError(f"{path}: a folder of images feeds only one-input models; this model "
                                 f"has inputs {_quoted(spec.name for spec in specs)}; give a .npz file")
            return image_folder_data(path, specs[0], **image_options)
        if path.suffix.lower() != ".npz":
            raise UsageError(f"{path}: not a .npz file or a folder of images; give one of those")
    if image_options:
        raise UsageError(f"{source if is_path else IN_MEMORY}: image options "
                         f"({', '.join(sorted(image_options))}) are for image folders only; drop them")
    if is_path:
        return npz_data(source, specs)
    if isinstance(source, CalibrationData):
        return source
    return iterable_data(source, specs)
