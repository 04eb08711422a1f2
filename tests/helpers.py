"""Helpers shared by the kernel tests."""

import itertools

import jax
import numpy as np

_SEEDS = itertools.count()


def fresh_rng() -> np.random.Generator:
  """A new generator per call: every check draws fresh random inputs, reproducibly per run."""
  return np.random.default_rng(next(_SEEDS))


def has_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False
