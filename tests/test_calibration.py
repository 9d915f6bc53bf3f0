"""quant/calibration.py: calibration samples from .npz files, image folders and iterables, streamed
in batches and checked against the model's inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from PIL import Image

from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.model import onnxruntime_session
from onnxsparse.quant.calibration import (
    CalibrationData,
    InputSpec,
    image_folder_data,
    iterable_data,
    model_input_specs,
    npz_data,
    open_calibration,
)

from conftest import DIGITS_TRAIN

FLOAT32 = np.dtype(np.float32)
DIGITS_SPECS = [InputSpec("input", (None, 1, 8, 8), FLOAT32)]
# A two-input model: a vector and a scalar per sample.
PAIR_SPECS = [InputSpec("vector", (None, 2), FLOAT32), InputSpec("gain", (None,), FLOAT32)]


def numbered_samples(count: int, sample_shape=(1, 8, 8), dtype=np.float32) -> np.ndarray:
    """Samples whose values tell them apart: sample i holds i*1000 + position."""
    size = int(np.prod(sample_shape))
    return (np.arange(count)[:, None] * 1000 + np.arange(size)).reshape(count, *sample_shape).astype(dtype)


def write_png(path: Path, pixels, mode: str | None = None) -> Path:
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode).save(path)
    return path


def collect(data: CalibrationData, batch_size: int) -> list[dict[str, np.ndarray]]:
    return list(data.batches(batch_size))


# ---------------------------------------------------------------------------------------------
# Model inputs
# ---------------------------------------------------------------------------------------------


def test_model_input_specs_skip_initializers_and_map_symbolic_dims_to_none():
    weight = helper.make_tensor("weight", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "weight"], ["y"])], "specs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 3]),
         helper.make_tensor_value_info("weight", TensorProto.FLOAT, [3])],  # IR 3 style: listed too
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 3])], [weight])
    specs = model_input_specs(helper.make_model(graph))
    assert specs == [InputSpec("x", (None, 2, 3), FLOAT32)]
    assert specs[0].sample_shape == (2, 3)


def test_digits_model_input_spec_is_one_by_eight_by_eight_float(digits_model):
    assert model_input_specs(digits_model) == DIGITS_SPECS


# ---------------------------------------------------------------------------------------------
# .npz files
# ---------------------------------------------------------------------------------------------


def test_npz_streams_batches_of_the_requested_size_with_equal_values(tmp_path):
    samples = numbered_samples(10)
    np.savez(tmp_path / "calib.npz", input=samples)
    data = npz_data(tmp_path / "calib.npz", DIGITS_SPECS)
    batches = collect(data, 4)
    assert data.sample_count == 10
    assert [len(batch["input"]) for batch in batches] == [4, 4, 2]
    assert all(set(batch) == {"input"} and batch["input"].dtype == np.float32 for batch in batches)
    np.testing.assert_array_equal(np.concatenate([batch["input"] for batch in batches]), samples)


def test_npz_labels_array_is_ignored(tmp_path):
    np.savez(tmp_path / "calib.npz", input=numbered_samples(3), labels=np.array([7, 8]))
    batches = collect(open_calibration(tmp_path / "calib.npz", DIGITS_SPECS), 8)
    assert [set(batch) for batch in batches] == [{"input"}]
    np.testing.assert_array_equal(batches[0]["input"], numbered_samples(3))


@pytest.mark.parametrize("stored_dtype", [np.float64, np.float16])
def test_npz_float64_and_float16_are_cast_to_float32(tmp_path, stored_dtype):
    samples = numbered_samples(5, (1, 8, 8), stored_dtype) / 64  # exact in float16 and float32
    np.savez(tmp_path / "calib.npz", input=samples)
    (batch,) = collect(npz_data(tmp_path / "calib.npz", DIGITS_SPECS), 5)
    assert batch["input"].dtype == np.float32
    np.testing.assert_array_equal(batch["input"], samples.astype(np.float32))


def test_digits_train_sample_feeds_the_digits_model(digits_model):
    data = open_calibration(DIGITS_TRAIN, model_input_specs(digits_model))
    assert data.sample_count == 1197
    first_batch = next(data.batches(256))
    with np.load(DIGITS_TRAIN) as digits:
        np.testing.assert_array_equal(first_batch["input"], digits["input"][:256])
    assert onnxruntime_session(digits_model).run(None, first_batch)[0].shape == (256, 10)


@settings(max_examples=40, deadline=None)
@given(sample_count=st.integers(1, 12), batch_size=st.integers(1, 8), compressed=st.booleans(),
       fortran_order=st.booleans(), stored_dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_npz_batches_concatenate_to_the_stored_arrays(sample_count, batch_size, compressed, fortran_order,
                                                      stored_dtype):
    vectors = numbered_samples(sample_count, (3, 2), stored_dtype) / 64
    gains = np.arange(sample_count, dtype=stored_dtype)
    if fortran_order:
        vectors = np.asfortranarray(vectors)
    specs = [InputSpec("vector", (None, 3, 2), FLOAT32), InputSpec("gain", (None,), FLOAT32)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "calib.npz"
        (np.savez_compressed if compressed else np.savez)(path, vector=vectors, gain=gains)
        batches = collect(npz_data(path, specs), batch_size)
    expected_sizes = [min(batch_size, sample_count - start) for start in range(0, sample_count, batch_size)]
    assert [len(batch["vector"]) for batch in batches] == [len(batch["gain"]) for batch in batches] == expected_sizes
    np.testing.assert_array_equal(np.concatenate([batch["vector"] for batch in batches]), vectors.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([batch["gain"] for batch in batches]), gains.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------

GRAY_PIXELS = [[0, 51, 102], [153, 204, 255]]


def test_grayscale_image_is_scaled_and_normalized_in_nchw(tmp_path):
    write_png(tmp_path / "one.png", GRAY_PIXELS)
    spec = InputSpec("input", (None, 1, 2, 3), FLOAT32)
    (batch,) = collect(image_folder_data(tmp_path, spec, mean=(0.5,), std=(0.25,)), 4)
    expected = [[[[-2.0, -1.2, -0.4], [0.4, 1.2, 2.0]]]]  # (pixel / 255 - 0.5) / 0.25
    np.testing.assert_allclose(batch["input"], expected, rtol=0, atol=1e-6)
    assert batch["input"].dtype == np.float32


RGB_PIXELS = [[[255, 0, 51], [0, 255, 102]]]  # one row, two pixels
RGB_MEAN, RGB_STD = (0.0, 0.5, 0.0), (1.0, 0.5, 0.2)
RGB_EXPECTED_HWC = np.array([[[1.0, -1.0, 1.0], [0.0, 1.0, 2.0]]], np.float32)  # per channel (p/255 - m) / s


def test_rgb_image_is_normalized_per_channel_in_nhwc(tmp_path):
    write_png(tmp_path / "one.png", RGB_PIXELS, "RGB")
    spec = InputSpec("input", (None, 1, 2, 3), FLOAT32)
    (batch,) = collect(image_folder_data(tmp_path, spec, mean=RGB_MEAN, std=RGB_STD, layout="NHWC"), 4)
    np.testing.assert_allclose(batch["input"], RGB_EXPECTED_HWC[None], rtol=0, atol=1e-6)


def test_rgb_image_in_nchw_puts_channels_first(tmp_path):
    write_png(tmp_path / "one.png", RGB_PIXELS, "RGB")
    spec = InputSpec("input", (None, 3, 1, 2), FLOAT32)
    (batch,) = collect(image_folder_data(tmp_path, spec, mean=RGB_MEAN, std=RGB_STD), 4)
    np.testing.assert_allclose(batch["input"], RGB_EXPECTED_HWC.transpose(2, 0, 1)[None], rtol=0, atol=1e-6)


def test_images_are_converted_to_the_input_channel_count(tmp_path):
    write_png(tmp_path / "rgb.png", np.full((2, 2, 3), 100), "RGB")
    write_png(tmp_path / "gray.png", np.full((2, 2), 60))
    gray_spec = InputSpec("input", (None, 1, 2, 2), FLOAT32)
    rgb_spec = InputSpec("input", (None, 3, 2, 2), FLOAT32)
    (as_gray,) = collect(image_folder_data(tmp_path, gray_spec, scale=1.0), 2)
    (as_rgb,) = collect(image_folder_data(tmp_path, rgb_spec, scale=1.0), 2)
    np.testing.assert_array_equal(as_gray["input"], np.stack([np.full((1, 2, 2), 60), np.full((1, 2, 2), 100)]))
    np.testing.assert_array_equal(as_rgb["input"], np.stack([np.full((3, 2, 2), 60), np.full((3, 2, 2), 100)]))


def test_images_are_resized_to_the_given_height_and_width(tmp_path):
    write_png(tmp_path / "big.png", np.full((5, 7), 128))
    spec = InputSpec("input", (None, 1, None, None), FLOAT32)
    (batch,) = collect(image_folder_data(tmp_path, spec, resize=(2, 3), scale=1.0), 1)
    np.testing.assert_array_equal(batch["input"], np.full((1, 1, 2, 3), 128.0))


def test_images_are_resized_to_the_model_size_without_resize(tmp_path):
    write_png(tmp_path / "big.png", np.full((5, 7, 3), 128), "RGB")
    spec = InputSpec("input", (None, 4, 6, 3), FLOAT32)  # NHWC: H=4, W=6
    (batch,) = collect(image_folder_data(tmp_path, spec, layout="NHWC", scale=1.0), 1)
    np.testing.assert_array_equal(batch["input"], np.full((1, 4, 6, 3), 128.0))


def test_images_come_sorted_by_name_and_other_files_are_ignored(tmp_path):
    for name, value in [("b.png", 20), ("a.png", 10), ("d.PNG", 40), ("c.bmp", 30)]:
        write_png(tmp_path / name, np.full((2, 2), value))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "nested").mkdir()
    write_png(tmp_path / "nested" / "0.png", np.full((2, 2), 99))
    data = image_folder_data(tmp_path, InputSpec("input", (None, 1, 2, 2), FLOAT32), scale=1.0)
    batches = collect(data, 3)
    assert data.sample_count == 4
    assert [len(batch["input"]) for batch in batches] == [3, 1]
    first_pixels = np.concatenate([batch["input"] for batch in batches])[:, 0, 0, 0]
    np.testing.assert_array_equal(first_pixels, [10, 20, 30, 40])


def test_image_folder_decodes_batch_by_batch(tmp_path):
    for index in range(3):
        write_png(tmp_path / f"{index}.png", np.full((2, 2), index))
    (tmp_path / "9_broken.png").write_bytes(b"not a png at all")
    batches = image_folder_data(tmp_path, InputSpec("input", (None, 1, 2, 2), FLOAT32)).batches(2)
    np.testing.assert_allclose(next(batches)["input"][:, 0, 0, 0], [0, 1 / 255], rtol=1e-6)
    with pytest.raises(OnnxSparseError, match="9_broken.png: not a readable image"):
        next(batches)  # the second batch holds 2.png and the broken file


# ---------------------------------------------------------------------------------------------
# Iterables
# ---------------------------------------------------------------------------------------------


def test_iterable_of_dicts_is_batched_per_input():
    samples = [{"vector": [index, -index / 4], "gain": np.float64(index / 2)} for index in range(5)]
    data = iterable_data(samples, PAIR_SPECS)
    batches = collect(data, 2)
    assert data.sample_count == 5
    assert [len(batch["gain"]) for batch in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([batch["vector"] for batch in batches]),
                                  [[index, -index / 4] for index in range(5)])
    np.testing.assert_array_equal(np.concatenate([batch["gain"] for batch in batches]), [0, 0.5, 1, 1.5, 2])
    assert all(array.dtype == np.float32 for batch in batches for array in batch.values())


def test_iterable_of_bare_arrays_feeds_a_one_input_model():
    samples = numbered_samples(3)
    batches = collect(open_calibration(list(samples), DIGITS_SPECS), 2)
    np.testing.assert_array_equal(np.concatenate([batch["input"] for batch in batches]), samples)


def test_array_of_samples_is_its_own_calibration_data():
    samples = numbered_samples(3)
    data = open_calibration(samples, DIGITS_SPECS)
    assert data.sample_count == 3
    np.testing.assert_array_equal(collect(data, 3)[0]["input"], samples)


def test_generator_is_read_lazily_and_replayed_on_the_second_pass():
    produced = []

    def generate():
        for index in range(5):
            produced.append(index)
            yield np.full((1, 8, 8), index, np.float32)

    data = iterable_data(generate(), DIGITS_SPECS)
    first_pass = data.batches(2)
    next(first_pass)
    assert produced == [0, 1]
    passes = [[batch["input"][:, 0, 0, 0].tolist() for batch in data.batches(2)] for _ in range(2)]
    assert passes == [[[0, 1], [2, 3], [4]]] * 2
    assert produced == [0, 1, 2, 3, 4]
    assert data.sample_count == 5


def test_existing_calibration_data_passes_through():
    data = iterable_data([np.zeros((1, 8, 8), np.float32)], DIGITS_SPECS)
    assert open_calibration(data, DIGITS_SPECS) is data


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the file (or "calibration data") and the input, saying what to do
# ---------------------------------------------------------------------------------------------


def npz_file(tmp_path: Path, **arrays) -> Path:
    np.savez(tmp_path / "calib.npz", **arrays)
    return tmp_path / "calib.npz"


def image_folder(tmp_path: Path, *pixels) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(pixels):
        write_png(folder / f"{index}.png", image)
    return folder


def file_with(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


def folder_with_corrupt_image(tmp_path: Path) -> Path:
    folder = image_folder(tmp_path, SMALL_IMAGE)
    file_with(folder, "1_bad.png", b"\x89PNG truncated")
    return folder


def bad_sample(index: int, value: float) -> np.ndarray:
    samples = numbered_samples(10, dtype=np.float64)
    samples[index, 0, 3, 4] = value
    return samples


def nothing():
    yield from ()


SMALL_IMAGE = np.zeros((2, 2))
SMALL_SPEC = [InputSpec("input", (None, 1, 2, 2), FLOAT32)]
# (case, source made in tmp_path, specs, image options, error type, fragments the message must hold)
ERROR_CASES = [
    ("npz_not_keyed_by_input", lambda tmp: npz_file(tmp, x_train=numbered_samples(2), y_train=np.arange(2)),
     DIGITS_SPECS, {}, UsageError, ["calib.npz: no array for input 'input' and arrays 'x_train', 'y_train' are "
                                    "not model inputs; give one array per model input, keyed by its name ('input')"]),
    ("npz_missing_input", lambda tmp: npz_file(tmp, vector=np.zeros((2, 2))), PAIR_SPECS, {}, UsageError,
     ["calib.npz: no array for input 'gain'"]),
    ("npz_sample_shape", lambda tmp: npz_file(tmp, input=np.zeros((3, 1, 28, 28), np.float32)), DIGITS_SPECS,
     {}, UsageError, ["calib.npz: input 'input': samples are 1x28x28, the model takes 1x8x8"]),
    ("npz_no_sample_axis", lambda tmp: npz_file(tmp, input=np.float32(1)), DIGITS_SPECS, {}, UsageError,
     ["calib.npz: array 'input' is a single value"]),
    ("npz_int", lambda tmp: npz_file(tmp, input=np.zeros((3, 1, 8, 8), np.int64)), DIGITS_SPECS, {},
     UsageError, ["calib.npz: input 'input': samples are int64, the model takes float32; convert"]),
    ("npz_bool", lambda tmp: npz_file(tmp, input=np.zeros((3, 1, 8, 8), bool)), DIGITS_SPECS, {},
     UsageError, ["input 'input': samples are bool"]),
    ("npz_strings", lambda tmp: npz_file(tmp, input=np.full((3, 1, 8, 8), "a")), DIGITS_SPECS, {},
     UsageError, ["input 'input': samples are <U1"]),
    ("npz_objects", lambda tmp: npz_file(tmp, input=np.empty((3, 1, 8, 8), object)), DIGITS_SPECS, {},
     UsageError, ["input 'input': samples are object"]),
    ("npz_nan", lambda tmp: npz_file(tmp, input=bad_sample(6, np.nan)), DIGITS_SPECS, {}, UsageError,
     ["calib.npz: input 'input': sample 6 contains NaN or Inf"]),
    ("npz_float64_overflow", lambda tmp: npz_file(tmp, input=bad_sample(9, 1e300)), DIGITS_SPECS, {},
     UsageError, ["input 'input': sample 9 contains NaN or Inf (in float32)"]),
    ("npz_empty", lambda tmp: npz_file(tmp, input=np.zeros((0, 1, 8, 8), np.float32)), DIGITS_SPECS, {},
     UsageError, ["calib.npz: the arrays hold no samples"]),
    ("npz_counts_differ", lambda tmp: npz_file(tmp, vector=np.zeros((3, 2)), gain=np.zeros(2)), PAIR_SPECS,
     {}, UsageError, ["calib.npz: the arrays hold different numbers of samples ('vector' 3, 'gain' 2)"]),
    ("npz_corrupt", lambda tmp: file_with(tmp, "bad.npz", b"PK not a zip"), DIGITS_SPECS, {}, OnnxSparseError,
     ["bad.npz: not a readable .npz file"]),
    ("npz_with_image_options", lambda tmp: npz_file(tmp, input=numbered_samples(2)), DIGITS_SPECS,
     {"layout": "NHWC"}, UsageError, ["calib.npz: image options (layout) are for image folders only"]),
    ("missing_path", lambda tmp: tmp / "nowhere.npz", DIGITS_SPECS, {}, UsageError,
     ["nowhere.npz: no such file or folder"]),
    ("not_npz_or_folder", lambda tmp: file_with(tmp, "bad.txt", b"1 2 3"), DIGITS_SPECS, {}, UsageError,
     ["bad.txt: not a .npz file or a folder of images"]),
    ("folder_without_images", lambda tmp: image_folder(tmp), SMALL_SPEC, {}, UsageError,
     ["images: no images (.bmp"]),
    ("corrupt_image", folder_with_corrupt_image, SMALL_SPEC, {}, OnnxSparseError,
     ["1_bad.png: not a readable image"]),
    ("folder_for_two_inputs", lambda tmp: image_folder(tmp, SMALL_IMAGE), PAIR_SPECS, {}, UsageError,
     ["images: a folder of images feeds only one-input models", "'vector', 'gain'"]),
    ("folder_for_vectors", lambda tmp: image_folder(tmp, SMALL_IMAGE), [PAIR_SPECS[0]], {}, UsageError,
     ["images: input 'vector' takes 2 samples, not images"]),
    ("folder_two_channels", lambda tmp: image_folder(tmp, SMALL_IMAGE),
     [InputSpec("input", (None, 2, 2, 2), FLOAT32)], {}, UsageError, ["images need 1 or 3 channels"]),
    ("folder_no_size", lambda tmp: image_folder(tmp, SMALL_IMAGE),
     [InputSpec("input", (None, 1, None, None), FLOAT32)], {}, UsageError,
     ["input 'input' has no fixed image size (?x?); give the size"]),
    ("folder_resize_clash", lambda tmp: image_folder(tmp, SMALL_IMAGE), SMALL_SPEC, {"resize": (4, 4)},
     UsageError, ["input 'input': resize gives 4x4 images, the model takes 2x2"]),
    ("folder_mean_length", lambda tmp: image_folder(tmp, SMALL_IMAGE), SMALL_SPEC, {"mean": (0.1, 0.2)},
     UsageError, ["images: mean has 2 values for 1-channel images; give 1 value"]),
    ("folder_std_zero", lambda tmp: image_folder(tmp, SMALL_IMAGE), SMALL_SPEC, {"std": (0.0,)},
     UsageError, ["images: std must not contain 0"]),
    ("folder_layout", lambda tmp: image_folder(tmp, SMALL_IMAGE), SMALL_SPEC, {"layout": "CHW"},
     UsageError, ["images: layout must be one of NCHW, NHWC, got 'CHW'"]),
    ("iterable_missing_input", lambda tmp: [{"vector": [1.0, 2.0]}], PAIR_SPECS, {}, UsageError,
     ["calibration data (sample 0): no array for input 'gain'"]),
    ("iterable_unknown_input", lambda tmp: [{"input": np.zeros((1, 8, 8)), "mask": 1.0}], DIGITS_SPECS, {},
     UsageError, ["calibration data (sample 0): array 'mask' is not a model input"]),
    ("iterable_bare_array_for_two_inputs", lambda tmp: [np.zeros(2)], PAIR_SPECS, {}, UsageError,
     ["calibration data (sample 0): the model has inputs 'vector', 'gain'; give each sample as a dict"]),
    ("iterable_sample_shape", lambda tmp: [np.zeros((1, 8, 8))] * 3 + [np.zeros((8, 8))], DIGITS_SPECS, {},
     UsageError, ["calibration data (sample 3): input 'input': samples are 8x8, the model takes 1x8x8"]),
    ("iterable_ragged_batch", lambda tmp: [np.zeros((1, 4, 4)), np.zeros((1, 5, 5))],
     [InputSpec("input", (None, 1, None, None), FLOAT32)], {}, UsageError,
     ["calibration data: input 'input': sample 1 is 1x5x5, sample 0 is 1x4x4"]),
    ("iterable_ints", lambda tmp: [np.zeros((1, 8, 8), np.int32)], DIGITS_SPECS, {}, UsageError,
     ["calibration data: input 'input': samples are int32, the model takes float32"]),
    ("iterable_inf", lambda tmp: iter(bad_sample(5, -np.inf)), DIGITS_SPECS, {}, UsageError,
     ["calibration data: input 'input': sample 5 contains NaN or Inf"]),
    ("iterable_empty_list", lambda tmp: [], DIGITS_SPECS, {}, UsageError, ["calibration data: no samples"]),
    ("iterable_empty_generator", lambda tmp: nothing(), DIGITS_SPECS, {}, UsageError,
     ["calibration data: no samples"]),
]


@pytest.mark.parametrize("make_source, specs, image_options, error_type, fragments",
                         [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES])
def test_bad_calibration_data_is_reported_in_one_line(tmp_path, capsys, make_source, specs, image_options,
                                                      error_type, fragments):
    with pytest.raises(error_type) as caught:
        for _ in open_calibration(make_source(tmp_path), specs, **image_options).batches(4):
            pass
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert capsys.readouterr().out == ""


def test_npz_shape_and_dtype_are_checked_on_open(tmp_path):
    path = npz_file(tmp_path, input=np.zeros((3, 1, 28, 28), np.float32))
    with pytest.raises(UsageError, match="samples are 1x28x28, the model takes 1x8x8"):
        npz_data(path, DIGITS_SPECS)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_batch_size_below_one_is_refused_before_reading(tmp_path, batch_size):
    data = npz_data(npz_file(tmp_path, input=numbered_samples(2)), DIGITS_SPECS)
    expected = f"calib.npz: batch size must be a whole number of at least 1, got {batch_size}"
    with pytest.raises(UsageError, match=expected):
        data.batches(batch_size)
