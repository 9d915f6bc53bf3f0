"""Pruning criteria: how important a unit (a group of weights pruned together) is.

Each criterion scores units given their values, shape [..., elements]; higher means keep.
`normalized` scores are comparable across layers whose units differ in size (global scope).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from onnxsparse.errors import UsageError


@dataclass(frozen=True)
class L1:
    name = "l1"

    def score(self, values: np.ndarray) -> np.ndarray:
        return np.abs(values).sum(axis=-1, dtype=np.float64)

    def normalized(self, values: np.ndarray, element_counts: np.ndarray) -> np.ndarray:
        return self.score(values) / np.maximum(element_counts, 1)


@dataclass(frozen=True)
class L2:
    name = "l2"

    def score(self, values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float64)
        return np.sqrt(np.einsum("...e,...e->...", values, values))

    def normalized(self, values: np.ndarray, element_counts: np.ndarray) -> np.ndarray:
        return self.score(values) / np.sqrt(np.maximum(element_counts, 1))


@dataclass(frozen=True)
class Random:
    """Uniform random scores: the baseline any real criterion must beat. Seeded per layer."""

    seed: int = 0
    key: str = ""
    name = "random"

    def score(self, values: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(self.key.encode())])
        return rng.random(values.shape[:-1])

    def normalized(self, values: np.ndarray, element_counts: np.ndarray) -> np.ndarray:
        return self.score(values)


CRITERIA = ("l1", "l2", "random")


def make_criterion(name: str, *, seed: int = 0, key: str = ""):
    """The criterion called `name`; `seed` and `key` (a layer name) seed the random one."""
    if name == "l1":
        return L1()
    if name == "l2":
        return L2()
    if name == "random":
        return Random(seed, key)
    raise UsageError(f"unknown criterion {name!r}; use one of: {', '.join(CRITERIA)}")
