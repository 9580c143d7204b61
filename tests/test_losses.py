"""Poisson losses (ibl_jax/losses.py) against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ibl_jax import losses


def test_poisson_nll_by_hand():
  # exp(ŷ) − y·ŷ:  ŷ = 0, y = 0 → 1;  ŷ = log 2, y = 3 → 2 − 3·log 2;  ŷ = −1, y = 1 → e⁻¹ + 1.
  log_rates = jnp.array([0.0, math.log(2.0), -1.0])
  spikes = jnp.array([0, 3, 1], jnp.uint8)
  np.testing.assert_allclose(losses.poisson_nll(log_rates, spikes), [1.0, 2 - 3 * math.log(2), math.exp(-1) + 1],
                             rtol=1e-6)


def test_poisson_nll_is_float32_and_minimised_at_the_count():
  log_rates = jnp.linspace(-2.0, 3.0, 501, dtype=jnp.bfloat16)
  nll = losses.poisson_nll(log_rates, jnp.full_like(log_rates, 4.0))
  assert nll.dtype == jnp.float32
  # d/dŷ (exp(ŷ) − yŷ) = 0 at ŷ = log y.
  assert abs(float(log_rates[jnp.argmin(nll)]) - math.log(4.0)) < 0.02


def test_masked_sum_count_and_mean():
  log_rates_BxTxN = jnp.zeros((1, 2, 2)).at[0, 1, 1].set(math.log(3.0))
  spikes_BxTxN = jnp.array([[[2, 0], [1, 3]]], jnp.uint8)
  targets_BxTxN = jnp.array([[[True, False], [False, True]]])
  # Targets: (ŷ=0, y=2) → 1 − 0 = 1;  (ŷ=log 3, y=3) → 3 − 3·log 3.
  expected_sum = 1.0 + 3.0 - 3.0 * math.log(3.0)
  total, count = losses.masked_poisson_nll(log_rates_BxTxN, spikes_BxTxN, targets_BxTxN)
  np.testing.assert_allclose(total, expected_sum, rtol=1e-6)
  assert float(count) == 2.0
  np.testing.assert_allclose(losses.mean_masked_poisson_nll(log_rates_BxTxN, spikes_BxTxN, targets_BxTxN),
                             expected_sum / 2, rtol=1e-6)


def test_non_targets_cannot_poison_the_loss():
  # An overflowing log-rate on a non-target entry (exp → inf) must not turn the sum into inf or NaN.
  log_rates_BxTxN = jnp.array([[[0.0, 1e4]]])
  spikes_BxTxN = jnp.array([[[1.0, 0.0]]])
  targets_BxTxN = jnp.array([[[True, False]]])
  total, count = losses.masked_poisson_nll(log_rates_BxTxN, spikes_BxTxN, targets_BxTxN)
  assert float(total) == 1.0 and float(count) == 1.0
  grads = jax.grad(lambda x: losses.mean_masked_poisson_nll(x, spikes_BxTxN, targets_BxTxN))(log_rates_BxTxN)
  np.testing.assert_array_equal(grads, [[[0.0, 0.0]]])  # exp(0) − 1 = 0 on the target; nothing elsewhere


def test_no_targets_gives_zero_not_nan():
  zeros = jnp.zeros((2, 3, 4))
  assert float(losses.mean_masked_poisson_nll(zeros, zeros, jnp.zeros((2, 3, 4), bool))) == 0.0
