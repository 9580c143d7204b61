"""The evaluation tasks: which inputs each hides and scores (`LeaveOut`), and per-neuron scoring."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ibl_jax import masking, metrics
from ibl_jax.errors import UserError
from ibl_jax.data import sessions as sessions_lib

TASKS = ("co_smooth", "forward_pred", "inter_region", "intra_region", "behaviour")
SPLIT_ORDER = ("train", "val", "test")  # trial_idx numbers the session's trials in this order
DEFAULTS = {"tasks": ",".join(TASKS), "chunk_size": 0, "forward_bins": 10, "figures": True,
            "baseline": True, "decoding": "paper", "decoding_trial_filter": None}  # configs/ndt1.py

PROMPT = {"neuron": masking.PROMPT_IDX[0], "causal": masking.PROMPT_IDX[1],
          "inter_region": masking.PROMPT_IDX[2], "intra_region": masking.PROMPT_IDX[3]}
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


def _unmasked(num_neurons: int, num_bins: int, prompt: str = "neuron") -> LeaveOut:
  """One variant that hides nothing and scores everything: the behaviour features (prompt causal: causal too)."""
  ones_1xN, all_T = np.ones((1, num_neurons), bool), np.ones(num_bins, bool)
  return LeaveOut(PROMPT[prompt], prompt == "causal", ones_1xN, ones_1xN, all_T, all_T)


def parse_tasks(tasks: str | Sequence[str] | None) -> tuple[str, ...]:
  """Task names from a comma list or a sequence, in the given order (default all)."""
  names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks or TASKS) if t.strip()]
  unknown = [t for t in names if t not in TASKS]
  if unknown or not names:
    raise EvalError(f"{f'unknown task {unknown[0]!r}' if unknown else 'no task given'}; choose from "
                    f"{', '.join(TASKS)}")
  return tuple(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------ metrics


def trial_offsets(session: sessions_lib.Session) -> dict[str, int]:
  """Index of each split's first trial when the session's trials are numbered in SPLIT_ORDER."""
  offsets, total = {}, 0
  for name in SPLIT_ORDER:
    if name in session.splits:
      offsets[name], total = total, total + session.splits[name].spikes.shape[0]
  return offsets


def conditions_across(splits: Sequence[sessions_lib.Split]) -> list[np.ndarray]:
  """PSTH conditions [K] of several splits with one labelling (a label means the same triple in each)."""
  if not all(c in sp.behaviour for sp in splits for c in CONDITION_COLUMNS):
    return [np.zeros(sp.spikes.shape[0], np.int64) for sp in splits]
  labels = metrics.conditions_from_behaviour(*(np.concatenate([sp.behaviour[c] for sp in splits])
                                                for c in CONDITION_COLUMNS))
  return np.split(labels, np.cumsum([sp.spikes.shape[0] for sp in splits])[:-1])


def conditions_of(split: sessions_lib.Split) -> np.ndarray:
  """PSTH conditions [K]: choice × block × reward, or a single condition when a column is missing."""
  if all(c in split.behaviour for c in CONDITION_COLUMNS):
    return metrics.conditions_from_behaviour(*(split.behaviour[c] for c in CONDITION_COLUMNS))
  return np.zeros(split.spikes.shape[0], np.int64)


def neuron_metrics(rates_KxTxN: np.ndarray, spikes_KxTxN: np.ndarray, conditions_K: np.ndarray,
                   prefix: str = "") -> dict[str, np.ndarray]:
  """Per-neuron bps, Poisson D², PSTH R² and single-trial R² (float64 [N]) over all given entries."""
  return {f"{prefix}bps": metrics.bits_per_spike(rates_KxTxN, spikes_KxTxN),
          f"{prefix}d2": metrics.poisson_d2(rates_KxTxN, spikes_KxTxN),
          f"{prefix}r2_psth": metrics.r2_psth(rates_KxTxN, spikes_KxTxN, conditions_K),
          f"{prefix}r2_trial": metrics.r2_trial(rates_KxTxN, spikes_KxTxN)}


def _mean_std(x: np.ndarray) -> tuple[float, float]:
  """Mean and std over the finite values (NaN: an undefined neuron, e.g. without spikes)."""
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  return (float(x.mean()), float(x.std())) if x.size else (math.nan, math.nan)


SCORED = ("", "baseline_", "oracle_")  # the model, the smoothing/PSTH baseline, the true rates


def summarise(arrays: dict[str, np.ndarray], pooled: dict[str, float]) -> dict[str, float]:
  """Means and stds of the per-neuron arrays, named `bps_per_neuron`/`bps_std`, `d2_mean`/`_std`, ...

  For the model, and with their prefix for the baseline and the oracle where present.
  """
  out = {}
  for prefix in SCORED:
    if f"{prefix}bps" not in arrays:
      continue
    out[f"{prefix}bps_per_neuron"], out[f"{prefix}bps_std"] = _mean_std(arrays[f"{prefix}bps"])
    out[f"{prefix}bps_pooled"] = pooled[prefix]
    for name in ("d2", "r2_psth", "r2_trial"):
      out[f"{prefix}{name}_mean"], out[f"{prefix}{name}_std"] = _mean_std(arrays[f"{prefix}{name}"])
  out["n_neurons_scored"] = int(np.isfinite(arrays["bps"]).sum())
  return out


def _score_neural(log_rates_KxTxN, split: sessions_lib.Split, spec: LeaveOut, conditions_K,
                  baseline_rates_KxTxN: np.ndarray | None = None):
  """Per-neuron arrays and summary of one neural task, over the scored bins (and of the baseline's rates)."""
  spikes_KxTxN = split.spikes[:, spec.scored_T].astype(np.float64)
  rates_KxTxN = np.exp(log_rates_KxTxN[:, spec.scored_T].astype(np.float64))
  arrays = neuron_metrics(rates_KxTxN, spikes_KxTxN, conditions_K)
  arrays["n_spikes"] = spikes_KxTxN.sum(axis=(0, 1))
  pooled = {"": metrics.bps_pooled(rates_KxTxN, spikes_KxTxN)}
  if baseline_rates_KxTxN is not None:
    base_KxTxN = np.asarray(baseline_rates_KxTxN, np.float64)[:, spec.scored_T]
    arrays.update(neuron_metrics(base_KxTxN, spikes_KxTxN, conditions_K, prefix="baseline_"))
    pooled["baseline_"] = metrics.bps_pooled(base_KxTxN, spikes_KxTxN)
  if split.true_rates is not None:
    true_KxTxN = split.true_rates[:, spec.scored_T].astype(np.float64)
    arrays.update(neuron_metrics(true_KxTxN, spikes_KxTxN, conditions_K, prefix="oracle_"))
    pooled["oracle_"] = metrics.bps_pooled(true_KxTxN, spikes_KxTxN)
  return arrays, summarise(arrays, pooled)
