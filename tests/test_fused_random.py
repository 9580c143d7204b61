"""fused_random draws the same bits as jax.random, and Dropout the same masks as nnx.Dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ibl_jax import fused_random


def test_threefry_known_answer():
  # Random123's published known-answer vectors for Threefry-2x32, 20 rounds (kat_vectors).
  cases = [((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
           ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
           ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
  for key, counter, expected in cases:
    got = fused_random.threefry2x32(*(jnp.uint32(v) for v in (*key, *counter)))
    assert [int(w) for w in got] == list(expected)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 17, 17), (1, 1, 1)])
def test_bits_uniform_bernoulli_equal_jax_random(shape):
  for seed in (0, 7):
    key = jax.random.fold_in(jax.random.key(seed), 11)
    np.testing.assert_array_equal(jax.jit(fused_random.bits, static_argnums=1)(key, shape),
                                  jax.random.bits(key, shape, jnp.uint32))
    np.testing.assert_array_equal(fused_random.uniform(key, shape), jax.random.uniform(key, shape))
    for p in (0.6, 1 / 3, jnp.float32(0.8)):
      np.testing.assert_array_equal(jax.jit(lambda k: fused_random.bernoulli(k, p, shape))(key),
                                    jax.random.bernoulli(key, p, shape))


def test_bernoulli_under_vmap_legacy_keys_and_other_prng():
  keys = jax.random.split(jax.random.key(3), 4)
  got = jax.vmap(lambda k: fused_random.bernoulli(k, 0.3, (5, 6)))(keys)
  np.testing.assert_array_equal(got, jax.vmap(lambda k: jax.random.bernoulli(k, 0.3, (5, 6)))(keys))
  raw = jax.random.PRNGKey(3)  # a legacy uint32[2] key
  np.testing.assert_array_equal(fused_random.bernoulli(raw, 0.3, (5, 6)), jax.random.bernoulli(raw, 0.3, (5, 6)))
  rbg = jax.random.key(3, impl="unsafe_rbg")  # not threefry: falls back to jax.random
  np.testing.assert_array_equal(fused_random.bernoulli(rbg, 0.3, (5, 6)), jax.random.bernoulli(rbg, 0.3, (5, 6)))


def test_dropout_equals_nnx_dropout():
  x = jax.random.normal(jax.random.key(1), (4, 10, 16))
  for rate in (0.2, 0.4):
    ours = fused_random.Dropout(rate)(x, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(5)))
    theirs = nnx.Dropout(rate)(x, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(5)))
    np.testing.assert_array_equal(ours, theirs)
    assert 0.5 * rate < float(jnp.mean(ours == 0)) < 1.5 * rate
  np.testing.assert_array_equal(fused_random.Dropout(0.4)(x, deterministic=True, rngs=None), x)
  np.testing.assert_array_equal(fused_random.Dropout(1.0)(x, deterministic=False, rngs=None), 0 * x)
  with pytest.raises(ValueError, match="rngs"):
    fused_random.Dropout(0.4)(x, deterministic=False, rngs=None)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="jax.random loops over the hash on CPUs only")
def test_compiled_draw_has_no_loop():
  """What the module is for: on a CPU the unrolled hash leaves no while loop in the compiled program."""
  x = jnp.ones((8, 8, 32, 32))
  drop = lambda f: jax.jit(lambda k, x: f(k, 0.6, x.shape) * x).lower(jax.random.key(0), x).compile().as_text()
  assert "while" in drop(jax.random.bernoulli)  # the premise: jax.random loops on this backend
  assert "while" not in drop(fused_random.bernoulli)
