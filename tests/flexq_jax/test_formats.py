import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import formats
from pallas_kernels import core


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
  lo, hi = core.qrange(bits)
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


# ---- "pallas8": int8 tiles of 16 rows x one group, phase-major within the group ----------------

def reference_pallas8(q: np.ndarray) -> np.ndarray:
  """Independent packer: one element at a time, from formats' drawing (column 32p + t <- k = 4t + p)."""
  n, kp = q.shape
  out = np.zeros((n // 16, kp // 128, 16, 128), np.int8)
  for r in range(n):
    for k in range(kp):
      j, kk = divmod(k, 128)
      t, p = divmod(kk, 4)
      out[r // 16, j, r % 16, 32 * p + t] = q[r, k]
  return out


def test_pallas8_bit_exact_and_phase_major_position():
  lo, hi = core.qrange(8)
  rng = np.random.default_rng(8)
  q = rng.integers(lo, hi + 1, (32, 256)).astype(np.int8)
  q[0, :4] = [lo, hi, 0, -1]
  packed = formats.pack_pallas8(jnp.asarray(q))
  assert packed.dtype == jnp.int8 and packed.shape == (2, 2, 16, 128)  # 8 bits a weight
  np.testing.assert_array_equal(packed, reference_pallas8(q))
  np.testing.assert_array_equal(formats.unpack_pallas8(packed), q)
  # A chosen element: row 19 = tile 1, row 3 in it; k = 128 + 4*5 + 2 = group 1, t = 5, phase 2.
  q1 = np.zeros((32, 256), np.int8)
  q1[19, 150] = -77
  packed1 = np.asarray(formats.pack_pallas8(jnp.asarray(q1)))
  assert packed1[1, 1, 3, 32 * 2 + 5] == -77 and np.count_nonzero(packed1) == 1
  # The same order as phase-major q_x: a K = 128 dot of matching columns is the group sum.
  x = rng.integers(-127, 128, (256,)).astype(np.int64)
  x_pm = x.reshape(2, 32, 4).transpose(0, 2, 1).reshape(2, 128)
  sums = np.einsum("jc,bjic->bij", x_pm, np.asarray(packed, np.int64)).reshape(32, 2)
  np.testing.assert_array_equal(sums, (q.astype(np.int64).reshape(32, 2, 128) * x.reshape(2, 128)).sum(-1))


def test_pallas8_round_trip_with_k_padding():
  rng = np.random.default_rng(1)
  q = rng.integers(-127, 128, (48, 200)).astype(np.int8)
  q_padded = np.pad(q, [(0, 0), (0, 56)])
  packed = formats.pack(jnp.asarray(q_padded), 8, "pallas8", k=200)
  assert packed.shape == (3, 2, 16, 128)  # stores the padded Kp = 256
  back = formats.unpack(packed, 8, "pallas8", k=200)
  assert back.shape == (48, 256) and back.dtype == jnp.int8
  np.testing.assert_array_equal(back, q_padded)
  assert formats.packed_bytes_per_weight(8, "pallas8") == 1.0
  assert "pallas8" in formats.LAYOUTS


def test_pallas8_errors():
  with pytest.raises(ValueError, match="8-bit weights only"):
    formats.pack(jnp.zeros((16, 128), jnp.int8), 6, "pallas8", k=128)
  with pytest.raises(ValueError, match="8-bit weights only"):
    formats.unpack(jnp.zeros((1, 1, 16, 128), jnp.int8), 6, "pallas8", k=128)
  with pytest.raises(ValueError, match="multiple of 16"):
    formats.pack_pallas8(jnp.zeros((40, 128), jnp.int8))
  with pytest.raises(ValueError, match="multiple of 128"):
    formats.pack_pallas8(jnp.zeros((16, 96), jnp.int8))
  with pytest.raises(ValueError, match=r"in \[-128, 127\]"):
    formats.pack_pallas8(jnp.full((16, 128), 200, jnp.int32))
  with pytest.raises(ValueError, match=r"int8 \[N/16, groups, 16, 128\]"):
    formats.unpack_pallas8(jnp.zeros((1, 1, 3, 16, 32), jnp.uint8))
  with pytest.raises(ValueError, match=r"int8 \[N/16, groups, 16, 128\]"):
    formats.unpack_pallas8(jnp.zeros((1, 1, 16, 128), jnp.uint8))


@pytest.mark.parametrize("k", [200, 576, 840, 2200])
def test_bitplanes_g4_round_trip_and_word_positions(k):
  rng = np.random.default_rng(k)
  kp = core.padded_k(k)
  q = np.zeros((24, kp), np.int8)
  q[:, :k] = rng.integers(-32, 32, (24, k))
  g4 = formats.pack(jnp.asarray(q), 6, "bitplanes_g4", k)
  groups = kp // 128
  assert g4.shape == (6, 24, core.g4_words(k)) and g4.dtype == jnp.uint32
  assert core.g4_words(k) == 16 * -(-groups // 4)
  np.testing.assert_array_equal(np.asarray(formats.unpack(g4, 6, "bitplanes_g4", k)), q)
  # word q of group g sits at 16 (g // 4) + 4 q + g % 4; the words padding the last block are zero
  plain = np.zeros((6, 24, 4 * groups), np.uint32)
  words = np.asarray(formats.pack(jnp.asarray(q), 6, "bitplanes", k))
  plain[..., : words.shape[-1]] = words
  g4 = np.asarray(g4)
  for g in range(groups):
    for w in range(4):
      np.testing.assert_array_equal(g4[..., 16 * (g // 4) + 4 * w + g % 4], plain[..., 4 * g + w])
  used = {16 * (g // 4) + 4 * w + g % 4 for g in range(groups) for w in range(4)}
  assert not g4[..., sorted(set(range(g4.shape[-1])) - used)].any()
  with pytest.raises(ValueError, match="bitplanes_g4"):
    formats.unpack(jnp.asarray(g4[..., :-16]), 6, "bitplanes_g4", k)
