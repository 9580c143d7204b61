"""`bernoulli` draws (dropout masks) that XLA fuses into the op that consumes them.

JAX lowers its default PRNG's hash (Threefry-2x32, 20 rounds; Salmon et al., SC 2011) on a CPU as a loop of
five iterations, which keeps compile times short but writes the hash's two counter arrays out and reads them back
in every iteration: with the paper NDT1's dropouts (the attention probabilities' masks are [B, H, L, L]) those
loops took 7 % of the CPU train step's op time (docs/performance.md, row 30). Written out unrolled in jnp, the
counters, the hash, the threshold and the select become one elementwise fusion that never stores the bits.
That suits a mask used at its own shape by one or two ops (dropout). A draw that many ops read, or that is
broadcast to a larger shape, is better stored: XLA copies the hash into each consumer and runs it per element
of the broadcast, so `masking.py` draws through `jax.random` (docs/performance.md, row 32).

The draw is JAX's own, bit for bit: the same counters (the flat index of each element, as
`jax.random.bits` makes them when `jax_threefry_partitionable` is on, JAX's default), the same hash, the same
bits-to-float conversion as `jax.random.uniform`. `tests/test_fused_random.py` checks masks against
`jax.random.bernoulli` and `Dropout` against `nnx.Dropout`. Keys of any other PRNG implementation, and the legacy
non-partitionable threefry, fall back to `jax.random.bernoulli`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds of key (k0, k1) over counter words (x0, x1); all uint32."""
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):  # five groups of four rounds, a key injection after each
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major index of each element, built from one iota per axis so XLA can split it over devices."""
  strides = np.cumprod((1,) + shape[:0:-1])[::-1]
  index = jnp.zeros(shape, jnp.uint32)
  for axis, stride in enumerate(strides):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
  return index


def _unrolled_ok(key: jax.Array, shape: tuple[int, ...]) -> bool:
  return (jax.random.key_impl(key) == "threefry2x32" and jax.config.jax_threefry_partitionable
          and 0 < int(np.prod(shape)) < 2**32)  # beyond 2**32 elements JAX's counters use their high word


def bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits equal to `jax.random.bits(key, shape)`."""
  shape = tuple(int(d) for d in shape)
  if not _unrolled_ok(key, shape):
    return jax.random.bits(key, shape, jnp.uint32)
  k0, k1 = jax.random.key_data(key)
  hi, lo = threefry2x32(k0, k1, jnp.zeros(shape, jnp.uint32), _flat_index(shape))
  return hi ^ lo


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """float32 in [0, 1), equal to `jax.random.uniform(key, shape)`."""
  # As jax.random.uniform (whichever PRNG made the bits): the top 23 bits as the mantissa of a float in [1, 2), minus 1.
  mantissa = (bits(key, shape) >> np.uint32(9)) | np.uint32(0x3F800000)
  return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)


def bernoulli(key: jax.Array, p, shape: tuple[int, ...]) -> jax.Array:
  """A boolean array, True with probability `p`, equal to `jax.random.bernoulli(key, p, shape)`."""
  return uniform(key, shape) < p


class Dropout(nnx.Module):
  """`nnx.Dropout` (same masks, same key use, no state) drawing its mask with `bernoulli` above."""

  def __init__(self, rate: float):
    self.rate = rate

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    if rngs is None:
      raise ValueError("deterministic=False needs `rngs` with a 'dropout' stream")
    keep_prob = 1.0 - self.rate
    keep = bernoulli(rngs.dropout(), keep_prob, x.shape)
    return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
