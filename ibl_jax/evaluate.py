"""The evaluation suite of DESIGN.md §7 on a session's test split: four held-out prediction tasks and decoding.

  python -m ibl_jax.evaluate --checkpoint=results/ndt1_mtm
  python -m ibl_jax.evaluate --checkpoint=results/ndt1_mtm/checkpoints/1500 --tasks=co_smooth --chunk-size=128

Protocols (K test trials, T bins, N neurons; every task but behaviour predicts each neuron exactly once per trial):

  task           input (zeroed entries)                                   scored                         prompt
  co_smooth      neuron i, all bins; one input per neuron                 neuron i, all bins             neuron
  forward_pred   the last `forward_bins` bins of every neuron; causal     every neuron, those bins       causal
  inter_region   every neuron of region R; one input per region           R's neurons, all bins          inter
  intra_region   every neuron outside R(i), and neuron i; one per neuron  neuron i, all bins             intra
  behaviour      nothing: features are the predicted rates                decoders (below)               neuron

A task is a set of V input variants (`LeaveOut`: which neurons each variant keeps, which it scores). The K·V
(trial, variant) inputs are built on device, `chunk_size` per call, from a group of trials' counts sent once
(`heldout_log_rates`); every call has the shape [chunk_size, T, n_max], so the model compiles once for all
tasks of all sessions with the same T and n_max (prompt, causal flag and the plan are traced values).

Metrics, per neuron over the scored entries of the test trials (`ibl_jax.metrics`): `bps` (bits per spike),
`r2_psth` (conditions choice × block × reward; one condition when the session has no such columns), `r2_trial`.
The summary gives `bps_per_neuron` (the mean of per-neuron bps: the paper's number) and `bps_pooled` (the NLB's),
means and stds. With true rates (synthetic sessions) the same metrics of the true rates are the `oracle_*`.

Behaviour decoding. Features are the rates the frozen model predicts from the unmasked input (prompt neuron)
on every split. Choice: each neuron's rate averaged in `CHOICE_WINDOWS` equal windows of the trial (5 × N
features: the trial is too short and too few trials for a per-bin decoder) → standardised → L2 logistic
regression, accuracy. Wheel speed and whisker motion energy: per (trial, bin), the N rates of that bin →
standardised → ridge, R² over test trials × bins. Regularisation is chosen by 4-fold cross-validation on
train + val (folds grouped by trial for the traces, so no trial's bins are on both sides); scores are on test.
The oracle decodes the true rates with the same decoders.

Outputs under `OUT/<eid>/`: `<task>.npz` (per-neuron `bps`, `r2_psth`, `r2_trial`, `n_spikes`, neuron `uuids`,
`regions`, `region_ids`, and `oracle_*` when known; behaviour: test targets and decoded values), `summary.json`
and, with figures on, `figures/` (bps histogram per task, trial-averaged rates of the best and worst
co-smoothed neurons).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn import linear_model, model_selection, pipeline, preprocessing
from sklearn import metrics as skmetrics
from tqdm import tqdm

from ibl_jax import masking, metrics, parallel, runs
from ibl_jax.errors import UserError
from ibl_jax.data import sessions as sessions_lib
from ibl_jax.data.schema import SessionError

TASKS = ("co_smooth", "forward_pred", "inter_region", "intra_region", "behaviour")
SPLIT_ORDER = ("train", "val", "test")  # trial_idx numbers the session's trials in this order
DEFAULTS = {"tasks": ",".join(TASKS), "chunk_size": 0, "forward_bins": 10, "figures": True}  # configs/ndt1.py
CPU_CHUNK_PER_DEVICE = 32  # docs/performance.md: on a CPU larger chunks fall out of cache (1.4x slower at 128)
MAX_CHUNK_PER_DEVICE = 4096

PROMPT = {"neuron": masking.PROMPT_IDX[0], "causal": masking.PROMPT_IDX[1],
          "inter_region": masking.PROMPT_IDX[2], "intra_region": masking.PROMPT_IDX[3]}
CHOICE_WINDOWS = 5  # choice features: each neuron's rate averaged over 5 equal windows (0.4 s at T = 100)
CV_FOLDS = 4
CHOICE_C = np.logspace(-4, 2, 7)  # inverse L2 strengths tried for the choice decoder
RIDGE_ALPHA = np.logspace(-1, 5, 7)  # ridge strengths tried for the trace decoders
TRACES = {"whisker": "whisker-motion-energy", "wheel": "wheel-speed"}
CONDITION_COLUMNS = ("choice", "block", "reward")



class EvalError(UserError):
  """A one-line, user-facing problem (bad arguments, a session the checkpoint cannot evaluate)."""


# --------------------------------------------------------------------------------------------- protocols


@dataclasses.dataclass(frozen=True)
class LeaveOut:
  """One held-out prediction task as V input variants of a trial.

  Variant v zeroes the neurons outside `keep_VxN[v]` (and, in every variant, the bins outside `keep_T`) and
  is scored on the neurons in `target_VxN[v]`; each neuron is the target of exactly one variant. Metrics
  are taken over the bins in `scored_T`.
  """
  prompt_idx: int
  causal: bool
  keep_VxN: np.ndarray
  target_VxN: np.ndarray
  keep_T: np.ndarray
  scored_T: np.ndarray


def leave_out(task: str, regions_N: np.ndarray, num_bins: int, forward_bins: int = 10) -> LeaveOut:
  """The variants of a neural task (see the module docstring) for neurons in `regions_N` (any labels)."""
  regions_N = np.asarray(regions_N)
  N, T = len(regions_N), num_bins
  eye_NxN, all_T = np.eye(N, dtype=bool), np.ones(T, bool)
  if task == "co_smooth":
    return LeaveOut(PROMPT["neuron"], False, ~eye_NxN, eye_NxN, all_T, all_T)
  if task == "forward_pred":
    if not 0 < forward_bins < T:
      raise EvalError(f"forward_bins={forward_bins} must be in 1..{T - 1} for T = {T} bins")
    future_T = np.arange(T) >= T - forward_bins
    ones_1xN = np.ones((1, N), bool)
    return LeaveOut(PROMPT["causal"], True, ones_1xN, ones_1xN, ~future_T, future_T)
  if task == "inter_region":
    in_region_RxN = np.unique(regions_N)[:, None] == regions_N[None, :]
    return LeaveOut(PROMPT["inter_region"], False, ~in_region_RxN, in_region_RxN, all_T, all_T)
  if task == "intra_region":
    same_region_NxN = regions_N[:, None] == regions_N[None, :]
    return LeaveOut(PROMPT["intra_region"], False, same_region_NxN & ~eye_NxN, eye_NxN, all_T, all_T)
  raise EvalError(f"unknown neural task {task!r}; choose from {', '.join(TASKS[:4])}")


def _unmasked(num_neurons: int, num_bins: int) -> LeaveOut:
  """One variant that hides nothing and scores everything: the behaviour features."""
  ones_1xN, all_T = np.ones((1, num_neurons), bool), np.ones(num_bins, bool)
  return LeaveOut(PROMPT["neuron"], False, ones_1xN, ones_1xN, all_T, all_T)


def parse_tasks(tasks: str | Sequence[str] | None) -> tuple[str, ...]:
  """Task names from a comma list or a sequence, in the given order (default all)."""
  names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks or TASKS) if t.strip()]
  unknown = [t for t in names if t not in TASKS]
  if unknown or not names:
    raise EvalError(f"{f'unknown task {unknown[0]!r}' if unknown else 'no task given'}; choose from "
                    f"{', '.join(TASKS)}")
  return tuple(dict.fromkeys(names))


# -------------------------------------------------------------------------------------- batched forwards


def auto_chunk_size(model_cfg, num_bins: int, n_max: int, devices: Sequence[jax.Device]) -> int:
  """The chunk for `eval.chunk_size = 0`: whole shards per device, as large as memory allows on accelerators.

  CPU: `CPU_CHUNK_PER_DEVICE` per device. Accelerators: the largest power of two per device (≤ 4096) whose
  forward activations fit in a quarter of the device's memory, counted in float32 per row as the inputs,
  predictions and accumulator (3·T·n_max), one layer's activations (6·L·D + 2·L·mlp) and its attention
  logits and probabilities (2·H·L²), L = T + 2 tokens. Paper size on an 80 GB H100: 3.6 MB a row -> 4096.
  """
  n = len(devices)
  limit = (devices[0].memory_stats() or {}).get("bytes_limit") if devices[0].platform != "cpu" else None
  if not limit:
    return CPU_CHUNK_PER_DEVICE * n
  L, D, H = num_bins + 2, model_cfg.hidden_size, model_cfg.num_heads
  row_bytes = 4 * (3 * num_bins * n_max + 6 * L * D + 2 * L * model_cfg.mlp_size + 2 * H * L * L)
  per_device = 2 ** int(math.log2(max(1, min(MAX_CHUNK_PER_DEVICE, limit // 4 // row_bytes))))
  return per_device * n


def chunk_plan(num_trials: int, num_variants: int, chunk_size: int) -> tuple[int, int]:
  """(G trials per group, m variants per chunk) for K trials × V variants in chunks of B rows.

  A chunk's row b runs trial b % G of the current group with variant c·m + b // G, so m·G ≤ B rows are used.
  The plan minimises chunks + 2 × groups (a group moves a chunk-sized buffer each way; on an H100 that costs
  about two paper-size chunks): for K = 200, V = 700, B = 256 it takes G = 51, m = 5: 4 groups, 560 chunks (one group
  of 200 trials: 700; the floor ⌈K·V / B⌉ is 547).
  """
  best = None
  for G in range(min(num_trials, chunk_size), 0, -1):  # ties go to the larger group
    m = min(chunk_size // G, num_variants)
    groups = -(-num_trials // G)
    cost = groups * -(-num_variants // m) + 2 * groups
    if best is None or cost < best[0]:
      best = (cost, G, m)
  return best[1], best[2]


def _chunk_step(fn, state, out_BxTxN, spikes_BxTxN, trial_idx_B, slot_valid_B, keep_T, keep_VxN, target_VxN,
                session_idx, prompt_idx, causal, group_size, per_chunk, num_variants, chunk):
  """One chunk of leave-one-out forwards on device; adds each row's target predictions to its slot in `out`.

  Row b holds trial b % G of the group (`spikes_BxTxN[b]`, repeated m times down the rows) and runs variant
  v = chunk·m + b // G. Rows past m·G, variants past V and padded trials add nothing. Variants' targets are
  disjoint, so a slot accumulates exact values (x + 0 = x) and the m slots of a trial sum to its predictions.
  """
  B, T, _ = spikes_BxTxN.shape
  b_B = jnp.arange(B)
  v_B = chunk * per_chunk + b_B // group_size
  valid_B = slot_valid_B & (b_B < per_chunk * group_size) & (v_B < num_variants)
  v_B = jnp.minimum(v_B, num_variants - 1)  # invalid rows still run a real input (then count for nothing)
  inputs_BxTxN = spikes_BxTxN.astype(jnp.float32) * keep_T[None, :, None] * keep_VxN[v_B][:, None, :]
  log_rates_BxTxN = fn(state, inputs_BxTxN, jnp.ones((B, T), bool), jnp.full((B,), session_idx, jnp.int32),
                       trial_idx_B, prompt_idx, causal).astype(jnp.float32)
  scored_BxTxN = (target_VxN[v_B] & valid_B[:, None])[:, None, :]
  return out_BxTxN + jnp.where(scored_BxTxN, log_rates_BxTxN, 0.0)


def _sum_slots(out_BxTxN, group_size):
  """Row g of the result is the sum of the slots b with b % G = g (rows ≥ G are zero)."""
  return jnp.zeros_like(out_BxTxN).at[jnp.arange(out_BxTxN.shape[0]) % group_size].add(out_BxTxN)


@dataclasses.dataclass(frozen=True)
class Predict:
  """A traceable forward and its state, placed on a mesh; `make_predict` builds one, `heldout_log_rates` runs it.

  fn(state, inputs_BxTxN float32, time_mask_BxT bool, session_idx_B int32, trial_idx_B int32, prompt_idx int32,
     causal bool) -> log_rates_BxTxN. N is n_max (inputs zero-padded). trial_idx numbers trials in SPLIT_ORDER,
  so a stub can look its truths up in `state`; a model ignores it. `step` is the one jitted chunk step
  (`step._cache_size()` counts its compilations: one per T, n_max and chunk size).
  """
  fn: Callable
  state: Any
  mesh: jax.sharding.Mesh
  step: Callable
  sum_slots: Callable
  zeros: Callable

  def on_mesh(self, x, sharded: bool = False) -> jax.Array:
    """A host array, identical on every process, as a global array (split over the trials or replicated)."""
    x = np.asarray(x)
    sharding = parallel.batch_sharding(self.mesh) if sharded else parallel.replicated(self.mesh)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def make_predict(fn: Callable, state: Any, mesh: jax.sharding.Mesh | None = None) -> Predict:
  """A `Predict` whose chunks are split over the devices of `mesh` (default all); `state` is replicated."""
  mesh = mesh or parallel.make_mesh()
  batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  step = jax.jit(functools.partial(_chunk_step, fn), donate_argnums=1,
                 in_shardings=(rep, batch, batch, batch, batch) + (rep,) * 10, out_shardings=batch)
  sum_slots = jax.jit(_sum_slots, in_shardings=(batch, rep), out_shardings=rep)
  zeros = jax.jit(lambda x: jnp.zeros(x.shape, jnp.float32), in_shardings=batch, out_shardings=batch)
  predict = Predict(fn, None, mesh, step, sum_slots, zeros)
  return dataclasses.replace(predict, state=jax.tree.map(predict.on_mesh, state))


def model_predict(graphdef, params, mesh: jax.sharding.Mesh | None = None) -> Predict:
  """The `Predict` of an NDT1 given as (graphdef, params): deterministic, one compilation per input shape."""

  def forward(params, inputs_BxTxN, time_mask_BxT, session_idx_B, trial_idx_B, prompt_idx, causal):
    del trial_idx_B  # a model sees only its inputs
    model = nnx.merge(graphdef, params)
    return model(inputs_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal, deterministic=True)

  return make_predict(forward, params, mesh)


def heldout_log_rates(predict: Predict, spec: LeaveOut, spikes_KxTxN: np.ndarray, *, session_idx: int,
                      trial_idx_K: np.ndarray, n_max: int, chunk_size: int, desc: str = "",
                      progress: bool = False) -> np.ndarray:
  """Runs every (trial, variant) input of `spec` on device in fixed-shape chunks; returns log-rates [K, T, N].

  Entry (k, t, n) is the prediction of the variant that targets neuron n, on trial k. Per group of trials the
  host sends the counts once (uint8) and reads the predictions once; a chunk sends nothing but its index.
  """
  K, T, N = spikes_KxTxN.shape
  V, B = spec.keep_VxN.shape[0], chunk_size
  if N > n_max:
    raise EvalError(f"the session has {N} neurons, more than the model's n_max = {n_max}")
  if B % predict.mesh.devices.size:
    raise EvalError(f"chunk size {B} is not a multiple of the {predict.mesh.devices.size} devices")
  assert (spec.target_VxN.sum(0) == 1).all(), "every neuron must be the target of exactly one variant"
  G, m = chunk_plan(K, V, B)
  pad_VxN = lambda x: np.pad(x.astype(bool), ((0, n_max - V), (0, n_max - N)))  # V ≤ N ≤ n_max
  on_mesh = predict.on_mesh
  consts = (on_mesh(spec.keep_T.astype(np.float32)), on_mesh(pad_VxN(spec.keep_VxN).astype(np.float32)),
            on_mesh(pad_VxN(spec.target_VxN)), on_mesh(np.int32(session_idx)), on_mesh(np.int32(spec.prompt_idx)),
            on_mesh(np.bool_(spec.causal)), on_mesh(np.int32(G)), on_mesh(np.int32(m)), on_mesh(np.int32(V)))
  chunk_idx = [on_mesh(np.int32(c)) for c in range(-(-V // m))]
  out_KxTxN = np.zeros((K, T, N), np.float32)
  bar = tqdm(total=-(-K // G) * len(chunk_idx), desc=desc, unit="chunk", disable=not progress, leave=False)

  def collect(rows, summed_BxTxN):
    out_KxTxN[rows] = np.asarray(summed_BxTxN[:len(rows), :, :N])

  pending = None
  for g0 in range(0, K, G):
    rows = np.arange(g0, min(g0 + G, K))
    slot_B = rows[np.arange(B) % G % len(rows)]  # slots of padded trials repeat a real trial
    spikes_BxTxN = np.zeros((B, T, n_max), spikes_KxTxN.dtype)
    spikes_BxTxN[:, :, :N] = spikes_KxTxN[slot_B]
    group = (on_mesh(spikes_BxTxN, True), on_mesh(trial_idx_K[slot_B].astype(np.int32), True),
             on_mesh(np.arange(B) % G < len(rows), True))
    out_BxTxN = predict.zeros(group[0])
    for c in chunk_idx:
      out_BxTxN = predict.step(predict.state, out_BxTxN, *group, *consts, c)
      bar.update()
    if pending is not None:  # read the previous group only now, so the device works while the host reads
      collect(*pending)
    pending = (rows, predict.sum_slots(out_BxTxN, consts[6]))
  collect(*pending)
  bar.close()
  return out_KxTxN


# ------------------------------------------------------------------------------------------------ metrics


def trial_offsets(session: sessions_lib.Session) -> dict[str, int]:
  """Index of each split's first trial when the session's trials are numbered in SPLIT_ORDER."""
  offsets, total = {}, 0
  for name in SPLIT_ORDER:
    if name in session.splits:
      offsets[name], total = total, total + session.splits[name].spikes.shape[0]
  return offsets


def conditions_of(split: sessions_lib.Split) -> np.ndarray:
  """PSTH conditions [K]: choice × block × reward, or a single condition when a column is missing."""
  if all(c in split.behaviour for c in CONDITION_COLUMNS):
    return metrics.conditions_from_behaviour(*(split.behaviour[c] for c in CONDITION_COLUMNS))
  return np.zeros(split.spikes.shape[0], np.int64)


def neuron_metrics(rates_KxTxN: np.ndarray, spikes_KxTxN: np.ndarray, conditions_K: np.ndarray,
                   prefix: str = "") -> dict[str, np.ndarray]:
  """Per-neuron bps, PSTH R² and single-trial R² (float64 [N]) over all given entries."""
  return {f"{prefix}bps": metrics.bits_per_spike(rates_KxTxN, spikes_KxTxN),
          f"{prefix}r2_psth": metrics.r2_psth(rates_KxTxN, spikes_KxTxN, conditions_K),
          f"{prefix}r2_trial": metrics.r2_trial(rates_KxTxN, spikes_KxTxN)}


def _mean_std(x: np.ndarray) -> tuple[float, float]:
  """Mean and std over the finite values (NaN: an undefined neuron, e.g. without spikes)."""
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  return (float(x.mean()), float(x.std())) if x.size else (math.nan, math.nan)


def summarise(arrays: dict[str, np.ndarray], pooled: dict[str, float]) -> dict[str, float]:
  """Means and stds of the per-neuron arrays, named `bps_per_neuron`/`bps_std`, `r2_psth_mean`/`_std`, ..."""
  out = {}
  for prefix in ("", "oracle_"):
    if f"{prefix}bps" not in arrays:
      continue
    out[f"{prefix}bps_per_neuron"], out[f"{prefix}bps_std"] = _mean_std(arrays[f"{prefix}bps"])
    out[f"{prefix}bps_pooled"] = pooled[prefix]
    for name in ("r2_psth", "r2_trial"):
      out[f"{prefix}{name}_mean"], out[f"{prefix}{name}_std"] = _mean_std(arrays[f"{prefix}{name}"])
  out["n_neurons_scored"] = int(np.isfinite(arrays["bps"]).sum())
  return out


def _score_neural(log_rates_KxTxN, split: sessions_lib.Split, spec: LeaveOut, conditions_K):
  """Per-neuron arrays and summary of one neural task, over the scored bins."""
  spikes_KxTxN = split.spikes[:, spec.scored_T].astype(np.float64)
  rates_KxTxN = np.exp(log_rates_KxTxN[:, spec.scored_T].astype(np.float64))
  arrays = neuron_metrics(rates_KxTxN, spikes_KxTxN, conditions_K)
  arrays["n_spikes"] = spikes_KxTxN.sum(axis=(0, 1))
  pooled = {"": metrics.bps_pooled(rates_KxTxN, spikes_KxTxN)}
  if split.true_rates is not None:
    true_KxTxN = split.true_rates[:, spec.scored_T].astype(np.float64)
    arrays.update(neuron_metrics(true_KxTxN, spikes_KxTxN, conditions_K, prefix="oracle_"))
    pooled["oracle_"] = metrics.bps_pooled(true_KxTxN, spikes_KxTxN)
  return arrays, summarise(arrays, pooled)


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


# ------------------------------------------------------------------------------------- sessions and runs


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def evaluate_session(predict: Predict, session: sessions_lib.Session, session_idx: int, n_max: int,
                     tasks: str | Sequence[str] | None, out_dir: str | Path | None, *, chunk_size: int,
                     forward_bins: int = DEFAULTS["forward_bins"], figures: bool = False, progress: bool = True,
                     meta: dict | None = None) -> dict:
  """Runs `tasks` on the session's test split; writes `out_dir/<eid>/` (unless None); returns the summary.

  Args:
    predict: see `Predict`; `model_predict(graphdef, params)` for an NDT1.
    session: with a `test` split (and train/val for behaviour decoding); true rates give the oracle.
    session_idx: the session's index in the model (stitching rows, session token).
    n_max: the model's neuron count; inputs are zero-padded to it.
    tasks: names from TASKS (comma list or sequence; None: all). Behaviour is skipped, with a warning, when
      the session has no behaviour columns.
    out_dir: the evaluation root (e.g. RUN_DIR/eval), or None to write nothing.
    chunk_size: (trial, variant) inputs per predict call.
    forward_bins: forward prediction predicts the last `forward_bins` bins.
    figures: also write `figures/` (needs out_dir).
    progress: tqdm bars per task.
    meta: extra top-level entries of the summary (e.g. the checkpoint).
  """
  tasks = parse_tasks(tasks)
  if chunk_size < 1:
    raise EvalError(f"chunk_size must be >= 1, got {chunk_size}")
  if "test" not in session.splits:
    raise EvalError(f"session {session.eid}: no test split (splits: {', '.join(session.splits)})")
  test = session.splits["test"]
  K, T, N = test.spikes.shape
  trial_idx_K = trial_offsets(session)["test"] + np.arange(K)
  conditions_K = conditions_of(test)
  session_dir = None if out_dir is None else Path(out_dir) / session.eid
  if session_dir is not None:
    session_dir.mkdir(parents=True, exist_ok=True)
  neuron_info = {"uuids": np.asarray(session.uuids, str), "regions": np.asarray(session.regions, str)}
  if session.region_ids is not None:
    neuron_info["region_ids"] = np.asarray(session.region_ids)
  summary = {"eid": session.eid, "session_idx": int(session_idx), **(meta or {}), "n_neurons": N, "n_trials": K,
             "n_conditions": int(len(np.unique(conditions_K))), "tasks": {}}
  cosmooth_rates_KxTxN = None  # for the figure of the best and worst co-smoothed neurons
  for task in tasks:
    t0 = time.time()
    if task == "behaviour":
      if not any(c in test.behaviour for c in ("choice", *TRACES.values())):
        _warn(f"session {session.eid}: no behaviour columns (choice, {', '.join(TRACES.values())}); "
              f"skipping the behaviour task")
        continue
      fit_splits = [s for s in ("train", "val") if s in session.splits]
      if not fit_splits:
        _warn(f"session {session.eid}: no train or val split to fit decoders on; skipping the behaviour task")
        continue
      arrays, scores = _behaviour_task(predict, session, session_idx, n_max, chunk_size=chunk_size,
                                       progress=progress, fit_splits=fit_splits)
    else:
      spec = leave_out(task, session.regions, T, forward_bins)
      log_rates_KxTxN = heldout_log_rates(predict, spec, test.spikes, session_idx=session_idx,
                                          trial_idx_K=trial_idx_K, n_max=n_max, chunk_size=chunk_size,
                                          desc=f"{session.eid[:8]} {task}", progress=progress)
      arrays, scores = _score_neural(log_rates_KxTxN, test, spec, conditions_K)
      arrays.update(neuron_info)
      scores.update(n_neurons=N, n_trials=K)
      if task == "co_smooth":
        cosmooth_rates_KxTxN = np.exp(log_rates_KxTxN)
    scores["wall_s"] = time.time() - t0
    summary["tasks"][task] = scores
    if session_dir is not None:
      np.savez(session_dir / f"{task}.npz", **arrays)
      if figures and task != "behaviour":
        _save_figures(session_dir / "figures", task, arrays, cosmooth_rates_KxTxN if task == "co_smooth" else None,
                      session)
  if session_dir is not None:
    (session_dir / "summary.json").write_text(json.dumps(_finite_or_none(summary), indent=1) + "\n")
  return summary


def _finite_or_none(tree):
  """JSON has no NaN: undefined numbers become null."""
  if isinstance(tree, dict):
    return {k: _finite_or_none(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_finite_or_none(v) for v in tree]
  if isinstance(tree, (float, np.floating)):
    return float(tree) if math.isfinite(tree) else None
  if isinstance(tree, np.integer):
    return int(tree)
  return tree


def _eval_config(config) -> dict:
  """The run's `eval` section over DEFAULTS (runs written before the section existed have none)."""
  section = config.get("eval")
  return {**DEFAULTS, **(section.to_dict() if section is not None else {})}


def load_eval_sessions(run: runs.Run, sessions: str | Sequence[str] | None = None) -> list[sessions_lib.Session]:
  """The sessions to evaluate (default: the run's own), read as the run read them, with its region ids.

  Raises:
    EvalError: a session the checkpoint has no stitching for, or whose neurons do not match it.
  """
  d = run.config.data
  corpus = sessions_lib.load_corpus(
      run.sources if sessions is None else sessions, region_vocab=run.region_vocab, with_true_rates=True,
      cache_dir=d.get("cache_dir"), trial_filter=d.get("trial_filter"),
      regions=d.regions.split(",") if d.get("regions") else None, neuron_order=d.get("neuron_order") or "none")
  for s in corpus.sessions:
    idx = run.session_index(s.eid)
    if idx is None:
      raise EvalError(f"session {s.eid}: the checkpoint {run.run_dir} has no stitching for it (trained on "
                      f"{len(run.eids)} other sessions); fine-tune on it first: python -m ibl_jax.finetune")
    if s.num_neurons != run.num_neurons[idx]:
      raise EvalError(f"session {s.eid}: {s.num_neurons} neurons, but the checkpoint's stitching for it has "
                      f"{run.num_neurons[idx]} (read with other data.regions/neuron_order/trial_filter?)")
    s.session_idx = idx
  return corpus.sessions


def evaluate_run(checkpoint: str | Path, sessions: str | Sequence[str] | None = None,
                 tasks: str | Sequence[str] | None = None, out_dir: str | Path | None = None,
                 chunk_size: int | None = None, *, figures: bool | None = None,
                 progress: bool = True) -> dict[str, dict]:
  """Evaluates a run's checkpoint on sessions it has stitching for; returns {eid: summary}.

  Args:
    checkpoint: a run directory (its best checkpoint), or `RUN_DIR/checkpoints/<step>`.
    sessions: a directory, eids file or comma list of sessions; default the run's training sessions.
    tasks: default the run's `eval.tasks`.
    out_dir: default `RUN_DIR/eval`.
    chunk_size: default the run's `eval.chunk_size`; 0 or less: `auto_chunk_size`.
    figures: default the run's `eval.figures`.
  """
  run = runs.open_run(checkpoint)
  ev = _eval_config(run.config)
  tasks = parse_tasks(tasks or ev["tasks"])
  chunk_size = int(chunk_size or ev["chunk_size"])
  session_list = load_eval_sessions(run, sessions)
  graphdef, params, step = runs.load_params(run, runs.step_of(checkpoint))
  mesh = parallel.make_mesh()
  if chunk_size <= 0:
    chunk_size = auto_chunk_size(run.config.model, max(s.num_bins for s in session_list), run.n_max,
                                 mesh.devices.flatten())
  chunk_size = math.ceil(chunk_size / mesh.devices.size) * mesh.devices.size  # whole shards per device
  predict = model_predict(graphdef, params, mesh)
  out_dir = Path(out_dir) if out_dir else run.run_dir / "eval"
  if jax.process_index() != 0:
    out_dir = None  # every process computes; process 0 writes
  return {s.eid: evaluate_session(predict, s, s.session_idx, run.n_max, tasks, out_dir, chunk_size=chunk_size,
                                  forward_bins=int(ev["forward_bins"]),
                                  figures=ev["figures"] if figures is None else figures, progress=progress,
                                  meta={"checkpoint": str(run.run_dir), "step": int(step)})
          for s in session_list}


# ------------------------------------------------------------------------------------------------ figures


def _save_figures(fig_dir: Path, task: str, arrays: dict, rates_KxTxN, session) -> None:
  """bps histogram (model vs oracle); for co-smoothing also the best and worst neurons' mean rates."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from ibl_jax import monitor  # pylint: disable=g-import-not-at-top
  fig_dir.mkdir(parents=True, exist_ok=True)
  bps_N = arrays["bps"]
  finite = np.flatnonzero(np.isfinite(bps_N))
  if not finite.size:
    return
  fig, ax = plt.subplots(figsize=(4, 3))
  series = [("model", bps_N)] + ([("oracle", arrays["oracle_bps"])] if "oracle_bps" in arrays else [])
  values = np.concatenate([v[np.isfinite(v)] for _, v in series])
  bins = np.linspace(values.min(), values.max() + 1e-9, 30)
  for label, v in series:
    ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.6, label=f"{label} (mean {np.nanmean(v):.3f})")
  ax.set_xlabel("bits per spike")
  ax.set_ylabel("neurons")
  ax.set_title(f"{session.eid[:8]} {task}", fontsize=9)
  ax.legend(fontsize=7, frameon=False)
  fig.tight_layout()
  fig.savefig(fig_dir / f"{task}_bps.png", dpi=100)
  plt.close(fig)
  if rates_KxTxN is None:
    return
  order = finite[np.argsort(bps_N[finite])]
  show = np.asarray(list(dict.fromkeys([*order[::-1][:2], *order[:2]])))  # best two, then worst two
  test = session.splits["test"]
  fig = monitor.rates_figure(
      rates_KxTxN[:, :, show], test.spikes[:, :, show].astype(np.float64),
      None if test.true_rates is None else test.true_rates[:, :, show],
      [f"{session.regions[n]} #{n}: {bps_N[n]:.2f} bps" for n in show])
  fig.savefig(fig_dir / f"{task}_psth.png", dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m ibl_jax.evaluate", description=__doc__.split("\n\n")[0],
                              epilog="Writes OUT/<eid>/<task>.npz, OUT/<eid>/summary.json and OUT/<eid>/figures/.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="run directory (its best checkpoint) or RUN_DIR/checkpoints/<step>")
  p.add_argument("--sessions", default=None,
                 help="sessions to evaluate: a directory, an eids file or a comma list (default: the sessions the "
                      "checkpoint was trained on); each needs stitching in the checkpoint")
  p.add_argument("--tasks", default=None, help=f"comma list from {','.join(TASKS)} (default: the run's eval.tasks)")
  p.add_argument("--out", default=None, help="output root (default: RUN_DIR/eval)")
  p.add_argument("--chunk-size", type=int, default=None,
                 help="held-out inputs per compiled forward call (default: the run's eval.chunk_size; "
                      "0: automatic, 32 per CPU device or sized to accelerator memory)")
  p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=None,
                 help="write figures (default: the run's eval.figures)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def _line(task: str, s: dict) -> str:
  fmt = lambda key: "  n/a" if s.get(key) is None or not math.isfinite(s[key]) else f"{s[key]:.3f}"
  if task == "behaviour":
    return (f"choice acc {fmt('choice_accuracy')} (oracle {fmt('oracle_choice_accuracy')}, chance "
            f"{fmt('choice_chance')})  whisker R² {fmt('whisker_r2')} ({fmt('oracle_whisker_r2')})  wheel R² "
            f"{fmt('wheel_r2')} ({fmt('oracle_wheel_r2')})")
  return (f"bps per neuron {fmt('bps_per_neuron')} (oracle {fmt('oracle_bps_per_neuron')})  pooled "
          f"{fmt('bps_pooled')} ({fmt('oracle_bps_pooled')})  PSTH R² {fmt('r2_psth_mean')} "
          f"({fmt('oracle_r2_psth_mean')})  trial R² {fmt('r2_trial_mean')} ({fmt('oracle_r2_trial_mean')})")


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on opening a checkpoint read-only
  try:
    summaries = evaluate_run(args.checkpoint, sessions=args.sessions, tasks=args.tasks, out_dir=args.out,
                             chunk_size=args.chunk_size, figures=args.figures, progress=not args.no_progress)
  except (EvalError, SessionError, FileNotFoundError) as e:
    print(f"error: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
    return 2
  for eid, summary in summaries.items():
    print(f"session {eid} ({summary['n_neurons']} neurons, {summary['n_trials']} test trials)")
    for task, scores in summary["tasks"].items():
      print(f"  {task:<13} {_line(task, scores)}  [{scores['wall_s']:.1f} s]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
