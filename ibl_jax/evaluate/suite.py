"""The suite: every task on a session (`evaluate_session`), a run's checkpoint on its sessions (`evaluate_run`)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from ibl_jax import baselines, parallel, runs
from ibl_jax.data import sessions as sessions_lib
from ibl_jax.evaluate.decoding import TRACES, _behaviour_task
from ibl_jax.evaluate.heldout import Predict, auto_chunk_size, heldout_log_rates, model_predict
from ibl_jax.evaluate.tasks import (DEFAULTS, EvalError, LeaveOut, _score_neural, conditions_across, conditions_of,
                                    leave_out, parse_tasks, trial_offsets)

# ------------------------------------------------------------------------------------- sessions and runs


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def evaluate_session(predict: Predict, session: sessions_lib.Session, session_idx: int, n_max: int,
                     tasks: str | Sequence[str] | None, out_dir: str | Path | None, *, chunk_size: int,
                     forward_bins: int = DEFAULTS["forward_bins"], figures: bool = False, progress: bool = True,
                     baseline: bool = DEFAULTS["baseline"], meta: dict | None = None,
                     decoding: str = DEFAULTS["decoding"], decoding_trial_filter=None) -> dict:
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
    baseline: also score the baseline of each neural task (`baselines.py`, fit on train+val; `baseline_*`).
    meta: extra top-level entries of the summary (e.g. the checkpoint).
    decoding: the behaviour protocol, "ours" or "paper" (ibl_jax/evaluate/decoding.py).
    decoding_trial_filter: trials kept for behaviour decoding only (data.trial_filter's formats).
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
  fit_splits = [session.splits[s] for s in ("train", "val") if s in session.splits]
  baseline = baseline and bool(fit_splits)
  cv_choice: dict = {}  # the baseline's kernel and penalty, chosen by CV on the first held-out task
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
                                       progress=progress, fit_splits=fit_splits, protocol=decoding,
                                       trial_filter=decoding_trial_filter, spike_baseline=baseline)
    else:
      spec = leave_out(task, session.regions, T, forward_bins)
      log_rates_KxTxN = heldout_log_rates(predict, spec, test.spikes, session_idx=session_idx,
                                          trial_idx_K=trial_idx_K, n_max=n_max, chunk_size=chunk_size,
                                          desc=f"{session.eid[:8]} {task}", progress=progress)
      base_KxTxN, base_info = _baseline(task, spec, fit_splits, test, cv_choice) if baseline else (None, {})
      arrays, scores = _score_neural(log_rates_KxTxN, test, spec, conditions_K, base_KxTxN)
      scores.update(base_info)
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


def _baseline(task: str, spec: LeaveOut, fit_splits, test, cv_choice: dict) -> tuple[np.ndarray, dict]:
  """The baseline's test rates [K, T, N] for a neural task, fit on train+val, and what it chose.

  Held-out tasks share the kernel width and penalty chosen by cross-validation on the first of them
  (`cv_choice`, filled here), so only that one pays for the search.
  """
  t0 = time.time()
  fit_KxTxN = np.concatenate([sp.spikes for sp in fit_splits]).astype(np.float64)
  if task == "forward_pred":
    *fit_conditions, test_conditions = conditions_across([*fit_splits, test])
    rates_KxTxN = baselines.psth_baseline(fit_KxTxN, np.concatenate(fit_conditions), test_conditions,
                                          scored_T=spec.scored_T)
    return rates_KxTxN, {"baseline_wall_s": time.time() - t0}
  grid = {"sigmas": [cv_choice["sigma"]], "alphas": [cv_choice["alpha"]]} if cv_choice else {}
  rates_KxTxN, model = baselines.heldout_baseline(fit_KxTxN, test.spikes, spec.keep_VxN, spec.target_VxN, **grid)
  cv_choice.setdefault("sigma", model.sigma)
  cv_choice.setdefault("alpha", model.alpha)
  return rates_KxTxN, {"baseline_wall_s": time.time() - t0, "baseline_sigma_bins": model.sigma,
                       "baseline_alpha": model.alpha}


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
      cache_dir=d.get("cache_dir"), array_cache=d.get("array_cache"), trial_filter=d.get("trial_filter"),
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
                 chunk_size: int | None = None, *, figures: bool | None = None, baseline: bool | None = None,
                 progress: bool = True, decoding: str | None = None) -> dict[str, dict]:
  """Evaluates a run's checkpoint on sessions it has stitching for; returns {eid: summary}.

  Args:
    checkpoint: a run directory (its best checkpoint), or `RUN_DIR/checkpoints/<step>`.
    sessions: a directory, eids file or comma list of sessions; default the run's training sessions.
    tasks: default the run's `eval.tasks`.
    out_dir: default `RUN_DIR/eval`.
    chunk_size: default the run's `eval.chunk_size`; 0 or less: `auto_chunk_size`.
    figures: default the run's `eval.figures`.
    baseline: default the run's `eval.baseline`.
    decoding: the behaviour protocol, default the run's `eval.decoding` ("ours" | "paper").
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
  # One session at a time: each is read into memory for its evaluation and dropped after (a large corpus's maps
  # would otherwise keep every evaluated session's pages in the process's RSS).
  return {s.eid: evaluate_session(predict, sessions_lib.in_memory(s), s.session_idx, run.n_max, tasks, out_dir,
                                  chunk_size=chunk_size,
                                  forward_bins=int(ev["forward_bins"]), baseline=bool(ev["baseline"] if baseline is None else baseline),
                                  figures=ev["figures"] if figures is None else figures, progress=progress,
                                  meta={"checkpoint": str(run.run_dir), "step": int(step)},
                                  decoding=decoding or ev["decoding"] or DEFAULTS["decoding"],
                                  decoding_trial_filter=ev["decoding_trial_filter"])
          for s in session_list}


# ------------------------------------------------------------------------------------------------ figures


def _save_figures(fig_dir: Path, task: str, arrays: dict, rates_KxTxN, session) -> None:
  """bps and D² histograms (model, baseline, oracle); for co-smoothing also the best and worst neurons' rates."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from ibl_jax import monitor  # pylint: disable=g-import-not-at-top
  fig_dir.mkdir(parents=True, exist_ok=True)
  bps_N = arrays["bps"]
  finite = np.flatnonzero(np.isfinite(bps_N))
  if not finite.size:
    return
  fig, axes = plt.subplots(1, 2, figsize=(8, 3))
  for ax, (metric, xlabel) in zip(axes, (("bps", "bits per spike"), ("d2", "Poisson D²"))):
    series = [(name, arrays[f"{prefix}{metric}"]) for name, prefix in (("model", ""), ("baseline", "baseline_"),
                                                                      ("oracle", "oracle_"))
              if f"{prefix}{metric}" in arrays and np.isfinite(arrays[f"{prefix}{metric}"]).any()]
    if not series:
      continue
    values = np.concatenate([v[np.isfinite(v)] for _, v in series])
    bins = np.linspace(values.min(), values.max() + 1e-9, 30)
    for label, v in series:
      ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.5, label=f"{label} (mean {np.nanmean(v):.3f})")
    ax.set_xlabel(xlabel)
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
