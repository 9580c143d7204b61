"""Baselines (ibl_jax/baselines.py) against scikit-learn fits and hand-computed PSTHs."""

import math

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from ibl_jax import baselines, metrics
from ibl_jax.evaluate import tasks


def _population(K=30, T=40, N=12, seed=0):
  """Poisson counts of N neurons driven by 2 smooth shared latents, with their true rates."""
  rng = np.random.default_rng(seed)
  t = np.linspace(0, 2 * np.pi, T)
  z_KxTx2 = np.stack([np.sin(t[None] + rng.uniform(0, 6, (K, 1))), np.cos(2 * t[None] + rng.uniform(0, 6, (K, 1)))],
                     -1)
  rates_KxTxN = np.exp(np.log(0.3) + z_KxTx2 @ rng.normal(0, 0.7, (2, N)))
  return rng.poisson(rates_KxTxN).astype(np.float64), rates_KxTxN


@pytest.mark.parametrize("task", ["co_smooth", "inter_region", "intra_region"])
def test_ridge_leave_out_matches_sklearn_on_the_kept_inputs(task):
  rng = np.random.default_rng(1)
  M, N, alpha = 200, 9, 0.05
  X_MxN, Z_MxN = rng.normal(size=(M, N)), rng.normal(size=(M, N))
  regions = np.array(list("AAABBBBCC"))
  spec = tasks.leave_out(task, regions, num_bins=10)
  W_NxN, c_N = baselines.ridge_leave_out(X_MxN, Z_MxN, spec.keep_VxN, spec.target_VxN, alpha)
  for keep_N, target_N in zip(spec.keep_VxN, spec.target_VxN):
    for n in np.flatnonzero(target_N):
      ref = Ridge(alpha=alpha * M).fit(X_MxN[:, keep_N], Z_MxN[:, n])  # sklearn: ‖y − Xw‖² + alpha‖w‖²
      np.testing.assert_allclose(W_NxN[keep_N, n], ref.coef_, rtol=1e-8, atol=1e-10)
      np.testing.assert_array_equal(W_NxN[~keep_N, n], 0.0)  # a hidden input never enters its target's fit
      assert c_N[n] == pytest.approx(ref.intercept_, rel=1e-8, abs=1e-10)


def test_fit_offset_is_the_poisson_maximum_likelihood_offset():
  # rate = exp(a + η): the score Σ (exp(a + η) − y) = 0 gives a = log(Σ y / Σ exp η). By hand for one neuron:
  # η = (0, log 2, log 3), y = (1, 2, 9): Σ exp η = 6, Σ y = 12 → a = log 2.
  a_N = baselines.fit_offset(np.log([[1.0], [2.0], [3.0]]), np.array([[1.0], [2.0], [9.0]]))
  np.testing.assert_allclose(a_N, [math.log(2)], rtol=1e-12)
  eta = np.array([[800.0], [799.0]])  # no overflow for large log-rates
  np.testing.assert_allclose(baselines.fit_offset(eta, np.array([[1.0], [0.0]])),
                             [-800.0 - math.log(1 + math.exp(-1))], rtol=1e-12)


def test_smoothing_baseline_predicts_held_out_neurons_without_seeing_them():
  spikes, rates = _population(K=60)
  fit, test = spikes[:45], spikes[45:]
  spec = tasks.leave_out("co_smooth", np.zeros(spikes.shape[-1]), spikes.shape[1])
  pred, model = baselines.heldout_baseline(fit, test, spec.keep_VxN, spec.target_VxN, sigmas=(1.0, 2.0),
                                           alphas=(0.1, 1.0))
  assert model.sigma in (1.0, 2.0) and model.alpha in (0.1, 1.0)
  assert np.diag(model.W_NxN).tolist() == [0.0] * spikes.shape[-1]
  # A neuron's own counts do not move its prediction.
  test2 = test.copy()
  test2[..., 0] = np.random.default_rng(3).poisson(3.0, test2[..., 0].shape)
  np.testing.assert_array_equal(model.predict(test2)[..., 0], pred[..., 0])
  bps = metrics.bits_per_spike(pred, test)
  oracle = metrics.bits_per_spike(rates[45:], test)
  assert 0.1 < np.nanmean(bps) < np.nanmean(oracle)  # informative, below the truth


def test_condition_psth_by_hand():
  # 4 fit trials × 2 bins × 1 neuron, conditions (0, 0, 1, 1): PSTH c0 = (1, 2), c1 = (3, 0 → floor);
  # all trials (2, 1). Queried trials of conditions 1, 0 and an unseen 7 (→ the all-trials PSTH).
  spikes = np.array([[0, 2], [2, 2], [3, 0], [3, 0]], np.float64)[:, :, None]
  out = baselines.condition_psth(spikes, np.array([0, 0, 1, 1]), np.array([1, 0, 7]))
  np.testing.assert_allclose(out[..., 0], [[3, baselines.RATE_FLOOR], [1, 2], [2, 1]])
  # Shrinkage by 2 pseudo-trials of the all-trials PSTH: c0 = ((0+2, 2+2) + 2·(2, 1)) / 4 = (1.5, 1.5).
  out = baselines.condition_psth(spikes, np.array([0, 0, 1, 1]), np.array([0]), shrink=2.0)
  np.testing.assert_allclose(out[0, :, 0], [1.5, 1.5])


def test_psth_baseline_beats_the_mean_when_conditions_matter():
  rng = np.random.default_rng(4)
  K, T = 80, 20
  cond = rng.integers(0, 2, K)
  rates = np.where(cond[:, None, None] == 0, np.linspace(0.2, 2, T)[None, :, None], 0.5)
  spikes = rng.poisson(np.broadcast_to(rates, (K, T, 3))).astype(np.float64)
  pred = baselines.psth_baseline(spikes[:60], cond[:60], cond[60:], sigmas=(0.0, 1.0), shrinks=(0.0, 2.0))
  assert (metrics.bits_per_spike(pred, spikes[60:]) > 0.05).all()
