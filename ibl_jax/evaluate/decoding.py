"""Behaviour decoding from a frozen model's predicted rates (choice, whisker motion energy, wheel speed)."""

from __future__ import annotations

import math

import numpy as np
from sklearn import linear_model, model_selection, pipeline, preprocessing
from sklearn import metrics as skmetrics

from ibl_jax import metrics
from ibl_jax.evaluate.heldout import heldout_log_rates
from ibl_jax.evaluate.tasks import _unmasked, trial_offsets

CHOICE_WINDOWS = 5  # choice features: each neuron's rate averaged over 5 equal windows (0.4 s at T = 100)
CV_FOLDS = 4
CHOICE_C = np.logspace(-4, 2, 7)  # inverse L2 strengths tried for the choice decoder
RIDGE_ALPHA = np.logspace(-1, 5, 7)  # ridge strengths tried for the trace decoders
TRACES = {"whisker": "whisker-motion-energy", "wheel": "wheel-speed"}

# ---------------------------------------------------------------------------------------------- behaviour


def choice_features(rates_KxTxN: np.ndarray, n_windows: int = CHOICE_WINDOWS) -> np.ndarray:
  """Each neuron's rate averaged in `n_windows` equal time windows: [K, n_windows · N]."""
  edges = np.linspace(0, rates_KxTxN.shape[1], n_windows + 1).round().astype(int)
  return np.concatenate([rates_KxTxN[:, a:b].mean(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)


def decode_choice(x_fit_KxF, y_fit_K, x_test_KxF, y_test_K) -> tuple[float, np.ndarray]:
  """L2 logistic regression, C by stratified 4-fold CV on the fit trials; returns (test accuracy, predictions)."""
  _, counts = np.unique(y_fit_K, return_counts=True)
  folds = min(CV_FOLDS, int(counts.min()))
  if len(counts) < 2 or folds < 2:  # one class (or a class of one trial): nothing to learn
    return math.nan, np.full(len(y_test_K), np.nan)
  search = model_selection.GridSearchCV(
      # liblinear: ~10x faster than lbfgs on these small, wide problems (it also penalises the intercept,
      # harmless on standardised features).
      pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression(solver="liblinear")),
      {"logisticregression__C": CHOICE_C}, scoring="accuracy",
      cv=model_selection.StratifiedKFold(folds, shuffle=True, random_state=0))
  search.fit(x_fit_KxF, y_fit_K)
  pred_K = search.predict(x_test_KxF)
  return metrics.accuracy(pred_K, y_test_K), pred_K


def decode_trace(rates_fit_KxTxN, y_fit_KxT, rates_test_KxTxN, y_test_KxT) -> tuple[float, np.ndarray]:
  """Per-bin ridge from the bin's N rates, alpha by trial-grouped 4-fold CV; returns (test R², predictions)."""
  K, T, N = rates_fit_KxTxN.shape
  folds = min(CV_FOLDS, K)
  if folds < 2:
    return math.nan, np.full(y_test_KxT.shape, np.nan)
  search = model_selection.GridSearchCV(
      pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.Ridge()), {"ridge__alpha": RIDGE_ALPHA},
      scoring="r2", cv=model_selection.GroupKFold(folds, shuffle=True, random_state=0))
  search.fit(rates_fit_KxTxN.reshape(K * T, N), y_fit_KxT.reshape(-1), groups=np.repeat(np.arange(K), T))
  pred_KxT = search.predict(rates_test_KxTxN.reshape(-1, N)).reshape(y_test_KxT.shape)
  return float(skmetrics.r2_score(y_test_KxT.reshape(-1), pred_KxT.reshape(-1))), pred_KxT


def decode_behaviour(rates_fit_KxTxN, fit: dict[str, np.ndarray], rates_test_KxTxN, test: dict[str, np.ndarray],
                     prefix: str = "") -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Decodes every behaviour present in both `fit` and `test`; returns (scores, test predictions)."""
  scores, preds = {}, {}
  if "choice" in fit and "choice" in test:
    acc, pred_K = decode_choice(choice_features(rates_fit_KxTxN), fit["choice"], choice_features(rates_test_KxTxN),
                                test["choice"])
    scores[f"{prefix}choice_accuracy"], preds[f"{prefix}choice_pred"] = acc, pred_K
  for short, column in TRACES.items():
    if column in fit and column in test:
      r2, pred_KxT = decode_trace(rates_fit_KxTxN, fit[column], rates_test_KxTxN, test[column])
      scores[f"{prefix}{short}_r2"], preds[f"{prefix}{short}_pred"] = r2, pred_KxT
  return scores, preds


def _behaviour_task(predict, session, session_idx, n_max, *, chunk_size, progress, fit_splits):
  """Decoders on the model's rates (and, with true rates, on those): scores and arrays for the npz."""
  offsets = trial_offsets(session)
  names = [*fit_splits, "test"]
  spikes_KxTxN = np.concatenate([session.splits[s].spikes for s in names])
  trial_idx_K = np.concatenate([offsets[s] + np.arange(session.splits[s].spikes.shape[0]) for s in names])
  _, T, N = spikes_KxTxN.shape
  log_rates = heldout_log_rates(predict, _unmasked(N, T), spikes_KxTxN,
                                session_idx=session_idx, trial_idx_K=trial_idx_K, n_max=n_max,
                                chunk_size=chunk_size, desc=f"{session.eid[:8]} behaviour", progress=progress)
  n_fit = sum(session.splits[s].spikes.shape[0] for s in fit_splits)
  rates_KxTxN = np.exp(log_rates.astype(np.float64))
  fit = {k: np.concatenate([session.splits[s].behaviour[k] for s in fit_splits])
         for k in session.splits["test"].behaviour if all(k in session.splits[s].behaviour for s in fit_splits)}
  test = session.splits["test"].behaviour
  scores, arrays = decode_behaviour(rates_KxTxN[:n_fit], fit, rates_KxTxN[n_fit:], test)
  if all(session.splits[s].true_rates is not None for s in names):
    true_KxTxN = np.concatenate([session.splits[s].true_rates for s in names]).astype(np.float64)
    oracle_scores, oracle_arrays = decode_behaviour(true_KxTxN[:n_fit], fit, true_KxTxN[n_fit:], test, "oracle_")
    scores.update(oracle_scores)
    arrays.update(oracle_arrays)
  if "choice" in fit and "choice" in test:  # majority class of the fit trials, scored on test
    values, counts = np.unique(fit["choice"], return_counts=True)
    scores["choice_chance"] = metrics.accuracy(np.full(len(test["choice"]), values[counts.argmax()]),
                                               test["choice"])
  arrays.update({f"{k}_true": test[v] for k, v in (("choice", "choice"), *TRACES.items()) if v in test})
  scores.update(n_trials=int(spikes_KxTxN.shape[0] - n_fit), n_trials_fit=int(n_fit))
  return arrays, scores
