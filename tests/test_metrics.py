"""Metrics (ibl_jax/metrics.py) against arithmetic written out by hand on tiny arrays."""

import math
import warnings

import numpy as np
import pytest

from ibl_jax import metrics

LN2 = math.log(2)


def _KxTxN(*rows_T, K=1):
  """A [K, T, N] array from per-neuron time series (one per argument), K = 1 trial by default."""
  return np.stack(rows_T, axis=-1).reshape(K, -1, len(rows_T)).astype(np.float64)


def test_bits_per_spike_by_hand():
  # One neuron, 2 bins: y = (1, 3), r = (1, 3). Null ȳ = 2.
  #   NLL_model = (1 − 1·log 1) + (3 − 3·log 3) = 4 − 3 log 3
  #   NLL_null  = (2 − 1·log 2) + (2 − 3·log 2) = 4 − 4 log 2
  #   bps = (3 log 3 − 4 log 2) / (4 ln 2) = 0.75·log2(3) − 1 ≈ 0.1887
  spikes, rates = _KxTxN([1, 3]), _KxTxN([1, 3])
  np.testing.assert_allclose(metrics.bits_per_spike(rates, spikes), [0.75 * math.log2(3) - 1], rtol=1e-12)


def test_null_rates_give_zero_and_better_rates_give_positive():
  rng = np.random.default_rng(0)
  true_rates = rng.gamma(2.0, 0.5, (20, 10, 5))
  spikes = rng.poisson(true_rates)
  null = np.broadcast_to(spikes.mean(axis=(0, 1)), spikes.shape)
  np.testing.assert_array_equal(metrics.bits_per_spike(null, spikes), np.zeros(5))
  assert (metrics.bits_per_spike(true_rates, spikes) > 0).all()
  # "Perfect" rates (the counts themselves, 0 floored at 1e-9) are the best any model can do on these counts.
  perfect = metrics.bits_per_spike(spikes, spikes)
  assert (perfect > metrics.bits_per_spike(true_rates, spikes)).all()


def test_zero_rate_is_floored_not_an_exception():
  # y = (1, 3), r = (0, 2): the 0 becomes 1e-9.
  #   NLL_model = (1e-9 − log 1e-9) + (2 − 3 log 2);  NLL_null = 4 − 4 log 2 (as above)
  spikes, rates = _KxTxN([1, 3]), _KxTxN([0, 2])
  nll_model = (1e-9 - math.log(1e-9)) + (2 - 3 * math.log(2))
  expected = ((4 - 4 * math.log(2)) - nll_model) / (4 * LN2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    bps = metrics.bits_per_spike(rates, spikes)
  assert np.isfinite(bps).all()
  np.testing.assert_allclose(bps, [expected], rtol=1e-12)


def test_spikeless_neuron_is_nan_per_neuron_but_a_penalty_when_pooled():
  spikes = _KxTxN([1, 3], [0, 0])
  rates = _KxTxN([1, 3], [0.5, 0.5])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no divide-by-zero or empty-mean warnings
    bps = metrics.bits_per_spike(rates, spikes)
    assert np.isnan(bps[1]) and np.isfinite(bps[0])
    assert metrics.bps_per_neuron(rates, spikes) == pytest.approx(bps[0])
    # nlb_tools keeps the silent neuron: null rate 1e-9 on 2 bins, the model's 0.5 + 0.5 spikes are pure loss.
    gain_silent = 2 * 1e-9 - (0.5 + 0.5)
    assert metrics.bps_pooled(rates, spikes) == pytest.approx(bps[0] + gain_silent / (4 * LN2), rel=1e-12)
    assert np.isnan(metrics.bps_per_neuron(rates[..., 1:], spikes[..., 1:]))
    assert np.isnan(metrics.bps_pooled(rates[..., 1:], spikes[..., 1:]))


def test_pooled_and_per_neuron_differ():
  # Neuron A: y = (1, 3), r = (1, 3) → gain g_A = 3 log 3 − 4 log 2 nats over 4 spikes (see above).
  # Neuron B: y = (0, 1), r = (0.9, 0.1), ȳ = 0.5:
  #   NLL_null = 0.5 + 0.5 − log 0.5 = 1 + log 2;  NLL_model = 0.9 + 0.1 − log 0.1 = 1 + log 10
  #   g_B = log 2 − log 10 = −log 5 nats over 1 spike.
  # per neuron: mean(g_A / (4 ln 2), g_B / ln 2);  pooled: (g_A + g_B) / (5 ln 2).
  spikes = _KxTxN([1, 3], [0, 1])
  rates = _KxTxN([1, 3], [0.9, 0.1])
  g_a, g_b = 3 * math.log(3) - 4 * math.log(2), -math.log(5)
  per_neuron = (g_a / (4 * LN2) + g_b / LN2) / 2
  pooled = (g_a + g_b) / (5 * LN2)
  np.testing.assert_allclose(metrics.bits_per_spike(rates, spikes), [g_a / (4 * LN2), g_b / LN2], rtol=1e-12)
  assert metrics.bps_per_neuron(rates, spikes) == pytest.approx(per_neuron, rel=1e-12)
  assert metrics.bps_pooled(rates, spikes) == pytest.approx(pooled, rel=1e-12)
  assert abs(per_neuron - pooled) > 0.3  # the badly fit sparse neuron weighs 1/2 vs 1/5


def test_mask_restricts_the_evaluated_entries():
  rng = np.random.default_rng(1)
  spikes = rng.poisson(1.0, (3, 4, 2)).astype(np.float64)
  spikes[0, 0] = 1  # both neurons keep spikes inside the mask
  rates = rng.gamma(2.0, 0.5, (3, 4, 2))
  mask_KxT = np.zeros((3, 4), bool)
  mask_KxT[:, :2] = True  # e.g. the bins a task predicts
  np.testing.assert_allclose(metrics.bits_per_spike(rates, spikes, mask_KxT),
                             metrics.bits_per_spike(rates[:, :2], spikes[:, :2]), rtol=1e-12)
  mask_KxTxN = np.broadcast_to(mask_KxT[:, :, None], spikes.shape)
  np.testing.assert_allclose(metrics.bps_pooled(rates, spikes, mask_KxTxN),
                             metrics.bps_pooled(rates[:, :2], spikes[:, :2]), rtol=1e-12)


def test_r2_psth_two_conditions_by_hand():
  # 4 trials × 2 bins, conditions (0, 0, 1, 1).
  #   true:  c0 trials (1, 3), (3, 1) → (2, 2);  c1 trials (0, 2), (2, 4) → (1, 3);  concat (2, 2, 1, 3), mean 2
  #   pred:  c0 (2, 2), (2, 2) → (2, 2);  c1 (1, 2), (1, 2) → (1, 2);  concat (2, 2, 1, 2)
  #   SS_res = 0 + 0 + 0 + 1 = 1,  SS_tot = 0 + 0 + 1 + 1 = 2  →  R² = 0.5
  # Neuron 2 has the same counts (2, 2) everywhere: a constant PSTH, SS_tot = 0 → NaN.
  spikes = _KxTxN([1, 3, 3, 1, 0, 2, 2, 4], [2] * 8, K=4)
  rates = _KxTxN([2, 2, 2, 2, 1, 2, 1, 2], [1] * 8, K=4)
  r2 = metrics.r2_psth(rates, spikes, np.array([0, 0, 1, 1]))
  assert r2[0] == pytest.approx(0.5) and np.isnan(r2[1])


def test_conditions_from_behaviour():
  labels = metrics.conditions_from_behaviour(choice=[1, -1, 1, 1, -1], block=[0.2, 0.8, 0.2, 0.5, 0.8],
                                             reward=[1, 0, 1, 1, 1])
  assert labels.shape == (5,) and labels.dtype == np.int64
  assert labels[0] == labels[2] and len(set(labels.tolist())) == 4  # trials 0 and 2 share (1, 0.2, 1)


def test_r2_trial_by_hand():
  # y = (0, 1, 2, 3) over 2 trials × 2 bins, r = (0, 1, 2, 2): SS_res = 1, ȳ = 1.5, SS_tot = 5 → R² = 0.8.
  spikes, rates = _KxTxN([0, 1, 2, 3], K=2), _KxTxN([0, 1, 2, 2], K=2)
  np.testing.assert_allclose(metrics.r2_trial(rates, spikes), [0.8])
  # Only the first bin of each trial (y = 0, 2; r = 0, 2): a perfect fit.
  np.testing.assert_allclose(metrics.r2_trial(rates, spikes, np.array([[True, False], [True, False]])), [1.0])
  assert np.isnan(metrics.r2_trial(rates, np.full_like(spikes, 0.1))[0])  # constant counts


def test_accuracy():
  assert metrics.accuracy([1, -1, 1, 1], np.array([1, 1, 1, -1])) == 0.5
  assert np.isnan(metrics.accuracy([], []))


def test_poisson_d2_by_hand():
  # Neuron A: y = (1, 3), r = (1.5, 2.5), ȳ = 2. With NLL(r) = Σ r − y·log r (log y! cancels):
  #   NLL_model = (1.5 − log 1.5) + (2.5 − 3 log 2.5);  NLL_sat = (1 − 1·log 1) + (3 − 3 log 3) = 4 − 3 log 3
  #   NLL_null = 4 − 4 log 2;  D² = 1 − (NLL_model − NLL_sat) / (NLL_null − NLL_sat)
  # Neuron B: y = (0, 2) (0·log 0 = 0), r = (0.5, 1.5), ȳ = 1:
  #   NLL_model = 0.5 + 1.5 − 2 log 1.5;  NLL_sat = 2 − 2 log 2;  NLL_null = 2
  # Neuron C has no spikes: NaN, and left out of the mean.
  spikes = _KxTxN([1, 3], [0, 2], [0, 0])
  rates = _KxTxN([1.5, 2.5], [0.5, 1.5], [0.2, 0.2])
  model_a = (1.5 - math.log(1.5)) + (2.5 - 3 * math.log(2.5))
  sat_a, null_a = 4 - 3 * math.log(3), 4 - 4 * math.log(2)
  model_b, sat_b, null_b = 2 - 2 * math.log(1.5), 2 - 2 * math.log(2), 2.0
  d2_a = 1 - (model_a - sat_a) / (null_a - sat_a)
  d2_b = 1 - (model_b - sat_b) / (null_b - sat_b)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    d2 = metrics.poisson_d2(rates, spikes)
    assert metrics.d2_mean(rates, spikes) == pytest.approx((d2_a + d2_b) / 2, rel=1e-12)
  np.testing.assert_allclose(d2[:2], [d2_a, d2_b], rtol=1e-12)
  assert np.isnan(d2[2])


def test_poisson_d2_invariants_and_the_oracle_on_poisson_data():
  rng = np.random.default_rng(2)
  true_rates = rng.gamma(2.0, 0.3, (40, 20, 6))
  spikes = rng.poisson(true_rates).astype(np.float64)
  null = np.broadcast_to(spikes.mean(axis=(0, 1)), spikes.shape)
  np.testing.assert_allclose(metrics.poisson_d2(null, spikes), np.zeros(6), atol=1e-12)  # the null: 0
  np.testing.assert_allclose(metrics.poisson_d2(spikes, spikes), np.ones(6), atol=1e-6)  # saturated: 1 (floor)
  oracle = metrics.poisson_d2(true_rates, spikes)
  assert ((oracle > 0) & (oracle < 1)).all()  # Poisson noise leaves deviance the true rates cannot explain
  assert (metrics.poisson_d2(0.5 * true_rates + 0.5 * null, spikes) < oracle).all()
  # D² and bits/spike share the numerator NLL_null − NLL_model: D² · deviance_null = bps · n_spikes · ln 2.
  y_log_y = np.where(spikes > 0, spikes * np.log(np.maximum(spikes, 1)), 0.0)
  ybar = spikes.mean(axis=(0, 1))
  null_dev = (ybar - spikes * np.log(ybar) - spikes + y_log_y).sum(axis=(0, 1))
  np.testing.assert_allclose(oracle * null_dev,
                             metrics.bits_per_spike(true_rates, spikes) * spikes.sum(axis=(0, 1)) * LN2, rtol=1e-9)
  # A mask evaluates only its entries, the null's mean included.
  mask_KxT = np.zeros((40, 20), bool)
  mask_KxT[:, -5:] = True
  np.testing.assert_allclose(metrics.poisson_d2(true_rates, spikes, mask_KxT),
                             metrics.poisson_d2(true_rates[:, -5:], spikes[:, -5:]), rtol=1e-12)


def test_pooled_matches_nlb_tools_by_hand_with_a_silent_neuron_and_a_zero_rate():
  # Neuron 0: y = (1, 0), r = (0.5, 0.25); null ȳ = 0.5.
  #   NLL_null = (0.5 − log 0.5) + 0.5,  NLL_model = (0.5 − log 0.5) + 0.25  ->  gain 0.25 nats.
  # Neuron 1: y = (0, 0), r = (0.1, 0 -> 1e-9); null ȳ = 0 -> 1e-9 on both bins.
  #   NLL_null = 2e-9,  NLL_model = 0.1 + 1e-9  ->  gain 1e-9 − 0.1 nats.
  # nlb_tools: (Σ gains) / (Σ spikes · ln 2) = (0.25 + 1e-9 − 0.1) / ln 2.
  spikes = _KxTxN([1, 0], [0, 0])
  rates = _KxTxN([0.5, 0.25], [0.1, 0.0])
  np.testing.assert_allclose(metrics.bps_pooled(rates, spikes), (0.25 + 1e-9 - 0.1) / LN2, rtol=0, atol=1e-9)
  bps = metrics.bits_per_spike(rates, spikes)
  np.testing.assert_allclose(bps[0], 0.25 / LN2, rtol=1e-12)
  assert np.isnan(bps[1])
  assert metrics.bps_per_neuron(rates, spikes) == pytest.approx(0.25 / LN2, rel=1e-12)
