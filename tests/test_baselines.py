"""Baselines (ibl_jax/baselines.py) against scikit-learn fits and hand-computed PSTHs."""

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


def test_fit_log_link_recovers_a_poisson_glm():
  rng = np.random.default_rng(2)
  eta_MxN = rng.normal(size=(20000, 3))
  a_N, b_N = np.array([-1.0, 0.0, 0.5]), np.array([0.5, 1.5, -0.3])
  spikes = rng.poisson(np.exp(a_N + b_N * eta_MxN))
  a_hat, b_hat = baselines.fit_log_link(eta_MxN, spikes)
  np.testing.assert_allclose(a_hat, a_N, atol=0.03)
  np.testing.assert_allclose(b_hat, b_N, atol=0.03)
  # At the maximum the score equations hold: Σ (μ − y) = 0 and Σ (μ − y)·η = 0.
  mu = np.exp(a_hat + b_hat * eta_MxN)
  np.testing.assert_allclose((mu - spikes).sum(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(((mu - spikes) * eta_MxN).sum(0), 0.0, atol=1e-3)


def test_smoothing_baseline_predicts_held_out_neurons_without_seeing_them():
  spikes, rates = _population(K=60)
  fit, test = spikes[:45], spikes[45:]
  spec = tasks.leave_out("co_smooth", np.zeros(spikes.shape[-1]), spikes.shape[1])
  pred, model = baselines.heldout_baseline(fit, test, spec.keep_VxN, spec.target_VxN)
  assert model.sigma in baselines.SIGMAS_BINS and model.alpha in baselines.ALPHAS
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
  pred = baselines.psth_baseline(spikes[:60], cond[:60], cond[60:])
  assert (metrics.bits_per_spike(pred, spikes[60:]) > 0.05).all()
