"""The baselines every evaluation reports beside the model (numpy only, seconds per session).

Held-out neurons (co-smoothing, inter- and intra-region): the Neural Latents Benchmark's smoothing baseline.
The held-in neurons' counts are smoothed with a Gaussian kernel over time and z-scored (train+val statistics);
a ridge regression maps them to each held-out neuron's log smoothed count, and a per-neuron offset a, the
Poisson maximum-likelihood one, makes `rate = exp(a + prediction)` match the neuron's mean rate (a log-linear
model like the NLB's Poisson GLM, fit in closed form; its log-rate is clipped to the training range). One
regularised Gram matrix per set of candidate inputs serves every held-out neuron: removing the held-out
columns from its inverse is a closed-form block update, so leave-one-out costs O(N²) per neuron, not O(N³).
Kernel width and ridge penalty are chosen by k-fold cross-validation over train+val trials (Poisson NLL on the
held-out folds); the test split is never seen while fitting.

Forward prediction: each neuron's PSTH over the train+val trials of the test trial's condition (choice ×
block × reward), shrunk towards the all-trials PSTH for rare conditions and smoothed; smoothing and shrinkage
by cross-validation.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import ndimage

SIGMAS_BINS = (1.0, 2.0, 4.0, 8.0)  # Gaussian kernel s.d. in bins (20, 40, 80 ms at the IBL's 20 ms bins)
ALPHAS = (1e-2, 1e-1, 1.0, 10.0)  # ridge penalty per training row, on z-scored inputs
PSTH_SIGMAS_BINS = (0.0, 1.0, 2.0, 4.0)
PSTH_SHRINK_TRIALS = (0.0, 2.0, 8.0, 32.0, 1e6)  # pseudo-trials of the all-trials PSTH (1e6: it alone)
CV_FOLDS = 3
LOG_OFFSET = 0.05  # spikes per bin added before the log of the smoothed target
RATE_FLOOR = 1e-4  # spikes per bin; a PSTH of 0 would make a spike infinitely unlikely


def gaussian_smooth(spikes_KxTxN: np.ndarray, sigma_bins: float) -> np.ndarray:
  """Counts smoothed along time (axis 1) per trial, float64; sigma 0 returns them unsmoothed."""
  x = np.asarray(spikes_KxTxN, np.float64)
  if sigma_bins <= 0:
    return x
  return ndimage.gaussian_filter1d(x, sigma_bins, axis=1, mode="reflect", truncate=3.0)


def _poisson_nll(rates, spikes) -> float:
  """Σ r − y·log r (log y! left out), the CV score."""
  rates = np.maximum(rates, 1e-9)
  return float((rates - spikes * np.log(rates)).sum())


def _folds(num_trials: int, k: int) -> list[np.ndarray]:
  """k contiguous blocks of trial indices (fewer when there are fewer trials)."""
  return [f for f in np.array_split(np.arange(num_trials), min(k, num_trials)) if f.size]


# ------------------------------------------------------------------------------------------- ridge + link


def ridge_leave_out(X_MxN: np.ndarray, Z_MxN: np.ndarray, keep_VxN: np.ndarray, target_VxN: np.ndarray,
                    alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """Ridge weights for every variant's targets from that variant's kept inputs only.

  For variant v and each neuron n in `target_VxN[v]`, solves min ‖z_n − c − X_K w‖² + alpha·M·‖w‖² over the
  columns K = `keep_VxN[v]` (intercept c unpenalised: data centred). Variants sharing a candidate set
  S = keep ∪ target share one inverse C = (X_Sᵀ X_S + λI)⁻¹; the columns R = S \\ K are removed in closed form,
  (A_KK)⁻¹ = C_KK − C_KR C_RR⁻¹ C_RK.

  Returns:
    W_NxN (W[j, n]: input j's weight for target n; 0 for inputs not kept) and the intercepts [N].
  """
  return _ridge_solve(_moments(X_MxN, Z_MxN), keep_VxN, target_VxN, alpha)


def _moments(X_MxN: np.ndarray, Z_MxN: np.ndarray) -> tuple:
  """(M, mean_x, mean_z, XcᵀXc, XcᵀZc): all the ridge needs, shared by every penalty."""
  X_MxN, Z_MxN = np.asarray(X_MxN, np.float64), np.asarray(Z_MxN, np.float64)
  mean_x_N, mean_z_N = X_MxN.mean(0), Z_MxN.mean(0)
  Xc_MxN = X_MxN - mean_x_N
  return X_MxN.shape[0], mean_x_N, mean_z_N, Xc_MxN.T @ Xc_MxN, Xc_MxN.T @ (Z_MxN - mean_z_N)


def _ridge_solve(moments: tuple, keep_VxN, target_VxN, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  M, mean_x_N, mean_z_N, G_NxN, B_NxN = moments  # B[j, n] = x_jᵀ z_n (centred)
  N = G_NxN.shape[0]
  W_NxN = np.zeros((N, N))
  keep_VxN, target_VxN = np.asarray(keep_VxN, bool), np.asarray(target_VxN, bool)
  live_V = target_VxN.any(1) & keep_VxN.any(1)  # a variant without inputs keeps the intercept (the mean) alone
  base_VxN = keep_VxN | target_VxN
  for base_N in np.unique(base_VxN[live_V], axis=0):
    base = np.flatnonzero(base_N)
    C_SxS = np.linalg.inv(G_NxN[np.ix_(base, base)] + alpha * M * np.eye(base.size))
    group = np.flatnonzero(live_V & (base_VxN == base_N).all(1))
    removed_GxS = ~keep_VxN[group][:, base]  # per variant, the positions in `base` of the inputs it hides
    single = target_VxN[group][:, base] if (removed_GxS.sum(1) == 1).all() else None
    if single is not None and (single == removed_GxS).all():
      # Each variant hides exactly its one target (co-smoothing, intra-region): all at once,
      # w_j = u_j − C[:, j] u_j[j] / C[j, j] with u_j = C b_j, b_j's own entry zeroed.
      targets = base[removed_GxS.argmax(1)]
      pos = removed_GxS.argmax(1)
      b_SxJ = B_NxN[np.ix_(base, targets)]
      b_SxJ[pos, np.arange(len(pos))] = 0.0
      u_SxJ = C_SxS @ b_SxJ
      u_SxJ -= C_SxS[:, pos] * (u_SxJ[pos, np.arange(len(pos))] / C_SxS[pos, pos])
      u_SxJ[pos, np.arange(len(pos))] = 0.0  # exactly 0 in exact arithmetic
      W_NxN[np.ix_(base, targets)] = u_SxJ
      continue
    for v, removed_S in zip(group, removed_GxS):
      targets, removed = np.flatnonzero(target_VxN[v]), np.flatnonzero(removed_S)
      b_SxJ = B_NxN[np.ix_(base, targets)]
      b_SxJ[removed] = 0.0
      u_SxJ = C_SxS @ b_SxJ
      if removed.size:
        u_SxJ -= C_SxS[:, removed] @ np.linalg.solve(C_SxS[np.ix_(removed, removed)], u_SxJ[removed])
        u_SxJ[removed] = 0.0
      W_NxN[np.ix_(base, targets)] = u_SxJ
  return W_NxN, mean_z_N - mean_x_N @ W_NxN


def fit_offset(eta_MxN: np.ndarray, spikes_MxN: np.ndarray) -> np.ndarray:
  """Per neuron the a maximising the Poisson likelihood of `rate = exp(a + η)`: log(Σ y / Σ exp η).

  The ridge fits log smoothed counts, whose mean is below the log of the mean rate (Jensen) and depends on the
  offset added before the log; a restores the neuron's mean rate. The gain stays 1: a free gain undoes the ridge's
  shrinkage and overfits small sessions (measured: −2.6 vs −0.4 bits/spike on a 24-trial session).
  """
  eta_MxN, y_MxN = np.asarray(eta_MxN, np.float64), np.asarray(spikes_MxN, np.float64)
  shift_N = eta_MxN.max(0)  # log-sum-exp: exp never overflows
  return np.log(np.maximum(y_MxN.sum(0), 1e-9)) - shift_N - np.log(np.exp(eta_MxN - shift_N).sum(0))


@dataclasses.dataclass(frozen=True)
class SmoothingGLM:
  """A fitted smoothing baseline for one task; `predict` gives every target's rates [K, T, N] from all counts.

  One pass serves every variant: a target's weights are 0 on the inputs its variant hides, so its prediction
  never sees them (and smoothing is per neuron).
  """
  sigma: float
  alpha: float
  mean_N: np.ndarray
  std_N: np.ndarray
  W_NxN: np.ndarray
  c_N: np.ndarray  # ridge intercepts, plus the link offsets of `fit_offset`
  eta_lo_N: np.ndarray  # the training range of the log-rate: new inputs never extrapolate beyond it
  eta_hi_N: np.ndarray

  def predict(self, spikes_KxTxN: np.ndarray) -> np.ndarray:
    K, T, N = spikes_KxTxN.shape
    X_MxN = (gaussian_smooth(spikes_KxTxN, self.sigma).reshape(K * T, N) - self.mean_N) / self.std_N
    eta_MxN = np.clip(X_MxN @ self.W_NxN + self.c_N, self.eta_lo_N, self.eta_hi_N)
    return np.exp(eta_MxN).reshape(K, T, N)


def _fit(spikes_KxTxN, keep_VxN, target_VxN, sigma: float, alphas) -> list[SmoothingGLM]:
  """One fitted model per alpha (the smoothing, z-scoring and Gram inverse work is shared per alpha)."""
  K, T, N = spikes_KxTxN.shape
  smooth_MxN = gaussian_smooth(spikes_KxTxN, sigma).reshape(K * T, N)
  mean_N, std_N = smooth_MxN.mean(0), np.maximum(smooth_MxN.std(0), 1e-6)
  X_MxN = (smooth_MxN - mean_N) / std_N
  Z_MxN = np.log(smooth_MxN + LOG_OFFSET)
  y_MxN = np.asarray(spikes_KxTxN, np.float64).reshape(K * T, N)
  moments = _moments(X_MxN, Z_MxN)
  out = []
  for alpha in alphas:
    W_NxN, c_N = _ridge_solve(moments, keep_VxN, target_VxN, alpha)
    eta_MxN = X_MxN @ W_NxN + c_N
    a_N = fit_offset(eta_MxN, y_MxN)
    out.append(SmoothingGLM(sigma, alpha, mean_N, std_N, W_NxN, c_N + a_N, eta_MxN.min(0) + a_N,
                            eta_MxN.max(0) + a_N))
  return out


def fit_smoothing_glm(spikes_KxTxN: np.ndarray, keep_VxN: np.ndarray, target_VxN: np.ndarray, *,
                      sigmas=SIGMAS_BINS, alphas=ALPHAS, folds: int = CV_FOLDS) -> SmoothingGLM:
  """The smoothing baseline for the variants of a task (see `tasks.LeaveOut`), fit on `spikes_KxTxN` (train+val).

  Kernel width and penalty: the pair with the lowest Poisson NLL of the targets on held-out trial folds; then
  refit on all trials.
  """
  spikes_KxTxN = np.asarray(spikes_KxTxN, np.float64)
  K = spikes_KxTxN.shape[0]
  scored_N = np.asarray(target_VxN, bool).any(0)
  fold_list = _folds(K, folds)
  scores = {}
  for sigma in sigmas:
    for fold in fold_list if len(fold_list) > 1 else []:
      train = np.setdiff1d(np.arange(K), fold)
      for model in _fit(spikes_KxTxN[train], keep_VxN, target_VxN, sigma, alphas):
        rates = model.predict(spikes_KxTxN[fold])
        scores[sigma, model.alpha] = scores.get((sigma, model.alpha), 0.0) + _poisson_nll(
            rates[..., scored_N], spikes_KxTxN[fold][..., scored_N])
  sigma, alpha = min(scores, key=scores.get) if scores else (sigmas[0], alphas[0])
  return _fit(spikes_KxTxN, keep_VxN, target_VxN, sigma, [alpha])[0]


def heldout_baseline(fit_spikes_KxTxN: np.ndarray, test_spikes_KxTxN: np.ndarray, keep_VxN: np.ndarray,
                     target_VxN: np.ndarray, **kwargs) -> tuple[np.ndarray, SmoothingGLM]:
  """Fits on `fit_spikes` (train+val), returns the test rates [K, T, N] of every target and the model."""
  model = fit_smoothing_glm(fit_spikes_KxTxN, keep_VxN, target_VxN, **kwargs)
  return model.predict(np.asarray(test_spikes_KxTxN, np.float64)), model


# ------------------------------------------------------------------------------------------------- PSTH


def condition_psth(spikes_KxTxN: np.ndarray, conditions_K: np.ndarray, query_conditions: np.ndarray, *,
                   sigma: float = 0.0, shrink: float = 0.0) -> np.ndarray:
  """Each queried trial's PSTH [Q, T, N]: the mean of the trials of its condition, smoothed over time.

  `shrink` pseudo-trials of the all-trials mean are added to every condition (a condition never seen gets the
  all-trials mean). Floored at `RATE_FLOOR`.
  """
  smooth_KxTxN = gaussian_smooth(spikes_KxTxN, sigma)
  conditions_K, query = np.asarray(conditions_K).reshape(-1), np.asarray(query_conditions).reshape(-1)
  all_TxN = smooth_KxTxN.mean(0)
  out_QxTxN = np.empty((len(query), *all_TxN.shape))
  for c in np.unique(query):
    rows = conditions_K == c
    n = rows.sum()
    psth_TxN = (smooth_KxTxN[rows].sum(0) + shrink * all_TxN) / (n + shrink) if n + shrink > 0 else all_TxN
    out_QxTxN[query == c] = psth_TxN
  return np.maximum(out_QxTxN, RATE_FLOOR)


def psth_baseline(fit_spikes_KxTxN: np.ndarray, fit_conditions_K: np.ndarray, test_conditions_K: np.ndarray, *,
                  scored_T: np.ndarray | None = None, sigmas=PSTH_SIGMAS_BINS, shrinks=PSTH_SHRINK_TRIALS,
                  folds: int = CV_FOLDS) -> np.ndarray:
  """Forward prediction's baseline: test rates [K, T, N] from the condition PSTHs of train+val trials.

  Smoothing and shrinkage by cross-validation over trial folds, scored on the `scored_T` bins (default all).
  """
  y_KxTxN = np.asarray(fit_spikes_KxTxN, np.float64)
  K, T, _ = y_KxTxN.shape
  scored_T = np.ones(T, bool) if scored_T is None else np.asarray(scored_T, bool)
  conditions_K = np.asarray(fit_conditions_K).reshape(-1)
  fold_list = _folds(K, folds)
  scores = {}
  for sigma, shrink in itertools.product(sigmas, shrinks):
    for fold in fold_list if len(fold_list) > 1 else []:
      train = np.setdiff1d(np.arange(K), fold)
      rates = condition_psth(y_KxTxN[train], conditions_K[train], conditions_K[fold], sigma=sigma, shrink=shrink)
      scores[sigma, shrink] = scores.get((sigma, shrink), 0.0) + _poisson_nll(
          rates[:, scored_T], y_KxTxN[fold][:, scored_T])
  sigma, shrink = min(scores, key=scores.get) if scores else (sigmas[0], shrinks[-1])
  return condition_psth(y_KxTxN, conditions_K, test_conditions_K, sigma=sigma, shrink=shrink)
