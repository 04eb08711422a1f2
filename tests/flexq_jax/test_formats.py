import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import formats


def reference_planes(q: np.ndarray, bits: int) -> np.ndarray:
  """Independent packer: loops over bits and words with plain Python ints."""
  n, k = q.shape
  out = np.zeros((bits, n, k // 32), np.uint32)
  for i in range(bits):
    for r in range(n):
      for w in range(k // 32):
        word = 0
        for t in range(32):
          u = int(q[r, 32 * w + t]) & ((1 << bits) - 1)
          word |= ((u >> i) & 1) << t
        out[i, r, w] = word
  return out


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_bitplanes_bit_exact_against_reference_packer(bits):
  lo, hi = formats.qrange(bits)
  rng = np.random.default_rng(bits)
  q = rng.integers(lo, hi + 1, (3, 128)).astype(np.int8)
  q[0, :4] = [lo, hi, 0, -1]  # the signed bounds and the all-ones pattern
  planes = formats.pack_bitplanes(jnp.asarray(q), bits)
  np.testing.assert_array_equal(planes, reference_planes(q, bits))
  np.testing.assert_array_equal(formats.unpack_bitplanes(planes), q)


def test_round_trip_at_real_tile_shape_with_edges():
  rng = np.random.default_rng(0)
  q = rng.integers(-32, 32, (1536, 576)).astype(np.int8)
  q[:, :128] = 0  # an all-zero group
  q[0] = -32
  q[1] = 31
  packed = formats.pack(jnp.asarray(np.pad(q, [(0, 0), (0, 64)])), 6, "bitplanes", k=576)
  assert packed.shape == (6, 1536, 18) and packed.dtype == jnp.uint32  # 6 bits/weight, K not padded
  back = formats.unpack(packed, 6, "bitplanes", k=576)
  assert back.shape == (1536, 640)  # padded to the group multiple on the way out
  np.testing.assert_array_equal(back[:, :576], q)
  assert not np.asarray(back[:, 576:]).any()


def test_bad_shapes_and_layouts():
  with pytest.raises(ValueError, match="multiple of 32"):
    formats.pack_bitplanes(jnp.zeros((2, 40), jnp.int8), 6)
  with pytest.raises(ValueError, match="unknown layout"):
    formats.pack(jnp.zeros((2, 128), jnp.int8), 6, "int8", k=128)
  with pytest.raises(ValueError, match="planes, expected 6"):
    formats.unpack(jnp.zeros((8, 2, 4), jnp.uint32), 6, "bitplanes", k=128)
