"""Behaviour decoding from a frozen model's predicted rates (choice, whisker motion energy, wheel speed).

Two protocols (`eval.decoding`):
  ours    choice: each neuron's rate in CHOICE_WINDOWS windows -> standardised L2 logistic regression, C in
          CHOICE_C; traces: per (trial, bin) the bin's N rates -> standardised ridge, alpha in RIDGE_ALPHA;
          prompt neuron for both.
  paper   the MtM paper's: features are the predicted log-rates flattened over bins × neurons [K, T·N]; choice:
          logistic regression, C in PAPER_CHOICE_C; traces: one multi-output ridge from the features to the whole
          trace [K, T], alpha in PAPER_RIDGE_ALPHA; choice read under the neuron prompt, traces under the causal
          prompt (and causal attention).
Block is decoded like choice (multi-class). Both choose the penalty by 4-fold cross-validation on train + val and score on test. Beside the model, the same
decoders run on the true rates (`oracle_*`, log of them for paper) and on the raw spikes smoothed with a
Gaussian of SPIKE_SIGMA_BINS (`spikes_*`), and reduced-rank regression maps the smoothed spikes to each trace
(`rrr_*`, `reduced_rank_regression`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn import linear_model, model_selection, multiclass, pipeline, preprocessing
from sklearn import metrics as skmetrics

from ibl_jax import baselines, metrics
from ibl_jax.data import sessions as sessions_lib
from ibl_jax.errors import UserError
from ibl_jax.evaluate.heldout import heldout_log_rates
from ibl_jax.evaluate.tasks import _unmasked, trial_offsets

CHOICE_WINDOWS = 5  # choice features: each neuron's rate averaged over 5 equal windows (0.4 s at T = 100)
CV_FOLDS = 4
CHOICE_C = np.logspace(-4, 2, 7)  # inverse L2 strengths tried for the choice decoder
RIDGE_ALPHA = np.logspace(-1, 5, 7)  # ridge strengths tried for the trace decoders
TRACES = {"whisker": "whisker-motion-energy", "wheel": "wheel-speed"}
CLASSES = ("choice", "block")  # per-trial targets, decoded by the choice decoder
PROTOCOLS = ("ours", "paper")
PAPER_CHOICE_C = np.logspace(-4, 4, 9)
PAPER_RIDGE_ALPHA = np.array([0.0, 10.0, 100.0, 1e3, 1e4])
SPIKE_SIGMA_BINS = 2.0  # the raw-spike baseline's smoothing (40 ms at 20 ms bins)
RRR_RANKS = (1, 2, 4, 8)
RRR_ALPHA = (1.0, 100.0, 1e4)

# ---------------------------------------------------------------------------------------------- behaviour


def choice_features(rates_KxTxN: np.ndarray, n_windows: int = CHOICE_WINDOWS) -> np.ndarray:
  """Each neuron's rate averaged in `n_windows` equal time windows: [K, n_windows · N]."""
  edges = np.linspace(0, rates_KxTxN.shape[1], n_windows + 1).round().astype(int)
  return np.concatenate([rates_KxTxN[:, a:b].mean(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)


def _logistic(n_classes: int, *, standardise: bool) -> tuple[object, str]:
  """(estimator, name of its C parameter). liblinear: ~10x faster than lbfgs on these small, wide problems (it
  also penalises the intercept, harmless on standardised features); binary only, so block's three classes are
  one-vs-rest."""
  clf = linear_model.LogisticRegression(solver="liblinear")
  key = "C"
  if n_classes > 2:
    clf, key = multiclass.OneVsRestClassifier(clf), "estimator__C"
  if standardise:
    return pipeline.make_pipeline(preprocessing.StandardScaler(), clf), f"{type(clf).__name__.lower()}__{key}"
  return clf, key


def decode_choice(x_fit_KxF, y_fit_K, x_test_KxF, y_test_K) -> tuple[float, np.ndarray]:
  """L2 logistic regression, C by stratified 4-fold CV on the fit trials; returns (test accuracy, predictions)."""
  return _logistic_cv(x_fit_KxF, y_fit_K, x_test_KxF, y_test_K, grid=CHOICE_C, standardise=True)


def _logistic_cv(x_fit_KxF, y_fit_K, x_test_KxF, y_test_K, *, grid, standardise: bool) -> tuple[float, np.ndarray]:
  """Logistic regression with C over `grid` by stratified 4-fold CV (both protocols); (test accuracy, predictions)."""
  _, counts = np.unique(y_fit_K, return_counts=True)
  folds = min(CV_FOLDS, int(counts.min()))
  if len(counts) < 2 or folds < 2:  # one class (or a class of one trial): nothing to learn
    return math.nan, np.full(len(y_test_K), np.nan)
  estimator, c_name = _logistic(len(counts), standardise=standardise)
  search = model_selection.GridSearchCV(
      estimator, {c_name: grid}, scoring="accuracy",
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


def decode_choice_paper(x_fit_KxF, y_fit_K, x_test_KxF, y_test_K) -> tuple[float, np.ndarray]:
  """The paper's choice decoder: logistic regression on the flattened features, C by stratified 4-fold CV."""
  return _logistic_cv(x_fit_KxF, y_fit_K, x_test_KxF, y_test_K, grid=PAPER_CHOICE_C, standardise=False)


def decode_trace_paper(x_fit_KxF, y_fit_KxT, x_test_KxF, y_test_KxT) -> tuple[float, np.ndarray]:
  """The paper's trace decoder: one ridge from a trial's flattened features to its whole trace (multi-output),
  alpha by 4-fold CV over trials; R² over test trials × bins."""
  folds = min(CV_FOLDS, len(x_fit_KxF))
  if folds < 2:
    return math.nan, np.full(y_test_KxT.shape, np.nan)
  search = model_selection.GridSearchCV(
      linear_model.Ridge(), {"alpha": PAPER_RIDGE_ALPHA}, scoring="r2",  # alpha 0: least squares (min-norm)
      cv=model_selection.KFold(folds, shuffle=True, random_state=0))
  with warnings.catch_warnings():  # alpha = 0 on T·N > K features is singular: CV scores it, it is not an error
    warnings.simplefilter("ignore")
    search.fit(x_fit_KxF, y_fit_KxT)
  pred_KxT = search.predict(x_test_KxF)
  return metrics.r2(y_test_KxT, pred_KxT), pred_KxT


def _rrr_predictions(x_fit_KxF, y_fit_KxT, x_new_MxF, alphas, ranks) -> dict[tuple, np.ndarray]:
  """Reduced-rank ridge predictions [M, T] for every (alpha, rank), in the dual (K × K) form: the ridge is
  W = X_cᵀ A with A = (G + αI)⁻¹ Y_c (G = X_c X_cᵀ), its rank-r version W V_r V_rᵀ with V_r the top right singular
  vectors of the fitted values G A. One kernel per call, one solve and one SVD per alpha."""
  x_mean_F, y_mean_T = x_fit_KxF.mean(0), y_fit_KxT.mean(0)
  X, Y = x_fit_KxF - x_mean_F, y_fit_KxT - y_mean_T
  G_KxK, K_MxK = X @ X.T, (x_new_MxF - x_mean_F) @ X.T
  out = {}
  for alpha in alphas:
    A_KxT = np.linalg.solve(G_KxK + alpha * np.eye(len(X)), Y)
    _, _, vt_TxT = np.linalg.svd(G_KxK @ A_KxT, full_matrices=False)
    full_MxT = K_MxK @ A_KxT
    for rank in ranks:
      out[(alpha, rank)] = full_MxT @ vt_TxT[:rank].T @ vt_TxT[:rank] + y_mean_T
  return out


def reduced_rank_regression(x_fit_KxF, y_fit_KxT, rank: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """Ridge from [K, F] to [K, T] constrained to rank `rank`: the ridge weights projected onto the top right
  singular vectors of the ridge's fitted values (Izenman 1975, with a ridge penalty). Returns (W [F, T], b [T])."""
  x_mean_F, y_mean_T = x_fit_KxF.mean(0), y_fit_KxT.mean(0)
  X, Y = x_fit_KxF - x_mean_F, y_fit_KxT - y_mean_T
  W_FxT = X.T @ np.linalg.solve(X @ X.T + alpha * np.eye(len(X)), Y)
  _, _, vt_TxT = np.linalg.svd(X @ W_FxT, full_matrices=False)
  W_FxT = W_FxT @ vt_TxT[:rank].T @ vt_TxT[:rank]
  return W_FxT, y_mean_T - x_mean_F @ W_FxT


def decode_trace_rrr(x_fit_KxF, y_fit_KxT, x_test_KxF, y_test_KxT) -> tuple[float, np.ndarray]:
  """Reduced-rank regression, rank and ridge by 4-fold CV over trials (mean R²); R² over test trials × bins."""
  K = len(x_fit_KxF)
  folds = min(CV_FOLDS, K)
  if folds < 2:
    return math.nan, np.full(y_test_KxT.shape, np.nan)
  ranks = [r for r in RRR_RANKS if r <= y_fit_KxT.shape[1]]
  cv: dict[tuple, list[float]] = {}
  for tr, va in model_selection.KFold(folds, shuffle=True, random_state=0).split(x_fit_KxF):
    for key, pred in _rrr_predictions(x_fit_KxF[tr], y_fit_KxT[tr], x_fit_KxF[va], RRR_ALPHA, ranks).items():
      cv.setdefault(key, []).append(metrics.r2(y_fit_KxT[va], pred))
  best = max(cv, key=lambda k: np.nanmean(cv[k]) if np.isfinite(cv[k]).any() else -np.inf)
  pred_KxT = _rrr_predictions(x_fit_KxF, y_fit_KxT, x_test_KxF, [best[0]], [best[1]])[best]
  return metrics.r2(y_test_KxT, pred_KxT), pred_KxT


def decode_behaviour(rates_fit_KxTxN, fit: dict[str, np.ndarray], rates_test_KxTxN, test: dict[str, np.ndarray],
                     prefix: str = "", *, protocol: str = "ours", trace_fit_KxTxN=None, trace_test_KxTxN=None
                     ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Decodes every behaviour present in both `fit` and `test`; returns (scores, test predictions).

  `rates_*`: the features [K, T, N] (ours: rates; paper: log-rates under the neuron prompt); `trace_*` (paper
  only; default `rates_*`): the features of the traces (log-rates under the causal prompt).
  """
  if protocol not in PROTOCOLS:
    raise UserError(f"eval.decoding={protocol!r}: choose one of {', '.join(PROTOCOLS)}")
  paper = protocol == "paper"
  flat = lambda x_KxTxN: np.asarray(x_KxTxN).reshape(len(x_KxTxN), -1)
  scores, preds = {}, {}
  for name in CLASSES:  # block: the choice decoder, multi-class (one-vs-rest)
    if name not in fit or name not in test:
      continue
    # Integer class codes (sklearn takes float labels such as block priors for a regression target).
    values, y_fit_K = np.unique(fit[name], return_inverse=True)
    y_test_K = np.array([int(np.flatnonzero(values == v)[0]) if v in values else -1 for v in test[name]])
    if paper:
      acc, code_K = decode_choice_paper(flat(rates_fit_KxTxN), y_fit_K, flat(rates_test_KxTxN), y_test_K)
    else:
      acc, code_K = decode_choice(choice_features(rates_fit_KxTxN), y_fit_K, choice_features(rates_test_KxTxN),
                                  y_test_K)
    pred_K = np.where(np.isfinite(code_K), values[np.nan_to_num(code_K).astype(int)], np.nan)
    scores[f"{prefix}{name}_accuracy"], preds[f"{prefix}{name}_pred"] = acc, pred_K
  trace_fit = rates_fit_KxTxN if trace_fit_KxTxN is None else trace_fit_KxTxN
  trace_test = rates_test_KxTxN if trace_test_KxTxN is None else trace_test_KxTxN
  for short, column in TRACES.items():
    if column in fit and column in test:
      if paper:
        r2, pred_KxT = decode_trace_paper(flat(trace_fit), fit[column], flat(trace_test), test[column])
      else:
        r2, pred_KxT = decode_trace(trace_fit, fit[column], trace_test, test[column])
      scores[f"{prefix}{short}_r2"], preds[f"{prefix}{short}_pred"] = r2, pred_KxT
  return scores, preds


def spike_baselines(spikes_fit_KxTxN, fit, spikes_test_KxTxN, test, *, protocol: str
                    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """The protocol's decoders on the smoothed raw spikes (`spikes_*`), and reduced-rank regression from them to each
  trace (`rrr_*`): what a decoder gets without the model."""
  smooth_fit = baselines.gaussian_smooth(np.asarray(spikes_fit_KxTxN, np.float64), SPIKE_SIGMA_BINS)
  smooth_test = baselines.gaussian_smooth(np.asarray(spikes_test_KxTxN, np.float64), SPIKE_SIGMA_BINS)
  scores, preds = decode_behaviour(smooth_fit, fit, smooth_test, test, "spikes_", protocol=protocol)
  flat = lambda x_KxTxN: x_KxTxN.reshape(len(x_KxTxN), -1)
  for short, column in TRACES.items():
    if column in fit and column in test:
      r2, pred_KxT = decode_trace_rrr(flat(smooth_fit), fit[column], flat(smooth_test), test[column])
      scores[f"rrr_{short}_r2"], preds[f"rrr_{short}_pred"] = r2, pred_KxT
  return scores, preds


def _behaviour_task(predict, session, session_idx, n_max, *, chunk_size, progress, fit_splits, protocol: str = "ours",
                    trial_filter=None, spike_baseline: bool = True):
  """Decoders on the model's rates (and, with true rates, on those; and on the raw spikes): scores and arrays for
  the npz. `trial_filter` (eval.decoding_trial_filter): trials kept for decoding only (data.trial_filter's
  formats, over the loaded trials)."""
  if trial_filter:
    session = sessions_lib.filter_trials(session, trial_filter)
  offsets = trial_offsets(session)
  names = [*fit_splits, "test"]
  spikes_KxTxN = np.concatenate([session.splits[s].spikes for s in names])
  trial_idx_K = np.concatenate([offsets[s] + np.arange(session.splits[s].spikes.shape[0]) for s in names])
  _, T, N = spikes_KxTxN.shape
  forward = lambda spec, what: heldout_log_rates(
      predict, spec, spikes_KxTxN, session_idx=session_idx, trial_idx_K=trial_idx_K, n_max=n_max,
      chunk_size=chunk_size, desc=f"{session.eid[:8]} behaviour{what}", progress=progress).astype(np.float64)
  n_fit = sum(session.splits[s].spikes.shape[0] for s in fit_splits)
  fit = {k: np.concatenate([session.splits[s].behaviour[k] for s in fit_splits])
         for k in session.splits["test"].behaviour if all(k in session.splits[s].behaviour for s in fit_splits)}
  test = session.splits["test"].behaviour
  log_rates = forward(_unmasked(N, T), "")
  if protocol == "paper":
    # Choice under the neuron prompt, the traces under the causal prompt (causal attention), on log-rates.
    has_trace = any(c in fit and c in test for c in TRACES.values())
    causal = forward(_unmasked(N, T, prompt="causal"), " (causal)") if has_trace else log_rates
    features, trace_features = log_rates, causal
  else:
    features, trace_features = np.exp(log_rates), None
  split_at = lambda x: (None, None) if x is None else (x[:n_fit], x[n_fit:])
  scores, arrays = decode_behaviour(features[:n_fit], fit, features[n_fit:], test, protocol=protocol,
                                    **dict(zip(("trace_fit_KxTxN", "trace_test_KxTxN"), split_at(trace_features))))
  if all(session.splits[s].true_rates is not None for s in names):
    true_KxTxN = np.concatenate([session.splits[s].true_rates for s in names]).astype(np.float64)
    if protocol == "paper":
      true_KxTxN = np.log(np.maximum(true_KxTxN, 1e-6))
    oracle_scores, oracle_arrays = decode_behaviour(true_KxTxN[:n_fit], fit, true_KxTxN[n_fit:], test, "oracle_",
                                                    protocol=protocol)
    scores.update(oracle_scores)
    arrays.update(oracle_arrays)
  if spike_baseline:
    base_scores, base_arrays = spike_baselines(spikes_KxTxN[:n_fit], fit, spikes_KxTxN[n_fit:], test,
                                               protocol=protocol)
    scores.update(base_scores)
    arrays.update(base_arrays)
  for name in CLASSES:  # majority class of the fit trials, scored on test
    if name in fit and name in test:
      values, counts = np.unique(fit[name], return_counts=True)
      scores[f"{name}_chance"] = metrics.accuracy(np.full(len(test[name]), values[counts.argmax()]), test[name])
  arrays.update({f"{k}_true": test[v] for k, v in (*((c, c) for c in CLASSES), *TRACES.items()) if v in test})
  scores.update(n_trials=int(spikes_KxTxN.shape[0] - n_fit), n_trials_fit=int(n_fit), protocol=protocol)
  return arrays, scores
