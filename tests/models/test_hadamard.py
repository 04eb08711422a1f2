import jax.numpy as jnp
import numpy as np
import pytest

from models import hadamard
from models.config import LlamaConfig


@pytest.mark.parametrize("n", [1, 2, 12, 20, 24, 40, 64, 240, 576, 1536])
def test_hadamard_matrices_are_hadamard_and_the_fast_transform_matches_them(n):
  h = hadamard.hadamard_matrix(n)
  assert set(np.unique(h)) <= {-1, 1}
  np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))
  x = np.random.default_rng(n).standard_normal((3, 5, n)).astype(np.float32)
  y = np.asarray(hadamard.hadamard_transform(jnp.asarray(x)))
  np.testing.assert_allclose(y, x @ h / np.sqrt(n), rtol=0, atol=2e-5 * np.abs(x).max() * np.sqrt(n))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)  # orthogonal


def test_orders_that_are_not_built_are_refused_clearly():
  for n in (3, 60, 11008):
    assert not hadamard.has_order(n)
    with pytest.raises(ValueError, match="no Hadamard matrix of order"):
      hadamard.hadamard_matrix(n)
  with pytest.raises(ValueError, match="power-of-two"):
    hadamard.fwht(jnp.ones((2, 12)))
  with pytest.raises(ValueError, match="down_proj_hadamard"):
    LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=60, num_layers=1, num_heads=2, num_kv_heads=2,
                down_proj_hadamard=True)
