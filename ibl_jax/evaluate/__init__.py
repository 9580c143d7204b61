"""The evaluation suite (docs/design.md §7) on a session's test split: four held-out prediction tasks and decoding.

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
`d2` (Poisson deviance explained, the IBL BrainWideBench's score), `r2_psth` (conditions choice × block ×
reward; one condition when the session has no such columns), `r2_trial`. The summary gives `bps_per_neuron`
(the mean of per-neuron bps: the paper's number), `bps_pooled` (the NLB's) and `d2_mean`, means and stds. The
same metrics of the baseline (`ibl_jax.baselines`: smoothing + ridge for held-out neurons, the condition PSTH
for forward prediction, fit on train + val) are the `baseline_*`, and with true rates (synthetic sessions) those
of the true rates are the `oracle_*`.

Behaviour decoding (`eval.decoding`, `decoding.py`). `paper` (the default): the MtM paper's protocol — features
are the predicted log-rates flattened over bins × neurons; choice (and block) by logistic regression, C 1e-4 … 1e4;
whisker motion energy and wheel speed by one multi-output ridge over the whole trace, alpha in {0, 10, …, 1e4};
choice read under the neuron prompt, the traces under the causal prompt. `ours`: each neuron's rate averaged in
`CHOICE_WINDOWS` windows → standardised L2 logistic regression; traces per (trial, bin) from that bin's N rates →
standardised ridge. Regularisation by 4-fold cross-validation on train + val; scores on test;
`eval.decoding_trial_filter` keeps trials for decoding only. The oracle decodes the true rates with the same
decoders; `spikes_*` the smoothed raw spikes, `rrr_*` reduced-rank regression from them to each trace.

Outputs under `OUT/<eid>/`: `<task>.npz` (per-neuron `bps`, `d2`, `r2_psth`, `r2_trial`, `n_spikes`, neuron
`uuids`, `regions`, `region_ids`, `baseline_*`, and `oracle_*` when known; behaviour: test targets and decoded values), `summary.json`
and, with figures on, `figures/` (bps and D² histograms per task, model, baseline and oracle, trial-averaged rates of the best and worst
co-smoothed neurons).

Modules: `tasks` (which inputs each task hides and scores; per-neuron scoring), `heldout` (batching every
(trial, variant) input through one compiled forward), `decoding` (behaviour decoders), `suite` (a session, a
run), `cli` (the command line). This package re-exports their public names.
"""

from ibl_jax.evaluate.decoding import (CHOICE_C, CHOICE_WINDOWS, CV_FOLDS, RIDGE_ALPHA, TRACES, choice_features,
                                       decode_behaviour, decode_choice, decode_trace)
from ibl_jax.evaluate.heldout import (CPU_ACTIVATION_BYTES, CPU_CHUNK_PER_DEVICE, MAX_CHUNK_PER_DEVICE, Predict,
                                      auto_chunk_size, chunk_plan, heldout_log_rates, make_predict, model_predict)
from ibl_jax.evaluate.suite import evaluate_run, evaluate_session, load_eval_sessions
from ibl_jax.evaluate.tasks import (CONDITION_COLUMNS, DEFAULTS, PROMPT, SPLIT_ORDER, TASKS, EvalError, LeaveOut,
                                    conditions_of, leave_out, neuron_metrics, parse_tasks, summarise, trial_offsets)
from ibl_jax.evaluate.cli import main
