"""Evaluation metrics (docs/design.md §7): plain numpy on host arrays, no model inside.

Arrays are `[K, T, N]` (trials, bins, neurons); rates are in spikes per bin (exp of the model's log-rates), never
log-rates. Per-neuron metrics return `[N]` float64 with NaN where a neuron is undefined (no spikes, or a constant
response); the means skip NaNs. Computation is float64 and warning-free.

Bits per spike. With the Poisson NLL of rates r on counts y over a neuron's evaluated entries,

  NLL(r) = Σ r − y·log r + log y!,

and the null model predicting the neuron's mean count ȳ = n_spikes / n_entries on every entry,

  bps = (NLL(ȳ) − NLL(r)) / (n_spikes · ln 2),

the information the model's rates carry beyond the neuron's mean rate, per spike (log y! cancels). 0 means no
better than the mean, negative means worse. Two aggregations are in use, both given and clearly named:
`bps_per_neuron` (per neuron, then the mean over neurons with spikes: the paper's tables) and `bps_pooled` (Σ over
all neurons of NLL(ȳ) − NLL(r), divided by all their spikes · ln 2: the Neural Latents Benchmark's number, equal
to `nlb_tools.evaluation.bits_per_spike`, silent neurons included with their null rate floored at 1e-9). The
pooled number weighs neurons by their spike count, so sparse neurons with poor fits pull it down less, but a
silent neuron's predicted spikes count fully against it.

Poisson D² (deviance explained; the IBL BrainWideBench's score). With the saturated model predicting each
count itself (NLL(y), with 0·log 0 = 0),

  D² = 1 − (NLL(r) − NLL(y)) / (NLL(ȳ) − NLL(y)),

the fraction of the null model's deviance that the model removes: 1 for a perfect fit, 0 for the mean rate,
negative for worse. Unlike bits/spike it is normalised by what is left to explain (the deviance), not by the
spike count, so a model that recovers the true rates of a noisy neuron scores well below 1 on both.
"""

from __future__ import annotations

import numpy as np

RATE_FLOOR = 1e-9  # a predicted rate of 0 would make log r = −inf on a spike; floored instead of raising


def _entries(mask, shape: tuple[int, int, int]) -> np.ndarray:
  """The evaluated entries as bool [K, T, N]; `mask` is None (all), [K, T] (all neurons) or [K, T, N]."""
  if mask is None:
    return np.ones(shape, bool)
  mask = np.asarray(mask, bool)
  if mask.ndim == 2:
    mask = mask[:, :, None]
  return np.broadcast_to(mask, shape)


def _poisson_nll_N(rates_KxTxN: np.ndarray, spikes_KxTxN: np.ndarray, mask_KxTxN: np.ndarray) -> np.ndarray:
  """Σ over evaluated entries of r − y·log r, per neuron (log y! left out: it cancels in every difference)."""
  return np.where(mask_KxTxN, rates_KxTxN - spikes_KxTxN * np.log(rates_KxTxN), 0.0).sum(axis=(0, 1))


def _nll_gain(rates, spikes, mask) -> tuple[np.ndarray, np.ndarray]:
  """Per neuron: NLL(null) − NLL(model) in nats, and the number of spikes, over the evaluated entries."""
  spikes_KxTxN = np.asarray(spikes, np.float64)
  rates_KxTxN = np.maximum(np.asarray(rates, np.float64), RATE_FLOOR)
  if rates_KxTxN.shape != spikes_KxTxN.shape or spikes_KxTxN.ndim != 3:
    raise ValueError(f"rates {rates_KxTxN.shape} and spikes {spikes_KxTxN.shape} must both be [K, T, N]")
  mask_KxTxN = _entries(mask, spikes_KxTxN.shape)
  n_entries_N = mask_KxTxN.sum(axis=(0, 1))
  n_spikes_N = np.where(mask_KxTxN, spikes_KxTxN, 0.0).sum(axis=(0, 1))
  null_N = np.maximum(n_spikes_N / np.maximum(n_entries_N, 1), RATE_FLOOR)
  null_KxTxN = np.broadcast_to(null_N, spikes_KxTxN.shape)
  nll_null_N = _poisson_nll_N(null_KxTxN, spikes_KxTxN, mask_KxTxN)
  nll_model_N = _poisson_nll_N(rates_KxTxN, spikes_KxTxN, mask_KxTxN)
  return nll_null_N - nll_model_N, n_spikes_N


def bits_per_spike(rates, spikes, mask=None) -> np.ndarray:
  """Per-neuron bits per spike `(NLL_null − NLL_model) / (n_spikes · ln 2)`; NaN for a neuron without spikes.

  Args:
    rates: [K, T, N] predicted rates (spikes per bin); values below 1e-9 (e.g. 0) are floored at 1e-9.
    spikes: [K, T, N] observed counts.
    mask: optional bool [K, T] or [K, T, N], the evaluated entries (default all). The null model's mean count
      is taken over these entries only.

  Returns:
    float64 [N].
  """
  gain_N, n_spikes_N = _nll_gain(rates, spikes, mask)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(n_spikes_N > 0, gain_N / (n_spikes_N * np.log(2)), np.nan)


def poisson_d2(rates, spikes, mask=None) -> np.ndarray:
  """Per-neuron Poisson D² `1 − (NLL_model − NLL_sat) / (NLL_null − NLL_sat)`; NaN without spikes.

  Args:
    rates: [K, T, N] predicted rates (spikes per bin); values below 1e-9 are floored at 1e-9.
    spikes: [K, T, N] observed counts.
    mask: optional bool [K, T] or [K, T, N], the evaluated entries (default all); the null model's mean count
      and all three NLLs are taken over these entries only.

  Returns:
    float64 [N]; NaN for a neuron without spikes or whose counts are all equal (no deviance to explain).
  """
  gain_N, n_spikes_N = _nll_gain(rates, spikes, mask)  # NLL_null − NLL_model
  spikes_KxTxN = np.asarray(spikes, np.float64)
  mask_KxTxN = _entries(mask, spikes_KxTxN.shape)
  n_entries_N = mask_KxTxN.sum(axis=(0, 1))
  null_N = np.maximum(n_spikes_N / np.maximum(n_entries_N, 1), RATE_FLOOR)
  # NLL_null − NLL_sat = Σ ȳ − y·log ȳ − (y − y·log y), with y·log y = 0 at y = 0.
  y_log_y = np.where(spikes_KxTxN > 0, spikes_KxTxN * np.log(np.maximum(spikes_KxTxN, 1.0)), 0.0)
  deviance_KxTxN = null_N - spikes_KxTxN * np.log(null_N) - spikes_KxTxN + y_log_y
  null_dev_N = np.where(mask_KxTxN, deviance_KxTxN, 0.0).sum(axis=(0, 1))
  defined_N = (n_spikes_N > 0) & (null_dev_N > 1e-12 * np.maximum(n_spikes_N, 1.0))
  with np.errstate(divide="ignore", invalid="ignore"):
    # 1 − (model − sat)/(null − sat) = (null − model)/(null − sat)
    return np.where(defined_N, gain_N / null_dev_N, np.nan)


def d2_mean(rates, spikes, mask=None) -> float:
  """The mean over neurons of `poisson_d2` (undefined neurons excluded): the summary number."""
  return _nanmean(poisson_d2(rates, spikes, mask))


def _nanmean(x: np.ndarray) -> float:
  """Mean over the finite values; NaN (and no warning) when there are none."""
  x = np.asarray(x, np.float64)
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float("nan")


def bps_per_neuron(rates, spikes, mask=None) -> float:
  """The mean over neurons of `bits_per_spike` (neurons without spikes excluded): the paper's number."""
  return _nanmean(bits_per_spike(rates, spikes, mask))


def bps_pooled(rates, spikes, mask=None) -> float:
  """`Σ_n (NLL_null − NLL_model)_n / (Σ_n n_spikes_n · ln 2)` over ALL neurons: the NLB's number.

  Matches `nlb_tools.evaluation.bits_per_spike`: a neuron without spikes stays in the sum, its null rate
  floored at 1e-9, so every spike the model predicts there is pure penalty. `bits_per_spike` instead gives such
  a neuron NaN and `bps_per_neuron` leaves it out (the paper's convention): the two aggregations differ exactly
  when a split has silent neurons. NaN when there is no spike at all.
  """
  gain_N, n_spikes_N = _nll_gain(rates, spikes, mask)
  if n_spikes_N.sum() <= 0:
    return float("nan")
  return float(gain_N.sum() / (n_spikes_N.sum() * np.log(2)))


def _r2_N(true_MxN: np.ndarray, pred_MxN: np.ndarray, mask_MxN: np.ndarray | None = None) -> np.ndarray:
  """Per column, `R² = 1 − SS_res / SS_tot` over the (masked) rows; NaN where SS_tot is (numerically) 0.

  SS_res = Σ (y − ŷ)², SS_tot = Σ (y − ȳ)². "Numerically 0" is SS_tot ≤ eps·Σ y², so a constant response
  whose mean rounds (e.g. 0.1 repeated) is still NaN rather than a huge negative number.
  """
  true_MxN = np.asarray(true_MxN, np.float64)
  pred_MxN = np.asarray(pred_MxN, np.float64)
  mask_MxN = np.ones(true_MxN.shape, bool) if mask_MxN is None else np.broadcast_to(mask_MxN, true_MxN.shape)
  n_N = mask_MxN.sum(axis=0)
  mean_N = np.where(mask_MxN, true_MxN, 0.0).sum(axis=0) / np.maximum(n_N, 1)
  ss_res_N = np.where(mask_MxN, (true_MxN - pred_MxN) ** 2, 0.0).sum(axis=0)
  ss_tot_N = np.where(mask_MxN, (true_MxN - mean_N) ** 2, 0.0).sum(axis=0)
  defined_N = ss_tot_N > np.finfo(np.float64).eps * np.where(mask_MxN, true_MxN ** 2, 0.0).sum(axis=0)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(defined_N, 1.0 - ss_res_N / ss_tot_N, np.nan)


def conditions_from_behaviour(choice, block, reward) -> np.ndarray:
  """Trial condition labels `[K]`: one int per distinct (choice, block, reward) triple (at most 2 × 3 × 2 = 12).

  Labels number the triples present, in sorted order; only equality of labels matters to `r2_psth`.
  """
  triples_Kx3 = np.stack([np.asarray(choice, np.float64), np.asarray(block, np.float64),
                          np.asarray(reward, np.float64)], axis=1)
  _, labels_K = np.unique(triples_Kx3, axis=0, return_inverse=True)
  return labels_K.reshape(-1).astype(np.int64)


def r2_psth(rates, spikes, conditions_K) -> np.ndarray:
  """Per-neuron R² of the condition-averaged responses (PSTHs). Returns float64 [N].

  For each condition c, the true PSTH is the mean of the counts over c's trials, `[T, N]`, and the predicted PSTH
  the mean of the rates; the C conditions are concatenated along time into `[C·T, N]` and R² is taken per neuron
  over those C·T points (NaN for a neuron whose true PSTHs are constant, e.g. without spikes).
  """
  rates_KxTxN = np.asarray(rates, np.float64)
  spikes_KxTxN = np.asarray(spikes, np.float64)
  conditions_K = np.asarray(conditions_K).reshape(-1)
  labels = np.unique(conditions_K)
  true_CxTxN = np.stack([spikes_KxTxN[conditions_K == c].mean(axis=0) for c in labels])
  pred_CxTxN = np.stack([rates_KxTxN[conditions_K == c].mean(axis=0) for c in labels])
  N = spikes_KxTxN.shape[-1]
  return _r2_N(true_CxTxN.reshape(-1, N), pred_CxTxN.reshape(-1, N))


def r2_trial(rates, spikes, mask=None) -> np.ndarray:
  """Per-neuron single-trial R² between counts and predicted rates over all trials × bins. Returns float64 [N].

  `mask` (optional, bool [K, T] or [K, T, N]) restricts the entries, e.g. to the bins a task predicts.
  """
  spikes_KxTxN = np.asarray(spikes, np.float64)
  K, T, N = spikes_KxTxN.shape
  mask_KxTxN = _entries(mask, spikes_KxTxN.shape)
  return _r2_N(spikes_KxTxN.reshape(K * T, N), np.asarray(rates, np.float64).reshape(K * T, N),
               mask_KxTxN.reshape(K * T, N))


def accuracy(pred, true) -> float:
  """Fraction of `pred == true` (e.g. decoded choice); NaN for no samples."""
  pred, true = np.asarray(pred).reshape(-1), np.asarray(true).reshape(-1)
  return float(np.mean(pred == true)) if pred.size else float("nan")


def balanced_accuracy(pred, true) -> float:
  """Mean over the classes present in `true` of the fraction of that class predicted right (mean recall); NaN for
  no samples. Chance is 1 / classes whatever the class balance, unlike `accuracy`."""
  pred, true = np.asarray(pred).reshape(-1), np.asarray(true).reshape(-1)
  if not true.size:
    return float("nan")
  return float(np.mean([np.mean(pred[true == c] == c) for c in np.unique(true)]))


def r2(true, pred, mask=None) -> float:
  """`R² = 1 − SS_res / SS_tot` over all (masked) entries together, e.g. a trace over trials × bins; NaN when
  undefined (no entries, or a constant truth)."""
  true = np.asarray(true, np.float64).reshape(-1, 1)
  mask = None if mask is None else np.asarray(mask, bool).reshape(-1, 1)
  return float(_r2_N(true, np.asarray(pred, np.float64).reshape(-1, 1), mask)[0])
