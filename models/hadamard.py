"""Hadamard matrices and a fast orthonormal Hadamard transform (for rotated models, QuaRot-style).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal. The
orders built here are n = 2^a * 12^b * 20^c: a Kronecker product of Paley matrices of order 12 and
20 (Paley's first construction from the quadratic residues mod 11 and mod 19) and a Sylvester
matrix of order 2^a. That covers SmolLM2's widths (576 = 12 * 12 * 4, 1536 = 12 * 128) and every
power of two; other orders raise ValueError.

`hadamard_transform(x)` computes x @ hadamard_matrix(n) / sqrt(n) along the last axis without the
dense matrix: one small dense product over the 12/20 factors, then a fast Walsh-Hadamard transform
(log2 of the power-of-two factor butterfly stages). models/llama.py applies it to down_proj's input
when LlamaConfig.down_proj_hadamard is set; flexq_jax/rotation.py folds the transpose into the
weight, so the float model is unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PALEY_PRIMES = {12: 11, 20: 19}  # order q + 1 from the prime q (q = 3 mod 4)


def _paley(q: int) -> np.ndarray:
  """Paley's first construction: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
  residues = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)])
  jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])  # antisymmetric
  s = np.zeros((q + 1, q + 1), np.int64)
  s[0, 1:] = 1
  s[1:, 0] = -1
  s[1:, 1:] = jac
  return s + np.eye(q + 1, dtype=np.int64)


def factor(n: int) -> tuple[tuple[int, ...], int]:
  """n = prod(small) * p with small factors in (12, 20) and p a power of two; ValueError otherwise."""
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"a Hadamard order must be a positive integer, got {n!r}")
  small, rest = [], int(n)
  for m in (20, 12):
    while rest % m == 0:
      small.append(m)
      rest //= m
  if rest & (rest - 1):
    raise ValueError(f"no Hadamard matrix of order {n} is built here (orders 2^a * 12^b * 20^c only)")
  return tuple(small), rest


def has_order(n: int) -> bool:
  """Whether hadamard_matrix(n) exists here."""
  try:
    factor(n)
  except ValueError:
    return False
  return True


@functools.lru_cache(maxsize=16)
def _small_matrix(small: tuple[int, ...]) -> np.ndarray:
  h = np.ones((1, 1), np.int64)
  for m in small:
    h = np.kron(h, _paley(PALEY_PRIMES[m]))
  return h


def sylvester(p: int) -> np.ndarray:
  """The Sylvester (Walsh) Hadamard matrix of order p = 2^a (symmetric)."""
  h = np.ones((1, 1), np.int64)
  while h.shape[0] < p:
    h = np.kron(np.array([[1, 1], [1, -1]]), h)
  return h


def hadamard_matrix(n: int) -> np.ndarray:
  """A +-1 Hadamard matrix of order n (int64): kron(Paley factors, Sylvester(2^a))."""
  small, p = factor(n)
  return np.kron(_small_matrix(small), sylvester(p))


def fwht(x: jax.Array) -> jax.Array:
  """x @ sylvester(n) along the last axis (n a power of two), unnormalized, in log2(n) stages."""
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f"the fast Walsh-Hadamard transform needs a power-of-two length, got {n}")
  lead = x.shape[:-1]
  h = 1
  while h < n:
    y = x.reshape(*lead, n // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
    h *= 2
  return x


def hadamard_transform(x: jax.Array) -> jax.Array:
  """x @ hadamard_matrix(n) / sqrt(n) along the last axis (an orthogonal transform), in fp32,
  returned in x's dtype."""
  n = x.shape[-1]
  small, p = factor(n)
  m = n // p
  x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], m, p)
  if m > 1:
    x32 = jnp.einsum("...ij,ik->...kj", x32, jnp.asarray(_small_matrix(small), jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  y = fwht(x32).reshape(x.shape) * np.float32(1.0 / np.sqrt(n))
  return y.astype(x.dtype)
