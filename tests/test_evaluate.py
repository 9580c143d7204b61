"""Evaluation suite: oracle stubs reach the oracle, batching changes nothing, inputs hide what each task says."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibl_jax import baselines, configs, evaluate, metrics, steps as steps_lib, train
from ibl_jax.data import sessions as sessions_lib
from ibl_jax.data import synthetic

from conftest import REPO, tiny_config

NEURAL_TASKS = evaluate.TASKS[:4]


@pytest.fixture(scope="module")
def corpus(corpus_dir):
  return sessions_lib.load_corpus(str(corpus_dir / "train_eids.txt"), with_true_rates=True)


def all_trials(session, field):
  """A per-trial array of every split, in the trial numbering `Predict` receives (evaluate.SPLIT_ORDER)."""
  return np.concatenate([getattr(session.splits[s], field) for s in evaluate.SPLIT_ORDER if s in session.splits])


def stub(session, rates_of_trials, calls=None):
  """A `Predict` returning log(rates_of_trials[trial_idx]) (zero-padded neurons get log-rate 0).

  With `calls`, it records every chunk's (inputs, trial_idx, prompt, causal); run it under `jax.disable_jit()`.
  """
  log_rates_KxTxN = np.log(np.maximum(rates_of_trials, 1e-9)).astype(np.float32)

  def fn(log_rates_KxTxN, inputs_BxTxN, time_mask_BxT, session_idx_B, trial_idx_B, prompt_idx, causal):
    del time_mask_BxT, session_idx_B
    if calls is not None:
      calls.append((np.array(inputs_BxTxN), np.array(trial_idx_B), int(prompt_idx), bool(causal)))
    out_BxTxN = log_rates_KxTxN[trial_idx_B]
    return jnp.pad(out_BxTxN, ((0, 0), (0, 0), (0, inputs_BxTxN.shape[2] - out_BxTxN.shape[2])))

  return evaluate.make_predict(fn, log_rates_KxTxN)


def true_rates_stub(session, calls=None):
  return stub(session, all_trials(session, "true_rates"), calls)


@pytest.fixture(scope="module")
def stub_run(corpus, tmp_path_factory):
  """Every task with the true-rate stub on one session (n_max > N: padded neurons), written with figures."""
  session = corpus.sessions[0]
  out = tmp_path_factory.mktemp("eval")
  summary = evaluate.evaluate_session(true_rates_stub(session), session, 0, session.num_neurons + 3, None, out,
                                      chunk_size=16, figures=True, progress=False)
  return session, out / session.eid, summary


def test_true_rates_score_the_oracle_on_every_neural_task(stub_run):
  session, session_dir, summary = stub_run
  for task in NEURAL_TASKS:
    with np.load(session_dir / f"{task}.npz") as f:
      for name in ("bps", "d2", "r2_psth", "r2_trial"):
        np.testing.assert_allclose(f[name], f[f"oracle_{name}"], rtol=1e-5, atol=1e-6, err_msg=f"{task} {name}")
    s = summary["tasks"][task]
    assert s["bps_per_neuron"] == pytest.approx(s["oracle_bps_per_neuron"], rel=1e-6), task
    assert s["bps_pooled"] == pytest.approx(s["oracle_bps_pooled"], rel=1e-6), task
    assert s["oracle_bps_per_neuron"] > 0.05, task  # the synthetic neurons are modulated
    assert s["d2_mean"] == pytest.approx(s["oracle_d2_mean"], rel=1e-5), task
    assert 0 < s["oracle_d2_mean"] < 1, task  # Poisson noise leaves deviance that even the true rates keep


def test_the_baseline_is_fit_on_train_and_val_and_scored_on_the_test_split(stub_run):
  session, session_dir, summary = stub_run
  fit_KxTxN = np.concatenate([session.splits[s].spikes for s in ("train", "val")]).astype(np.float64)
  test = session.splits["test"]
  cs = summary["tasks"]["co_smooth"]
  spec = evaluate.leave_out("co_smooth", session.regions, test.spikes.shape[1])
  rates, model = baselines.heldout_baseline(fit_KxTxN, test.spikes, spec.keep_VxN, spec.target_VxN)
  assert (cs["baseline_sigma_bins"], cs["baseline_alpha"]) == (model.sigma, model.alpha)
  with np.load(session_dir / "co_smooth.npz") as f:
    np.testing.assert_allclose(f["baseline_bps"], metrics.bits_per_spike(rates, test.spikes), rtol=1e-9)
    np.testing.assert_allclose(f["baseline_d2"], metrics.poisson_d2(rates, test.spikes), rtol=1e-9)
  for task in NEURAL_TASKS:  # below the true rates (on these 24-trial sessions it can be below the mean rate)
    s = summary["tasks"][task]
    assert s["baseline_bps_per_neuron"] < s["oracle_bps_per_neuron"], task
    assert s["baseline_d2_mean"] < s["oracle_d2_mean"], task
  # Forward prediction: the condition PSTHs of train+val trials, scored on the predicted bins only.
  fp = evaluate.leave_out("forward_pred", session.regions, test.spikes.shape[1])
  *fit_c, test_c = evaluate.tasks.conditions_across([session.splits["train"], session.splits["val"], test])
  psth = baselines.psth_baseline(fit_KxTxN, np.concatenate(fit_c), test_c, scored_T=fp.scored_T)
  with np.load(session_dir / "forward_pred.npz") as f:
    np.testing.assert_allclose(f["baseline_bps"], metrics.bits_per_spike(psth[:, fp.scored_T],
                                                                         test.spikes[:, fp.scored_T]), rtol=1e-9)


def test_conditions_across_splits_share_one_labelling():
  split = lambda choice, block, reward: sessions_lib.Split(
      np.zeros((len(choice), 2, 1), np.uint8), {"choice": np.array(choice, float), "block": np.array(block, float),
                                                "reward": np.array(reward, float)})
  a, b = evaluate.tasks.conditions_across([split([1, -1], [0.2, 0.8], [1, 0]), split([-1, 1, 1], [0.8, 0.5, 0.2],
                                                                                      [0, 1, 1])])
  # a = ((1, .2, 1), (−1, .8, 0)), b = ((−1, .8, 0), (1, .5, 1), (1, .2, 1)): equal triples, equal labels.
  assert a[0] == b[2] and a[1] == b[0] and len({*a.tolist(), *b.tolist()}) == 3


def test_outputs_have_the_stated_keys_and_shapes(stub_run):
  session, session_dir, _ = stub_run
  N = session.num_neurons
  for task in NEURAL_TASKS:
    with np.load(session_dir / f"{task}.npz") as f:
      assert {"bps", "d2", "r2_psth", "r2_trial", "uuids", "regions", "oracle_bps", "oracle_d2", "oracle_r2_psth",
              "oracle_r2_trial", "baseline_bps", "baseline_d2", "baseline_r2_psth"} <= set(f.files), task
      assert all(f[k].shape == (N,) for k in f.files), {k: f[k].shape for k in f.files}
      assert list(f["uuids"]) == list(session.uuids)
  with np.load(session_dir / "behaviour.npz") as f:
    assert {"choice_pred", "choice_true", "oracle_choice_pred", "whisker_pred", "wheel_pred"} <= set(f.files)
  summary = json.loads((session_dir / "summary.json").read_text())
  assert {"eid", "n_neurons", "n_trials", "tasks"} <= set(summary)
  assert set(summary["tasks"]) == set(evaluate.TASKS)
  for task in NEURAL_TASKS:
    assert {"bps_per_neuron", "bps_pooled", "bps_std", "r2_psth_mean", "r2_psth_std", "r2_trial_mean",
            "r2_trial_std", "oracle_bps_per_neuron", "oracle_bps_pooled", "oracle_r2_psth_mean",
            "oracle_r2_trial_mean", "n_neurons", "n_trials", "d2_mean", "d2_std", "oracle_d2_mean",
            "baseline_bps_per_neuron", "baseline_bps_pooled", "baseline_d2_mean", "baseline_r2_psth_mean",
            "baseline_wall_s"} <= set(summary["tasks"][task]), task
  assert {"choice_accuracy", "whisker_r2", "wheel_r2", "oracle_choice_accuracy", "oracle_whisker_r2",
          "oracle_wheel_r2"} <= set(summary["tasks"]["behaviour"])
  assert (session_dir / "figures" / "co_smooth_psth.png").exists()
  assert all((session_dir / "figures" / f"{t}_bps.png").exists() for t in NEURAL_TASKS)


def test_predicting_the_mean_count_scores_zero_bits(corpus):
  session = corpus.sessions[1]
  test = session.splits["test"]
  mean_N = test.spikes.astype(np.float64).mean(axis=(0, 1))
  K_all = sum(s.spikes.shape[0] for s in session.splits.values())
  flat = stub(session, np.broadcast_to(mean_N, (K_all, *test.spikes.shape[1:])))
  summary = evaluate.evaluate_session(flat, session, 0, session.num_neurons, ["co_smooth"], None, chunk_size=32,
                                      progress=False)
  assert summary["tasks"]["co_smooth"]["bps_per_neuron"] == pytest.approx(0.0, abs=1e-6)
  assert summary["tasks"]["co_smooth"]["bps_pooled"] == pytest.approx(0.0, abs=1e-6)


def _loop_log_rates(predict, spec, session, n_max):
  """The unbatched reference: one forward per variant with all test trials, keeping its target neurons."""
  test = session.splits["test"]
  K, T, N = test.spikes.shape
  trial_idx_K = evaluate.trial_offsets(session)["test"] + np.arange(K)
  forward = jax.jit(predict.fn)
  out_KxTxN = np.full((K, T, N), np.nan, np.float32)
  for keep_N, target_N in zip(spec.keep_VxN, spec.target_VxN):
    inputs_KxTxN = np.zeros((K, T, n_max), np.float32)
    inputs_KxTxN[:, :, :N] = test.spikes * keep_N[None, None, :] * spec.keep_T[None, :, None]
    log_rates = np.asarray(forward(predict.state, inputs_KxTxN, np.ones((K, T), bool), np.zeros(K, np.int32),
                                   trial_idx_K, spec.prompt_idx, spec.causal))
    out_KxTxN[:, :, target_N] = log_rates[:, :, :N][:, :, target_N]
  return out_KxTxN


def test_batched_leave_out_equals_an_unbatched_loop(corpus, corpus_dir, tmp_path):
  session = corpus.sessions[0]
  config = tiny_config(corpus_dir, tmp_path)
  model = steps_lib.build_model(config.model, num_sessions=len(corpus.sessions), n_max=corpus.n_max, seed=1)
  graphdef, params = steps_lib.split_params(model)
  real = evaluate.model_predict(graphdef, params)
  test = session.splits["test"]
  trial_idx_K = evaluate.trial_offsets(session)["test"] + np.arange(test.spikes.shape[0])
  stub_predict = true_rates_stub(session)
  for name, predict, reference in (("stub", stub_predict, stub_predict),
                                   ("ndt1", real, evaluate.model_predict(graphdef, params))):
    for task in NEURAL_TASKS:
      spec = evaluate.leave_out(task, session.regions, session.num_bins)
      batched = evaluate.heldout_log_rates(predict, spec, test.spikes, session_idx=0, trial_idx_K=trial_idx_K,
                                           n_max=corpus.n_max, chunk_size=24)
      looped = _loop_log_rates(reference, spec, session, corpus.n_max)
      np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5, err_msg=f"{name} {task}")
      conditions_K = evaluate.conditions_of(test)
      b = evaluate.neuron_metrics(np.exp(batched[:, spec.scored_T]), test.spikes[:, spec.scored_T], conditions_K)
      l = evaluate.neuron_metrics(np.exp(looped[:, spec.scored_T]), test.spikes[:, spec.scored_T], conditions_K)
      for key in b:
        np.testing.assert_allclose(b[key], l[key], rtol=1e-4, atol=1e-5, err_msg=f"{name} {task} {key}")
  assert real.step._cache_size() == 1  # every task, one compilation (prompt and causal are traced)
  # co_smooth and forward_pred (at most one neuron zeroed per variant) took the one-prefix-per-trial path
  assert real.prefix_step._cache_size() == 1


def test_ndt1_prefix_is_affine_in_each_neuron(corpus, corpus_dir, tmp_path):
  """The leave-one-out shortcut's premise: zeroing neuron n moves NDT1's pre-activation by its counts times
  `neuron_prefix[n]`, and the forward from that pre-activation equals the forward from the zeroed counts."""
  model = steps_lib.build_model(tiny_config(corpus_dir, tmp_path).model, num_sessions=len(corpus.sessions), n_max=corpus.n_max, seed=3)
  rng = np.random.default_rng(0)
  spikes = rng.poisson(0.5, (3, corpus.num_bins, corpus.n_max)).astype(np.float32)
  session_B = np.array([1, 1, 1], np.int32)
  n = 5
  zeroed = spikes.copy()
  zeroed[:, :, n] = 0
  base, direction = model.input_prefix(spikes, session_B), model.neuron_prefix(1)
  corrected = base - spikes[:, :, n, None] * direction[n][None, None, :]
  np.testing.assert_allclose(corrected, model.input_prefix(zeroed, session_B), rtol=1e-5, atol=1e-5)
  time_mask = np.ones(spikes.shape[:2], bool)
  np.testing.assert_allclose(model(spikes, time_mask, session_B, 0, False, prefix_BxTxE=corrected),
                             model(zeroed, time_mask, session_B, 0, False), rtol=1e-5, atol=1e-5)


def _calls(session, task, n_max):
  calls = []
  with jax.disable_jit():  # the stub sees each chunk's concrete inputs
    evaluate.evaluate_session(true_rates_stub(session, calls), session, 0, n_max, [task], None, chunk_size=16,
                              progress=False)
  return calls


def _inputs_by_trial(calls, session):
  """(trial index in the test split, input [T, n_max]) of every call row, padding rows included."""
  offset = evaluate.trial_offsets(session)["test"]
  return [(int(k) - offset, x) for inputs, trial_idx, _, _ in calls for k, x in zip(trial_idx, inputs)]


def test_inter_region_zeroes_exactly_one_whole_region(corpus):
  session = corpus.sessions[0]
  spikes = session.splits["test"].spikes.astype(np.float32)
  n_max = session.num_neurons + 3
  calls = _calls(session, "inter_region", n_max)
  assert {(p, c) for _, _, p, c in calls} == {(2, False)}
  seen = set()
  for k, x_TxN in _inputs_by_trial(calls, session):
    assert not x_TxN[:, session.num_neurons:].any()  # padded neurons stay zero
    hidden = [r for r in np.unique(session.regions)
              if np.array_equal(x_TxN[:, :session.num_neurons], spikes[k] * (session.regions != r))]
    assert len(hidden) >= 1, f"trial {k}: the input is not the counts with one region zeroed"
    seen.update((k, r) for r in hidden)
  assert seen == {(k, r) for k in range(len(spikes)) for r in np.unique(session.regions)}


def test_intra_region_feeds_only_the_region_without_the_held_out_neuron(corpus):
  session = corpus.sessions[0]
  spikes = session.splits["test"].spikes.astype(np.float32)
  N = session.num_neurons
  calls = _calls(session, "intra_region", N)
  assert {(p, c) for _, _, p, c in calls} == {(3, False)}
  seen = set()
  for k, x_TxN in _inputs_by_trial(calls, session):
    fed = [i for i in range(N)
           if np.array_equal(x_TxN, spikes[k] * ((session.regions == session.regions[i]) & (np.arange(N) != i)))]
    assert fed, f"trial {k}: the input is not one region with one of its neurons zeroed"
    seen.update((k, i) for i in fed)
  assert seen == {(k, i) for k in range(len(spikes)) for i in range(N)}


def test_forward_prediction_zeroes_the_last_bins_causally(corpus):
  session = corpus.sessions[0]
  spikes = session.splits["test"].spikes.astype(np.float32)
  calls = _calls(session, "forward_pred", session.num_neurons)
  assert {(p, c) for _, _, p, c in calls} == {(1, True)}
  for k, x_TxN in _inputs_by_trial(calls, session):
    np.testing.assert_array_equal(x_TxN[:-10], spikes[k][:-10])
    assert not x_TxN[-10:].any()


def _simulated_session(n_trials=200, n_neurons=30):
  """An IBL-like session with enough test trials for decoding, built in memory (no disk round trip)."""
  sim = synthetic.simulate_session(synthetic.make_brain(0), eid="sim", n_neurons=n_neurons,
                                   regions=["VISa", "LP", "PO"], n_trials=n_trials, seed=3)
  splits = {name: sessions_lib.Split(
      spikes=sim["counts_KxTxN"][idx], true_rates=sim["true_rates_KxTxN"][idx],
      behaviour={"choice": sim["choice"][idx], "block": sim["block"][idx], "reward": sim["reward"][idx],
                 "wheel-speed": sim["wheel_speed_KxT"][idx], "whisker-motion-energy": sim["whisker_KxT"][idx]})
      for name, idx in sim["splits"].items()}
  return sessions_lib.Session(eid="sim", source="memory", splits=splits, regions=sim["regions"],
                              depths=sim["depths"], uuids=sim["uuids"])


def test_behaviour_decoding_from_true_rates_beats_chance():
  session = _simulated_session()
  summary = evaluate.evaluate_session(true_rates_stub(session), session, 0, session.num_neurons, ["behaviour"],
                                      None, chunk_size=64, progress=False)
  b = summary["tasks"]["behaviour"]
  assert b["n_trials"] == len(session.splits["test"].spikes)
  assert b["choice_accuracy"] > max(0.75, b["choice_chance"] + 0.15), b
  assert b["choice_accuracy"] == b["oracle_choice_accuracy"]
  assert b["whisker_r2"] > 0.1 and b["wheel_r2"] > 0.1, b


def test_behaviour_is_skipped_with_a_warning_without_columns(corpus, capsys):
  session = dataclasses.replace(corpus.sessions[2], splits={  # an unaligned session: spikes only
      name: dataclasses.replace(split, behaviour={}) for name, split in corpus.sessions[2].splits.items()})
  summary = evaluate.evaluate_session(true_rates_stub(session), session, 0, session.num_neurons,
                                      "co_smooth,behaviour", None, chunk_size=64, progress=False)
  assert list(summary["tasks"]) == ["co_smooth"]
  assert summary["n_conditions"] == 1  # no choice/block/reward: one PSTH condition
  assert "skipping the behaviour task" in capsys.readouterr().err


def test_cli_evaluates_a_trained_run_and_fails_in_one_line(corpus_dir, tmp_path, subprocess_env, capsys):
  config = tiny_config(corpus_dir, tmp_path, **{"training.num_steps": 4, "training.eval_every": 4,
                                                 "training.checkpoint_every": 4})
  train.train_and_evaluate(config)
  run_dir = tmp_path / "tiny"
  done = subprocess.run([sys.executable, "-m", "ibl_jax.evaluate", f"--checkpoint={run_dir}", "--chunk-size=64",
                         "--no-progress", "--no-baseline", "--tasks=co_smooth,behaviour"],
                        cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  for eid in (corpus_dir / "train_eids.txt").read_text().split():
    summary = json.loads((run_dir / "eval" / eid / "summary.json").read_text())
    assert summary["eid"] == eid and set(summary["tasks"]) == {"co_smooth", "behaviour"}
    assert summary["tasks"]["co_smooth"]["n_neurons"] == summary["n_neurons"]
    assert "baseline_bps_per_neuron" not in summary["tasks"]["co_smooth"]  # --no-baseline
    assert (run_dir / "eval" / eid / "figures" / "co_smooth_psth.png").exists()

  capsys.readouterr()  # drop the training log
  assert evaluate.main([f"--checkpoint={tmp_path / 'nope'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: checkpoint") and "\n" not in err, err
  new_eid = (corpus_dir / "test_eids.txt").read_text().split()[0]
  assert evaluate.main([f"--checkpoint={run_dir}", f"--sessions={corpus_dir / new_eid}"]) == 2
  err = capsys.readouterr().err.strip()
  assert new_eid in err and "python -m ibl_jax.finetune" in err and "\n" not in err, err


def test_chunk_plan_fills_chunks_and_is_optimal_by_hand():
  for K, V, B in ((200, 700, 256), (55, 92, 24), (7, 3, 16), (1, 1, 8), (300, 1, 64), (3, 50, 8)):
    G, m = evaluate.chunk_plan(K, V, B)
    assert 1 <= G <= min(K, B) and 1 <= m <= V and m * G <= B, (K, V, B, G, m)
  # K = 200, V = 700, B = 256: G = 51 -> 4 groups x ceil(700 / 5) = 560 chunks, cost 560 + 2 x 4 = 568;
  # one group of 200 (m = 1) costs 700 + 2; G = 8, m = 32 costs 25 x 22 + 50 = 600.
  assert evaluate.chunk_plan(200, 700, 256) == (51, 5)
  assert evaluate.chunk_plan(300, 1, 64) == (64, 1)  # one variant: whole chunks of trials


class _FakeGPU:
  platform = "gpu"

  def __init__(self, gib):
    self.gib = gib

  def memory_stats(self):
    return {"bytes_limit": self.gib * 2**30}


def test_auto_chunk_size_per_cpu_device_and_by_accelerator_memory():
  paper = configs.get_config("ndt1", "paper").model
  cpus = jax.devices()
  assert evaluate.auto_chunk_size(paper, 100, 668, cpus) == evaluate.CPU_CHUNK_PER_DEVICE * len(cpus)  # 32 x 3.56 MB
  # Paper size by hand: L = 102 tokens, a row is 4 * (3*100*668 + 6*102*512 + 2*102*1024 + 2*8*102*102) bytes
  # = 4 * (200400 + 313344 + 208896 + 166464) = 3.56 MB; a quarter of 80 GiB holds 6037 rows -> 4096;
  # of 16 GiB 1207 -> 1024; of 1 GiB 75 -> 64.
  row = 4 * (3 * 100 * 668 + 6 * 102 * paper.hidden_size + 2 * 102 * paper.mlp_size
             + 2 * paper.num_heads * 102 * 102)
  assert (paper.hidden_size, paper.mlp_size, paper.num_heads) == (512, 1024, 8) and row == 3_556_416
  assert evaluate.auto_chunk_size(paper, 100, 668, [_FakeGPU(80)]) == 4096
  assert evaluate.auto_chunk_size(paper, 100, 668, [_FakeGPU(16)] * 2) == 2 * 1024
  assert evaluate.auto_chunk_size(paper, 100, 668, [_FakeGPU(1)]) == 64
