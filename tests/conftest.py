"""Shared fixtures: the digits sample and the materialized zoo models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI draws the same examples every run (reproducible); local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO / "samples" / "digits" / "digits_cnn.onnx"
DIGITS_TRAIN = REPO / "samples" / "digits" / "digits_train.npz"
DIGITS_TEST = REPO / "samples" / "digits" / "digits_test.npz"
# Zoo models CI runs (they fit its time budget); `--zoo=all` runs every one.
CI_ZOO = ("resnet50", "squeezenet")


def pytest_addoption(parser):
    parser.addoption("--zoo", default="ci", help="zoo models to test: 'ci' (resnet50, squeezenet), 'all', "
                     "'none', or a comma-separated list")


def zoo_names(config) -> list[str]:
    from onnxsparse.zoo import ZOO_MODELS

    choice = config.getoption("--zoo")
    if choice == "all":
        return list(ZOO_MODELS)
    if choice == "none":
        return []
    return list(CI_ZOO) if choice == "ci" else choice.split(",")


def pytest_generate_tests(metafunc):
    if "zoo_name" in metafunc.fixturenames:
        metafunc.parametrize("zoo_name", zoo_names(metafunc.config))


@pytest.fixture(scope="session")
def zoo_path():
    """Path of a materialized zoo model, made once per machine (cached outside git)."""
    from onnxsparse.zoo import zoo_model_path

    return zoo_model_path


@pytest.fixture(scope="session")
def digits_model():
    import onnxsparse

    return onnxsparse.load_model(DIGITS_MODEL)


@pytest.fixture(scope="session")
def digits_test():
    from onnxsparse.report.evaluate import load_labelled

    return load_labelled(DIGITS_TEST)
