"""Supervised decoding heads: scores of the head's outputs (validation in the loop, test after fine-tuning).

Metrics, per target (short names as in the behaviour task: choice, block, wheel, whisker):
  classes  `<t>_accuracy`, `<t>_balanced_accuracy` (mean recall over the classes present: chance 1/classes),
           and `<t>_chance` (the majority class of the fit trials, scored like a prediction)
  traces   `<t>_r2`: R² over the scored trials × bins of a session (standardised values; R² is unchanged)
`decode_score` is the mean over targets of the balanced accuracy or the R² (validation: the best checkpoint's
metric, `training.best_metric=decode_score`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from ibl_jax import metrics
from ibl_jax.data import batches as batches_lib
from ibl_jax.models import heads

SHORT = {"choice": "choice", "block": "block", "wheel-speed": "wheel", "whisker-motion-energy": "whisker"}
TASK = "supervised"  # the evaluation summary's task name for the head's test scores


def gather(decode, params, batches, targets) -> tuple[dict, dict, np.ndarray]:
  """Runs `decode(params, batch)` over batches; returns (outputs, labels, session_idx_M) over the real rows."""
  outputs, labels, sessions = {t: [] for t in targets}, {}, []
  for batch in batches:
    out = jax.device_get(decode(params, batch))
    real_M = np.asarray(batch["time_mask"]).any(1)
    sessions.append(np.asarray(batch["session_idx"])[real_M])
    for t in targets:
      outputs[t].append(np.asarray(out[t])[real_M])
      for key in (t, f"{t}_mask"):
        if key in batch:
          labels.setdefault(key, []).append(np.asarray(batch[key])[real_M])
  cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}
  return cat(outputs), cat(labels), np.concatenate(sessions)


def scores(outputs: dict, labels: dict, session_idx_M: np.ndarray, targets) -> dict[str, float]:
  """The metrics above, pooled over the given rows (per session for R², then averaged)."""
  out, headline = {}, []
  for t in targets:
    name = SHORT[t]
    if t in heads.CLASSES:
      y_M = labels[t]
      scored = y_M >= 0
      pred_M = outputs[t].argmax(-1)
      out[f"{name}_accuracy"] = metrics.accuracy(pred_M[scored], y_M[scored])
      out[f"{name}_balanced_accuracy"] = metrics.balanced_accuracy(pred_M[scored], y_M[scored])
      headline.append(out[f"{name}_balanced_accuracy"])
    else:
      per_session = [metrics.r2(labels[t][rows], outputs[t][rows], labels[f"{t}_mask"][rows])
                     for rows in (session_idx_M == s for s in np.unique(session_idx_M))]
      out[f"{name}_r2"] = float(np.nanmean(per_session)) if np.isfinite(per_session).any() else math.nan
      headline.append(out[f"{name}_r2"])
  finite = [v for v in headline if math.isfinite(v)]
  out["decode_score"] = float(np.mean(finite)) if finite else math.nan
  return out


def evaluate_head(decode, params, corpus, targets, batch_size: int, out_dir: Path | None,
                  meta: dict | None = None) -> dict[str, dict]:
  """The head's test scores per session; merged into `out_dir/<eid>/summary.json` as task TASK, with
  `out_dir/<eid>/supervised.npz` (test labels and predictions; traces back in the data's units)."""
  results = {}
  for session in corpus.sessions:
    if "test" not in session.splits:
      continue
    t0 = time.time()
    batches = batches_lib.sequential_batches(corpus, "test", batch_size, sessions=[session.session_idx],
                                             behaviours=targets)
    outputs, labels, session_idx_M = gather(decode, params, batches, targets)
    task = scores(outputs, labels, session_idx_M, targets)
    arrays = {}
    for t in targets:
      name = SHORT[t]
      if t in heads.CLASSES:
        values = np.asarray(heads.CLASSES[t])
        arrays[f"{name}_true"] = session.splits["test"].behaviour.get(t, np.full(len(session_idx_M), np.nan))
        arrays[f"{name}_pred"] = values[outputs[t].argmax(-1)]
        arrays[f"{name}_logits"] = outputs[t]
        fit_split = session.splits.get("train")
        if fit_split is not None and t in fit_split.behaviour:
          fit = batches_lib.class_index(fit_split.behaviour[t], t)
          majority = np.bincount(fit[fit >= 0], minlength=len(values)).argmax()
          scored = labels[t] >= 0
          task[f"{name}_chance"] = metrics.accuracy(np.full(scored.sum(), majority), labels[t][scored])
      else:
        mean, std = batches_lib.trace_scale(session, t)
        arrays[f"{name}_true"] = labels[t] * std + mean
        arrays[f"{name}_pred"] = outputs[t] * std + mean
        arrays[f"{name}_mask"] = labels[f"{t}_mask"]
    task.update(n_trials=int(len(session_idx_M)), wall_s=time.time() - t0)
    results[session.eid] = task
    if out_dir is not None:
      d = Path(out_dir) / session.eid
      d.mkdir(parents=True, exist_ok=True)
      np.savez(d / f"{TASK}.npz", **arrays)
      path = d / "summary.json"
      summary = json.loads(path.read_text()) if path.exists() else {"eid": session.eid, "tasks": {}}
      summary.update(meta or {})
      summary["tasks"][TASK] = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                for k, v in task.items()}
      path.write_text(json.dumps(summary, indent=1) + "\n")
  return results
